"""Low-rank path against readable references, forward and every gradient, float64."""

from __future__ import annotations

import math

import pytest
import torch

from lora_pass.lowering import op_backend
from lora_pass.ops import lowrank, naive
from lora_pass.ops.attention import AttentionConfig, guarded_attention
from lora_pass.ops.exact import exact_attention_backward, exact_attention_forward
from lora_pass.ops.features import feature_rank, taylor_features, taylor_features_vjp

CASES = [
    # B, Hq, Hkv, L, D, causal, mask, degree, chunk
    (2, 4, 2, 13, 8, False, None, 2, 5),
    (2, 4, 2, 13, 8, True, None, 2, 5),
    (2, 2, 2, 16, 8, True, None, 2, 4),
    (1, 3, 1, 11, 4, True, "padding", 2, 4),
    (2, 2, 1, 11, 4, False, "padding", 2, 3),
    (2, 2, 2, 9, 4, True, "bias", 2, 4),
    (1, 2, 2, 10, 4, False, "bias", 3, 4),
    (1, 2, 1, 12, 4, True, None, 3, 5),
    (1, 2, 2, 7, 6, True, None, 1, 3),
    (1, 1, 1, 1, 4, True, None, 2, 4),
    (2, 4, 2, 13, 8, True, "padding", 2, 16),  # one causal chunk: the polynomial alone, no features
]


def case_id(c):
    b, hq, hkv, length, d, causal, mask, g, chunk = c
    return f"B{b}-H{hq}-KV{hkv}-L{length}-D{d}-{'causal' if causal else 'full'}-{mask or 'nomask'}-g{g}-C{chunk}"


def make_inputs(b, hq, hkv, length, d, mask, dtype=torch.float64, q_scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, length, d, generator=g, dtype=dtype) * q_scale
    k = torch.randn(b, hkv, length, d, generator=g, dtype=dtype) * q_scale + 0.5
    v = torch.randn(b, hkv, length, d, generator=g, dtype=dtype)
    w = None
    if mask is not None:
        w = (torch.rand(b, length, generator=g, dtype=dtype) > 0.3).to(dtype)
        w[:, 0] = 1
        if mask == "bias":
            w = w * (torch.rand(b, length, generator=g, dtype=dtype) + 0.5)
    return q, k, v, w


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_chunked_matches_surrogate(case):
    assert_matches_surrogate(case)


def assert_matches_surrogate(case, seed=0):
    """The chunked path's output and gradients against the float64 surrogate on fresh inputs."""
    b, hq, hkv, length, d, causal, mask, degree, chunk = case
    q, k, v, w = make_inputs(b, hq, hkv, length, d, mask, seed=seed)
    scale = d**-0.5
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = naive.lowrank_attention(qr, kr, vr, scale=scale, degree=degree, causal=causal, key_weight=w)
    dout = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), dout)
    out = lowrank.lowrank_attention_forward(q, k, v, scale=scale, degree=degree, causal=causal, key_weight=w, chunk=chunk)
    grads = lowrank.lowrank_attention_backward(dout, q, k, v, out, scale=scale, degree=degree, causal=causal,
                                               key_weight=w, chunk=chunk)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=lambda m: f"d{name}: {m}")


SPLIT_CASES = [
    # B, Hq, Hkv, L, D, causal, mask, degree, chunk: chunk 4, the last scan in steps of 2 rows
    (2, 4, 2, 13, 8, False, None, 2, 4),
    (2, 4, 2, 13, 8, True, None, 2, 4),
    (1, 3, 1, 11, 4, True, "padding", 2, 4),
    (2, 2, 1, 11, 4, False, "padding", 2, 4),
    (2, 2, 2, 9, 4, True, "bias", 2, 4),
    (1, 2, 1, 12, 4, True, None, 3, 4),
]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=case_id)
def test_last_scan_in_smaller_steps_matches_surrogate(case, monkeypatch):
    """dK, dV are computed in steps of fewer rows than the chunk (LAST_SCAN_ROWS, causal and
    non-causal): GQA, masks, partial last chunks, against the float64 surrogate."""
    monkeypatch.setattr(lowrank, "LAST_SCAN_ROWS", 2)
    chunk = case[-1]
    assert lowrank.last_scan_rows(chunk) == 2
    assert_matches_surrogate(case, seed=case[3] + case[4])


def test_last_scan_rows_fall_back_to_the_chunk_when_it_does_not_divide():
    assert lowrank.last_scan_rows(lowrank.CHUNK_FULL) == lowrank.LAST_SCAN_ROWS
    assert lowrank.last_scan_rows(lowrank.CHUNK_CAUSAL) == lowrank.LAST_SCAN_ROWS
    for chunk in (3, 5, 12, 100):
        assert lowrank.last_scan_rows(chunk) == chunk


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_default_chunking_covers_lengths_not_multiple_of_chunk(causal):
    """The last chunk is padded: padded keys must not reach any real query, padded rows are dropped."""
    length = multi_chunk_length(causal, 37)
    q, k, v, _ = make_inputs(1, 2, 1, length, 4, None, q_scale=0.2)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = naive.lowrank_attention(qr, kr, vr, scale=0.5, degree=2, causal=causal)
    dout = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), dout)
    out = lowrank.lowrank_attention_forward(q, k, v, scale=0.5, degree=2, causal=causal)
    grads = lowrank.lowrank_attention_backward(dout, q, k, v, out, scale=0.5, degree=2, causal=causal)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=lambda m: f"d{name}: {m}")
    assert length % lowrank.chunk_size(length, causal) != 0


def multi_chunk_length(causal, extra):
    """The shortest length that the default chunking splits into chunks, plus `extra` rows."""
    return (lowrank.CAUSAL_ONE_CHUNK if causal else lowrank.CHUNK_FULL) + extra


def test_chunk_size_is_bounded_by_the_length_and_the_target():
    for length in (1, 100, 128, 256, 257, 1000, 32768, 100000):
        assert lowrank.chunk_size(length, False) == min(length, lowrank.CHUNK_FULL)
        want = length if length <= lowrank.CAUSAL_ONE_CHUNK else lowrank.CHUNK_CAUSAL
        assert lowrank.chunk_size(length, True) == want


@pytest.mark.parametrize("degree,d", [(1, 5), (2, 6), (3, 4)])
def test_features_reproduce_taylor_polynomial_and_rank(degree, d):
    x, y = torch.randn(7, d, dtype=torch.float64), torch.randn(7, d, dtype=torch.float64)
    px, py = taylor_features(x, degree), taylor_features(y, degree)
    assert px.shape[-1] == feature_rank(d, degree) == math.comb(d + degree, degree)
    torch.testing.assert_close((px * py).sum(-1), naive.taylor_polynomial((x * y).sum(-1), degree))
    grad = torch.randn_like(px)
    xr = x.clone().requires_grad_()
    (taylor_features(xr, degree) * grad).sum().backward()
    torch.testing.assert_close(taylor_features_vjp(x, grad, degree), xr.grad)


def test_feature_rank_for_head_dim_64():
    assert feature_rank(64, 2) == 2145


def test_surrogate_through_features_matches_explicit_polynomial():
    q, k, v, w = make_inputs(2, 4, 2, 9, 4, "padding")
    a = naive.lowrank_attention_features(q, k, v, scale=0.5, degree=2, key_weight=w)
    b = naive.lowrank_attention(q, k, v, scale=0.5, degree=2, key_weight=w)
    torch.testing.assert_close(a, b)


class _FixedCentre(torch.autograd.Function):
    """The chunked forward and chained backward with the key centre mu held fixed, as the
    backward assumes (mu is a stop-gradient: the exact function does not depend on it)."""

    @staticmethod
    def forward(ctx, q, k, v, kw):
        ctx.kw = kw
        ctx.save_for_backward(q, k, v)
        ctx.out = lowrank.lowrank_attention_forward(q, k, v, **kw)
        return ctx.out

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        return (*lowrank.lowrank_attention_backward(dout, q, k, v, ctx.out, **ctx.kw), None)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask", [None, "padding"])
@pytest.mark.parametrize("degree", [1, 2])
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_gradcheck_lowrank_path(causal, mask, degree, split, monkeypatch):
    """`split`: chunks of 4 rows, the last scan (dK, dV) in steps of 2."""
    monkeypatch.setattr(lowrank, "LAST_SCAN_ROWS", 2)
    q, k, v, w = make_inputs(1, 4, 2, 7, 3, mask, q_scale=0.4)
    kw = dict(scale=0.5, degree=degree, causal=causal, key_weight=w, chunk=4 if split else 3,
              center=naive.key_center(k, w))
    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: _FixedCentre.apply(q, k, v, kw), inputs)


def test_op_lowrank_mode_matches_surrogate_gradients():
    q, k, v, w = make_inputs(1, 4, 2, 9, 4, "padding", q_scale=0.3)
    cfg = AttentionConfig(scale=0.5, causal=True, degree=2, paths="lowrank")
    a = tuple(t.clone().requires_grad_() for t in (q, k, v))
    b = tuple(t.clone().requires_grad_() for t in (q, k, v))
    out = guarded_attention(*a, cfg, key_weight=w)
    ref = naive.lowrank_attention(*b, scale=0.5, degree=2, causal=True, key_weight=w)
    dout = torch.randn_like(ref)
    torch.testing.assert_close(out, ref)
    for got, want in zip(torch.autograd.grad(out, a, dout), torch.autograd.grad(ref, b, dout)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_inputs_accumulate_in_float32(dtype):
    q, k, v, _ = make_inputs(1, 2, 2, 24, 8, None, dtype=torch.float64, q_scale=0.2)
    ref = naive.lowrank_attention(q, k, v, scale=8**-0.5, degree=2, causal=True)
    low = [t.to(dtype) for t in (q, k, v)]
    out = lowrank.lowrank_attention_forward(*low, scale=8**-0.5, degree=2, causal=True, chunk=8)
    assert out.dtype == dtype
    # the error is that of rounding the inputs and the output, not of a low-precision accumulation
    naive_low = naive.lowrank_attention(*[t.float() for t in low], scale=8**-0.5, degree=2, causal=True).to(dtype)
    err_fast = (out.double() - ref).abs().max()
    err_naive = (naive_low.double() - ref).abs().max()
    assert err_fast <= 2 * err_naive + 1e-6


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask", [None, "padding"])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)], ids=["MHA", "GQA"])
def test_exact_kernels_match_reference(causal, mask, heads):
    q, k, v, w = make_inputs(2, heads[0], heads[1], 10, 8, mask, dtype=torch.float32)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref = naive.exact_attention(qr, kr, vr, scale=0.3, causal=causal, key_weight=None if w is None else w.double())
    dout = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), dout)
    out, lse = exact_attention_forward(q, k, v, scale=0.3, causal=causal, key_weight=w)
    grads = exact_attention_backward(dout.float(), q, k, v, out, lse, scale=0.3, causal=causal, key_weight=w)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("paths", ["guarded", "lowrank"])
def test_op_compiles_directly_with_fullgraph(paths):
    """Users may call the op in their own compiled code: Dynamo must trace it whole. Several chunks
    (L > CAUSAL_ONE_CHUNK, not a multiple of the chunk) inside the cond branches."""
    q, k, v, _ = make_inputs(1, 4, 2, multi_chunk_length(True, 44), 8, None, dtype=torch.float32, q_scale=0.05)
    cfg = AttentionConfig(scale=8**-0.5, causal=True, degree=2, r_max=0.5, paths=paths)
    compiled = torch.compile(lambda q, k, v: guarded_attention(q, k, v, cfg), fullgraph=True)
    a = tuple(t.clone().requires_grad_() for t in (q, k, v))
    b = tuple(t.clone().requires_grad_() for t in (q, k, v))
    out, ref = compiled(*a), guarded_attention(*b, cfg)
    dout = torch.randn_like(ref)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(out, a, dout), torch.autograd.grad(ref, b, dout)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["lowrank", "exact"])
def test_rows_without_a_visible_key_are_zero(path):
    """Left padding under a causal mask: query rows 0-4 see only masked keys. Both paths give
    zeros there (as SDPA does) and, elsewhere, what the rows with a visible key get alone."""
    b, hq, hkv, length, d, pad = 2, 2, 1, 13, 4, 5
    q, k, v, _ = make_inputs(b, hq, hkv, length, d, None)
    w = torch.ones(b, length, dtype=q.dtype)
    w[1, :pad] = 0
    scale = d**-0.5
    kw = dict(scale=scale, causal=True, key_weight=w)
    if path == "lowrank":
        out = lowrank.lowrank_attention_forward(q, k, v, degree=2, chunk=4, **kw)
        backward = lambda dout: lowrank.lowrank_attention_backward(dout, q, k, v, out, degree=2, chunk=4, **kw)  # noqa: E731
        reference = lambda q_, k_, v_, w_: naive.lowrank_attention(q_, k_, v_, degree=2, scale=scale, causal=True,  # noqa: E731
                                                                   key_weight=w_)
    else:
        out, lse = exact_attention_forward(q, k, v, **kw)
        backward = lambda dout: exact_attention_backward(dout, q, k, v, out, lse, **kw)  # noqa: E731
        reference = lambda q_, k_, v_, w_: naive.exact_attention(q_, k_, v_, scale=scale, causal=True,  # noqa: E731
                                                                 key_weight=w_)
    assert torch.isfinite(out).all() and out[1, :, :pad].eq(0).all()
    dout = torch.randn_like(out)
    grads = backward(dout)
    assert all(torch.isfinite(g).all() for g in grads)
    # reference: batch 0 as it is; batch 1 from position `pad` on is plain causal attention over
    # its own positions (the same keys visible, the same key mean), zero before it
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out0 = reference(qr[:1], kr[:1], vr[:1], None)
    out1 = reference(qr[1:, :, pad:], kr[1:, :, pad:], vr[1:, :, pad:], None)
    ref = torch.cat([out0, torch.cat([out1.new_zeros(1, hq, pad, d), out1], 2)])
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), dout)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_chunk_loop_compiles_to_one_loop_with_correct_gradients(causal):
    """The op as the backend inserts it (opaque to Dynamo, traced by AOTAutograd), several chunks:
    the chunk loops are compiled as loops (`while` in the forward and backward code, not unrolled),
    and output and gradients equal eager. The loops' initial states share zeros with each other
    after CSE; a compiled loop that overwrote them gave wrong gradients (lowering._while_loop_create_owning_carries)."""
    from torch._inductor.utils import run_and_get_code

    length = multi_chunk_length(causal, 44)
    assert math.ceil(length / lowrank.chunk_size(length, causal)) >= 2
    q, k, v, _ = make_inputs(1, 4, 2, length, 8, None, dtype=torch.float32, q_scale=0.05)
    cfg = AttentionConfig(scale=8**-0.5, causal=causal, degree=2, r_max=0.5, paths="lowrank")

    @torch.compiler.allow_in_graph
    def op(q, k, v):
        return guarded_attention(q, k, v, cfg)

    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: op(q, k, v), backend=op_backend(), fullgraph=True)
    a = tuple(t.clone().requires_grad_() for t in (q, k, v))
    b = tuple(t.clone().requires_grad_() for t in (q, k, v))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    (out, grads), codes = run_and_get_code(lambda: (lambda o: (o, torch.autograd.grad(o, a, dout)))(compiled(*a)))
    ref = guarded_attention(*b, cfg)
    ref_grads = torch.autograd.grad(ref, b, dout)
    assert len(codes) == 2 and all("while " in code for code in codes)
    # causal: the backward's reverse-scan state gradients are accumulated in place
    # (inductor_pass.accumulate_carries_in_place); the forward's initial states share one zeros tensor
    # (CSE) and the non-causal states are read after their loops: those stay loop outputs
    assert [("baddbmm_" in code) for code in codes] == [False, causal]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")
