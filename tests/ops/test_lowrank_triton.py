"""The fused Triton kernels of the low-rank path against float64 references.

Each check runs the kernels, forward and backward, and compares output, dQ, dK and dV with the
explicit L x L surrogate (`naive.lowrank_attention`, autograd for the gradients) and with the CPU
scan path (`lowrank.lowrank_attention_forward` / `_backward`), both in float64 on the same (rounded)
inputs. Without a GPU the kernels run under the Triton interpreter on CPU tensors: the interpreter
is switched on (TRITON_INTERPRET=1) before Triton is imported, and where another module of the
session imported Triton first the checks run in one child process that starts with it. With a GPU
the same cases run compiled on CUDA (chunk lt.CHUNK, lengths scaled to keep several chunks and
super-chunks; bench/gpu_check.sh runs them).

Tolerances (normwise: max |error| <= tol * max |reference|), from the arithmetic:

* float32 under the interpreter: exact float32 products, float32 sums (u = 2^-24). An entry is
  a short chain of operations on sums of at most n = K + L terms (K features, L keys or queries);
  the rounding errors of such a sum add up like a random walk, about sqrt(n) u relative to the
  sum's scale, so tol = 8 sqrt(n) u (8 for the chain: centring, scaling, feature product, state
  product, quotient).
* 16-bit inputs, and float32 on CUDA (TF32 operands): every dot operand is rounded once to its
  format, unit roundoff u_op = 2^-9 for bfloat16 (float16 inputs: their state products run in
  bfloat16 too), 2^-11 for TF32. A term of any product carries at most k = 4 such roundings (two
  rounded factors, a rounded feature of unrounded coordinates, the rounded result); terms and
  their errors both add like random walks, so an entry's error is about k u_op of its scale, and
  the largest of a few thousand entries is within 4 standard deviations: tol = 4 k u_op = 16 u_op.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import NamedTuple

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

pytest.importorskip("triton")

from lora_pass.ops import lowrank, naive
from lora_pass.ops import lowrank_triton as lt

ROOT = Path(__file__).resolve().parents[2]
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


class Case(NamedTuple):
    b: int
    hq: int
    hkv: int
    lq: int
    lk: int
    d: int
    causal: bool
    degree: int
    weights: bool  # padding key weights (0 / 1)
    softmax_one: bool
    dtype: torch.dtype
    chunk: int | None  # rows per chunk; None: the GPU's lt.CHUNK


# With chunk 16 a super-chunk is 64 rows: L = 70 is two super-chunks (64 + 6) and ends in a partial
# chunk; chunk None is the GPU's 64 rows (super-chunk 256: L = 270 is two super-chunks, 5 chunks).
CASES = {
    "d64-causal-gqa-pad": Case(1, 2, 1, 70, 70, 64, True, 2, True, False, F32, 16),
    "d64-full-gqa-pad-cross": Case(1, 2, 1, 20, 40, 64, False, 2, True, False, F32, 16),
    "d64-causal-deg1": Case(1, 1, 1, 80, 80, 64, True, 1, False, False, F32, 16),
    "d32-causal-softmax1-3super": Case(1, 1, 1, 140, 140, 32, True, 2, False, True, F32, 16),
    "d32-full-deg1-softmax1-pad-b2": Case(2, 4, 2, 45, 45, 32, False, 1, True, True, F32, 16),
    "d32-causal-one-superchunk": Case(1, 2, 1, 40, 40, 32, True, 2, True, False, F32, 16),
    "d32-causal-chunk32-gqa": Case(1, 2, 1, 150, 150, 32, True, 2, True, False, F32, 32),
    "d32-causal-chunk64-super256": Case(1, 1, 1, 270, 270, 32, True, 2, True, False, F32, None),
    "d64-causal-pad-bf16": Case(1, 1, 1, 70, 70, 64, True, 2, True, False, BF16, 16),
    "d32-full-softmax1-bf16": Case(1, 1, 1, 70, 70, 32, False, 2, False, True, BF16, 16),
    "d32-causal-gqa-pad-fp16": Case(1, 2, 1, 70, 70, 32, True, 2, True, False, F16, 16),
}


def make_inputs(case, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(case.b, case.hq, case.lq, case.d, generator=g, dtype=torch.float64) * 0.3
    k = torch.randn(case.b, case.hkv, case.lk, case.d, generator=g, dtype=torch.float64) * 0.3 + 0.5
    v = torch.randn(case.b, case.hkv, case.lk, case.d, generator=g, dtype=torch.float64)
    dout = torch.randn(case.b, case.hq, case.lq, case.d, generator=g, dtype=torch.float64)
    w = None
    if case.weights:
        w = (torch.rand(case.b, case.lk, generator=g, dtype=torch.float64) > 0.3).to(torch.float64)
        w[:, 0] = 1  # every query row sees a key: the L x L reference is defined everywhere
    q, k, v, dout = (t.to(case.dtype).to(device) for t in (q, k, v, dout))
    return q, k, v, dout, (None if w is None else w.to(device))


def tolerance(case, cuda=False):
    if case.dtype == F32 and not cuda:
        return 8 * math.sqrt(lt.state_rows(case.d, case.degree) + max(case.lq, case.lk)) * 2.0**-24
    return 16 * (2.0**-11 if case.dtype == F32 else 2.0**-9)


def scan_path(q, k, v, dout, **args):
    """(out, dq, dk, dv) of the CPU scan path in float64."""
    q, k, v, dout = (t.detach().cpu().to(torch.float64) for t in (q, k, v, dout))
    args = {n: (a.cpu().to(torch.float64) if isinstance(a, torch.Tensor) else a) for n, a in args.items()}
    out = lowrank.lowrank_attention_forward(q, k, v, **args)
    return (out, *lowrank.lowrank_attention_backward(dout, q, k, v, out, **args))


def dense_surrogate(q, k, v, dout, w, case):
    """(out, dq, dk, dv) of the L x L surrogate in float64, gradients by autograd."""
    q, k, v = (t.detach().cpu().to(torch.float64).requires_grad_() for t in (q, k, v))
    w = None if w is None else w.cpu().to(torch.float64)
    out = naive.lowrank_attention(q, k, v, scale=case.d**-0.5, degree=case.degree, causal=case.causal, key_weight=w,
                                  softmax_one=case.softmax_one)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout.cpu().to(torch.float64)))


def run_kernels(q, k, v, dout, chunk, **args):
    out = lt.lowrank_attention_forward_triton(q, k, v, chunk=chunk, **args)
    return (out, *lt.lowrank_attention_backward_triton(dout, q, k, v, out, chunk=chunk, **args))


def assert_close(got, refs, tol, what):
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, refs):
        assert g.shape == r.shape, (what, name, g.shape, r.shape)
        err = (g.detach().cpu().to(torch.float64) - r).abs().max().item()
        bound = tol * r.abs().max().item()
        assert err <= bound, f"{what} {name}: max error {err:.3e} > {bound:.3e} (tol {tol:.2e})"


def check_case(case, device="cpu"):
    q, k, v, dout, w = make_inputs(case, device)
    args = dict(scale=case.d**-0.5, degree=case.degree, causal=case.causal, key_weight=w, softmax_one=case.softmax_one)
    got = run_kernels(q, k, v, dout, case.chunk, **args)
    for t, like in zip(got, (q, q, k, v)):
        assert t.dtype == like.dtype and t.shape == like.shape and t.device == like.device
    tol = tolerance(case, cuda=device == "cuda")
    assert_close(got, dense_surrogate(q, k, v, dout, w, case), tol, "L x L surrogate")
    assert_close(got, scan_path(q, k, v, dout, **args), tol, "CPU scan path")


def check_left_padding():
    """Causal rows whose visible keys are all masked out (left padding) give 0 output and their
    keys 0 gradients, as in the CPU scan path (the L x L surrogate is 0 / 0 there)."""
    case = Case(1, 2, 1, 70, 70, 32, True, 2, False, False, F32, 16)
    q, k, v, dout, _ = make_inputs(case, seed=1)
    w = torch.ones(1, 70, dtype=torch.float64)
    w[:, :5] = 0
    args = dict(scale=32**-0.5, degree=2, causal=True, key_weight=w)
    got = run_kernels(q, k, v, dout, 16, **args)
    assert got[0][:, :, :5].abs().max() == 0 and got[2][:, :, :5].abs().max() == 0
    assert_close(got, scan_path(q, k, v, dout, **args), tolerance(case), "CPU scan path")


def check_center():
    """A given key centre replaces the mean (the surrogate depends on it), as in the scan path."""
    case = Case(2, 2, 1, 70, 70, 32, True, 2, False, True, F32, 16)
    q, k, v, dout, _ = make_inputs(case, seed=2)
    center = torch.linspace(-0.5, 0.5, 32, dtype=F32).view(1, 1, 1, 32)
    args = dict(scale=32**-0.5, degree=2, causal=True, center=center, softmax_one=True)
    assert_close(run_kernels(q, k, v, dout, 16, **args), scan_path(q, k, v, dout, **args), tolerance(case),
                 "CPU scan path")


def check_heads_inner():
    """Inputs in the heads-inner layout ([B, L, H, D] storage seen as [B, H, L, D], as the model's
    projections give them): read through their strides, outputs in the same layout."""
    case = Case(1, 2, 1, 70, 70, 32, True, 2, True, False, F32, 16)
    q, k, v, dout, w = make_inputs(case, seed=5)
    q, k, v, dout = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, dout))
    args = dict(scale=32**-0.5, degree=2, causal=True, key_weight=w)
    got = run_kernels(q, k, v, dout, 16, **args)
    for t, like in zip(got, (q, q, k, v)):
        assert t.stride() == like.stride()
    assert_close(got, scan_path(q, k, v, dout, **args), tolerance(case), "CPU scan path")


def check_state_layout():
    """The stored states are Phi(kt)^T (w v) and Phi(kt)^T w over the keys up to the end of each
    super-chunk, Phi in the documented block layout (`block_features`)."""
    b, hkv, lk, d, chunk = 1, 2, 150, 32, 16
    g = torch.Generator().manual_seed(3)
    k = torch.randn(b, hkv, lk, d, generator=g) * 0.3 + 0.5
    v = torch.randn(b, hkv, lk, d, generator=g)
    w = (torch.rand(b, lk, generator=g) > 0.3).float()
    p = lt._Launch(k, k, v, d**-0.5, 2, True, w, None, False, chunk)
    h, z = p.key_states(lt._plain, k, v)
    kt = (k.double() - p.mu.double()[:, :, None]) * p.root
    phi = lt.block_features(kt, 2) * w.double()[:, None, :, None]
    ends = [min(lk, (s + 1) * p.super_len) for s in range(p.n_states)]
    want_h = torch.stack([phi[:, :, :e].transpose(-1, -2) @ v.double()[:, :, :e] for e in ends], 2)
    want_z = torch.stack([phi[:, :, :e].sum(-2) for e in ends], 2)
    assert p.n_states == 3 and h.shape == want_h.shape and z.shape == want_z.shape
    tol = 8 * math.sqrt(lk) * 2.0**-24
    assert (h.double() - want_h).abs().max() <= tol * want_h.abs().max()
    assert (z.double() - want_z).abs().max() <= tol * want_z.abs().max()


CHECKS = {**{name: (lambda case=case: check_case(case)) for name, case in CASES.items()},
          "left-padding": check_left_padding, "center": check_center, "heads-inner": check_heads_inner,
          "state-layout": check_state_layout}


def _child_main(path, names):
    """Entry of the child process (TRITON_INTERPRET=1 from its start): run the named checks and write
    {name: None or the failure} to `path`."""
    out = {}
    for name in names:
        try:
            CHECKS[name]()
            out[name] = None
        except Exception:  # noqa: BLE001 (reported by the parent's test of that name)
            out[name] = traceback.format_exc()
    with open(path, "w") as f:
        json.dump(out, f)


CHILD = "import sys, json; import tests.ops.test_lowrank_triton as m; m._child_main(sys.argv[1], json.loads(sys.argv[2]))"


@pytest.fixture(scope="module")
def child_results(request):
    """Where Triton was imported without the interpreter before this module: the selected checks,
    run once in a child process that sets TRITON_INTERPRET=1 before importing Triton."""
    if lt.INTERPRETED:
        return None
    names = sorted({item.callspec.params["name"] for item in request.session.items
                    if item.module is sys.modules[__name__] and item.originalname == "test_interpreted_kernels"})
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "results.json")
        run = subprocess.run([sys.executable, "-c", CHILD, path, json.dumps(names)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=1500, check=False)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
        with open(path) as f:
            return json.load(f)


@pytest.mark.parametrize("name", list(CHECKS))
def test_interpreted_kernels(name, child_results):
    if child_results is None:
        CHECKS[name]()
    else:
        assert child_results[name] is None, child_results[name]


CUDA = torch.cuda.is_available() and not lt.INTERPRETED


@pytest.mark.skipif(not CUDA, reason="compiled kernels need a CUDA device (and no TRITON_INTERPRET=1)")
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_kernels_match_references(name):
    """The compiled kernels on the same cases: chunk lt.CHUNK, lengths scaled by lt.CHUNK / chunk."""
    case = CASES[name]
    probe = torch.empty(1, 1, 1, case.d, device="cuda")
    if not lt.supported(probe, probe, case.degree):
        pytest.skip("device below compute capability 8.0")
    f = lt.CHUNK // (case.chunk or lt.CHUNK)
    check_case(case._replace(lq=case.lq * f, lk=case.lk * f, chunk=None), device="cuda")


def test_supported_is_false_on_cpu():
    q = torch.zeros(1, 2, 8, 64)
    k = torch.zeros(1, 1, 8, 64)
    assert not lt.supported(q, k, 2)
    assert not lt.supported(q.bfloat16(), k.bfloat16(), 1)
    assert not lt.supported("not a tensor", k, 2)


def test_block_layout_reproduces_the_polynomial():
    """Phi(q) . Phi(k) = 1 + s + s^2 / 2 (degree 2) and 1 + s (degree 1), s = q . k, with 2,369
    features for d = 64 (2,145 unique monomials)."""
    g = torch.Generator().manual_seed(4)
    for d in lt.HEAD_DIMS:
        q = torch.randn(5, d, generator=g, dtype=torch.float64) * 0.3
        k = torch.randn(7, d, generator=g, dtype=torch.float64) * 0.3
        s = q @ k.T
        for degree in (1, 2):
            phi_q, phi_k = lt.block_features(q, degree), lt.block_features(k, degree)
            assert phi_q.shape[-1] == lt.state_rows(d, degree)
            torch.testing.assert_close(phi_q @ phi_k.T, naive.taylor_polynomial(s, degree), rtol=1e-12, atol=1e-12)
    assert lt.state_rows(64, 2) == 2369 and lt.state_rows(32, 2) == 673 and lt.state_rows(64, 1) == 65
