"""Fused Triton kernels for the low-rank attention path (CUDA, compute capability 8.0 and up).

Same surrogate as `ops/lowrank.py` (exp replaced by P_g on centred logits, P_g(s) = 1 + s + s^2 / 2
for degree 2, 1 + s for degree 1), computed by four kernels that never write a feature to memory
and never form an L x L tensor:

    _state_kernel   H = sum_t Phi(x_t) (a_t y_t)^T, z = sum_t c_t Phi(x_t) over the rows of a
                    sequence, in order or in reverse, one (feature block, batch * KV head) per
                    program; the state tile stays in registers and is stored once per super-chunk.
                    Forward and backward run it on the keys (y = v, a = c = key weight: the prefix
                    states H_<s, z_<s); the backward runs it again on the queries in reverse
                    (y = dO, a = 1 / den, c = dden, the G query heads of a KV head summed: the
                    suffix state gradients dH_>s, dz_>s).
    _out_kernel     one block of query rows: Phi(qt) . (H_<s, z_<s) for the super-chunk s holding
                    the block, plus the exact masked polynomial against the keys of s before the
                    row; then the normalisation (softmax or softmax_1).
    _dq_kernel      one block of query rows: the denominator again (the forward's output is all
                    the backward gets), 1 / den and dden for the later kernels, and
                    dQ = J_Phi^T (dO H^T / den + dden z) + the intra-super-chunk part.
    _dkdv_kernel    one block of key rows (the G query heads of its KV head summed): dV, dK from
                    the suffix state gradients dH_>s, dz_>s and the intra-super-chunk part.

Feature layout (docs/gpu.md, "Feature layout"). With the head dim split in NB = D / 8 blocks x_a
of 8 coordinates, (q . k)^2 = sum_{a, b} (q_a . k_a)(q_b . k_b), so

    Phi(x) = [x, vec(x_a x_b^T) * c_ab for the NB (NB + 1) / 2 block pairs a <= b, 1]

with c_ab = 1 for a < b and sqrt(1/2) on the diagonal pairs (both sides carry the weight, so the
map is the same function for queries and keys) gives Phi(q) . Phi(k) = 1 + s + s^2 / 2. For
d = 64 that is 64 + 36 * 64 + 1 = 2,369 features (2,145 unique monomials; the 224 repeated ones
are the off-diagonal entries of the diagonal blocks). Every block pair is one 64-wide feature tile
built in registers from two 8-column slices of a q or k tile, a whole K = 64 step of the
tensor-core products. States are stored as [B, Hkv, n_states, K, D] with rows [0, D) the linear
block, D + 64 p the tile p (pairs in the order (0,0), (0,1), ..., (0,NB-1), (1,1), ...), and row
K - 1 the constant feature; `block_features` is the same map in torch.

Super-chunks: causal states are stored at the end of every super-chunk of SUPER_CHUNKS * chunk
rows (256 for the default chunk of 64); a query block reads the prefix state of the super-chunks
before its own, and handles the keys of its own super-chunk with the exact polynomial (the CPU
path does the same per chunk). Non-causal attention has one state: all the keys (all the queries
for the state gradients). A causal sequence of one super-chunk needs no state at all.

Precision: accumulation is float32 everywhere. The products with q, k, v and dO run on their own
16-bit dtype; the feature-state products run in bfloat16 for 16-bit inputs (a state sums up to L
terms: float16 would overflow), with states stored in bfloat16 for them (the dot rounds them to
bfloat16 anyway) and in float32 for float32 inputs. Float32 dots run as TF32 tensor-core products
on the GPU (operands rounded to 10-bit mantissas, float32 accumulation). Under the Triton
interpreter (TRITON_INTERPRET=1, used by the tests on CPU tensors) the constexpr EMULATE rounds
each dot operand to its dtype and multiplies in float32 ("ieee"): the tensor cores' arithmetic for
16-bit operands, exact float32 for float32 ones.

Memory and masking: q [B, Hq, Lq, D], k, v [B, Hkv, Lk, D] in any layout with a unit stride on the
last dim (the heads-inner layout included); query heads hq use KV head hq // G (nothing is
expanded). Lengths need not be multiples of the chunk: rows past the end are masked in the
kernels. Key weights multiply each key's weight (0 masks it) and are left out of the centre.
"""

from __future__ import annotations

import math
import re

import torch

from .naive import key_center

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # the CPU scan path does not need Triton
    triton = None
    tl = None
    HAVE_TRITON = False

BLOCK = 8  # coordinates per block of the degree-2 layout: features come in 8 x 8 = 64-wide tiles
CHUNK = 64  # rows per chunk (key rows per state step, query / key rows per program)
SUPER_CHUNKS = 4  # chunks per super-chunk: causal states are stored every 256 rows
HEAD_DIMS = (32, 64)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_CAPABILITY = (8, 0)
NUM_WARPS = 8
NUM_STAGES = 2
KERNEL_NAMES = ("state", "out", "dq", "dkdv")


def _interpreting() -> bool:
    """Whether the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 when Triton was
    imported): they then run on CPU tensors, and never as compiled GPU kernels."""
    return INTERPRETED


def pair_count(head_dim: int, degree: int) -> int:
    """Number of 8 x 8 feature tiles (block pairs a <= b) of the degree-2 part (0 for degree 1)."""
    nb = head_dim // BLOCK
    return nb * (nb + 1) // 2 if degree == 2 else 0


def state_rows(head_dim: int, degree: int) -> int:
    """Rows K of a stored state: D linear features, 64 per feature tile, one constant feature
    (2,369 for d = 64, degree 2)."""
    return head_dim + pair_count(head_dim, degree) * BLOCK * BLOCK + 1


def super_chunk(chunk: int) -> int:
    """Rows per super-chunk (causal states are stored once per super-chunk)."""
    return SUPER_CHUNKS * chunk


def block_features(x: torch.Tensor, degree: int) -> torch.Tensor:
    """Phi(x) [..., state_rows(d, degree)] in the kernels' layout (a reference: the kernels build
    these tiles in registers and never store them)."""
    d = x.shape[-1]
    parts = [x]
    if degree == 2:
        blocks = x.split(BLOCK, dim=-1)
        for a in range(d // BLOCK):
            for b in range(a, d // BLOCK):
                tile = (blocks[a][..., :, None] * blocks[b][..., None, :]).flatten(-2)
                parts.append(tile * (0.5**0.5 if a == b else 1.0))
    parts.append(torch.ones_like(x[..., :1]))
    return torch.cat(parts, dim=-1)


def supported(q, k, degree) -> bool:
    """Whether the fused kernels can run these inputs: compiled Triton kernels (not the
    interpreter), q on a CUDA device of compute capability >= 8.0, degree 1 or 2, head dim in
    HEAD_DIMS, float32 / bfloat16 / float16, k of the same dtype and device, Hq a multiple of Hkv.
    False (never an exception) otherwise, on the CPU in particular."""
    if not HAVE_TRITON or INTERPRETED or not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        return False
    if q.device.type != "cuda" or k.device != q.device:
        return False
    if degree not in (1, 2) or q.dim() != 4 or k.dim() != 4:
        return False
    if q.shape[-1] not in HEAD_DIMS or k.shape[-1] != q.shape[-1]:
        return False
    if q.dtype not in DTYPES or k.dtype != q.dtype:
        return False
    if q.shape[1] % max(k.shape[1], 1) != 0:
        return False
    try:
        return torch.cuda.get_device_capability(q.device) >= MIN_CAPABILITY
    except (RuntimeError, AssertionError):
        return False


# --- kernels ----------------------------------------------------------------------------------------

if HAVE_TRITON:
    _SQRT_HALF = tl.constexpr(0.5**0.5)

    # integer arguments that are counts, flags or strides of the small row buffers: not specialised
    # on their value, so that one compiled kernel per constexpr config serves every shape
    # (kernel_configs lists them all)
    _FLAGS_STATE = ["n_heads_kv", "group", "n_rows", "n_chunks", "cps", "n_states", "reverse", "k_rows",
                    "saw_b", "saw_h", "scw_b", "scw_h"]
    _FLAGS_OUT = ["n_heads_q", "group", "len_q", "len_k", "super_len", "n_states", "k_rows", "causal",
                  "n_tiles"]

    # Dot operands: every product is tl.dot(a, b, input_precision=PREC) on operands cast with
    # `x.to(DT).to(DT_OP)`, DT the operand's dtype (IN: the inputs', ST: the states'), DT_OP = DT on
    # the GPU and float32 under the interpreter (EMULATE), whose 16-bit dot is not usable: there the
    # operand is rounded to DT and multiplied exactly, as the tensor cores do.
    #
    # Feature tiles: tile p is the block pair (a, b), a <= b, of E-coordinate blocks: T = E * E features
    # vec(x_a x_b^T) * c_ab, rows D + T p of the state.

    @triton.jit
    def _pair_of(p, NB: tl.constexpr):
        """Blocks (a, b), a <= b, of feature tile p (tiles ordered (0,0), (0,1), ..., (0,NB-1), (1,1), ...)."""
        a = p * 0
        b = p * 0
        base = 0
        for i in tl.static_range(NB):
            inside = (p >= base) & (p < base + NB - i)
            a = tl.where(inside, i, a)
            b = tl.where(inside, i + p - base, b)
            base += NB - i
        return a, b

    @triton.jit
    def _query_block(Q, MU, sq_b, sq_h, sq_t, n_heads_q, group, len_q, root,
                     D: tl.constexpr, BM: tl.constexpr):
        """The query block of this program (grid: query blocks x batch * query heads): batch b, query
        head hq, its KV head hkv and KV row bkv = b * Hkv + hkv, first row i0, the rows and their
        mask, the block's pointer, its rows qt = q * root in fp32, and the key centre mu of its KV head."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // n_heads_q).to(tl.int64)
        hq = pid_bh % n_heads_q
        hkv = hq // group
        bkv = b * (n_heads_q // group) + hkv
        i0 = pid_m * BM
        t = tl.arange(0, BM)
        rows = i0 + t
        rmask = rows < len_q
        cols = tl.arange(0, D)
        q_ptr = Q + b * sq_b + hq * sq_h + i0 * sq_t
        qt = tl.load(q_ptr + t[:, None] * sq_t + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32) * root
        mu = tl.load(MU + bkv * D + cols)
        return b, hq, hkv, bkv, i0, rows, rmask, q_ptr, qt, mu

    @triton.jit(do_not_specialize=_FLAGS_STATE)
    def _state_kernel(X, Y, MU, AW, CW, H, Z,
                      sx_b, sx_h, sx_t, sy_b, sy_h, sy_t,
                      saw_b, saw_h, scw_b, scw_h,
                      n_heads_kv, group, n_rows, n_chunks, cps, n_states, reverse, k_rows, root,
                      D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr,
                      PREC: tl.constexpr, EMULATE: tl.constexpr):
        """States of one feature tile (program 0: linear + constant; p > 0: tile p - 1) of one
        (batch, KV head): H += Phi(xt)^T (a y), z += Phi(xt)^T c over chunks of BT rows of the
        `group` source heads of the KV head, xt = (x - mu) * root. Stored (inclusive) at the end
        of every super-chunk of `cps` chunks walking forward, at its start walking in reverse.
        MU [B * Hkv, D]; AW, CW indexed b * s_b + head * s_h + row."""
        NB: tl.constexpr = D // E
        T: tl.constexpr = E * E
        ST: tl.constexpr = H.dtype.element_ty
        ST_OP: tl.constexpr = tl.float32 if EMULATE else ST
        pid_f = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // n_heads_kv).to(tl.int64)
        h0 = (pid_bh % n_heads_kv).to(tl.int64) * group  # first source head
        t = tl.arange(0, BT)
        cols = tl.arange(0, D)
        x_head = X + b * sx_b + h0 * sx_h
        y_head = Y + b * sy_b + h0 * sy_h
        aw_head = AW + b * saw_b + h0 * saw_h
        cw_head = CW + b * scw_b + h0 * scw_h
        y_off = t[:, None] * sy_t + cols[None, :]
        mu_base = MU + pid_bh * D
        h_base = H + pid_bh.to(tl.int64) * n_states * k_rows * D
        z_base = Z + pid_bh.to(tl.int64) * n_states * k_rows
        if pid_f == 0:
            x_off = t[:, None] * sx_t + cols[None, :]
            mu = tl.load(mu_base + cols)
            h_lin = tl.zeros([D, D], dtype=tl.float32)
            z_lin = tl.zeros([D], dtype=tl.float32)
            h_one = tl.zeros([D], dtype=tl.float32)
            z_one = tl.sum(tl.zeros([1], dtype=tl.float32), 0)
            for i in range(n_chunks):
                c = tl.where(reverse != 0, n_chunks - 1 - i, i).to(tl.int64)
                r0 = c * BT
                rmask = r0 + t < n_rows
                for g in range(group):
                    xt = tl.load(x_head + g * sx_h + r0 * sx_t + x_off, mask=rmask[:, None], other=0.0)
                    xt = (xt.to(tl.float32) - mu[None, :]) * root
                    aw = tl.load(aw_head + g * saw_h + r0 + t, mask=rmask, other=0.0)
                    cw = tl.load(cw_head + g * scw_h + r0 + t, mask=rmask, other=0.0)
                    y = tl.load(y_head + g * sy_h + r0 * sy_t + y_off, mask=rmask[:, None], other=0.0)
                    y = y.to(tl.float32) * aw[:, None]
                    h_lin += tl.dot(tl.trans(xt).to(ST).to(ST_OP), y.to(ST).to(ST_OP), input_precision=PREC)
                    z_lin += tl.sum(xt * cw[:, None], 0)
                    h_one += tl.sum(y, 0)
                    z_one += tl.sum(cw, 0)
                if tl.where(reverse != 0, c % cps == 0, ((c + 1) % cps == 0) | (c == n_chunks - 1)):
                    s_row = (c // cps) * k_rows
                    tl.store(h_base + s_row * D + cols[:, None] * D + cols[None, :], h_lin.to(ST))
                    tl.store(z_base + s_row + cols, z_lin)
                    tl.store(h_base + (s_row + k_rows - 1) * D + cols, h_one.to(ST))
                    tl.store(z_base + s_row + k_rows - 1, z_one)
        else:
            a, bb = _pair_of(pid_f - 1, NB)
            weight = tl.where(a == bb, _SQRT_HALF, 1.0)
            ea = a * E + tl.arange(0, E)
            eb = bb * E + tl.arange(0, E)
            xa_off = t[:, None] * sx_t + ea[None, :]
            xb_off = t[:, None] * sx_t + eb[None, :]
            fcols = tl.arange(0, T)
            mu_a = tl.load(mu_base + ea)
            mu_b = tl.load(mu_base + eb)
            h_tile = tl.zeros([T, D], dtype=tl.float32)
            z_tile = tl.zeros([T], dtype=tl.float32)
            for i in range(n_chunks):
                c = tl.where(reverse != 0, n_chunks - 1 - i, i).to(tl.int64)
                r0 = c * BT
                rmask = r0 + t < n_rows
                for g in range(group):
                    x_ptr = x_head + g * sx_h + r0 * sx_t
                    xa = tl.load(x_ptr + xa_off, mask=rmask[:, None], other=0.0)
                    xb = tl.load(x_ptr + xb_off, mask=rmask[:, None], other=0.0)
                    xa = (xa.to(tl.float32) - mu_a[None, :]) * root
                    xb = (xb.to(tl.float32) - mu_b[None, :]) * root
                    f = tl.reshape(xa[:, :, None] * xb[:, None, :], (BT, T)) * weight
                    aw = tl.load(aw_head + g * saw_h + r0 + t, mask=rmask, other=0.0)
                    cw = tl.load(cw_head + g * scw_h + r0 + t, mask=rmask, other=0.0)
                    y = tl.load(y_head + g * sy_h + r0 * sy_t + y_off, mask=rmask[:, None], other=0.0)
                    y = y.to(tl.float32) * aw[:, None]
                    h_tile += tl.dot(tl.trans(f).to(ST).to(ST_OP), y.to(ST).to(ST_OP), input_precision=PREC)
                    z_tile += tl.sum(f * cw[:, None], 0)
                if tl.where(reverse != 0, c % cps == 0, ((c + 1) % cps == 0) | (c == n_chunks - 1)):
                    s_row = (c // cps) * k_rows + D + (pid_f - 1) * T
                    tl.store(h_base + s_row * D + fcols[:, None] * D + cols[None, :], h_tile.to(ST))
                    tl.store(z_base + s_row + fcols, z_tile)

    @triton.jit(do_not_specialize=_FLAGS_OUT)
    def _out_kernel(Q, K, V, W, MU, H, Z, O,
                    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_t,
                    n_heads_q, group, len_q, len_k, super_len, n_states, k_rows, causal, n_tiles,
                    deg2, one, root,
                    D: tl.constexpr, E: tl.constexpr, BM: tl.constexpr,
                    PREC: tl.constexpr, EMULATE: tl.constexpr):
        """Output rows of one query block: (Phi(qt) H_<s + sum_j P(qt . kt_j) w_j v_j) / den, the
        sum over the keys of the block's own super-chunk s up to the row (causal) or empty."""
        NB: tl.constexpr = D // E
        T: tl.constexpr = E * E
        IN: tl.constexpr = Q.dtype.element_ty
        IN_OP: tl.constexpr = tl.float32 if EMULATE else IN
        ST: tl.constexpr = H.dtype.element_ty
        ST_OP: tl.constexpr = tl.float32 if EMULATE else ST
        BI: tl.constexpr = max(16, BM // 2)  # key rows per step of the intra loop
        b, hq, hkv, bkv, i0, rows, rmask, q_ptr, qt, mu = _query_block(Q, MU, sq_b, sq_h, sq_t, n_heads_q, group,
                                                                        len_q, root, D, BM)
        t = tl.arange(0, BM)
        ti = tl.arange(0, BI)
        e = tl.arange(0, E)
        cols = tl.arange(0, D)
        num = tl.zeros([BM, D], dtype=tl.float32)
        den = tl.zeros([BM], dtype=tl.float32)
        sc = i0 // super_len
        if causal != 0:  # the exact polynomial against the keys of this super-chunk up to the row
            k_ptr = K + b * sk_b + hkv * sk_h
            v_ptr = V + b * sv_b + hkv * sv_h
            qt_in = qt.to(IN).to(IN_OP)
            for j0 in range(sc * super_len, tl.minimum(i0 + BM, len_k), BI):
                km = j0 + ti < len_k
                kt = tl.load(k_ptr + (j0 + ti)[:, None] * sk_t + cols[None, :], mask=km[:, None], other=0.0)
                kt = (kt.to(tl.float32) - mu[None, :]) * root
                vv = tl.load(v_ptr + (j0 + ti)[:, None] * sv_t + cols[None, :], mask=km[:, None], other=0.0)
                w = tl.load(W + b * len_k + j0 + ti, mask=km, other=0.0)
                s = tl.dot(qt_in, tl.trans(kt).to(IN).to(IN_OP), input_precision=PREC)
                att = (1.0 + s * (1.0 + 0.5 * deg2 * s)) * tl.where(j0 + ti[None, :] <= rows[:, None], w[None, :], 0.0)
                num += tl.dot(att.to(IN).to(IN_OP), vv.to(IN_OP), input_precision=PREC)
                den += tl.sum(att, 1)
        sidx = tl.where(causal != 0, sc - 1, 0)
        if sidx >= 0:  # the state of the super-chunks before this one (causal) or of all keys
            h_ptr = H + (bkv * n_states + sidx) * k_rows * D
            z_ptr = Z + (bkv * n_states + sidx) * k_rows
            h_lin = tl.load(h_ptr + cols[:, None] * D + cols[None, :])
            num += tl.dot(qt.to(ST).to(ST_OP), h_lin.to(ST_OP), input_precision=PREC)
            den += tl.sum(qt * tl.load(z_ptr + cols)[None, :], 1)
            num += tl.load(h_ptr + (k_rows - 1) * D + cols).to(tl.float32)[None, :]
            den += tl.load(z_ptr + k_rows - 1)
            fcols = tl.arange(0, T)
            qe_off = t[:, None] * sq_t + e[None, :]  # loop-invariant offsets of the tiles' loads
            qmask = rmask[:, None]
            a = 0
            bb = 0
            for p in range(n_tiles):  # feature tiles (a, bb), a <= bb, in state order
                xa = tl.load(q_ptr + a * E + qe_off, mask=qmask, other=0.0)
                xb = tl.load(q_ptr + bb * E + qe_off, mask=qmask, other=0.0)
                xa = xa.to(tl.float32) * root
                xb = xb.to(tl.float32) * root
                f = tl.reshape(xa[:, :, None] * xb[:, None, :], (BM, T)) * tl.where(a == bb, _SQRT_HALF, 1.0)
                frow = D + p * T
                h_tile = tl.load(h_ptr + (frow + fcols)[:, None] * D + cols[None, :])
                num += tl.dot(f.to(ST).to(ST_OP), h_tile.to(ST_OP), input_precision=PREC)
                den += tl.sum(f * tl.load(z_ptr + frow + fcols)[None, :], 1)
                last = bb == NB - 1
                a = tl.where(last, a + 1, a)
                bb = tl.where(last, a, bb + 1)
        # softmax_1: the null key's weight e^{-c}, c = qt . mu_t, kept exact (ops/lowrank.py)
        cq = tl.sum(qt * mu[None, :], 1) * root
        lead = one * tl.exp(tl.minimum(cq, 0.0)) + (1.0 - one)
        den_s = one * tl.exp(-tl.maximum(cq, 0.0)) + lead * den
        den_s = tl.where(den_s == 0.0, 1.0, den_s)
        out = num * (lead / den_s)[:, None]
        o_ptr = O + b * so_b + hq * so_h + i0 * so_t
        tl.store(o_ptr + t[:, None] * so_t + cols[None, :], out.to(O.dtype.element_ty), mask=rmask[:, None])

    @triton.jit(do_not_specialize=_FLAGS_OUT)
    def _dq_kernel(Q, K, V, W, MU, H, Z, DO, OUT, DQ, R, DD,
                   sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                   sdo_b, sdo_h, sdo_t, so_b, so_h, so_t, sdq_b, sdq_h, sdq_t,
                   n_heads_q, group, len_q, len_k, super_len, n_states, k_rows, causal, n_tiles,
                   deg2, one, root,
                   D: tl.constexpr, E: tl.constexpr, BM: tl.constexpr,
                   PREC: tl.constexpr, EMULATE: tl.constexpr):
        """dQ of one query block, and r = dN / dO and dden per row (R, DD [B * Hq, Lq]) for the
        state gradients and dK, dV. The denominator is computed again from the states."""
        NB: tl.constexpr = D // E
        T: tl.constexpr = E * E
        BI: tl.constexpr = max(16, BM // 2)  # key rows per step of the intra loops
        IN: tl.constexpr = Q.dtype.element_ty
        IN_OP: tl.constexpr = tl.float32 if EMULATE else IN
        ST: tl.constexpr = H.dtype.element_ty
        ST_OP: tl.constexpr = tl.float32 if EMULATE else ST
        b, hq, hkv, bkv, i0, rows, rmask, q_ptr, qt, mu = _query_block(Q, MU, sq_b, sq_h, sq_t, n_heads_q, group,
                                                                        len_q, root, D, BM)
        pid_bh = tl.program_id(1)  # the row of R and DD
        t = tl.arange(0, BM)
        ti = tl.arange(0, BI)
        e = tl.arange(0, E)
        cols = tl.arange(0, D)
        fcols = tl.arange(0, T)
        k_ptr = K + b * sk_b + hkv * sk_h
        v_ptr = V + b * sv_b + hkv * sv_h
        qt_in = qt.to(IN).to(IN_OP)
        sc = i0 // super_len
        sidx = tl.where(causal != 0, sc - 1, 0)
        h_ptr = H + (bkv * n_states + sidx) * k_rows * D
        z_ptr = Z + (bkv * n_states + sidx) * k_rows
        j_lo = sc * super_len
        j_hi = tl.minimum(i0 + BM, len_k)
        # pass 1: the denominator
        den = tl.zeros([BM], dtype=tl.float32)
        if causal != 0:
            for j0 in range(j_lo, j_hi, BI):
                km = j0 + ti < len_k
                kt = tl.load(k_ptr + (j0 + ti)[:, None] * sk_t + cols[None, :], mask=km[:, None], other=0.0)
                kt = (kt.to(tl.float32) - mu[None, :]) * root
                w = tl.load(W + b * len_k + j0 + ti, mask=km, other=0.0)
                s = tl.dot(qt_in, tl.trans(kt).to(IN).to(IN_OP), input_precision=PREC)
                m = tl.where(j0 + ti[None, :] <= rows[:, None], w[None, :], 0.0)
                den += tl.sum((1.0 + s * (1.0 + 0.5 * deg2 * s)) * m, 1)
        if sidx >= 0:
            den += tl.sum(qt * tl.load(z_ptr + cols)[None, :], 1)
            den += tl.load(z_ptr + k_rows - 1)
            qe_off = t[:, None] * sq_t + e[None, :]  # loop-invariant offsets of the tiles' loads
            qmask = rmask[:, None]
            a = 0
            bb = 0
            for p in range(n_tiles):
                xa = tl.load(q_ptr + a * E + qe_off, mask=qmask, other=0.0)
                xb = tl.load(q_ptr + bb * E + qe_off, mask=qmask, other=0.0)
                xa = xa.to(tl.float32) * root
                xb = xb.to(tl.float32) * root
                f = tl.reshape(xa[:, :, None] * xb[:, None, :], (BM, T)) * tl.where(a == bb, _SQRT_HALF, 1.0)
                den += tl.sum(f * tl.load(z_ptr + D + p * T + fcols)[None, :], 1)
                last = bb == NB - 1
                a = tl.where(last, a + 1, a)
                bb = tl.where(last, a, bb + 1)
        do = tl.load(DO + b * sdo_b + hq * sdo_h + rows[:, None] * sdo_t + cols[None, :], mask=rmask[:, None], other=0.0)
        o = tl.load(OUT + b * so_b + hq * so_h + rows[:, None] * so_t + cols[None, :], mask=rmask[:, None], other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        cq = tl.sum(qt * mu[None, :], 1) * root
        lead = one * tl.exp(tl.minimum(cq, 0.0)) + (1.0 - one)
        null = one * tl.exp(-tl.maximum(cq, 0.0))
        den_s = null + lead * den
        den_s = tl.where(den_s == 0.0, 1.0, den_s)
        r = lead / den_s  # dN = dO * r
        dden = -delta * r
        dc = delta * null / den_s  # softmax_1: through the null key's weight e^{-c}
        tl.store(R + pid_bh.to(tl.int64) * len_q + rows, r, mask=rmask)
        tl.store(DD + pid_bh.to(tl.int64) * len_q + rows, dden, mask=rmask)
        # pass 2: dQt = intra + J^T (r dO H^T + dden z) + dc mu_t
        dqt = dc[:, None] * (mu * root)[None, :]
        if causal != 0:
            do_in = do.to(IN_OP)
            for j0 in range(j_lo, j_hi, BI):
                km = j0 + ti < len_k
                kt = tl.load(k_ptr + (j0 + ti)[:, None] * sk_t + cols[None, :], mask=km[:, None], other=0.0)
                kt_in = ((kt.to(tl.float32) - mu[None, :]) * root).to(IN).to(IN_OP)
                vv = tl.load(v_ptr + (j0 + ti)[:, None] * sv_t + cols[None, :], mask=km[:, None], other=0.0)
                w = tl.load(W + b * len_k + j0 + ti, mask=km, other=0.0)
                s = tl.dot(qt_in, tl.trans(kt_in), input_precision=PREC)
                dp = tl.dot(do_in, tl.trans(vv).to(IN_OP), input_precision=PREC) * r[:, None] + dden[:, None]
                ds = dp * (1.0 + deg2 * s) * tl.where(j0 + ti[None, :] <= rows[:, None], w[None, :], 0.0)
                dqt += tl.dot(ds.to(IN).to(IN_OP), kt_in, input_precision=PREC)
        if sidx >= 0:
            do_st = do.to(ST).to(ST_OP)
            h_lin = tl.load(h_ptr + cols[:, None] * D + cols[None, :])
            dqt += tl.dot(do_st, tl.trans(h_lin).to(ST_OP), input_precision=PREC) * r[:, None]
            dqt += dden[:, None] * tl.load(z_ptr + cols)[None, :]
            acc = tl.reshape(dqt, (BM, NB, E))  # dQ by E-blocks: the feature tiles' J^T adds per block
            blk = tl.arange(0, NB)[None, :, None]
            qe_off = t[:, None] * sq_t + e[None, :]  # loop-invariant offsets of the tiles' loads
            qmask = rmask[:, None]
            a = 0
            bb = 0
            for p in range(n_tiles):
                xa = tl.load(q_ptr + a * E + qe_off, mask=qmask, other=0.0)
                xb = tl.load(q_ptr + bb * E + qe_off, mask=qmask, other=0.0)
                xa = xa.to(tl.float32) * root
                xb = xb.to(tl.float32) * root
                frow = D + p * T
                h_tile = tl.load(h_ptr + (frow + fcols)[:, None] * D + cols[None, :])
                g = tl.dot(do_st, tl.trans(h_tile).to(ST_OP), input_precision=PREC) * r[:, None]
                g = (g + dden[:, None] * tl.load(z_ptr + frow + fcols)[None, :]) * tl.where(a == bb, _SQRT_HALF, 1.0)
                g3 = tl.reshape(g, (BM, E, E))  # d/dx_a: sum_j g_ij x_bj, d/dx_b: sum_i g_ij x_ai
                acc += tl.where(blk == a, tl.sum(g3 * xb[:, None, :], 2)[:, None, :], 0.0)
                acc += tl.where(blk == bb, tl.sum(g3 * xa[:, :, None], 1)[:, None, :], 0.0)
                last = bb == NB - 1
                a = tl.where(last, a + 1, a)
                bb = tl.where(last, a, bb + 1)
            dqt = tl.reshape(acc, (BM, D))
        dq = dqt * root
        dq_ptr = DQ + b * sdq_b + hq * sdq_h
        tl.store(dq_ptr + rows[:, None] * sdq_t + cols[None, :], dq.to(DQ.dtype.element_ty), mask=rmask[:, None])

    @triton.jit(do_not_specialize=_FLAGS_OUT)
    def _dkdv_kernel(Q, K, V, W, MU, DH, DZ, DO, R, DD, DK, DV,
                     sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                     sdo_b, sdo_h, sdo_t, sdk_b, sdk_h, sdk_t, sdv_b, sdv_h, sdv_t,
                     n_heads_q, group, len_q, len_k, super_len, n_states, k_rows, causal, n_tiles,
                     deg2, one, root,
                     D: tl.constexpr, E: tl.constexpr, BM: tl.constexpr,
                     PREC: tl.constexpr, EMULATE: tl.constexpr):
        """dK, dV of one key block of a KV head: the exact polynomial against the queries of its own
        super-chunk (the `group` query heads summed), and the suffix state gradients dH_>s, dz_>s of
        the super-chunks after its own (causal; of all queries otherwise)."""
        NB: tl.constexpr = D // E
        T: tl.constexpr = E * E
        IN: tl.constexpr = K.dtype.element_ty
        IN_OP: tl.constexpr = tl.float32 if EMULATE else IN
        ST: tl.constexpr = DH.dtype.element_ty
        ST_OP: tl.constexpr = tl.float32 if EMULATE else ST
        # query rows per step of the intra loop (float32 operands take twice the registers)
        BI: tl.constexpr = max(16, BM // 4 if IN == tl.float32 else BM // 2)
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        n_heads_kv = n_heads_q // group
        b = (pid_bh // n_heads_kv).to(tl.int64)
        hkv = pid_bh % n_heads_kv
        j0 = pid_n * BM
        t = tl.arange(0, BM)
        ti = tl.arange(0, BI)
        e = tl.arange(0, E)
        kr = j0 + t
        km = kr < len_k
        cols = tl.arange(0, D)
        k_ptr = K + b * sk_b + hkv * sk_h + j0 * sk_t
        v_ptr = V + b * sv_b + hkv * sv_h + j0 * sv_t
        mu_ptr = MU + pid_bh * D
        mu = tl.load(mu_ptr + cols)
        w = tl.load(W + b * len_k + kr, mask=km, other=0.0)
        dkt = tl.zeros([BM, D], dtype=tl.float32)
        dv = tl.zeros([BM, D], dtype=tl.float32)
        sc = j0 // super_len
        if causal != 0:  # the exact polynomial against the queries of this super-chunk from the key on
            kt = tl.load(k_ptr + t[:, None] * sk_t + cols[None, :], mask=km[:, None], other=0.0)
            kt_in = ((kt.to(tl.float32) - mu[None, :]) * root).to(IN).to(IN_OP)
            vv_in = tl.load(v_ptr + t[:, None] * sv_t + cols[None, :], mask=km[:, None], other=0.0).to(IN_OP)
            n_blocks = tl.cdiv(tl.minimum(sc * super_len + super_len, len_q) - j0, BI)
            for it in range(group * n_blocks):  # (query head, query block) of this KV head
                hq = hkv * group + it // n_blocks
                i0 = j0 + (it % n_blocks) * BI
                rmask = i0 + ti < len_q
                q_ptr = Q + b * sq_b + hq * sq_h
                qt = tl.load(q_ptr + (i0 + ti)[:, None] * sq_t + cols[None, :], mask=rmask[:, None], other=0.0)
                qt_in = (qt.to(tl.float32) * root).to(IN).to(IN_OP)
                do_ptr = DO + b * sdo_b + hq * sdo_h
                do = tl.load(do_ptr + (i0 + ti)[:, None] * sdo_t + cols[None, :], mask=rmask[:, None], other=0.0)
                do = do.to(IN_OP)
                rd_ptr = (b * n_heads_q + hq) * len_q + i0 + ti
                r = tl.load(R + rd_ptr, mask=rmask, other=0.0)
                dd = tl.load(DD + rd_ptr, mask=rmask, other=0.0)
                st = tl.dot(kt_in, tl.trans(qt_in), input_precision=PREC)  # [keys, queries]
                att = (1.0 + st * (1.0 + 0.5 * deg2 * st)) * r[None, :]
                att = tl.where(i0 + ti[None, :] >= kr[:, None], att * w[:, None], 0.0)
                dv += tl.dot(att.to(IN).to(IN_OP), do, input_precision=PREC)
                dp = tl.dot(vv_in, tl.trans(do), input_precision=PREC) * r[None, :] + dd[None, :]
                ds = tl.where(i0 + ti[None, :] >= kr[:, None], dp * (1.0 + deg2 * st) * w[:, None], 0.0)
                dkt += tl.dot(ds.to(IN).to(IN_OP), qt_in, input_precision=PREC)
        sidx = tl.where(causal != 0, sc + 1, 0)
        if sidx < n_states:  # the state gradients of the later super-chunks (causal) or of all queries
            h_ptr = DH + (pid_bh.to(tl.int64) * n_states + sidx) * k_rows * D
            z_ptr = DZ + (pid_bh.to(tl.int64) * n_states + sidx) * k_rows
            kt = tl.load(k_ptr + t[:, None] * sk_t + cols[None, :], mask=km[:, None], other=0.0)
            kt = (kt.to(tl.float32) - mu[None, :]) * root
            vv_st = tl.load(v_ptr + t[:, None] * sv_t + cols[None, :], mask=km[:, None], other=0.0).to(ST).to(ST_OP)
            h_lin = tl.load(h_ptr + cols[:, None] * D + cols[None, :])
            dpk = tl.dot(vv_st, tl.trans(h_lin).to(ST_OP), input_precision=PREC) + tl.load(z_ptr + cols)[None, :]
            dkt += dpk * w[:, None]
            dv += tl.dot((kt * w[:, None]).to(ST).to(ST_OP), h_lin.to(ST_OP), input_precision=PREC)
            dv += w[:, None] * tl.load(h_ptr + (k_rows - 1) * D + cols).to(tl.float32)[None, :]
            acc = tl.reshape(dkt, (BM, NB, E))  # dK by E-blocks: the feature tiles' J^T adds per block
            fcols = tl.arange(0, T)
            blk = tl.arange(0, NB)[None, :, None]
            # float32 states: the dV and dK products of a tile in two passes over the tiles (the
            # registers of both do not fit with float32 operands); one pass otherwise
            for part in tl.static_range(2 if ST == tl.float32 else 1):
                a = 0
                bb = 0
                for p in range(n_tiles):
                    xa = tl.load(k_ptr + t[:, None] * sk_t + (a * E + e)[None, :], mask=km[:, None], other=0.0)
                    xb = tl.load(k_ptr + t[:, None] * sk_t + (bb * E + e)[None, :], mask=km[:, None], other=0.0)
                    xa = (xa.to(tl.float32) - tl.load(mu_ptr + a * E + e)[None, :]) * root
                    xb = (xb.to(tl.float32) - tl.load(mu_ptr + bb * E + e)[None, :]) * root
                    weight = w[:, None] * tl.where(a == bb, _SQRT_HALF, 1.0)
                    frow = D + p * T
                    h_tile = tl.load(h_ptr + (frow + fcols)[:, None] * D + cols[None, :])
                    if part == 1 or ST != tl.float32:
                        g = tl.dot(vv_st, tl.trans(h_tile).to(ST_OP), input_precision=PREC)
                        g = (g + tl.load(z_ptr + frow + fcols)[None, :]) * weight
                        g3 = tl.reshape(g, (BM, E, E))  # d/dx_a: sum_j g_ij x_bj, d/dx_b: sum_i g_ij x_ai
                        acc += tl.where(blk == a, tl.sum(g3 * xb[:, None, :], 2)[:, None, :], 0.0)
                        acc += tl.where(blk == bb, tl.sum(g3 * xa[:, :, None], 1)[:, None, :], 0.0)
                    if part == 0:
                        f = tl.reshape(xa[:, :, None] * xb[:, None, :], (BM, T)) * weight
                        dv += tl.dot(f.to(ST).to(ST_OP), h_tile.to(ST_OP), input_precision=PREC)
                    last = bb == NB - 1
                    a = tl.where(last, a + 1, a)
                    bb = tl.where(last, a, bb + 1)
            dkt = tl.reshape(acc, (BM, D))
        dk = dkt * root
        tl.store(DK + b * sdk_b + hkv * sdk_h + kr[:, None] * sdk_t + cols[None, :], dk.to(DK.dtype.element_ty),
                 mask=km[:, None])
        tl.store(DV + b * sdv_b + hkv * sdv_h + kr[:, None] * sdv_t + cols[None, :], dv.to(DV.dtype.element_ty),
                 mask=km[:, None])

    KERNELS = {"state": _state_kernel, "out": _out_kernel, "dq": _dq_kernel, "dkdv": _dkdv_kernel}
    INTERPRETED = type(_out_kernel).__name__ == "InterpretedFunction"
else:
    KERNELS = {}
    INTERPRETED = False


# --- host side --------------------------------------------------------------------------------------


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dim has stride 1 (any other layout is read through its strides)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float32 else torch.bfloat16


def _precision() -> tuple[str, bool]:
    """(PREC, EMULATE): TF32 tensor-core products for float32 operands on the GPU; under the
    interpreter, exact float32 products of operands rounded to their dtype."""
    return ("ieee", True) if _interpreting() else ("tf32", False)


class _Launch:
    """Shapes, scalars and small buffers shared by the launches of one call."""

    def __init__(self, q, k, v, scale, degree, causal, key_weight, center, softmax_one, chunk):
        if degree not in (1, 2):
            raise ValueError(f"degree must be 1 or 2, got {degree}")
        b, hq, lq, d = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        if d not in HEAD_DIMS:
            raise ValueError(f"head dim {d} not in {HEAD_DIMS}")
        if hq % hkv:
            raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
        if causal and lq != lk:
            raise ValueError(f"causal low-rank attention needs Lq == Lk, got {lq} and {lk}")
        if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
            raise ValueError(f"q, k, v must share one of {DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
        c = chunk or CHUNK
        if q.device.type == "cuda" and not _interpreting() and c != CHUNK:
            raise ValueError(f"the compiled kernels run chunks of {CHUNK} rows, got {c}")
        if c not in (16, 32, 64):
            raise ValueError(f"chunk must be 16, 32 or 64, got {c}")
        self.b, self.hq, self.hkv, self.g, self.lq, self.lk, self.d = b, hq, hkv, hq // hkv, lq, lk, d
        self.c, self.causal, self.degree = c, causal, degree
        self.root = math.sqrt(scale)
        self.n_pairs = pair_count(d, degree)
        self.k_rows = state_rows(d, degree)
        self.super_len = super_chunk(c) if causal else triton.cdiv(max(lq, lk), c) * c
        self.n_states = triton.cdiv(lk, self.super_len) if causal else 1
        self.needs_states = self.n_states > 1 or not causal
        mu = key_center(k, key_weight) if center is None else center
        self.mu = mu.to(torch.float32).expand(b, hkv, 1, d).reshape(b, hkv, d).contiguous()
        if key_weight is None:
            self.w = torch.ones(b, lk, dtype=torch.float32, device=q.device)
        else:
            self.w = key_weight.to(torch.float32).expand(b, lk).contiguous()
        self.prec, self.emulate = _precision()
        self.sdt = _state_dtype(q.dtype)
        self.flags = dict(deg2=1.0 if degree == 2 else 0.0, one=1.0 if softmax_one else 0.0, root=self.root)
        self.meta = dict(D=d, E=BLOCK, PREC=self.prec, EMULATE=self.emulate, num_warps=NUM_WARPS,
                         num_stages=NUM_STAGES)

    def counts(self):
        """The count arguments of _out_kernel, _dq_kernel and _dkdv_kernel."""
        return (self.hq, self.g, self.lq, self.lk, self.super_len, self.n_states, self.k_rows,
                int(self.causal), self.n_pairs)

    def states(self, launch, x, y, mu, aw, cw, aw_strides, cw_strides, group, n_rows, reverse):
        """Run _state_kernel: (H [B, Hkv, n_states, K, D], z [B, Hkv, n_states, K])."""
        h = torch.empty(self.b, self.hkv, self.n_states, self.k_rows, self.d, dtype=self.sdt, device=x.device)
        z = torch.empty(self.b, self.hkv, self.n_states, self.k_rows, dtype=torch.float32, device=x.device)
        n_chunks = triton.cdiv(n_rows, self.c)
        cps = self.super_len // self.c if self.causal else n_chunks
        grid = (1 + self.n_pairs, self.b * self.hkv)
        launch(_state_kernel)[grid](
            x, y, mu, aw, cw, h, z,
            x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
            *aw_strides, *cw_strides,
            self.hkv, group, n_rows, n_chunks, cps, self.n_states, int(reverse), self.k_rows, self.root,
            BT=self.c, **self.meta)
        return h, z

    def key_states(self, launch, k, v):
        lk_strides = (self.lk, 0)
        return self.states(launch, k, v, self.mu, self.w, self.w, lk_strides, lk_strides, 1, self.lk, False)


def _plain(kernel):
    return kernel


def _strides(*ts):
    return [s for t in ts for s in (t.stride(0), t.stride(1), t.stride(2))]


def _forward(q, k, v, key_weight, center, scale, degree, causal, softmax_one, chunk, launch):
    if q.shape[2] == 0 or k.shape[2] == 0:
        return torch.zeros_like(q)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    p = _Launch(q, k, v, scale, degree, causal, key_weight, center, softmax_one, chunk)
    if p.needs_states:
        h, z = p.key_states(launch, k, v)
    else:  # one causal super-chunk: the exact polynomial alone, no state is read
        h = torch.empty(1, dtype=p.sdt, device=q.device)
        z = torch.empty(1, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    grid = (triton.cdiv(p.lq, p.c), p.b * p.hq)
    launch(_out_kernel)[grid](q, k, v, p.w, p.mu, h, z, out, *_strides(q, k, v, out), *p.counts(),
                              **p.flags, BM=p.c, **p.meta)
    return out


def _backward(dout, q, k, v, out, key_weight, center, scale, degree, causal, softmax_one, chunk, launch):
    if q.shape[2] == 0 or k.shape[2] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dout, out = dout.to(q.dtype), out.to(q.dtype)  # the compiled kernels take them in the inputs' dtype
    dout, q, k, v, out = (_unit_last(t) for t in (dout, q, k, v, out))
    p = _Launch(q, k, v, scale, degree, causal, key_weight, center, softmax_one, chunk)
    if p.needs_states:
        h, z = p.key_states(launch, k, v)
    else:
        h = torch.empty(1, dtype=p.sdt, device=q.device)
        z = torch.empty(1, dtype=torch.float32, device=q.device)
    r = torch.empty(p.b, p.hq, p.lq, dtype=torch.float32, device=q.device)
    dden = torch.empty_like(r)
    dq = torch.empty_like(q)
    grid = (triton.cdiv(p.lq, p.c), p.b * p.hq)
    launch(_dq_kernel)[grid](q, k, v, p.w, p.mu, h, z, dout, out, dq, r, dden,
                             *_strides(q, k, v, dout, out, dq), *p.counts(), **p.flags, BM=p.c, **p.meta)
    if p.needs_states:
        zero_mu = torch.zeros_like(p.mu)
        rd_strides = (p.hq * p.lq, p.lq)
        dh, dz = p.states(launch, q, dout, zero_mu, r, dden, rd_strides, rd_strides, p.g, p.lq, True)
    else:
        dh, dz = h, z
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    grid = (triton.cdiv(p.lk, p.c), p.b * p.hkv)
    launch(_dkdv_kernel)[grid](q, k, v, p.w, p.mu, dh, dz, dout, r, dden, dk, dv,
                               *_strides(q, k, v, dout, dk, dv), *p.counts(), **p.flags, BM=p.c, **p.meta)
    return dq, dk, dv


def _check_runnable(q):
    if not HAVE_TRITON:
        raise RuntimeError("the fused low-rank kernels need Triton")
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError("the fused low-rank kernels run on CUDA tensors (or under TRITON_INTERPRET=1)")


def lowrank_attention_forward_triton(q, k, v, *, scale, degree, causal, key_weight=None, center=None,
                                     softmax_one=False, chunk=None):
    """Low-rank attention output [B, Hq, Lq, D] in the dtype of q, computed by the fused kernels.

    Same numbers as `lowrank.lowrank_attention_forward` up to float32 rounding (and the rounding
    of 16-bit dot operands): keys centred on `center` [B, Hkv, 1, D] (default: the mean of the
    unmasked keys, `naive.key_center`), `key_weight` [B, Lk] multiplying each key's weight,
    GQA through Hq = G * Hkv, softmax_1 with `softmax_one`. `chunk`: rows per chunk (16, 32 or 64;
    the compiled kernels run 64), super-chunks of SUPER_CHUNKS chunks.
    On CUDA the call goes through the `lora_pass::lowrank_attention_fwd_triton` op.
    """
    _check_runnable(q)
    if q.device.type == "cuda" and not _interpreting():
        return torch.ops.lora_pass.lowrank_attention_fwd_triton(
            q, k, v, key_weight, center, float(scale), int(degree), bool(causal), bool(softmax_one), int(chunk or 0))
    return _forward(q, k, v, key_weight, center, scale, degree, causal, softmax_one, chunk, _plain)


def lowrank_attention_backward_triton(dout, q, k, v, out, *, scale, degree, causal, key_weight=None, center=None,
                                      softmax_one=False, chunk=None):
    """Chained gradient (dq, dk, dv) of `lowrank_attention_forward_triton` (mu a constant), as
    `lowrank.lowrank_attention_backward`; `out` is the forward's output. Features are recomputed,
    the state gradients run over the queries in reverse, nothing L x L is formed.
    On CUDA the call goes through the `lora_pass::lowrank_attention_bwd_triton` op.
    """
    _check_runnable(q)
    if q.device.type == "cuda" and not _interpreting():
        return tuple(torch.ops.lora_pass.lowrank_attention_bwd_triton(
            dout, q, k, v, out, key_weight, center, float(scale), int(degree), bool(causal), bool(softmax_one),
            int(chunk or 0)))
    return _backward(dout, q, k, v, out, key_weight, center, scale, degree, causal, softmax_one, chunk, _plain)


if HAVE_TRITON:
    from torch.library import triton_op, wrap_triton

    @triton_op("lora_pass::lowrank_attention_fwd_triton", mutates_args=())
    def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_weight: torch.Tensor | None,
                center: torch.Tensor | None, scale: float, degree: int, causal: bool, softmax_one: bool,
                chunk: int) -> torch.Tensor:
        return _forward(q, k, v, key_weight, center, scale, degree, causal, softmax_one, chunk or None, wrap_triton)

    @triton_op("lora_pass::lowrank_attention_bwd_triton", mutates_args=())
    def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                key_weight: torch.Tensor | None, center: torch.Tensor | None, scale: float, degree: int,
                causal: bool, softmax_one: bool, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _backward(dout, q, k, v, out, key_weight, center, scale, degree, causal, softmax_one, chunk or None,
                         wrap_triton)


# --- what the op compiles ---------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def kernel_configs():
    """Every (kernel name, constexpr config) the op launches on a GPU: the four kernels for each
    head dim in HEAD_DIMS and input dtype in DTYPES, chunk CHUNK. Degree, causality, softmax_1,
    GQA, key weights and lengths are runtime arguments of the same compiled kernels."""
    out = []
    for name in KERNEL_NAMES:
        for d in HEAD_DIMS:
            for dtype in DTYPES:
                out.append((name, dict(D=d, E=BLOCK, chunk=CHUNK, dtype=dtype, PREC="tf32", EMULATE=False,
                                       num_warps=NUM_WARPS, num_stages=NUM_STAGES)))
    return out


def _is_stride(arg: str) -> bool:
    """Tensor strides (sq_t, sdo_b, ...): specialised on divisibility by 16; the counts and flags and
    the strides of the small row-weight buffers are not specialised."""
    return re.fullmatch(r"s[a-z]+_[bht]", arg) is not None and arg not in _FLAGS_STATE


def _signature(kernel, types: dict, constexprs: dict):
    """Triton signature {arg: type}: `types` for the named pointers and floats, "i32" for the rest."""
    sig = {}
    for name in kernel.arg_names:
        sig[name] = "constexpr" if name in constexprs else types.get(name, "i32")
    return sig


def compile_specs():
    """For each entry of kernel_configs(): a dict with the jitted `fn`, its `signature`, `constexprs`,
    `attrs` (16-byte aligned pointers, strides divisible by 16: the common case of D in HEAD_DIMS),
    the compile `options` (num_warps, num_stages) and a `name` for the test ids.

    `triton.compile(triton.compiler.ASTSource(fn, signature, constexprs, attrs),
    target=GPUTarget("cuda", 90, 32), options=options)` compiles one without a GPU. The functions
    must be jitted, not interpreted: build the specs in a process without TRITON_INTERPRET=1.
    """
    specs = []
    for name, cfg in kernel_configs():
        fn = KERNELS[name]
        t = _TRITON_DTYPE[cfg["dtype"]]
        st = "fp32" if cfg["dtype"] == torch.float32 else "bf16"
        ptr = {"state": dict(X=t, Y=t, MU="fp32", AW="fp32", CW="fp32", H=st, Z="fp32"),
               "out": dict(Q=t, K=t, V=t, W="fp32", MU="fp32", H=st, Z="fp32", O=t),
               "dq": dict(Q=t, K=t, V=t, W="fp32", MU="fp32", H=st, Z="fp32", DO=t, OUT=t, DQ=t, R="fp32",
                          DD="fp32"),
               "dkdv": dict(Q=t, K=t, V=t, W="fp32", MU="fp32", DH=st, DZ="fp32", DO=t, R="fp32", DD="fp32",
                            DK=t, DV=t)}[name]
        types = {k: "*" + v for k, v in ptr.items()}
        types.update(root="fp32", deg2="fp32", one="fp32")
        constexprs = dict(D=cfg["D"], E=cfg["E"], PREC=cfg["PREC"], EMULATE=cfg["EMULATE"])
        constexprs["BT" if name == "state" else "BM"] = cfg["chunk"]
        signature = _signature(fn, types, constexprs)
        aligned = [i for i, a in enumerate(fn.arg_names) if a in ptr or _is_stride(a)]
        attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
        specs.append(dict(name=f"{name}-d{cfg['D']}-{t}", kernel=name, fn=fn, signature=signature,
                          constexprs=constexprs, attrs=attrs,
                          options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])))
    return specs
