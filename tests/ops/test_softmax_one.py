"""softmax_1 (outlier-free) attention, e^{s_ij} / (1 + sum_l e^{s_il}): the references, the low-rank
and exact paths forward and every gradient, the guarded op (eager, gradcheck, compiled) and the
guard's error bound (docs/guard.md section 9)."""

from __future__ import annotations

import pytest
import torch

from lora_pass import guard
from lora_pass.lowering import op_backend
from lora_pass.ops import exact, lowrank, naive
from lora_pass.ops.attention import STATS_FIELDS, AttentionConfig, guarded_attention, new_stats
from tests.ops.test_lowrank import case_id


def make_inputs(b, hq, hkv, length, d, mask, *, seed, dtype=torch.float64, q_scale=0.3, key_mean=0.5):
    """Random q, k, v (keys around a common mean, so that c_i = scale q_i . mu is not 0) and key
    weights: "padding" (about 30% masked), "many" (batch 0 padded, batch 1 keeps only its last two
    keys: non-causal rows see two keys, causal rows before them see none), "bias" (padding times
    positive weights)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, length, d, generator=g, dtype=torch.float64) * q_scale
    k = torch.randn(b, hkv, length, d, generator=g, dtype=torch.float64) * q_scale + key_mean
    v = torch.randn(b, hkv, length, d, generator=g, dtype=torch.float64)
    w = None
    if mask is not None:
        w = (torch.rand(b, length, generator=g, dtype=torch.float64) > 0.3).double()
        w[:, 0] = 1
        if mask == "many":
            w[-1] = 0
            w[-1, -2:] = 1
        if mask == "bias":
            w = w * (torch.rand(b, length, generator=g, dtype=torch.float64) + 0.5)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(w)


def randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def grads_of(fn, inputs, dout):
    """(output, gradients of every input) by autograd."""
    leaves = tuple(t.clone().requires_grad_() for t in inputs)
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, dout)


def _exact(q, k, v, dout, *, scale, causal, key_weight):
    """Naive exact softmax_1 attention and its autograd gradients."""
    return grads_of(lambda q, k, v: naive.exact_attention(q, k, v, scale=scale, causal=causal, key_weight=key_weight,
                                                          softmax_one=True), (q, k, v), dout)


def assert_all_close(got, want, rtol, atol):
    for name, a, b in zip(("q", "k", "v"), got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"d{name}: {m}")


# --- the references --------------------------------------------------------------------------


def _appended_zero_column(q, k, v, scale, causal, w):
    """softmax over the masked logits with a zero logit appended, that column dropped."""
    k, v = naive._expand_kv(q, k), naive._expand_kv(q, v)
    s = scale * q @ k.transpose(-1, -2)
    allowed = naive._allowed(q, k, causal, w)
    s = s.masked_fill(allowed == 0, float("-inf")) + torch.log(allowed.clamp_min(torch.finfo(s.dtype).tiny))
    s = torch.cat([s, s.new_zeros(s.shape[:-1] + (1,))], dim=-1)
    return torch.softmax(s, dim=-1)[..., :-1] @ v


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask", [None, "many", "bias"])
def test_naive_exact_is_softmax_with_a_zero_logit_appended(causal, mask):
    q, k, v, w = make_inputs(2, 4, 2, 9, 4, mask, seed=11, q_scale=2.0)  # logits up to about +-20
    dout = randn((2, 4, 9, 4), 12)
    out, grads = _exact(q, k, v, dout, scale=0.5, causal=causal, key_weight=w)
    ref, ref_grads = grads_of(lambda q, k, v: _appended_zero_column(q, k, v, 0.5, causal, w), (q, k, v), dout)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert_all_close(grads, ref_grads, rtol=1e-9, atol=1e-11)
    if mask == "many" and causal:
        assert out[-1, :, 0].abs().max() == 0  # no visible key: softmax_1 gives 0


# --- the low-rank path against the surrogate -------------------------------------------------

CASES = [
    # B, Hq, Hkv, L, D, causal, mask, degree, chunk
    (2, 4, 2, 13, 8, False, None, 2, 5),
    (2, 4, 2, 13, 8, True, None, 2, 5),
    (1, 3, 1, 11, 4, True, "padding", 2, 4),
    (2, 2, 1, 11, 4, False, "padding", 2, 3),
    (2, 4, 2, 14, 4, True, "many", 2, 4),
    (2, 2, 2, 14, 4, False, "many", 3, 5),
    (2, 2, 2, 9, 4, True, "bias", 1, 4),
    (1, 2, 2, 10, 4, False, "bias", 3, 4),
    (1, 2, 1, 12, 4, True, None, 3, 5),
    (1, 2, 2, 7, 6, True, None, 1, 3),
    (1, 1, 1, 1, 4, True, None, 2, 4),
    (2, 2, 1, 11, 4, True, "padding", 2, 16),  # one causal chunk: the polynomial alone, no features
]


def _lowrank(q, k, v, dout, **kw):
    out = lowrank.lowrank_attention_forward(q, k, v, softmax_one=True, **kw)
    return out, lowrank.lowrank_attention_backward(dout, q, k, v, out, softmax_one=True, **kw)


def _surrogate(q, k, v, dout, *, scale, degree, causal, key_weight):
    return grads_of(lambda q, k, v: naive.lowrank_attention(q, k, v, scale=scale, degree=degree, causal=causal,
                                                            key_weight=key_weight, softmax_one=True), (q, k, v), dout)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_chunked_lowrank_matches_surrogate(case):
    b, hq, hkv, length, d, causal, mask, degree, chunk = case
    q, k, v, w = make_inputs(b, hq, hkv, length, d, mask, seed=length * 31 + d)
    kw = dict(scale=d**-0.5, degree=degree, causal=causal, key_weight=w)
    dout = randn((b, hq, length, d), length * 31 + d + 1)
    ref, ref_grads = _surrogate(q, k, v, dout, **kw)
    out, grads = _lowrank(q, k, v, dout, chunk=chunk, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert_all_close(grads, ref_grads, rtol=1e-9, atol=1e-11)
    # the null key changes the result: this is not ordinary softmax (NaN in rows without a key)
    plain = naive.lowrank_attention(q, k, v, **kw)
    assert (plain - ref).nan_to_num().abs().max() > 1e-3


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask", [None, "padding"])
def test_last_scan_in_smaller_steps_matches_surrogate(causal, mask, monkeypatch):
    """softmax_1 with dK, dV computed in steps of 2 rows of a 4-row chunk (GQA, partial chunk)."""
    monkeypatch.setattr(lowrank, "LAST_SCAN_ROWS", 2)
    q, k, v, w = make_inputs(2, 4, 2, 13, 8, mask, seed=7)
    kw = dict(scale=8**-0.5, degree=2, causal=causal, key_weight=w)
    dout = randn((2, 4, 13, 8), 8)
    ref, ref_grads = _surrogate(q, k, v, dout, **kw)
    out, grads = _lowrank(q, k, v, dout, chunk=4, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert_all_close(grads, ref_grads, rtol=1e-9, atol=1e-11)


def _huge_mean_inputs(causal, mean, seed):
    """Keys with a large common mean along the first axis, queries whose first coordinate is
    0.5 to 0.6 in size with a random sign: c_i = scale q_i . mu is about +-(0.25 to 0.3) * mean."""
    b, hq, hkv, length, d = 2, 4, 2, 11, 4
    q, k, v, _ = make_inputs(b, hq, hkv, length, d, None, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    sign = torch.randint(0, 2, (b, hq, length), generator=g).double() * 2 - 1
    q[..., 0] = sign * (0.5 + 0.1 * torch.rand(b, hq, length, generator=g, dtype=torch.float64))
    k[..., 0] += mean
    c = 0.5 * (q * naive._expand_kv(q, naive.key_center(k, None))).sum(-1)
    return q, k, v, c


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_huge_key_mean_is_finite_and_correct(causal):
    """|c_i| from 150 to 700: e^{|c_i|} overflows float32, so a plain N / (e^{-c} + D) would give
    inf and NaN; the low-rank path must not. float64 against the surrogate, float32 against the
    float64 result."""
    q, k, v, c = _huge_mean_inputs(causal, 800.0, seed=5)
    assert c.abs().min() > 150 and c.abs().max() < 700 and (c > 0).any() and (c < 0).any()
    kw = dict(scale=0.5, degree=2, causal=causal, key_weight=None)
    dout = randn(q.shape, 8)
    ref, ref_grads = _surrogate(q, k, v, dout, **kw)
    out, grads = _lowrank(q, k, v, dout, chunk=4, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert_all_close(grads, ref_grads, rtol=1e-9, atol=1e-11)

    # float32: the same inputs rounded to float32; the reference is float64 on those rounded inputs
    low = [t.float() for t in (q, k, v, dout)]
    ref, ref_grads = _lowrank(*[t.double() for t in low], chunk=4, **kw)
    out, grads = _lowrank(*low, chunk=4, **kw)
    assert all(torch.isfinite(t).all() for t in (out, *grads))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert_all_close([t.double() for t in grads], ref_grads, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_extreme_key_mean_in_float64(causal):
    """|c_i| >= 5,000: e^{-c_i} overflows even float64 for c_i < 0, so the plain surrogate cannot be
    the reference. Rows with c_i > 0 are then ordinary softmax rows (e^{-c_i} = 0) and rows with
    c_i < 0 are 0 (weight e^{c_i} N_i / 1 = 0), with no gradient through them."""
    q, k, v, c = _huge_mean_inputs(causal, 2e4, seed=6)
    assert c.abs().min() > 5000 and (c > 0).any() and (c < 0).any()
    kw = dict(scale=0.5, degree=2, causal=causal, key_weight=None)
    dout = randn(q.shape, 9)
    keep = (c > 0).double()[..., None]
    plain = lambda q, k, v: naive.lowrank_attention(q, k, v, scale=0.5, degree=2, causal=causal) * keep  # noqa: E731
    ref, ref_grads = grads_of(plain, (q, k, v), dout)
    out, grads = _lowrank(q, k, v, dout, chunk=4, **kw)
    assert all(torch.isfinite(t).all() for t in (out, *grads))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert_all_close(grads, ref_grads, rtol=1e-9, atol=1e-11)


def test_row_without_visible_keys_and_huge_mean_gives_zero_not_nan():
    """Causal row 0 whose only key is masked, with c_0 so large that e^{-c_0} underflows float32:
    the output is 0 (the null key takes all the weight), not 0 / 0."""
    q, k, v, c = _huge_mean_inputs(True, 800.0, seed=7)
    q[:, :, 0, 0] = 0.6  # c_0 > 0 in every head
    w = torch.ones(q.shape[0], q.shape[2], dtype=torch.float64)
    w[:, 0] = 0
    kw = dict(scale=0.5, degree=2, causal=True, key_weight=w, chunk=4)
    low = [t.float() for t in (q, k, v, randn(q.shape, 10))]
    out, grads = _lowrank(*low, **{**kw, "key_weight": w.float()})
    ref, ref_grads = _lowrank(*[t.double() for t in low], **kw)
    assert all(torch.isfinite(t).all() for t in (out, *grads))
    assert out[:, :, 0].abs().max() == 0
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert_all_close([t.double() for t in grads], ref_grads, rtol=1e-4, atol=1e-5)


class _FixedCentre(torch.autograd.Function):
    """Chunked forward and chained backward with the key centre mu held fixed (a constant)."""

    @staticmethod
    def forward(ctx, q, k, v, kw):
        ctx.kw = kw
        ctx.save_for_backward(q, k, v)
        ctx.out = lowrank.lowrank_attention_forward(q, k, v, softmax_one=True, **kw)
        return ctx.out

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        return (*lowrank.lowrank_attention_backward(dout, q, k, v, ctx.out, softmax_one=True, **ctx.kw), None)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradcheck_lowrank_with_fixed_centre(causal):
    q, k, v, w = make_inputs(1, 4, 2, 7, 3, "padding", seed=21, q_scale=0.4, key_mean=1.5)
    kw = dict(scale=0.5, degree=2, causal=causal, key_weight=w, chunk=3, center=naive.key_center(k, w))
    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: _FixedCentre.apply(q, k, v, kw), inputs)


# --- the exact path ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask", [None, "many", "bias"])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)], ids=["MHA", "GQA"])
def test_exact_kernels_match_reference(dtype, causal, mask, heads):
    q, k, v, w = make_inputs(2, heads[0], heads[1], 10, 8, mask, seed=41, dtype=dtype, q_scale=1.0)
    dout = randn(q.shape, 42)
    w64 = None if w is None else w.double()
    ref, ref_grads = _exact(*[t.double() for t in (q, k, v)], dout, scale=0.3, causal=causal, key_weight=w64)
    kw = dict(scale=0.3, causal=causal, key_weight=w)
    out, lse = exact.exact_attention_forward(q, k, v, softmax_one=True, **kw)
    grads = exact.exact_attention_backward(dout.to(dtype), q, k, v, out, lse, softmax_one=True, **kw)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.double(), ref, **tol)
    assert_all_close([t.double() for t in grads], ref_grads, **tol)
    # the returned logsumexp is the ordinary softmax's (rows with a visible key)
    plain, plain_lse = exact.exact_attention_forward(q, k, v, **kw)
    seen = plain_lse.isfinite() & (naive._allowed(q, naive._expand_kv(q, k), causal, w) > 0).any(-1)
    assert torch.equal(lse[seen], plain_lse[seen])
    assert torch.isfinite(out).all() and torch.isfinite(lse[seen]).all()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask", [None, "many"])
def test_math_fallback_matches_reference(causal, mask):
    """The explicit-softmax branch (devices without a fused kernel), run here on CPU. It computes
    in float32 whatever the input dtype."""
    q, k, v, w = make_inputs(2, 4, 2, 10, 8, mask, seed=43, dtype=torch.float32, q_scale=1.0)
    dout = randn(q.shape, 44)
    w64 = None if w is None else w.double()
    ref, ref_grads = _exact(*[t.double() for t in (q, k, v)], dout, scale=0.3, causal=causal, key_weight=w64)
    ke, ve, m = exact._expand_kv(q, k), exact._expand_kv(q, v), exact.additive_mask(w, q)
    out, lse = exact._math_forward(q, ke, ve, 0.3, causal, m, softmax_one=True)
    dq, dk, dv = exact._math_backward(dout.float(), q, ke, ve, out, lse, 0.3, causal, m, softmax_one=True)
    grads = dq, exact._reduce_kv(dk, 2), exact._reduce_kv(dv, 2)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert_all_close([t.double() for t in grads], ref_grads, rtol=1e-5, atol=1e-5)


# --- the guarded op ----------------------------------------------------------------------------


def test_gradcheck_op_exact_path():
    # one batch element, "many": only keys 4 and 5 are kept, so causal rows 0 to 3 see no key
    q, k, v, w = make_inputs(1, 4, 2, 6, 3, "many", seed=51, q_scale=0.8, key_mean=1.0)
    cfg = AttentionConfig(scale=0.5, causal=True, paths="exact", softmax_one=True)
    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: guarded_attention(q, k, v, cfg, key_weight=w), inputs)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradcheck_op_lowrank_path(causal):
    """The op recentres the keys on every call (mu = their mean, a stop-gradient), so a finite
    difference in k would move mu: gradcheck runs over q and v with k fixed, and dk of the op is
    checked against the surrogate's autograd gradient (mu detached) instead."""
    q, k, v, w = make_inputs(1, 4, 2, 7, 3, "padding", seed=53, q_scale=0.4, key_mean=1.5)
    cfg = AttentionConfig(scale=0.5, causal=causal, degree=2, paths="lowrank", softmax_one=True)
    inputs = tuple(t.clone().requires_grad_() for t in (q, v))
    assert torch.autograd.gradcheck(lambda q, v: guarded_attention(q, k, v, cfg, key_weight=w), inputs)
    dout = randn(q.shape, 54)
    out, grads = grads_of(lambda q, k, v: guarded_attention(q, k, v, cfg, key_weight=w), (q, k, v), dout)
    ref, ref_grads = _surrogate(q, k, v, dout, scale=0.5, degree=2, causal=causal, key_weight=w)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert_all_close(grads, ref_grads, rtol=1e-9, atol=1e-11)


def test_op_compiled_with_fullgraph_matches_eager_on_both_paths():
    """One compiled function; small inputs take the low-rank path, large ones the exact path,
    both softmax_1, with key weights. One chunk, to keep the compile time down (chunking under
    compile is covered by tests/ops/test_lowrank.py, the chunked softmax_1 maths above)."""
    length = 64
    small = make_inputs(1, 4, 2, length, 8, "padding", seed=61, dtype=torch.float32, q_scale=0.05, key_mean=2.0)
    w = small[3]
    large = tuple(t * 4 for t in small[:3])  # R = 16 R_small > R_max; logits within about +-5
    cfg = AttentionConfig(scale=8**-0.5, causal=True, degree=2, r_max=guard.r_max(2, 0.05), softmax_one=True)
    stats_compiled, stats_eager = new_stats("cpu"), new_stats("cpu")
    compiled = torch.compile(lambda q, k, v, w: guarded_attention(q, k, v, cfg, stats_compiled, key_weight=w),
                             fullgraph=True, backend=op_backend())
    for inputs, refs in ((small[:3], "lowrank"), (large, "exact")):
        dout = randn(inputs[0].shape, 62).float()
        out, grads = grads_of(lambda q, k, v: compiled(q, k, v, w), inputs, dout)
        eager = lambda q, k, v: guarded_attention(q, k, v, cfg, stats_eager, key_weight=w)  # noqa: E731
        ref, ref_grads = grads_of(eager, inputs, dout)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert_all_close(grads, ref_grads, rtol=1e-4, atol=1e-5)
        # and eager is the softmax_1 function of the path the guard picked
        f64 = [t.double() for t in inputs]
        want = (naive.lowrank_attention(*f64, scale=cfg.scale, degree=2, causal=True, key_weight=w.double(),
                                        softmax_one=True) if refs == "lowrank" else
                naive.exact_attention(*f64, scale=cfg.scale, causal=True, key_weight=w.double(), softmax_one=True))
        torch.testing.assert_close(ref.double(), want, rtol=1e-5, atol=1e-5)
    for stats in (stats_compiled, stats_eager):
        counts = dict(zip(STATS_FIELDS, stats.tolist()))
        assert counts == {**counts, "forward_lowrank": 1, "forward_exact": 1, "backward_lowrank": 1,
                          "backward_exact": 1}


# --- the guard -----------------------------------------------------------------------------


def test_measured_dq_normaliser_includes_the_null_key():
    """With ||mu|| > max ||k - mu||, the softmax_1 dq normaliser uses ||mu||; the others do not change."""
    q, k, v, _ = make_inputs(1, 2, 1, 5, 4, None, seed=71, key_mean=3.0)
    dout = randn(q.shape, 72)
    ref = {name: torch.zeros_like(q if name in ("out", "dq") else k) for name in ("out", "dq", "dk", "dv")}
    approx = {name: t + 1e-3 for name, t in ref.items()}
    plain = guard.measured_errors(approx, ref, q, k, v, dout, scale=0.5)
    one = guard.measured_errors(approx, ref, q, k, v, dout, scale=0.5, softmax_one=True)
    mu = naive.key_center(k, None)
    mu_norm = float(torch.linalg.vector_norm(mu))
    k_norm = float(torch.linalg.vector_norm(k - mu, dim=-1).max())
    assert mu_norm > k_norm
    assert one["dq"] == pytest.approx(plain["dq"] * k_norm / mu_norm, rel=1e-12)
    assert {n: one[n] for n in ("out", "dk", "dv")} == {n: plain[n] for n in ("out", "dk", "dv")}
