"""Chunked low-rank attention forward and chained backward, written for Inductor.

Nothing here forms an L x L matrix: keys and queries are processed in chunks of `chunk` rows,
features are recomputed in the backward instead of being saved, and every product is
(rows x k)(k x d) or smaller. Causal attention uses prefix states H_<c, z_<c for earlier chunks
and the exact Taylor polynomial inside a chunk; its backward runs the scan in reverse.

The loops over chunks are `scan`s (`compat.scan`): traced once, whatever the number of chunks,
and lowered by Inductor to a loop around one compiled chunk step, so compile time does not grow
with L and only one chunk's features are alive at a time (peak memory O(L d + C k + k d) for
chunk size C and k features). The inputs are laid out chunk-major ([N, B, H, C, D]) once, padded
to a whole number of chunks: padded keys have weight 0 (non-causal) or come after every real
query (causal), padded query rows are dropped.

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

from .. import compat
from .features import FeatureTensors, feature_rank, taylor_features, taylor_features_vjp
from .naive import key_center, taylor_polynomial

CHUNK_CAUSAL = 256  # causal: the exact polynomial inside a chunk costs O(L C d)
CHUNK_FULL = 256  # non-causal: the chunk only bounds the memory of the features


def chunk_size(length: int, causal: bool = True) -> int:
    """Rows per chunk: CHUNK_CAUSAL or CHUNK_FULL, or the whole length when it is shorter.

    The chunk loop is a scan, compiled once, so the number of chunks costs no compile time;
    the chunk size sets the causal intra-chunk cost and the memory of one chunk's features.
    """
    target = CHUNK_CAUSAL if causal else CHUNK_FULL
    return max(1, min(length, target))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunked(t: torch.Tensor, dim: int, chunk: int, n: int) -> torch.Tensor:
    """[..., L, ...] (L at `dim`) -> [n, ..., chunk, ...], contiguous, zero-padded to n * chunk."""
    pad = n * chunk - t.shape[dim]
    if pad:
        t = torch.cat([t, t.new_zeros(t.shape[:dim] + (pad,) + t.shape[dim + 1:])], dim=dim)
    t = t.reshape(t.shape[:dim] + (n, chunk) + t.shape[dim + 1:])
    return t.movedim(dim, 0).contiguous()


def _unchunked(t: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """Inverse of `_chunked` for a stacked scan output [n, ..., chunk, ...]."""
    t = t.movedim(0, dim)
    t = t.reshape(t.shape[:dim] + (t.shape[dim] * t.shape[dim + 1],) + t.shape[dim + 2:])
    return t.narrow(dim, 0, length)


class _Prepared:
    """Centred, scaled, regrouped and chunk-major inputs shared by forward and backward.

    Per chunk: `qt` [N, B, Hkv, G, C, D], `kt`, `v` [N, B, Hkv, C, D], `w` [N, B, 1, C, 1] (key
    weights, None without them), `null_a`, `null_b` [N, B, Hkv, G, C, 1] (softmax_one).
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
        self.root = math.sqrt(scale)
        c = chunk or chunk_size(max(lq, lk, 1), causal)
        self.c = c = max(1, min(c, max(lq, lk, 1)))
        self.nq, self.nk = math.ceil(lq / c), math.ceil(lk / c)
        q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
        qt = (q * self.root).view(b, hkv, self.g, lq, d)
        mu = key_center(k, key_weight) if center is None else center.to(cdt)
        self.qt = _chunked(qt, 3, c, self.nq)
        self.kt = _chunked((k - mu) * self.root, 2, c, self.nk)
        self.v = _chunked(v, 2, c, self.nk)
        w = None if key_weight is None else key_weight.to(cdt)[:, None, :, None]
        if w is None and not causal and self.nk * c != lk:
            w = torch.ones(b, 1, lk, 1, dtype=cdt, device=q.device)  # padded keys get weight 0
        self.has_weight = key_weight is not None
        self.w = None if w is None else _chunked(w, 2, c, self.nk)
        self.mu_t = mu * self.root  # [B, Hkv, 1, D]: softmax_one's c_i = qt_i . mu_t
        if softmax_one:
            cq = (qt * self.mu_t[:, :, None]).sum(-1, keepdim=True)  # [B, Hkv, G, Lq, 1]
            self.null_a = _chunked(torch.exp(cq.clamp_max(0)), 3, c, self.nq)
            self.null_b = _chunked(torch.exp(-cq.clamp_min(0)), 3, c, self.nq)

    # --- per-chunk helpers (called inside the scan bodies with chunk tensors) ---------------------

    def rows(self, t):
        """[B, Hkv, G, C, X] -> [B, Hkv, G * C, X]."""
        return t.reshape(self.b, self.hkv, self.g * t.shape[-2], t.shape[-1])

    def unrows(self, t):
        return t.view(self.b, self.hkv, self.g, self.c, t.shape[-1])

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
        m = torch.ones(self.c, self.c, dtype=s.dtype, device=s.device).tril().repeat(self.g, 1)  # [G * C, C]
        if w_c is not None:
            m = m * w_c.transpose(-1, -2)
        return s, m, taylor_polynomial(s, self.degree) * m

    def null_weights(self, den, null):
        """softmax_one: (a, b + a * den) with a = e^{min(c, 0)}, b = e^{-max(c, 0)} for one chunk.

        The second is e^{min(c, 0)} (e^{-c} + den). It is 0 only when b underflows and den = 0 (a row
        whose keys are all masked out, numerator 0 as well): it is then replaced by 1, so that the
        row's output is 0, the limit of softmax_1, instead of 0 / 0.
        """
        a, b = (self.rows(t) for t in null)
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
        """(dN, dden, dc) for the rows of one chunk, O being the forward's output.

        Softmax: O = N / den, dN = dO / den, dden = -rowsum(dO * O) / den, dc = None.
        softmax_one: O = a N / den_s with den_s = b + a den (`null_weights`), so
        dN = dO a / den_s, dden = -rowsum(dO * O) a / den_s, and the null key's weight
        e^{-c} = b / a gives dc = rowsum(dO * O) b / den_s (O = N / (e^{-c} + den)).
        """
        if not self.softmax_one:
            den = self.visible(den)
            return do_r / den, -(do_r * o_r).sum(-1, keepdim=True) / den, None
        a, b, den_s = self.null_weights(den, null)
        delta = (do_r * o_r).sum(-1, keepdim=True)
        r = a / den_s
        return do_r * r, -delta * r, delta * (b / den_s)

    def key_grads(self, kt_c, v_c, w_c, dh, dz, tables, pk=None):
        """d(kt), dv of one key chunk from the state gradients dH [.., k, D] and dz [.., k]."""
        if pk is None:
            pk = self.key_features(kt_c, w_c, tables)
        dpk = v_c @ dh.transpose(-1, -2) + dz[..., None, :]
        dv_c = pk @ dh
        if w_c is not None:
            dpk = dpk * w_c
        return self.features_vjp(kt_c, dpk, tables), dv_c

    # --- chunk tensors as scan inputs -------------------------------------------------------------

    def key_xs(self):
        return (self.kt, self.v) + (() if self.w is None else (self.w,))

    def split_keys(self, x):
        """(kt_c, v_c, w_c, rest) from a scan slice that starts with `key_xs()`."""
        n = 2 if self.w is None else 3
        return x[0], x[1], (x[2] if self.w is not None else None), x[n:]

    def null_xs(self):
        return (self.null_a, self.null_b) if self.softmax_one else ()

    def state_zeros(self, dtype):
        rank = feature_rank(self.d, self.degree)
        return (torch.zeros(self.b, self.hkv, rank, self.d, dtype=dtype, device=self.kt.device),
                torch.zeros(self.b, self.hkv, rank, dtype=dtype, device=self.kt.device))


def _states(p: _Prepared, dtype, prefix=False):
    """H = sum_j Phi(kt_j) v_j^T and z = sum_j Phi(kt_j) over every key chunk, accumulated in `dtype`.

    `prefix`: also return z before each chunk ([N, B, Hkv, k]), for the causal backward.
    """

    def step(carry, x, tables):
        h, z = carry
        kt_c, v_c, w_c, _ = p.split_keys(x)
        pk = p.key_features(kt_c, w_c, tables)
        h_new = h + (pk.transpose(-1, -2) @ v_c).to(dtype)
        z_new = z + pk.sum(-2).to(dtype)
        return (h_new, z_new), ((z.clone(),) if prefix else ())

    (h, z), ys = compat.scan(step, p.state_zeros(dtype), p.key_xs(), tuple(p.tables))
    return (h, z, ys[0]) if prefix else (h, z)


def lowrank_attention_forward(q, k, v, *, scale, degree, causal, key_weight=None, chunk=None, center=None,
                              tables=None, softmax_one=False):
    """Low-rank attention output [B, Hq, Lq, D] in the dtype of q.

    `center` [B, Hkv, 1, D] overrides the key centre mu (default: mean of the unmasked keys).
    `softmax_one`: softmax_1 attention (a null key of logit 0 and value 0, its weight exact).
    """
    if q.shape[2] == 0 or k.shape[2] == 0:
        return q.new_zeros(q.shape)
    p = _Prepared(q, k, v, scale, key_weight, center, degree, tables, softmax_one, chunk, causal)
    nx = len(p.null_xs())
    if not causal:
        h, z = _states(p, p.cdt)

        def query_step(carry, x, extra):
            qt_c, null = x[0], x[1:1 + nx]
            h, z, tables = extra[0], extra[1], extra[2:]
            qr = p.rows(qt_c)
            pq = p.features(qr, tables)
            return (), (p.unrows(p.normalise(pq @ h, pq @ z[..., None], null)),)

        _, (out,) = compat.scan(query_step, (), (p.qt, *p.null_xs()), (h, z, *p.tables))
    else:
        def step(carry, x, tables):
            h, z = carry  # prefix states, float64 so that the backward can peel chunks off exactly
            kt_c, v_c, w_c, rest = p.split_keys(x)
            qt_c, null = rest[0], rest[1:]
            qr = p.rows(qt_c)
            _, _, a = p.intra(qr, kt_c, w_c)
            pq = p.features(qr, tables)
            num = a @ v_c + pq @ h.to(p.cdt)
            den = a.sum(-1, keepdim=True) + pq @ z.to(p.cdt)[..., None]
            pk = p.key_features(kt_c, w_c, tables)
            h_new = h + (pk.transpose(-1, -2) @ v_c).double()
            z_new = z + pk.sum(-2).double()
            return (h_new, z_new), (p.unrows(p.normalise(num, den, null)),)

        _, (out,) = compat.scan(step, p.state_zeros(torch.float64), (*p.key_xs(), p.qt, *p.null_xs()),
                                tuple(p.tables))
    return _unchunked(out, 3, p.lq).reshape(q.shape).to(q.dtype)


def lowrank_attention_backward(dout, q, k, v, out, *, scale, degree, causal, key_weight=None, chunk=None,
                               center=None, tables=None, softmax_one=False):
    """Chained low-rank gradient (dq, dk, dv) of `lowrank_attention_forward`; mu is a constant.

    `out` is the forward's output. softmax_one: the null key's weight e^{-c_i} depends on q_i
    through c_i = qt_i . mu_t, which adds dc_i mu_t to d(qt_i) (see `_Prepared.output_grads`).
    """
    if q.shape[2] == 0 or k.shape[2] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    p = _Prepared(q, k, v, scale, key_weight, center, degree, tables, softmax_one, chunk, causal)
    cdt = p.cdt
    shape5 = (p.b, p.hkv, p.g, p.lq, p.d)
    do = _chunked(dout.to(cdt).view(shape5), 3, p.c, p.nq)
    o = _chunked(out.to(cdt).view(shape5), 3, p.c, p.nq)
    nx = len(p.null_xs())
    if not causal:
        h, z = _states(p, cdt)

        def query_step(carry, x, extra):
            dh, dz = carry
            qt_c, do_c, o_c, null = x[0], x[1], x[2], x[3:3 + nx]
            h, z, mu_t, tables = extra[0], extra[1], extra[2], extra[3:]
            qr = p.rows(qt_c)
            pq = p.features(qr, tables)
            dn, dden, dc = p.output_grads(pq @ z[..., None], p.rows(do_c), p.rows(o_c), null)
            dpq = dn @ h.transpose(-1, -2) + dden * z[..., None, :]
            dqt = p.features_vjp(qr, dpq, tables)
            if dc is not None:
                dqt = dqt + dc * mu_t
            dh_new = dh + pq.transpose(-1, -2) @ dn
            dz_new = dz + (pq * dden).sum(-2)
            return (dh_new, dz_new), (p.unrows(dqt),)

        (dh, dz), (dqt,) = compat.scan(query_step, p.state_zeros(cdt), (p.qt, do, o, *p.null_xs()),
                                       (h, z, p.mu_t, *p.tables))

        def key_step(carry, x, extra):
            kt_c, v_c, w_c, _ = p.split_keys(x)
            dh, dz, tables = extra[0], extra[1], extra[2:]
            dkt, dv_c = p.key_grads(kt_c, v_c, w_c, dh, dz, tables)
            return (), (dkt * p.root, dv_c)

        _, (dk, dv) = compat.scan(key_step, (), p.key_xs(), (dh, dz, *p.tables))
    else:
        h_total, _, z_prefix = _states(p, torch.float64, prefix=True)

        def step(carry, x, extra):
            h_suffix, dh, dz = carry  # states of this chunk and later; gradient reaching earlier keys
            kt_c, v_c, w_c, rest = p.split_keys(x)
            qt_c, do_c, o_c, z_prev, later, null = rest[0], rest[1], rest[2], rest[3].to(cdt), rest[4], rest[5:]
            h_total, mu_t, tables = extra[0], extra[1], extra[2:]
            qr = p.rows(qt_c)
            pk = p.key_features(kt_c, w_c, tables)
            h_suffix = h_suffix + (pk.transpose(-1, -2) @ v_c).double()
            # `later` is 0 for the first chunk: no earlier keys, and not the rounding residue of
            # h_total - h_suffix (a row with no visible key may have a huge dN, softmax_one)
            h_prev = (h_total - h_suffix).to(cdt) * later
            s, m, a = p.intra(qr, kt_c, w_c)
            pq = p.features(qr, tables)
            den = a.sum(-1, keepdim=True) + pq @ z_prev[..., None]
            dn, dden, dc = p.output_grads(den, p.rows(do_c), p.rows(o_c), null)
            # inside the chunk: exact polynomial, P_g' = P_{g-1}
            ds = (dn @ v_c.transpose(-1, -2) + dden) * m * taylor_polynomial(s, p.degree - 1)
            dpq = dn @ h_prev.transpose(-1, -2) + dden * z_prev[..., None, :]
            dqt = ds @ kt_c + p.features_vjp(qr, dpq, tables)
            if dc is not None:
                dqt = dqt + dc * mu_t
            # keys of this chunk: inside the chunk, and through the states of every later chunk
            dkt_inter, dv_inter = p.key_grads(kt_c, v_c, w_c, dh, dz, tables, pk=pk)
            dkt = ds.transpose(-1, -2) @ qr + dkt_inter
            dv_c = a.transpose(-1, -2) @ dn + dv_inter
            dh_new = dh + pq.transpose(-1, -2) @ dn
            dz_new = dz + (pq * dden).sum(-2)
            return (h_suffix, dh_new, dz_new), (p.unrows(dqt), dkt * p.root, dv_c)

        init = (torch.zeros_like(h_total), *p.state_zeros(cdt))
        later = (torch.arange(p.nq, device=q.device) > 0).to(cdt)
        xs = tuple(t.flip(0) for t in (*p.key_xs(), p.qt, do, o, z_prefix, later, *p.null_xs()))
        _, ys = compat.scan(step, init, xs, (h_total, p.mu_t, *p.tables))
        dqt, dk, dv = (t.flip(0) for t in ys)
    dq = (_unchunked(dqt, 3, p.lq) * p.root).reshape(q.shape).to(q.dtype)
    dk = _unchunked(dk, 2, p.lk).to(k.dtype)
    dv = _unchunked(dv, 2, p.lk).to(v.dtype)
    return dq, dk, dv
