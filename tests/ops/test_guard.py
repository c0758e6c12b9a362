"""The guard: the written error bound holds wherever the guard lets the low-rank path run."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_pass import guard
from lora_pass.ops import naive
from lora_pass.ops.attention import AttentionConfig, guarded_attention, new_stats, STATS_FIELDS
from lora_pass.ops.lowrank import lowrank_attention_backward, lowrank_attention_forward


def test_taylor_error_matches_the_algorithm_note():
    assert guard.taylor_relative_error(0.5, 2) == pytest.approx(0.03, abs=0.005)
    assert guard.taylor_relative_error(1.0, 2) == pytest.approx(0.36, abs=0.01)
    assert guard.taylor_relative_error(0.5, 4) == pytest.approx(0.0004, abs=0.0001)
    assert guard.taylor_relative_error(1.0, 4) == pytest.approx(0.019, abs=0.001)


@pytest.mark.parametrize("degree", [1, 2, 3, 4])
def test_taylor_error_is_the_maximum_over_the_interval(degree):
    for bound in (0.1, 0.5, 1.0, 2.0):
        s = torch.linspace(-bound, bound, 20001, dtype=torch.float64)
        grid = (naive.taylor_polynomial(s, degree) * torch.exp(-s) - 1).abs().max().item()
        assert guard.taylor_relative_error(bound, degree) == pytest.approx(grid, rel=1e-6)


def test_r_max_is_monotone_and_meets_the_tolerance():
    for degree in (1, 2, 3, 4):
        previous = 0.0
        for tol in (0.01, 0.05, 0.1, 0.3):
            r = guard.r_max(degree, tol)
            assert r > previous
            assert max(guard.error_bounds(r, degree).values()) <= tol
            assert max(guard.error_bounds(r * 1.01, degree).values()) > tol
            previous = r
    assert guard.r_max(4, 0.05) > guard.r_max(2, 0.05) > guard.r_max(1, 0.05)


def _errors(q, k, v, w, causal, degree, scale, dout, softmax_one=False):
    """Normalised errors of the low-rank path against float64 exact (softmax or softmax_1) attention."""
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = naive.exact_attention(qr, kr, vr, scale=scale, causal=causal, key_weight=w, softmax_one=softmax_one)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), dout)
    kw = dict(scale=scale, degree=degree, causal=causal, key_weight=w, chunk=5, softmax_one=softmax_one)
    out = lowrank_attention_forward(q, k, v, **kw)
    grads = lowrank_attention_backward(dout, q, k, v, out, **kw)
    approx = dict(zip(("out", "dq", "dk", "dv"), (out, *grads)))
    exact = dict(zip(("out", "dq", "dk", "dv"), (ref, *ref_grads)))
    return guard.measured_errors(approx, exact, q, k, v, dout, scale=scale, key_weight=w, softmax_one=softmax_one)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    length=st.integers(2, 17),
    d=st.sampled_from([2, 4, 8]),
    heads=st.sampled_from([(1, 1), (2, 1), (2, 2)]),
    causal=st.booleans(),
    mask=st.sampled_from([None, "padding", "bias"]),
    degree=st.sampled_from([1, 2, 3]),
    tolerance=st.sampled_from([0.02, 0.05, 0.2]),
    ratio=st.floats(0.3, 1.6),
    offset=st.floats(0.0, 8.0),
    softmax_one=st.booleans(),
)
def test_guard_soundness_property(seed, length, d, heads, causal, mask, degree, tolerance, ratio, offset,
                                  softmax_one):
    """Inputs scaled so R lands around R_max: whenever R <= R_max, every error (softmax, or softmax_1
    against float64 exact softmax_1 attention) is within the written bound and the tolerance."""
    g = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    q = torch.randn(1, hq, length, d, generator=g, dtype=torch.float64)
    # centring must absorb the offset; for softmax_1 the null key's shift c_i grows with it
    k = torch.randn(1, hkv, length, d, generator=g, dtype=torch.float64) + offset
    v = torch.randn(1, hkv, length, d, generator=g, dtype=torch.float64) * 3
    w = None
    if mask is not None:
        w = (torch.rand(1, length, generator=g, dtype=torch.float64) > 0.4).double()
        w[:, 0] = 1
        if mask == "bias":
            w = w * torch.exp(torch.randn(1, length, generator=g, dtype=torch.float64))
    scale = d**-0.5
    r_max = guard.r_max(degree, tolerance)
    r0 = float(guard.norm_bound(q, k, scale=scale, key_weight=w))
    factor = math.sqrt(ratio * r_max / r0) if r0 > 0 else 1.0
    q, k = q * factor, k * factor
    bound = float(guard.norm_bound(q, k, scale=scale, key_weight=w))
    dout = torch.randn(1, hq, length, d, generator=g, dtype=torch.float64)
    if bound > r_max:
        return  # the guard sends this call to the exact path
    errors = _errors(q, k, v, w, causal, degree, scale, dout, softmax_one)
    limits = guard.error_bounds(bound, degree)
    for name, err in errors.items():
        assert err <= limits[name] * (1 + 1e-9) + 1e-12, (name, err, limits[name])
        assert err <= tolerance, (name, err, tolerance)


def test_norm_bound_uses_centred_unmasked_keys():
    q = torch.ones(1, 1, 3, 2)
    k = torch.tensor([[[[10.0, 10.0], [12.0, 10.0], [100.0, 100.0]]]])
    w = torch.tensor([[1.0, 1.0, 0.0]])
    bound = guard.norm_bound(q, k, scale=0.5, key_weight=w)
    assert float(bound) == pytest.approx(0.5 * math.sqrt(2) * 1.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_inputs_take_the_exact_path(bad):
    q = torch.randn(1, 2, 8, 4) * 0.01
    k, v = q.clone(), torch.randn(1, 2, 8, 4)
    q[0, 1, 3, 2] = bad
    stats = new_stats("cpu")
    cfg = AttentionConfig(scale=0.5, causal=True, degree=2, r_max=guard.r_max(2, 0.05))
    out = guarded_attention(q, k, v, cfg, stats)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5)
    torch.testing.assert_close(out, ref, equal_nan=True)
    counts = dict(zip(STATS_FIELDS, stats.tolist()))
    assert counts["forward_exact"] == 1 and counts["forward_lowrank"] == 0


def test_guard_picks_the_path_per_call():
    cfg = AttentionConfig(scale=0.5, causal=False, degree=2, r_max=guard.r_max(2, 0.05))
    stats = new_stats("cpu")
    torch.manual_seed(0)
    small = torch.randn(1, 1, 8, 4) * 0.05
    big = torch.randn(1, 1, 8, 4) * 3
    for q in (small, big, small):
        x = q.clone().requires_grad_()
        guarded_attention(x, x, x, cfg, stats).sum().backward()
    counts = dict(zip(STATS_FIELDS, stats.tolist()))
    assert counts == {**counts, "forward_lowrank": 2, "forward_exact": 1, "backward_lowrank": 2, "backward_exact": 1}
    assert counts["max_bound"] == pytest.approx(float(guard.norm_bound(big, big, scale=0.5)))


def test_cost_model_scales_with_feature_rank():
    base = guard.crossover_length(64, 2, "cpu", True)
    assert guard.crossover_length(32, 2, "cpu", True) < base < guard.crossover_length(64, 3, "cpu", True)
