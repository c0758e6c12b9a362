"""Chunked low-rank attention forward and chained backward, written for Inductor.

Nothing here forms an L x L matrix: keys and queries are processed in chunks of `chunk` rows,
features are recomputed in the backward instead of being saved, and every product is
(rows x k)(k x d) or smaller. Causal attention uses prefix states H_<c, z_<c for earlier chunks
and the exact Taylor polynomial inside a chunk; its backward runs the scan in reverse.

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

from .features import FeatureTensors, taylor_features, taylor_features_vjp
from .naive import key_center, taylor_polynomial

MIN_CHUNK = 256
MAX_CHUNKS = 32  # causal: the exact polynomial inside a chunk costs O(L C d), so chunks stay small
MAX_CHUNKS_FULL = 8  # non-causal: chunks only bound the memory of the features


def chunk_size(length: int, causal: bool = True) -> int:
    """Rows per chunk: at least MIN_CHUNK, at most MAX_CHUNKS (causal) or MAX_CHUNKS_FULL chunks.

    The loop over chunks is unrolled in the traced graph, so the number of chunks sets the
    compile time; the chunk size sets the causal intra-chunk cost and the feature memory.
    """
    chunks = MAX_CHUNKS if causal else MAX_CHUNKS_FULL
    c = max(MIN_CHUNK, math.ceil(length / chunks))
    return min(length, 64 * math.ceil(c / 64)) if length > 0 else 1


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Prepared:
    """Centred, scaled and regrouped inputs shared by forward and backward."""

    def __init__(self, q, k, v, scale, key_weight, center=None, degree=2, tables=None, softmax_one=False):
        cdt = compute_dtype(q.dtype)
        self.degree = degree
        self.tables = tables if tables is not None else FeatureTensors.build(q.shape[-1], degree, q.device)
        b, hq, lq, d = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        self.b, self.hkv, self.g, self.lq, self.lk, self.d = b, hkv, hq // hkv, lq, lk, d
        self.root = math.sqrt(scale)
        q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
        self.qt = (q * self.root).view(b, hkv, self.g, lq, d)
        mu = key_center(k, key_weight) if center is None else center.to(cdt)
        self.kt = (k - mu) * self.root
        self.v = v
        self.w = None if key_weight is None else key_weight.to(cdt)[:, None, :, None]
        self.softmax_one = softmax_one
        if softmax_one:
            self.mu_t = mu * self.root  # [B, Hkv, 1, D]: c_i = qt_i . mu_t
            c = (self.qt * self.mu_t[:, :, None]).sum(-1, keepdim=True)  # [B, Hkv, G, Lq, 1]
            self.null_a, self.null_b = torch.exp(c.clamp_max(0)), torch.exp(-c.clamp_min(0))

    def q_rows(self, t, start, stop):
        """[B, Hkv, G, Lq, X] rows start:stop -> [B, Hkv, G * rows, X]."""
        rows = t[:, :, :, start:stop]
        return rows.reshape(self.b, self.hkv, self.g * (stop - start), t.shape[-1])

    def from_q_rows(self, t, rows):
        return t.view(self.b, self.hkv, self.g, rows, t.shape[-1])

    def key_weight(self, start, stop):
        return None if self.w is None else self.w[:, :, start:stop]

    def features(self, x):
        return taylor_features(x, self.degree, self.tables)

    def null_weights(self, den, start, stop):
        """softmax_one, query rows start:stop: (a, b + a * den) with a = e^{min(c, 0)}, b = e^{-max(c, 0)}.

        The second is e^{min(c, 0)} (e^{-c} + den). It is 0 only when b underflows and den = 0 (a row
        whose keys are all masked out, numerator 0 as well): it is then replaced by 1, so that the
        row's output is 0, the limit of softmax_1, instead of 0 / 0.
        """
        a, b = self.q_rows(self.null_a, start, stop), self.q_rows(self.null_b, start, stop)
        den_s = b + a * den
        return a, den_s.masked_fill(den_s == 0, 1.0)

    def visible(self, den):
        """A row whose visible keys are all masked out (left padding under a causal mask) has
        numerator and denominator exactly 0: its denominator becomes 1, so that its output is 0,
        as in SDPA and the exact path, and its gradients are 0 (its keys have weight 0)."""
        return den if self.w is None else den.masked_fill(den == 0, 1.0)

    def normalise(self, num, den, start, stop):
        """Output of query rows start:stop from their numerator and denominator."""
        if not self.softmax_one:
            return num / self.visible(den)
        a, den_s = self.null_weights(den, start, stop)
        return num * (a / den_s)

    def features_vjp(self, x, grad):
        return taylor_features_vjp(x, grad, self.degree, self.tables)


def _key_features(p: _Prepared, start, stop):
    pk = p.features(p.kt[:, :, start:stop])
    w = p.key_weight(start, stop)
    return pk if w is None else pk * w


def _intra_mask(p: _Prepared, rows, dtype, device):
    tril = torch.ones(rows, rows, dtype=dtype, device=device).tril()
    return tril.repeat(p.g, 1)  # [G * rows, rows]


def _intra_weights(p: _Prepared, qt_c, kt_c, start, stop):
    """Masked exact polynomial inside a causal chunk: S, the mask and A = P_g(S) * mask."""
    s = qt_c @ kt_c.transpose(-1, -2)
    m = _intra_mask(p, stop - start, s.dtype, s.device)
    w = p.key_weight(start, stop)
    if w is not None:
        m = m * w.transpose(-1, -2)
    return s, m, taylor_polynomial(s, p.degree) * m


def _states(p: _Prepared, chunk, chunk_z=None):
    """H = sum_j Phi(kt_j) v_j^T and z = sum_j Phi(kt_j), accumulated over key chunks.

    `chunk_z`: a list that receives each chunk's own z (for the causal backward's prefixes).
    """
    h = z = None
    for start in range(0, p.lk, chunk):
        stop = min(start + chunk, p.lk)
        pk = _key_features(p, start, stop)
        dh, dz = pk.transpose(-1, -2) @ p.v[:, :, start:stop], pk.sum(-2)
        if chunk_z is not None:
            chunk_z.append(dz)
        h = dh if h is None else h + dh
        z = dz if z is None else z + dz
    return h, z


def _prefix_sums(chunk_z):
    """float64 z of the chunks before each chunk, summed in the forward's order, so that the
    backward's denominators equal the forward's bit for bit (a row whose visible keys are all
    masked has a denominator of exactly 0 in both)."""
    out, acc = [None], None
    for dz in chunk_z[:-1]:
        acc = dz.double() if acc is None else acc + dz.double()
        out.append(acc)
    return out


def lowrank_attention_forward(q, k, v, *, scale, degree, causal, key_weight=None, chunk=None, center=None,
                              tables=None, softmax_one=False):
    """Low-rank attention output [B, Hq, Lq, D] in the dtype of q.

    `center` [B, Hkv, 1, D] overrides the key centre mu (default: mean of the unmasked keys).
    `softmax_one`: softmax_1 attention (a null key of logit 0 and value 0, its weight exact).
    """
    p = _Prepared(q, k, v, scale, key_weight, center, degree, tables, softmax_one)
    chunk = chunk or chunk_size(max(p.lq, p.lk, 1), causal)
    outs = []
    if not causal:
        h, z = _states(p, chunk)
        for start in range(0, p.lq, chunk):
            stop = min(start + chunk, p.lq)
            pq = p.features(p.q_rows(p.qt, start, stop))
            outs.append(p.from_q_rows(p.normalise(pq @ h, pq @ z[..., None], start, stop), stop - start))
    else:
        h = z = None  # prefix states, float64 so that the backward can peel chunks off exactly
        for start in range(0, p.lq, chunk):
            stop = min(start + chunk, p.lq)
            qt_c, kt_c, v_c = p.q_rows(p.qt, start, stop), p.kt[:, :, start:stop], p.v[:, :, start:stop]
            _, _, a = _intra_weights(p, qt_c, kt_c, start, stop)
            num, den = a @ v_c, a.sum(-1, keepdim=True)
            pk = _key_features(p, start, stop)
            if h is not None:
                pq = p.features(qt_c)
                num = num + pq @ h.to(num.dtype)
                den = den + pq @ z.to(num.dtype)[..., None]
            outs.append(p.from_q_rows(p.normalise(num, den, start, stop), stop - start))
            dh, dz = (pk.transpose(-1, -2) @ v_c).double(), pk.sum(-2).double()
            h = dh if h is None else h + dh
            z = dz if z is None else z + dz
    out = torch.cat(outs, dim=3) if outs else p.qt.new_zeros(p.qt.shape)
    return out.reshape(q.shape).to(q.dtype)


def lowrank_attention_backward(dout, q, k, v, out, *, scale, degree, causal, key_weight=None, chunk=None,
                               center=None, tables=None, softmax_one=False):
    """Chained low-rank gradient (dq, dk, dv) of `lowrank_attention_forward`; mu is a constant.

    `out` is the forward's output. softmax_one: the null key's weight e^{-c_i} depends on q_i
    through c_i = qt_i . mu_t, which adds dc_i mu_t to d(qt_i) (see `_output_grads`).
    """
    p = _Prepared(q, k, v, scale, key_weight, center, degree, tables, softmax_one)
    chunk = chunk or chunk_size(max(p.lq, p.lk, 1), causal)
    cdt = p.qt.dtype
    do = dout.to(cdt).view(p.qt.shape)
    o = out.to(cdt).view(p.qt.shape)
    dqs, dks, dvs = [], [], []
    if not causal:
        h, z = _states(p, chunk)
        dh = dz = None
        for start in range(0, p.lq, chunk):
            stop = min(start + chunk, p.lq)
            qt_c = p.q_rows(p.qt, start, stop)
            pq = p.features(qt_c)
            dn, dden, dc = _output_grads(p, pq @ z[..., None], do, o, start, stop)
            dpq = dn @ h.transpose(-1, -2) + dden * z[..., None, :]
            dqt_c = p.features_vjp(qt_c, dpq)
            if dc is not None:
                dqt_c = dqt_c + dc * p.mu_t
            dqs.append(p.from_q_rows(dqt_c, stop - start))
            g_h, g_z = pq.transpose(-1, -2) @ dn, (pq * dden).sum(-2)
            dh = g_h if dh is None else dh + g_h
            dz = g_z if dz is None else dz + g_z
        for start in range(0, p.lk, chunk):
            stop = min(start + chunk, p.lk)
            dkt_c, dv_c = _key_grads(p, start, stop, dh, dz)
            dks.append(dkt_c * p.root)
            dvs.append(dv_c)
    else:
        chunk_z = []
        h_total = _states(p, chunk, chunk_z)[0].double()
        z_prefix = _prefix_sums(chunk_z)
        h_suffix = None  # sum of the states of chunk c and later (float64)
        dh = dz = None  # gradient reaching the keys of chunks before the current one
        for start in reversed(range(0, p.lq, chunk)):
            stop = min(start + chunk, p.lq)
            qt_c, kt_c, v_c = p.q_rows(p.qt, start, stop), p.kt[:, :, start:stop], p.v[:, :, start:stop]
            pk = _key_features(p, start, stop)
            g_h = (pk.transpose(-1, -2) @ v_c).double()
            h_suffix = g_h if h_suffix is None else h_suffix + g_h
            s, m, a = _intra_weights(p, qt_c, kt_c, start, stop)
            den = a.sum(-1, keepdim=True)
            if start > 0:
                h_prev, z_prev = (h_total - h_suffix).to(cdt), z_prefix[start // chunk].to(cdt)
                pq = p.features(qt_c)
                den = den + pq @ z_prev[..., None]
            dn, dden, dc = _output_grads(p, den, do, o, start, stop)
            # inside the chunk: exact polynomial, P_g' = P_{g-1}
            ds = (dn @ v_c.transpose(-1, -2) + dden) * m * taylor_polynomial(s, p.degree - 1)
            dqt_c = ds @ kt_c
            dkt_c = ds.transpose(-1, -2) @ qt_c
            dv_c = a.transpose(-1, -2) @ dn
            if start > 0:
                dpq = dn @ h_prev.transpose(-1, -2) + dden * z_prev[..., None, :]
                dqt_c = dqt_c + p.features_vjp(qt_c, dpq)
            if dc is not None:
                dqt_c = dqt_c + dc * p.mu_t
            if dh is not None:  # keys of this chunk feed the states of every later chunk
                dkt_inter, dv_inter = _key_grads(p, start, stop, dh, dz, pk=pk)
                dkt_c = dkt_c + dkt_inter
                dv_c = dv_c + dv_inter
            if start > 0:
                g_h, g_z = pq.transpose(-1, -2) @ dn, (pq * dden).sum(-2)
                dh = g_h if dh is None else dh + g_h
                dz = g_z if dz is None else dz + g_z
            dqs.append(p.from_q_rows(dqt_c, stop - start))
            dks.append(dkt_c * p.root)
            dvs.append(dv_c)
        dqs.reverse(), dks.reverse(), dvs.reverse()
    dq = (torch.cat(dqs, dim=3) * p.root).reshape(q.shape).to(q.dtype)
    dk = torch.cat(dks, dim=2).to(k.dtype)
    dv = torch.cat(dvs, dim=2).to(v.dtype)
    return dq, dk, dv


def _output_grads(p: _Prepared, den, do, o, start, stop):
    """(dN, dden, dc) for query rows start:stop, O being the forward's output.

    Softmax: O = N / den, dN = dO / den, dden = -rowsum(dO * O) / den, dc = None.
    softmax_one: O = a N / den_s with den_s = b + a den (`_Prepared.null_weights`), so
    dN = dO a / den_s, dden = -rowsum(dO * O) a / den_s, and the null key's weight
    e^{-c} = b / a gives dc = rowsum(dO * O) b / den_s (O = N / (e^{-c} + den)).
    """
    do_c, o_c = p.q_rows(do, start, stop), p.q_rows(o, start, stop)
    if not p.softmax_one:
        den = p.visible(den)
        dn = do_c / den
        dden = -(do_c * o_c).sum(-1, keepdim=True) / den
        return dn, dden, None
    a, den_s = p.null_weights(den, start, stop)
    delta = (do_c * o_c).sum(-1, keepdim=True)
    r = a / den_s
    b = p.q_rows(p.null_b, start, stop)
    return do_c * r, -delta * r, delta * (b / den_s)


def _key_grads(p: _Prepared, start, stop, dh, dz, pk=None):
    """d(kt), dv of keys start:stop from the state gradients dH [.., k, D] and dz [.., k]."""
    kt_c = p.kt[:, :, start:stop]
    if pk is None:
        pk = _key_features(p, start, stop)
    dpk = p.v[:, :, start:stop] @ dh.transpose(-1, -2) + dz[..., None, :]
    dv_c = pk @ dh
    w = p.key_weight(start, stop)
    if w is not None:
        dpk = dpk * w
    return p.features_vjp(kt_c, dpk), dv_c
