"""Exact attention as explicit forward and backward kernels, for the guarded op.

Inside `torch.cond` the backward cannot be left to autograd, so the exact branch calls the same
fused ATen kernels that Inductor's own SDPA lowering uses: the flash kernel on CPU, the
memory-efficient kernel on CUDA (which takes masks and float32), and an explicit softmax
elsewhere. Each forward returns (out, logsumexp) and the backward takes them back.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten


def _expand_kv(q, t):
    g = q.shape[1] // t.shape[1]
    return t if g == 1 else t.repeat_interleave(g, dim=1)


def _reduce_kv(grad, heads):
    b, hq, length, d = grad.shape
    return grad if hq == heads else grad.view(b, heads, hq // heads, length, d).sum(2)


def additive_mask(key_weight, q):
    """[B, Lk] key weights -> additive [B, 1, 1, Lk] mask in q's dtype (log 0 = -inf)."""
    if key_weight is None:
        return None
    return torch.log(key_weight.to(q.dtype))[:, None, None, :]


def exact_attention_forward(q, k, v, *, scale, causal, key_weight=None):
    """(out [B, Hq, L, D], logsumexp [B, Hq, L] float32) of softmax attention."""
    k, v = _expand_kv(q, k), _expand_kv(q, v)
    mask = additive_mask(key_weight, q)
    if q.device.type == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=scale
        )
        return out, lse.float()
    if q.device.type == "cuda":
        bias = None if mask is None else mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out, lse, _, _ = aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, causal, scale=scale
        )
        return out, lse[..., : q.shape[2]].float()
    s = _logits(q, k, scale, causal, mask)
    lse = torch.logsumexp(s, dim=-1)
    return (torch.exp(s - lse[..., None]) @ v.float()).to(q.dtype), lse


def exact_attention_backward(dout, q, k, v, out, lse, *, scale, causal, key_weight=None):
    """(dq, dk, dv) of `exact_attention_forward`, K and V gradients summed over GQA groups."""
    heads = k.shape[1]
    k, v = _expand_kv(q, k), _expand_kv(q, v)
    mask = additive_mask(key_weight, q)
    if q.device.type == "cpu":
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale
        )
    elif q.device.type == "cuda":
        bias = None if mask is None else mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        pad = (-q.shape[2]) % 32
        lse_padded = torch.nn.functional.pad(lse, (0, pad)) if pad else lse
        zero = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, bias, out, lse_padded, zero, zero, 0.0, [True, True, True, False],
            causal, scale=scale,
        )
    else:
        p = torch.exp(_logits(q, k, scale, causal, mask) - lse[..., None])
        do = dout.float()
        dv = p.transpose(-1, -2) @ do
        dp = do @ v.float().transpose(-1, -2)
        ds = p * (dp - (do * out.float()).sum(-1, keepdim=True))
        dq, dk = scale * ds @ k.float(), scale * ds.transpose(-1, -2) @ q.float()
        dq, dk, dv = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    return dq, _reduce_kv(dk, heads), _reduce_kv(dv, heads)


def _logits(q, k, scale, causal, mask):
    s = scale * q.float() @ k.float().transpose(-1, -2)
    if causal:
        keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return s if mask is None else s + mask.float()
