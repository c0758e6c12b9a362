"""Chunked low-rank attention forward and chained backward, written for Inductor.

Nothing here forms an L x L matrix: keys and queries are processed in chunks of `chunk` rows,
features are recomputed in the backward instead of being saved, and every product is
(rows x k)(k x d) or smaller. Causal attention uses prefix states H_<c, z_<c for earlier chunks
and the exact Taylor polynomial inside a chunk.

The loops over chunks are `scan`s (`control_flow.scan`): traced once, whatever the number of chunks,
and lowered by Inductor to a loop around one compiled chunk step, so compile time does not grow
with L and only one chunk's features are alive at a time. A scan runs over chunk numbers and each
step reads its chunk of q, k, v (dO, O) straight from the inputs (`_take`): the inputs are
neither copied into a chunk-major layout nor reversed, and the centring and scaling are applied
to one chunk at a time. Outputs are written heads inside ([B, L, H, D] transposed, the flash
kernel's layout, ops/layout.py), which for B = 1 makes the stacked scan output the result itself;
the op (ops/attention.py) fixes the final layouts of both paths in one place.
Peak memory is the outputs plus O(C k + k d) per head for chunk size C and k features.
Lengths that are not a multiple of the chunk are zero-padded (a copy): padded keys have weight 0
(non-causal) or come after every real query (causal), padded query rows are dropped.

Causal backward (docs/design.md, "Causal backward in two scans"): a scan in the forward's order
carries H_<c, z_<c and gives dQ; a scan in reverse order carries the state gradients dH_>c, dz_>c
of the later chunks and gives dK, dV (put back in order in place, `layout.reverse_leading_`).
Five (rows x k)(k x d) products per chunk, no subtraction of states (nothing cancels), and float32
states for float32 compute. The last scan of either backward, during which every output is
alive, takes fewer rows per step than the chunk (LAST_SCAN_ROWS; docs/design.md,
"Memory of the last scan").

Layout: q [B, Hq, Lq, D] is viewed as [B, Hkv, G * rows, D] per chunk so that the G query heads
of a KV head share its states (GQA without copying K or V).

softmax_one (outlier-free attention, softmax_1 = ordinary softmax with a null key of logit 0 and
value 0): after centring, the null key's logit is -c_i with c_i = qt_i . (mu sqrt(scale)), and
its weight e^{-c_i} is kept exact. With the current numerator N_i and denominator D_i the output
is N_i / (e^{-c_i} + D_i), computed as a_i N_i / (b_i + a_i D_i) with a_i = e^{min(c_i, 0)} and
b_i = e^{-max(c_i, 0)}, both in (0, 1], so nothing overflows however large |c_i| is.
"""

from __future__ import annotations

import math

import torch

from . import control_flow
from .features import FeatureTensors, feature_rank, taylor_features, taylor_features_vjp
from .layout import reverse_leading_
from .naive import key_center, taylor_polynomial

CHUNK_CAUSAL = 64  # causal: the exact polynomial inside a chunk costs O(L C d)
CHUNK_FULL = 64  # non-causal: the chunk only bounds the memory of the features
LAST_SCAN_ROWS = 8  # rows per step of the backward's last scan (dK, dV), when every output is alive
CAUSAL_ONE_CHUNK = 256  # causal sequences up to this long are one chunk: no features at all


def chunk_size(length, causal: bool = True) -> int:
    """Rows per chunk: the whole length when it is at most CHUNK_FULL (non-causal) or
    CAUSAL_ONE_CHUNK (causal), else CHUNK_FULL or CHUNK_CAUSAL. A symbolic length (dynamic
    shapes) always gets CHUNK_FULL or CHUNK_CAUSAL: the number of chunks is then the symbolic
    trip count of the loops, and nothing is specialised on the length.

    The chunk loop is a scan, compiled once, so the number of chunks costs no compile time;
    the chunk size sets the causal intra-chunk cost and the memory of one chunk's features
    (measured on bench/attention.py: 64 rows is fastest for long causal sequences). A causal
    sequence of one chunk is the masked polynomial alone, O(L^2 d) but with no O(L k d) feature
    products, which is cheaper for short sequences.
    """
    if not isinstance(length, int):
        return CHUNK_CAUSAL if causal else CHUNK_FULL
    if causal:
        return max(1, length if length <= CAUSAL_ONE_CHUNK else CHUNK_CAUSAL)
    return max(1, min(length, CHUNK_FULL))


def _several(n) -> bool:
    """Whether a number of chunks may be more than one (always, when it is symbolic)."""
    return not isinstance(n, int) or n > 1


def _chunks(length, chunk: int):
    """Chunks that hold `length` rows: ceil(length / chunk), and one more for a symbolic length.

    The extra chunk (zero padding, 1 to 2 chunks of it in all) keeps every size the compiler
    tests away from its special values whatever the length: the chunk count is never 1 and the
    padding never empty or a single row. Tests of those (the contiguity of a tensor with a size-1
    dimension, a concatenation with an empty tensor) would otherwise guard the graph on L <= 64
    or on L mod 64, and a later length on the other side would compile it again.
    """
    return math.ceil(length / chunk) if isinstance(length, int) else (length + chunk - 1) // chunk + 1


def last_scan_rows(chunk: int) -> int:
    """Rows per step of the backward's last scan (dK, dV; the causal reverse scan or the
    non-causal key scan): LAST_SCAN_ROWS, or the chunk when it is not a multiple of it
    (docs/design.md, "Memory of the last scan")."""
    return LAST_SCAN_ROWS if chunk % LAST_SCAN_ROWS == 0 else chunk


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _padded(t: torch.Tensor, dim: int, rows) -> torch.Tensor:
    """t zero-padded along `dim` to `rows` (t itself when it is long enough; with symbolic sizes
    always a concatenation, of a padding that may be empty)."""
    pad = rows - t.shape[dim]
    if isinstance(pad, int) and pad <= 0:
        return t
    return torch.cat([t, t.new_zeros(t.shape[:dim] + (pad,) + t.shape[dim + 1:])], dim=dim)


def _take(t: torch.Tensor, dim: int, chunk: int, i: torch.Tensor) -> torch.Tensor:
    """Chunk number `i` ([1] int64) of `t` along `dim`: rows i * chunk .. (i + 1) * chunk."""
    t = t.unflatten(dim, (t.shape[dim] // chunk, chunk))
    return t.index_select(dim, i).squeeze(dim)


def _zeroed(t: torch.Tensor) -> torch.Tensor:
    """Zeros computed from t (0 for every value, NaN and infinities included): the initial state of a
    second scan made from the first one's final state, so that Inductor writes it into that dead
    buffer instead of allocating a second state (the first scan's final state stays referenced)."""
    return torch.nan_to_num(t - t, 0.0, 0.0, 0.0)


def _sequence(t: torch.Tensor, length: int) -> torch.Tensor:
    """Stacked per-chunk outputs [n, B, C, *heads, D] -> [B, H, length, D], stored heads inside
    ([B, L, H, D] transposed, ops/layout.py): a view for B = 1, one copy otherwise."""
    t = t.movedim(0, 1).flatten(1, 2).flatten(2, -2)
    return t.narrow(1, 0, length).transpose(1, 2)


class _Prepared:
    """Inputs padded to whole chunks, the key centre, and the per-chunk views of them.

    Stored whole: `q` [B, Hkv, G, Nq * C, D], `k`, `v` [B, Hkv, Nk * C, D] (the inputs' dtype),
    `w` [B, 1, Nk * C, 1] (key weights; None without them), `mu` [B, Hkv, 1, D]. The chunk
    helpers below take a chunk number and return it centred, scaled and in the compute dtype.
    """

    def __init__(self, q, k, v, scale, key_weight, center=None, degree=2, tables=None, softmax_one=False,
                 chunk=None, causal=False):
        cdt = compute_dtype(q.dtype)
        self.cdt = cdt
        self.degree, self.softmax_one = degree, softmax_one
        self.tables = tables if tables is not None else FeatureTensors.build(q.shape[-1], degree, q.device)
        b, hq, lq, d = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        if causal and lq != lk:
            raise ValueError(f"causal low-rank attention needs Lq == Lk, got {lq} and {lk}")
        self.b, self.hkv, self.g, self.lq, self.lk, self.d = b, hkv, hq // hkv, lq, lk, d
        self.sizes = (b, lq, lk)
        self.root = math.sqrt(scale)
        static = isinstance(lq, int) and isinstance(lk, int)
        c = chunk or chunk_size(max(lq, lk, 1) if static else lq, causal)
        self.c = c = max(1, min(c, max(lq, lk, 1))) if static else c
        self.nq, self.nk = _chunks(lq, c), _chunks(lk, c)
        self.q = self.queries(q)
        self.k, self.v = _padded(k, 2, self.nk * c), _padded(v, 2, self.nk * c)
        self.mu = (key_center(k, key_weight) if center is None else center).to(cdt)
        w = None if key_weight is None else key_weight[:, None, :, None]
        if w is None and not causal and not (isinstance(lk, int) and self.nk * c == lk):
            w = torch.ones(b, 1, lk, 1, dtype=cdt, device=q.device)  # padded keys get weight 0
        self.has_weight = key_weight is not None
        self.w = None if w is None else _padded(w, 2, self.nk * c)
        self.mu_t = self.mu * self.root  # softmax_one's c_i = qt_i . mu_t

    def scan(self, fn, init, xs, extra=()):
        """control_flow.scan, binding the symbolic sizes of the inputs (dynamic shapes) for its outputs."""
        return control_flow.scan(fn, init, xs, extra, sizes=self.sizes)

    def queries(self, t):
        """[B, Hq, Lq, D] (q, dO, O) -> [B, Hkv, G, Nq * C, D], padded."""
        return _padded(t.view(self.b, self.hkv, self.g, self.lq, self.d), 3, self.nq * self.c)

    # --- one chunk, from its number i ([1] int64) -------------------------------------------------

    def rows(self, t):
        """[B, Hkv, G, C, X] -> [B, Hkv, G * C, X]."""
        return t.reshape(self.b, self.hkv, self.g * t.shape[-2], t.shape[-1])

    def unrows(self, t):
        return t.view(self.b, self.hkv, self.g, self.c, t.shape[-1])

    def query_out(self, t):
        """Rows [B, Hkv, G * C, D] of an output -> [B, C, Hkv, G, D], a step's slice of `_sequence`."""
        return self.unrows(t).permute(0, 3, 1, 2, 4)

    @staticmethod
    def key_out(t):
        """[B, Hkv, C, D] -> [B, C, Hkv, D], a step's slice of `_sequence`."""
        return t.transpose(1, 2)

    def query_rows(self, t, i, rows=None):
        """Chunk i of a [B, Hkv, G, Nq * C, X] tensor as [B, Hkv, G * C, X] in the compute dtype
        (chunks of `rows` queries, a divisor of the chunk size, when given)."""
        return self.rows(_take(t, 3, rows or self.c, i)).to(self.cdt)

    def qt(self, q, i, rows=None):
        return self.query_rows(q, i, rows) * self.root

    def keys(self, k, v, w, mu, i, rows=None):
        """(kt_c, v_c, w_c): centred scaled keys [B, Hkv, C, D], values, weights [B, 1, C, 1] or None
        of key chunk i, with chunks of `rows` keys (default: the chunk size; a divisor of it)."""
        rows = rows or self.c
        kt = (_take(k, 2, rows, i).to(self.cdt) - mu) * self.root
        vc = _take(v, 2, rows, i).to(self.cdt)
        return kt, vc, (None if w is None else _take(w, 2, rows, i).to(self.cdt))

    def null(self, qr, mu_t):
        """softmax_one: (a, b) = (e^{min(c, 0)}, e^{-max(c, 0)}) per row, c = qt . mu_t; () otherwise."""
        if not self.softmax_one:
            return ()
        cq = (qr * mu_t).sum(-1, keepdim=True)
        return torch.exp(cq.clamp_max(0)), torch.exp(-cq.clamp_min(0))

    def features(self, x, tables):
        return taylor_features(x, self.degree, FeatureTensors(tables))

    def features_vjp(self, x, grad, tables):
        return taylor_features_vjp(x, grad, self.degree, FeatureTensors(tables))

    def key_features(self, kt_c, w_c, tables):
        pk = self.features(kt_c, tables)
        return pk if w_c is None else pk * w_c

    def intra(self, qr, kt_c, w_c):
        """Masked exact polynomial inside a causal chunk: S, the mask and A = P_g(S) * mask."""
        s = qr @ kt_c.transpose(-1, -2)
        c = kt_c.shape[-2]
        m = torch.ones(c, c, dtype=s.dtype, device=s.device).tril().repeat(self.g, 1)  # [G * C, C]
        if w_c is not None:
            m = m * w_c.transpose(-1, -2)
        return s, m, taylor_polynomial(s, self.degree) * m

    def causal_chunk(self, k, v, w, mu, q, i, rows=None):
        """Chunk i of a causal sequence (chunks of `rows`, default the chunk size): (kt_c, v_c, w_c,
        qr) and the intra-chunk (S, mask, A)."""
        kt_c, v_c, w_c = self.keys(k, v, w, mu, i, rows)
        qr = self.qt(q, i, rows)
        return (kt_c, v_c, w_c, qr), self.intra(qr, kt_c, w_c)

    def intra_grad(self, s, m, dn, dden, v_c):
        """dS inside a causal chunk from dN and dden: the exact polynomial, P_g' = P_{g-1}."""
        return (dn @ v_c.transpose(-1, -2) + dden) * m * taylor_polynomial(s, self.degree - 1)

    def null_weights(self, den, null):
        """softmax_one: (a, b + a * den) with a = e^{min(c, 0)}, b = e^{-max(c, 0)} for one chunk.

        The second is e^{min(c, 0)} (e^{-c} + den). It is 0 only when b underflows and den = 0 (a row
        whose keys are all masked out, numerator 0 as well): it is then replaced by 1, so that the
        row's output is 0, the limit of softmax_1, instead of 0 / 0.
        """
        a, b = null
        den_s = b + a * den
        return a, b, den_s.masked_fill(den_s == 0, 1.0)

    def visible(self, den):
        """A row whose visible keys are all masked out (left padding under a causal mask) has
        numerator and denominator exactly 0: its denominator becomes 1, so that its output is 0,
        as in SDPA and the exact path, and its gradients are 0 (its keys have weight 0)."""
        return den if not self.has_weight else den.masked_fill(den == 0, 1.0)

    def normalise(self, num, den, null):
        """Output rows of one chunk from their numerator and denominator."""
        if not self.softmax_one:
            return num / self.visible(den)
        a, _, den_s = self.null_weights(den, null)
        return num * (a / den_s)

    def output_grads(self, den, do_r, o_r, null):
        """(r, dden, dc) for the rows of one chunk, O being the forward's output; dN = dO * r.

        Softmax: O = N / den, r = 1 / den, dden = -rowsum(dO * O) / den, dc = None.
        softmax_one: O = a N / den_s with den_s = b + a den (`null_weights`), so
        r = a / den_s, dden = -rowsum(dO * O) a / den_s, and the null key's weight
        e^{-c} = b / a gives dc = rowsum(dO * O) b / den_s (O = N / (e^{-c} + den)).
        """
        delta = (do_r * o_r).sum(-1, keepdim=True)
        if not self.softmax_one:
            r = 1 / self.visible(den)
            return r, -delta * r, None
        a, b, den_s = self.null_weights(den, null)
        r = a / den_s
        return r, -delta * r, delta * (b / den_s)

    def key_grads(self, kt_c, v_c, w_c, dh, dz, tables):
        """d(kt), dv of one key chunk from the state gradients dH [.., k, D] and dz [.., k]."""
        pk = self.key_features(kt_c, w_c, tables)
        dpk = v_c @ dh.transpose(-1, -2) + dz[..., None, :]
        dv_c = pk @ dh
        if w_c is not None:
            dpk = dpk * w_c
        return self.features_vjp(kt_c, dpk, tables), dv_c

    def state_zeros(self):
        rank = feature_rank(self.d, self.degree)
        return (torch.zeros(self.b, self.hkv, rank, self.d, dtype=self.cdt, device=self.k.device),
                torch.zeros(self.b, self.hkv, rank, dtype=self.cdt, device=self.k.device))

    def regroup(self, t, rows):
        """Per-chunk rows [Nq, B, Hkv, G * C, X] (a scan's stacked output) -> the same rows in
        chunks of `rows`: [Nq * C / rows, B, Hkv, G * rows, X] (a copy of L numbers; t itself when
        rows is the chunk size)."""
        f = self.c // rows
        if f == 1:
            return t
        n, b, h, _, x = t.shape
        t = t.view(n, b, h, self.g, f, rows, x).permute(0, 4, 1, 2, 3, 5, 6)
        return t.reshape(n * f, b, h, self.g * rows, x)

    def chunk_numbers(self, n, reverse=False):
        """Scan input [n, 1]: the chunk number each step reads (last chunk first with `reverse`)."""
        i = torch.arange(n, device=self.k.device)
        return ((n - 1 - i) if reverse else i).view(n, 1)

    def key_inputs(self):
        """Loop-invariant scan operands for the key side: k, v, mu, and w when there are weights."""
        return (self.k, self.v, self.mu) + (() if self.w is None else (self.w,))

    def split_key_inputs(self, extra):
        """(k, v, w, mu, rest) from operands that start with `key_inputs()`."""
        n = 3 if self.w is None else 4
        return extra[0], extra[1], (extra[3] if self.w is not None else None), extra[2], extra[n:]


def _states(p: _Prepared):
    """H = sum_j Phi(kt_j) v_j^T [B, Hkv, k, D] and z = sum_j Phi(kt_j) [B, Hkv, k] over every key chunk."""

    def step(carry, x, extra):
        h, z = carry
        k, v, w, mu, tables = p.split_key_inputs(extra)
        kt_c, v_c, w_c = p.keys(k, v, w, mu, x[0])
        pk = p.key_features(kt_c, w_c, tables)
        return (h + pk.transpose(-1, -2) @ v_c, z + pk.sum(-2)), ()

    (h, z), _ = p.scan(step, p.state_zeros(), (p.chunk_numbers(p.nk),), (*p.key_inputs(), *p.tables))
    return h, z


def lowrank_attention_forward(q, k, v, *, scale, degree, causal, key_weight=None, chunk=None, center=None,
                              tables=None, softmax_one=False):
    """Low-rank attention output [B, Hq, Lq, D] in the dtype of q.

    `center` [B, Hkv, 1, D] overrides the key centre mu (default: mean of the unmasked keys).
    `softmax_one`: softmax_1 attention (a null key of logit 0 and value 0, its weight exact).
    """
    if q.shape[2] == 0 or k.shape[2] == 0:
        return q.new_zeros(q.shape)
    p = _Prepared(q, k, v, scale, key_weight, center, degree, tables, softmax_one, chunk, causal)
    if not causal:
        h, z = _states(p)

        def query_step(carry, x, extra):
            q, h, z, mu_t, tables = extra[0], extra[1], extra[2], extra[3], extra[4:]
            qr = p.qt(q, x[0])
            pq = p.features(qr, tables)
            return (), (p.query_out(p.normalise(pq @ h, pq @ z[..., None], p.null(qr, mu_t))),)

        _, (out,) = p.scan(query_step, (), (p.chunk_numbers(p.nq),), (p.q, h, z, p.mu_t, *p.tables))
    else:
        def step(carry, x, extra):
            h, z = carry  # states of the chunks before this one
            k, v, w, mu, rest = p.split_key_inputs(extra)
            q, mu_t, tables = rest[0], rest[1], rest[2:]
            (kt_c, v_c, w_c, qr), (_, _, a) = p.causal_chunk(k, v, w, mu, q, x[0])
            num, den = a @ v_c, a.sum(-1, keepdim=True)
            if _several(p.nq):  # one chunk has no earlier keys: the states stay 0
                pq = p.features(qr, tables)
                num, den = num + pq @ h, den + pq @ z[..., None]
                pk = p.key_features(kt_c, w_c, tables)
                h, z = h + pk.transpose(-1, -2) @ v_c, z + pk.sum(-2)
            return (h, z), (p.query_out(p.normalise(num, den, p.null(qr, mu_t))),)

        _, (out,) = p.scan(step, p.state_zeros(), (p.chunk_numbers(p.nq),),
                                (*p.key_inputs(), p.q, p.mu_t, *p.tables))
    return _sequence(out, p.lq).to(q.dtype)


def lowrank_attention_backward(dout, q, k, v, out, *, scale, degree, causal, key_weight=None, chunk=None,
                               center=None, tables=None, softmax_one=False):
    """Chained low-rank gradient (dq, dk, dv) of `lowrank_attention_forward`; mu is a constant.

    `out` is the forward's output. softmax_one: the null key's weight e^{-c_i} depends on q_i
    through c_i = qt_i . mu_t, which adds dc_i mu_t to d(qt_i) (see `_Prepared.output_grads`).
    """
    if q.shape[2] == 0 or k.shape[2] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    p = _Prepared(q, k, v, scale, key_weight, center, degree, tables, softmax_one, chunk, causal)
    do, o = p.queries(dout), p.queries(out)
    if not causal:
        h, z = _states(p)

        def query_step(carry, x, extra):
            dh, dz = carry
            q, do, o, h, z, mu_t, tables = extra[0], extra[1], extra[2], extra[3], extra[4], extra[5], extra[6:]
            i = x[0]
            qr = p.qt(q, i)
            pq = p.features(qr, tables)
            do_r = p.query_rows(do, i)
            r, dden, dc = p.output_grads(pq @ z[..., None], do_r, p.query_rows(o, i), p.null(qr, mu_t))
            dn = do_r * r
            dpq = dn @ h.transpose(-1, -2) + dden * z[..., None, :]
            dqt = p.features_vjp(qr, dpq, tables)
            if dc is not None:
                dqt = dqt + dc * mu_t
            return (dh + pq.transpose(-1, -2) @ dn, dz + (pq * dden).sum(-2)), (p.query_out(dqt * p.root),)

        (dh, dz), (dqt,) = p.scan(query_step, p.state_zeros(), (p.chunk_numbers(p.nq),),
                                       (p.q, do, o, h, z, p.mu_t, *p.tables))

        rows = last_scan_rows(p.c)

        def key_step(carry, x, extra):
            k, v, w, mu, rest = p.split_key_inputs(extra)
            dh, dz, tables = rest[0], rest[1], rest[2:]
            kt_c, v_c, w_c = p.keys(k, v, w, mu, x[0], rows)
            dkt, dv_c = p.key_grads(kt_c, v_c, w_c, dh, dz, tables)
            return (), (p.key_out(dkt * p.root), p.key_out(dv_c))

        _, (dk, dv) = p.scan(key_step, (), (p.chunk_numbers(p.nk * p.c // rows),),
                                  (*p.key_inputs(), dh, dz, *p.tables))
    else:
        # forward order: prefix states H_<c, z_<c give dQ; each row's r = dN / dO is kept
        def query_step(carry, x, extra):
            h, z = carry
            k, v, w, mu, rest = p.split_key_inputs(extra)
            q, do, o, mu_t, tables = rest[0], rest[1], rest[2], rest[3], rest[4:]
            i = x[0]
            (kt_c, v_c, w_c, qr), (s, m, a) = p.causal_chunk(k, v, w, mu, q, i)
            do_r = p.query_rows(do, i)
            den = a.sum(-1, keepdim=True)
            if _several(p.nq):
                pq = p.features(qr, tables)
                den = den + pq @ z[..., None]
            r, dden, dc = p.output_grads(den, do_r, p.query_rows(o, i), p.null(qr, mu_t))
            dn = do_r * r
            dqt = p.intra_grad(s, m, dn, dden, v_c) @ kt_c
            if _several(p.nq):
                dpq = dn @ h.transpose(-1, -2) + dden * z[..., None, :]
                dqt = dqt + p.features_vjp(qr, dpq, tables)
                pk = p.key_features(kt_c, w_c, tables)
                h, z = h + pk.transpose(-1, -2) @ v_c, z + pk.sum(-2)
            if dc is not None:
                dqt = dqt + dc * mu_t
            return (h, z), (p.query_out(dqt * p.root), r)

        states, (dqt, r_all) = p.scan(query_step, p.state_zeros(), (p.chunk_numbers(p.nq),),
                                           (*p.key_inputs(), p.q, do, o, p.mu_t, *p.tables))

        # reverse order: the state gradients of the later chunks, dH_>c and dz_>c, give dK and dV,
        # in chunks of `rows` (every output is alive during this scan: its buffers are kept small)
        rows = last_scan_rows(p.c) if _several(p.nk) else p.c
        n_rev = p.nk * p.c // rows
        r_all = p.regroup(r_all, rows)

        def key_step(carry, x, extra):
            dh, dz = carry
            k, v, w, mu, rest = p.split_key_inputs(extra)
            q, do, o, r_all, tables = rest[0], rest[1], rest[2], rest[3], rest[4:]
            i = x[0]
            (kt_c, v_c, w_c, qr), (s, m, a) = p.causal_chunk(k, v, w, mu, q, i, rows)
            do_r, r = p.query_rows(do, i, rows), r_all.index_select(0, i).squeeze(0)
            dn = do_r * r
            dden = -(do_r * p.query_rows(o, i, rows)).sum(-1, keepdim=True) * r  # as in output_grads
            dkt = p.intra_grad(s, m, dn, dden, v_c).transpose(-1, -2) @ qr
            dv_c = a.transpose(-1, -2) @ dn
            if _several(n_rev):  # one chunk has no later queries: the state gradients stay 0
                dkt_inter, dv_inter = p.key_grads(kt_c, v_c, w_c, dh, dz, tables)
                dkt, dv_c = dkt + dkt_inter, dv_c + dv_inter
                pq = p.features(qr, tables)
                dh, dz = dh + pq.transpose(-1, -2) @ dn, dz + (pq * dden).sum(-2)
            return (dh, dz), (p.key_out(dkt * p.root), p.key_out(dv_c))

        _, (dk, dv) = p.scan(key_step, tuple(_zeroed(t) for t in states), (p.chunk_numbers(n_rev, reverse=True),),
                                  (*p.key_inputs(), p.q, do, o, r_all, *p.tables))
        reverse_leading_(dk)
        reverse_leading_(dv)
    return _sequence(dqt, p.lq).to(q.dtype), _sequence(dk, p.lk).to(k.dtype), _sequence(dv, p.lk).to(v.dtype)
