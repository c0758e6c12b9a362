"""The exact branch calls the kernel scaled_dot_product_attention itself would pick
(ops/exact.py `sdpa_kernel`), and the branch is correct whichever kernel that is."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend

from lora_pass.ops import exact
from lora_pass.ops.naive import exact_attention

NAMES = {int(SDPBackend.FLASH_ATTENTION): "flash", int(SDPBackend.EFFICIENT_ATTENTION): "efficient",
         int(SDPBackend.MATH): "math"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_choice_is_sdpa_own_on_real_fake_and_traced_inputs(dtype, masked):
    q = torch.randn(2, 3, 24, 16, dtype=dtype)
    mask = torch.zeros(2, 1, 1, 24, dtype=dtype) if masked else None
    own = NAMES[int(torch._fused_sdp_choice(q, q, q, mask, 0.0, not masked, scale=0.25))]
    assert exact.sdpa_kernel(q, q, q, mask, not masked, 0.25) == own
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:  # a trace's fake mode: torch's own answer there is "math"
        fq = mode.from_tensor(q)
        fm = None if mask is None else mode.from_tensor(mask)
        assert NAMES[int(torch._fused_sdp_choice(fq, fq, fq, fm, 0.0, not masked, scale=0.25))] == "math"
        assert exact.sdpa_kernel(fq, fq, fq, fm, not masked, 0.25) == own
    seen = []
    compiled = torch.compile(lambda t: seen.append(exact.sdpa_kernel(t, t, t, mask, not masked, 0.25)) or t + 1,
                             backend="eager", fullgraph=True)
    compiled(q)
    assert seen == [own]


def test_cpu_float_inputs_take_the_flash_kernel():
    q = torch.randn(1, 2, 40, 64)
    assert exact.sdpa_kernel(q, q, q, None, True, 0.125) == "flash"


@pytest.mark.parametrize("kernel", ["flash", "math"])
@pytest.mark.parametrize("softmax_one", [False, True])
def test_branch_matches_reference_whichever_kernel(monkeypatch, kernel, softmax_one):
    """Forward and every gradient of the exact branch against the float64 reference, with the
    kernel SDPA would pick forced to each of the CPU's choices."""
    monkeypatch.setattr(exact, "_choice", lambda *metadata: kernel)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 33, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA: two query heads per KV head
    weight = torch.ones(2, 33, dtype=torch.float64)
    weight[1, 25:] = 0
    dout = torch.randn(2, 4, 33, 16, generator=gen, dtype=torch.float64)
    kw = dict(scale=0.3, causal=True, key_weight=weight, softmax_one=softmax_one)
    out, lse = exact.exact_attention_forward(q, k, v, **kw)
    dq, dk, dv = exact.exact_attention_backward(dout, q, k, v, out, lse, **kw)
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = exact_attention(*x, **kw)
    rq, rk, rv = torch.autograd.grad(ref, x, dout)
    for got, want in ((out, ref), (dq, rq), (dk, rk), (dv, rv)):
        torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-10)
