"""Memory layouts of the op (ops/layout.py): the model's heads-inside q, k, v pass without copies,
both paths give the flash kernel's layouts, operands that share memory are copied, and the
compiled exact path allocates no more than plain SDPA."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lora_pass.lowering import lowrank_inductor_defaults, op_backend
from lora_pass.ops import layout
from lora_pass.ops.attention import STATS_FIELDS, AttentionConfig, _operands, guarded_attention, new_stats

B, H, L, D = 1, 4, 40, 8


def heads_inside(seed, scale=0.1, b=B, h=H, length=L):
    """[b, h, length, D] stored as [b, length, h, D], as Hugging Face attention makes q, k, v."""
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(b, length, h, D, generator=g, dtype=torch.float64)).transpose(1, 2)


def test_layout_helpers():
    t = heads_inside(0)
    assert layout.is_heads_inner(t) and not layout.is_heads_inner(t.contiguous())
    assert layout.heads_inner(t).data_ptr() == t.data_ptr()  # already heads inside: no copy
    assert layout.like(t.contiguous(), t).stride() == t.stride()
    assert layout.like(t, t.contiguous()).is_contiguous()
    one = torch.zeros(1, 1, 6, 4).as_strided((1, 1, 6, 4), (4, 4, 4, 1))  # size-1 dims, odd strides
    assert layout.row_major(one).stride() == (24, 24, 4, 1)
    torch.testing.assert_close(layout.heads_inner(t.contiguous()), t)


@pytest.mark.parametrize("paths", ["lowrank", "exact"])
@pytest.mark.parametrize("b", [1, 2])
def test_both_paths_give_flash_layouts_and_equal_values(paths, b):
    """Output like q, gradients heads inside, values those of contiguous inputs."""
    q, k, v = (heads_inside(s, b=b) for s in range(3))
    cfg = AttentionConfig(scale=D**-0.5, causal=True, degree=2, r_max=0.5, paths=paths)
    a = [t.clone().requires_grad_() for t in (q, k, v)]
    c = [t.contiguous().requires_grad_() for t in (q, k, v)]
    out, ref = guarded_attention(*a, cfg), guarded_attention(*c, cfg)
    assert out.stride() == q.stride() and ref.is_contiguous()
    dout = torch.randn_like(ref)
    grads, ref_grads = torch.autograd.grad(out, a, dout), torch.autograd.grad(ref, c, dout)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        assert layout.is_heads_inner(g) and layout.is_heads_inner(r)
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_operands_sharing_memory_are_copied_and_others_are_not():
    fused = torch.randn(B, L, 3 * H * D, dtype=torch.float64)
    q, k, v = (t.view(B, L, H, D).transpose(1, 2) for t in fused.split(H * D, dim=-1))
    oq, ok, ov = _operands(q, k, v)
    assert oq is q  # the first user of a storage keeps it
    assert ok.untyped_storage().data_ptr() != fused.untyped_storage().data_ptr()
    assert ov.untyped_storage().data_ptr() not in (fused.untyped_storage().data_ptr(), ok.untyped_storage().data_ptr())
    torch.testing.assert_close((ok, ov), (k, v), rtol=0, atol=0)
    separate = [heads_inside(s) for s in range(3)]
    assert all(a is b for a, b in zip(_operands(*separate), separate))
    same = _operands(separate[0], separate[0])
    assert same[0] is separate[0] and same[1] is not separate[0]
    strided = torch.randn(B, H, L, 2 * D)[..., ::2]
    assert _operands(strided)[0].stride(-1) == 1


def test_fused_projection_views_compile_through_cond():
    """q, k, v split from one tensor (GPT-2's c_attn) reach the guarded op's cond: compiled
    forward and gradients equal eager."""
    x = torch.randn(B, L, H * D, dtype=torch.float32)
    w = torch.randn(3 * H * D, H * D, dtype=torch.float32) * 0.02
    cfg = AttentionConfig(scale=D**-0.5, causal=True, degree=2, r_max=0.5, paths="guarded")

    @torch.compiler.allow_in_graph
    def op(q, k, v):
        return guarded_attention(q, k, v, cfg)

    def model(x, w):
        q, k, v = (t.view(B, L, H, D).transpose(1, 2) for t in (x @ w.t()).split(H * D, dim=-1))
        return op(q, k, v).transpose(1, 2).reshape(B, L, H * D)

    compiled = torch.compile(model, backend=op_backend(), fullgraph=True)
    a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
    out, ref = compiled(x, a), model(x, b)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    dout = torch.randn_like(ref)
    (ga,), (gb,) = torch.autograd.grad(out, (a,), dout), torch.autograd.grad(ref, (b,), dout)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


def _allocated_peak_mb(step) -> float:
    """MiB one call of `step` allocates above what is live before it: the benchmarks' CPU measure
    (bench/common.py, loaded from the checkout)."""
    path = Path(__file__).resolve().parents[2] / "bench" / "common.py"
    spec = importlib.util.spec_from_file_location("lora_pass_bench_common", path)
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    return common.allocated_peak_mb(step)


def test_compiled_exact_path_allocates_no_more_than_plain_sdpa():
    """A step of attention on heads-inside projections (the Hugging Face layout): the op on its
    exact path allocates what Inductor-compiled SDPA does, no copies of q, k, v, out or grads."""
    length, heads = 256, 4
    xs = [torch.randn(1, length, heads * 64, requires_grad=True) for _ in range(3)]
    dout = torch.randn(1, length, heads * 64)
    cfg = AttentionConfig(scale=0.125, causal=True, degree=2, r_max=0.2, paths="exact")

    @torch.compiler.allow_in_graph
    def op(q, k, v):
        return guarded_attention(q, k, v, cfg)

    def model(attention, backend="inductor"):
        def f(*xs):
            q, k, v = (t.view(1, length, heads, 64).transpose(1, 2) for t in xs)
            return attention(q, k, v).transpose(1, 2).reshape(1, length, heads * 64)
        return torch.compile(f, backend=backend, fullgraph=True)

    sdpa = model(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125))
    peaks = {}
    for name, fn in (("sdpa", sdpa), ("op", model(op, op_backend()))):
        def step(fn=fn):
            return torch.autograd.grad(fn(*xs), xs, dout)
        step()
        peaks[name] = _allocated_peak_mb(step)
    assert peaks["op"] <= peaks["sdpa"], peaks


@pytest.mark.parametrize("n", [0, 1, 2, 7, 16, 17, 40])
def test_reverse_leading_reverses_in_place(n):
    t = torch.randn(n, 3, 2)
    want, ptr = t.flip(0), t.data_ptr()
    layout.reverse_leading_(t)
    assert torch.equal(t, want) and t.data_ptr() == ptr


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_compiled_lowrank_path_copies_no_output(causal):
    """A step of the guarded op (guard passing, low-rank path, several chunks) allocates its four
    L x d results and less than one more: the reverse scan's dK, dV are reordered in place and
    the cond outputs keep their storage (each was an L x d copy)."""
    length, d = 2048, 16
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, length, d, generator=g) * s for s in (0.05, 0.05, 1.0))
    for t in (q, k, v):
        t.requires_grad_()
    dout = torch.randn(1, 1, length, d, generator=g)
    cfg = AttentionConfig(scale=d**-0.5, causal=causal, degree=2, r_max=0.5)
    stats = new_stats("cpu")

    @torch.compiler.allow_in_graph
    def op(q, k, v, s):
        return guarded_attention(q, k, v, cfg, s)

    # with the settings the backend compiles a low-rank path with (the C++ wrapper on CPU)
    fn = torch.compile(lambda q, k, v: op(q, k, v, stats), backend=op_backend(lowrank_inductor_defaults("cpu")),
                       fullgraph=True)

    def step():
        return torch.autograd.grad(fn(q, k, v), (q, k, v), dout)

    step()
    peak = _allocated_peak_mb(step)
    counts = dict(zip(STATS_FIELDS, stats.tolist()))
    assert counts["forward_lowrank"] == 2 and counts["forward_exact"] == 0
    block = length * d * 4 / 2**20  # one L x d float32 tensor
    assert peak < 5 * block, (peak, block)
