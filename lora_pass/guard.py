"""The norm guard: the logit bound R, the error bounds it implies, R_max, and the cost model.

The derivation of every formula here is in docs/guard.md; tests/ops/test_guard.py checks it.
"""

from __future__ import annotations

import functools
import math

import torch

from .ops.features import feature_rank
from .ops.naive import key_center


def _poly(x: float, degree: int) -> float:
    return sum(x**j / math.factorial(j) for j in range(degree + 1))


def taylor_relative_error(bound: float, degree: int) -> float:
    """rho_g(R) = max over |s| <= R of |P_g(s) / e^s - 1| (attained at s = +-R)."""
    if degree < 0:
        return 1.0
    return max(abs(_poly(s, degree) * math.exp(-s) - 1.0) for s in (bound, -bound))


def error_bounds(bound: float, degree: int) -> dict:
    """Worst-case normalised errors of the low-rank path when every centred logit is within R.

    Keys: "out", "dq", "dk", "dv"; the normalisations are those of `measured_errors`. The same
    bounds hold for softmax_1 attention (docs/guard.md section 9), with its dq normalisation.
    """
    rho = taylor_relative_error(bound, degree)
    rho_grad = taylor_relative_error(bound, degree - 1)
    if rho >= 1.0:
        return {name: math.inf for name in ("out", "dq", "dk", "dv")}
    eps = 2 * rho / (1 - rho)
    eps_grad = 2 * (rho + rho_grad) / (1 - rho) + eps
    return {"out": eps, "dq": eps_grad, "dk": eps_grad, "dv": eps}


@functools.lru_cache(maxsize=None)
def r_max(degree: int, tolerance: float) -> float:
    """Largest R whose error bounds (output and gradients) are all within `tolerance`."""
    lo, hi = 0.0, 64.0
    if max(error_bounds(hi, degree).values()) <= tolerance:
        return hi
    for _ in range(200):
        mid = (lo + hi) / 2
        if max(error_bounds(mid, degree).values()) <= tolerance:
            lo = mid
        else:
            hi = mid
    return lo


def tolerance_for(bound: float, degree: int) -> float:
    """The smallest tolerance whose R_max(degree, tolerance) admits `bound`: the largest of the
    error bounds at R = bound (R_max is monotone in the tolerance, the bounds monotone in R).
    A value >= 1 means no tolerance the backend accepts (0 < tolerance < 1) admits it."""
    if not math.isfinite(bound):
        return math.inf
    return max(error_bounds(bound, degree).values())


def degree_for(bound: float, tolerance: float, max_degree: int = 6) -> int | None:
    """The smallest Taylor degree g <= max_degree with R_max(g, tolerance) >= bound, or None."""
    if not math.isfinite(bound):
        return None
    return next((g for g in range(1, max_degree + 1) if r_max(g, tolerance) >= bound), None)


def norm_bound(q: torch.Tensor, k: torch.Tensor, *, scale: float, key_weight=None) -> torch.Tensor:
    """R = scale * max_i ||q_i|| * max_j ||k_j - mu|| per (batch, KV head), max over all: a 0-d tensor.

    q [B, Hq, Lq, D], k [B, Hkv, Lk, D]; masked keys (key_weight == 0) are left out of mu and of
    the maximum. NaN or Inf anywhere gives NaN or Inf, which fails the guard. Unchanged for
    softmax_1 attention: the null key's weight is exact, so only the real keys need |s'| <= R.
    """
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    q32, k32 = q.float(), k.float()
    qn = torch.linalg.vector_norm(q32, dim=-1).amax(-1).view(b, hkv, hq // hkv).amax(-1)
    kn = torch.linalg.vector_norm(k32 - key_center(k32, key_weight), dim=-1)
    if key_weight is not None:
        kn = kn * (key_weight > 0).to(kn.dtype)[:, None, :]
    # amax and vector_norm propagate NaN and Inf, so a non-finite input fails `bound <= r_max`
    return (scale * qn * kn.amax(-1)).amax()


def measured_errors(approx: dict, ref: dict, q, k, v, dout, *, scale: float, key_weight=None,
                    softmax_one: bool = False) -> dict:
    """Normalised errors of an approximate attention against a reference (both dicts of
    "out", "dq", "dk", "dv"), in the normalisation that `error_bounds` bounds:

    out: max_i ||O~_i - O_i|| / max_j ||v_j||
    dq:  max_i ||dQ~_i - dQ_i|| / (scale max_i ||dO_i|| max_j ||v_j|| max_j ||k_j - mu||)
    dk:  sum_j ||dK~_j - dK_j|| / (scale max_i ||q_i|| max_j ||v_j|| sum_i ||dO_i||)
    dv:  sum_j ||dV~_j - dV_j|| / sum_i ||dO_i||
    Maxima and sums are per (batch, KV head group); the worst group is returned.
    `softmax_one`: softmax_1 attention, whose null key sits at the centred position 0 - mu, so the
    dq normaliser's max_j ||k_j - mu|| becomes max(max_j ||k_j - mu||, ||mu||) (docs/guard.md 9).
    """
    f = lambda t: t.detach().double()  # noqa: E731
    b, hq, lq, d = q.shape
    hkv = k.shape[1]

    def rows(t):  # [B, H, L, X] -> row norms grouped per KV head: [B, Hkv, H / Hkv * L]
        return torch.linalg.vector_norm(f(t), dim=-1).reshape(b, hkv, -1)

    valid = None if key_weight is None else (key_weight > 0)[:, None, :].double()
    vn = rows(v) if valid is None else rows(v) * valid
    mu = key_center(f(k), key_weight)
    kc = f(k) - mu
    kn = rows(kc) if valid is None else rows(kc) * valid
    qn, don = rows(q), rows(dout)
    vmax, kmax, qmax = vn.amax(-1), kn.amax(-1), qn.amax(-1)
    if softmax_one:
        kmax = torch.maximum(kmax, torch.linalg.vector_norm(mu, dim=-1).reshape(b, hkv))

    def diff(name):
        return rows(f(approx[name]) - f(ref[name]))

    tiny = 1e-300
    out = diff("out").amax(-1) / (vmax + tiny)
    dq = diff("dq").amax(-1) / (scale * don.amax(-1) * vmax * kmax + tiny)
    dk = diff("dk").sum(-1) / (scale * qmax * vmax * don.sum(-1) + tiny)
    dv = diff("dv").sum(-1) / (don.sum(-1) + tiny)
    return {name: float(t.max()) for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv))}


# --- cost model -------------------------------------------------------------------------------
# Crossover sequence lengths for d = 64, g = 2 (rank 2,145), forward + backward. CPU: measured by
# bench/attention.py on one thread, the op compiled as the backend compiles it (C++ wrapper), on an
# Intel Xeon (bench/results/cpu-intel-xeon/attention_1426.json, interpolated between the measured
# lengths: 7,041 causal, 2,771 non-causal; 7,912 and 3,162 in its later run). The same op on an
# AMD EPYC crosses over earlier (bench/results/cpu-amd-epyc/attention.json: 5,789 and 2,920), so
# the causal entry is the slower machine's and the non-causal one lies within both machines' runs.
# CUDA: not measured yet; a FLOP-based placeholder until a GPU run of bench/attention.py
# replaces it. Other (d, g) scale with the feature rank: the low-rank cost is
# O(L k d) against O(L^2 d) for exact attention, so the crossover moves with k.
CROSSOVER_D64_G2 = {
    ("cpu", True): 7000,
    ("cpu", False): 2800,
    ("cuda", True): 8192,
    ("cuda", False): 8192,
}


def crossover_length(head_dim: int, degree: int, device_type: str, causal: bool) -> int:
    """Sequence length above which the low-rank path is expected to be faster than exact."""
    base = CROSSOVER_D64_G2.get((device_type, causal), CROSSOVER_D64_G2[("cuda", causal)])
    return int(math.ceil(base * feature_rank(head_dim, degree) / feature_rank(64, 2)))

