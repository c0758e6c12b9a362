"""Exact attention as explicit forward and backward kernels, for the guarded op.

Inside `torch.cond` the backward cannot be left to autograd, so the exact branch calls the fused
ATen kernel that scaled_dot_product_attention itself would pick for the same inputs
(`sdpa_kernel`): on CPU the flash kernel (math where torch would take it), on CUDA the flash
kernel where it applies (bf16 / fp16, no mask), else the memory-efficient kernel (masks,
float32), else an explicit softmax. Each forward returns (out, logsumexp) and the backward takes
them back. The logsumexp
is float64 for float64 inputs (the CPU kernel's backward takes it in the inputs' dtype), float32
otherwise.

softmax_one (outlier-free attention): softmax_1(s)_ij = e^{s_ij} / (1 + sum_l e^{s_il}) = P_ij
sigma(lse_i), with P the ordinary softmax, lse_i its (natural) logsumexp and sigma the logistic
function, so O1_i = sigma(lse_i) O_i. The forward scales the kernel's output by sigma(lse) and
returns the ordinary lse. Its logit gradient is dS_ij = P1_ij (dO_i . v_j - dO_i . O1_i) and
dV_j = sum_i P1_ij dO_i. The kernels' backward computes dS_ij = P_ij (dO'_i . v_j - dO'_i . O'_i)
and dV_j = sum_i P_ij dO'_i from (dO', O', lse); with dO' = sigma(lse) dO and O' = O1 these are
exactly the softmax_1 gradients, so the same kernels serve both. lse = -inf (a row with every key
masked) gives sigma = 0 and an output of 0.
"""

from __future__ import annotations

import functools

import torch

aten = torch.ops.aten


def _expand_kv(q, t):
    g = q.shape[1] // t.shape[1]
    return t if g == 1 else t.repeat_interleave(g, dim=1)


def _reduce_kv(grad, heads):
    b, hq, length, d = grad.shape
    return grad if hq == heads else grad.view(b, heads, hq // heads, length, d).sum(2)


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _null_factor(lse, t):
    """sigma(lse)[..., None] * t in t's dtype (lse's precision): softmax -> softmax_1 scaling."""
    return (t.to(lse.dtype) * torch.sigmoid(lse)[..., None]).to(t.dtype)


def additive_mask(key_weight, q):
    """[B, Lk] key weights -> additive [B, 1, 1, Lk] mask in q's dtype (log 0 = -inf)."""
    if key_weight is None:
        return None
    return torch.log(key_weight.to(q.dtype))[:, None, None, :]


#: The kernels the exact branch implements (forward and backward), in SDPA's order of preference,
#: by their SDPBackend names; SDPA's choice among them is `sdpa_kernel`'s answer (cuDNN attention,
#: which SDPA may prefer on some GPUs, is not among them: its next choice is taken).
KERNELS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


def _hint(n) -> int:
    """A size as an int: a symbolic size's hint (dynamic shapes), else the size."""
    if isinstance(n, torch.SymInt):
        hint = n.node.hint
        return int(hint) if hint is not None else 1
    return int(n)


def sdpa_kernel(q, k, v, mask, causal: bool, scale) -> str:
    """The kernel ("flash", "efficient" or "math") that F.scaled_dot_product_attention picks for
    these inputs among `KERNELS`: torch's own choice (`torch._fused_sdp_choice`, which checks
    the device, dtype, head dim, mask and alignment), with the kernels the branch does not
    implement disabled.

    The choice is asked on real tensors of the inputs' device, dtype, head dim and lengths (one
    batch, one head) outside every dispatch mode: under the fake mode of a trace torch answers
    "math" whatever the inputs, while at run time the same SDPA call takes a fused kernel. The
    answer depends on metadata alone and is computed once per combination (`_choice`).
    """
    device = q.device
    return _choice(device.type, device.index, q.dtype, (_hint(q.shape[2]), _hint(q.shape[3])),
                   (_hint(k.shape[2]), _hint(k.shape[3])), (_hint(v.shape[2]), _hint(v.shape[3])),
                   None if mask is None else (mask.dtype, _hint(mask.shape[-1])), bool(causal), scale)


@torch.compiler.assume_constant_result
def _choice(*metadata) -> str:
    """`sdpa_kernel` on metadata only: a constant to Dynamo, computed once per combination."""
    return _choice_cached(*metadata)


@functools.lru_cache(maxsize=256)
def _choice_cached(device_type, device_index, dtype, q_shape, k_shape, v_shape, mask, causal, scale) -> str:
    from torch.nn.attention import SDPBackend
    from torch.nn.attention import sdpa_kernel as allowed_kernels
    from torch.utils._python_dispatch import _disable_current_modes

    backends = {name: getattr(SDPBackend, backend) for name, backend in KERNELS.items()}
    device = torch.device(device_type, device_index)
    with _disable_current_modes():
        q, k, v = (torch.empty((1, 1, *shape), dtype=dtype, device=device) for shape in (q_shape, k_shape, v_shape))
        m = None if mask is None else torch.zeros((1, 1, 1, mask[1]), dtype=mask[0], device=device)
        with allowed_kernels(list(backends.values())):
            choice = int(torch._fused_sdp_choice(q, k, v, m, 0.0, causal, scale=scale))
    return next((name for name, backend in backends.items() if int(backend) == choice), "math")


def exact_attention_forward(q, k, v, *, scale, causal, key_weight=None, softmax_one=False):
    """(out [B, Hq, L, D], logsumexp [B, Hq, L]) of softmax attention (softmax_1 attention with
    `softmax_one`; the logsumexp is that of the ordinary softmax in both cases)."""
    k, v = _expand_kv(q, k), _expand_kv(q, v)
    mask = additive_mask(key_weight, q)
    device, kernel = q.device.type, _kernel(q, k, v, mask, causal, scale)
    if device == "cpu" and kernel != "math":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=scale
        )
    elif device == "cuda" and kernel == "flash":
        out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    elif device == "cuda" and kernel == "efficient":
        bias = None if mask is None else mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out, lse, _, _ = aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, causal, scale=scale
        )
        lse = lse[..., : q.shape[2]]
    else:
        return _math_forward(q, k, v, scale, causal, mask, softmax_one)
    lse = lse.to(_lse_dtype(q))
    return (_null_factor(lse, out) if softmax_one else out), lse


def _kernel(q, k, v, mask, causal, scale) -> str:
    """`sdpa_kernel` on CPU and CUDA; "math" (the explicit softmax) on other devices."""
    return sdpa_kernel(q, k, v, mask, causal, scale) if q.device.type in ("cpu", "cuda") else "math"


def exact_attention_backward(dout, q, k, v, out, lse, *, scale, causal, key_weight=None, softmax_one=False):
    """(dq, dk, dv) of `exact_attention_forward`, K and V gradients summed over GQA groups.

    `out` and `lse` are the forward's: with `softmax_one`, out is the softmax_1 output and lse
    the ordinary logsumexp.
    """
    heads = k.shape[1]
    k, v = _expand_kv(q, k), _expand_kv(q, v)
    mask = additive_mask(key_weight, q)
    kernel = _kernel(q, k, v, mask, causal, scale)
    if softmax_one and kernel != "math":
        dout = _null_factor(lse, dout)  # dO' = sigma(lse) dO, with O' = O1 (module docstring)
    if q.device.type == "cpu" and kernel != "math":
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale
        )
    elif q.device.type == "cuda" and kernel == "flash":
        empty = q.new_empty(0, dtype=torch.int32)
        seed = torch.zeros((), dtype=torch.int64, device=q.device)  # no dropout: not read
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse.float(), empty, empty, q.shape[2], k.shape[2], 0.0, causal, seed, seed,
            scale=scale,
        )
    elif q.device.type == "cuda" and kernel == "efficient":
        bias = None if mask is None else mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        pad = (-q.shape[2]) % 32
        lse_padded = torch.nn.functional.pad(lse, (0, pad)) if pad else lse
        zero = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, bias, out, lse_padded, zero, zero, 0.0, [True, True, True, False],
            causal, scale=scale,
        )
    else:
        dq, dk, dv = _math_backward(dout, q, k, v, out, lse, scale, causal, mask, softmax_one)
    return dq, _reduce_kv(dk, heads), _reduce_kv(dv, heads)


def _math_forward(q, k, v, scale, causal, mask, softmax_one=False):
    """Explicit-softmax forward (where SDPA would take its math kernel), in float32 (float64 for
    float64 inputs); k, v already expanded."""
    s = _logits(q, k, scale, causal, mask)
    lse = torch.logsumexp(s, dim=-1)
    return (torch.exp(s - _normaliser(lse, softmax_one)[..., None]) @ v.to(lse.dtype)).to(q.dtype), lse


def _math_backward(dout, q, k, v, out, lse, scale, causal, mask, softmax_one=False):
    """Explicit-softmax backward; k, v expanded, gradients not reduced over GQA groups.

    The weights P (P1 with softmax_one) are rebuilt from lse; dS = P (dO . v - dO . O) holds for
    both with O the forward's output (module docstring).
    """
    p = torch.exp(_logits(q, k, scale, causal, mask) - _normaliser(lse, softmax_one)[..., None])
    acc = _lse_dtype(q)
    do = dout.to(acc)
    dv = p.transpose(-1, -2) @ do
    dp = do @ v.to(acc).transpose(-1, -2)
    ds = p * (dp - (do * out.to(acc)).sum(-1, keepdim=True))
    dq, dk = scale * ds @ k.to(acc), scale * ds.transpose(-1, -2) @ q.to(acc)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _normaliser(lse, softmax_one):
    """log of the softmax denominator: lse, or log(1 + e^lse) for softmax_1 (0 where lse = -inf,
    so that a row whose keys are all masked gets weights 0 instead of e^{-inf + inf})."""
    return torch.logaddexp(lse, torch.zeros_like(lse)) if softmax_one else lse


def _logits(q, k, scale, causal, mask):
    acc = _lse_dtype(q)
    s = scale * q.to(acc) @ k.to(acc).transpose(-1, -2)
    if causal:
        keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return s if mask is None else s + mask.to(acc)
