"""Readable references: exact softmax attention and the low-rank surrogate, both O(L^2).

Shapes: q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D] with Hq a multiple of Hkv (GQA).
`key_weight` [B, Lk] multiplies each key's weight exp(s_ij): 1 keeps a key, 0 masks it out,
exp(b_j) carries an additive per-key bias b_j. The tests compare every path with these, in float64;
the op reuses two small helpers (`key_center`, `taylor_polynomial`) and the guard `key_center`.

`softmax_one=True` selects outlier-free attention, softmax_1(x)_i = exp(x_i) / (1 + sum_j exp(x_j))
(Hu et al. 2024, "Outlier-efficient Hopfield layers"): ordinary softmax with one extra null key
whose logit is always 0 and whose value is 0. Masks and key weights act on the real keys only;
the null key's weight 1 always stays, so a row whose keys are all masked out gives 0.
"""

from __future__ import annotations

import torch

from .features import taylor_features


def _expand_kv(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return t.repeat_interleave(q.shape[1] // t.shape[1], dim=1)


def _allowed(q, k, causal: bool, key_weight):
    lq, lk = q.shape[-2], k.shape[-2]
    w = q.new_ones(q.shape[0], 1, lq, lk)
    if causal:
        w = w * torch.ones(lq, lk, dtype=q.dtype, device=q.device).tril()
    if key_weight is not None:
        w = w * key_weight.to(q.dtype)[:, None, None, :]
    return w


def exact_attention(q, k, v, *, scale: float, causal: bool = False, key_weight=None, softmax_one: bool = False):
    """softmax(scale * q k^T, masked) v (or softmax_1), with an explicit L x L matrix."""
    k, v = _expand_kv(q, k), _expand_kv(q, v)
    s = scale * q @ k.transpose(-1, -2)
    w = _allowed(q, k, causal, key_weight)
    s = s.masked_fill(w == 0, float("-inf")) + torch.log(w.clamp_min(torch.finfo(w.dtype).tiny))
    if not softmax_one:
        return torch.softmax(s, dim=-1) @ v
    # sum_j e^{s_ij} v_j / (1 + sum_j e^{s_ij}), both shifted by m_i = max(0, max_j s_ij) so that
    # nothing overflows; the value does not depend on m, which is held constant (detached)
    m = s.amax(-1, keepdim=True).clamp_min(0).detach()
    e = torch.exp(s - m)
    return (e @ v) / (torch.exp(-m) + e.sum(-1, keepdim=True))


def taylor_polynomial(s: torch.Tensor, degree: int) -> torch.Tensor:
    """P_g(s) = sum_{j <= g} s^j / j!."""
    out = torch.ones_like(s)
    term = torch.ones_like(s)
    for j in range(1, degree + 1):
        term = term * s / j
        out = out + term
    return out


def key_center(k: torch.Tensor, key_weight) -> torch.Tensor:
    """Mean of the unmasked keys per (batch, KV head): [B, Hkv, 1, D], without gradient."""
    k = k.detach()
    if key_weight is None:
        return k.mean(dim=-2, keepdim=True)
    valid = (key_weight > 0).to(k.dtype)[:, None, :, None]
    return (k * valid).sum(-2, keepdim=True) / valid.sum(-2, keepdim=True).clamp_min(1)


def lowrank_attention(q, k, v, *, scale: float, degree: int, causal: bool = False, key_weight=None,
                      softmax_one: bool = False):
    """The surrogate that the low-rank path computes: exp replaced by P_g on centred logits.

    Written with an explicit L x L matrix P_g(S) = Phi(Qt) Phi(Kt)^T; its autograd gradient is
    the reference for the chained low-rank backward.

    softmax_one: with centred logits s'_ij = scale q_i . (k_j - mu) and c_i = scale q_i . mu,
    softmax_1 attention is exactly sum_j e^{s'_ij} v_j / (e^{-c_i} + sum_j e^{s'_ij}) (the null
    key's centred logit is -c_i). The surrogate replaces e^{s'} by P_g(s') and keeps the null
    key's weight e^{-c_i} exact. mu is a constant (detached); c_i depends on q_i. Written plainly:
    e^{-c_i} overflows for c_i < -709 in float64 (the low-rank path itself never overflows).
    """
    mu = key_center(k, key_weight)
    qt = q * scale**0.5
    kt = (k - mu) * scale**0.5
    kt, v = _expand_kv(q, kt), _expand_kv(q, v)
    a = taylor_polynomial(qt @ kt.transpose(-1, -2), degree) * _allowed(q, kt, causal, key_weight)
    if not softmax_one:
        return (a @ v) / a.sum(-1, keepdim=True)
    c = scale * (q * _expand_kv(q, mu)).sum(-1, keepdim=True)
    return (a @ v) / (torch.exp(-c) + a.sum(-1, keepdim=True))


def lowrank_attention_features(q, k, v, *, scale: float, degree: int, key_weight=None):
    """Non-causal surrogate through the feature map, O(L k d): checks Phi against P_g."""
    mu = key_center(k, key_weight)
    pq = taylor_features(q * scale**0.5, degree)
    pk = taylor_features((k - mu) * scale**0.5, degree)
    if key_weight is not None:
        pk = pk * key_weight.to(pk.dtype)[:, None, :, None]
    pk, v = _expand_kv(q, pk), _expand_kv(q, v)
    h = pk.transpose(-1, -2) @ v
    z = pk.sum(-2)
    return (pq @ h) / (pq @ z[..., None])
