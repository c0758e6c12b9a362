"""Symmetric Taylor feature map of exp(q . k) and its transposed Jacobian.

P_g(q . k) = sum_{j <= g} (q . k)^j / j! = Phi(q) . Phi(k) with one feature per monomial of degree
at most g (a multiset m of coordinates), weighted by sqrt(1 / prod_i m_i!). The rank is
C(d + g, g), for example 2,145 for d = 64, g = 2.

Degree 2 (the degree the low-rank path is affordable at) is laid out so that every feature and
every term of the Jacobian is a load at an affine offset, which Inductor vectorises: the pairs
x_a x_b with a != b are grouped by their cyclic distance s = (b - a) mod d, so row s holds
x_a x_{(a + s) mod d} for every a, and the wrap-around is read from a copy of x laid out twice
([x, x], see `_doubled`). Rows s = 1 .. ceil(d / 2) - 1 hold d pairs each, and for even d the
row s = d / 2 holds its d / 2 distinct pairs; every unordered pair appears exactly once. The
generic layout (one gathered product per monomial, from index tables) serves degrees 3 and up.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

from .layout import row_major_strides


def feature_rank(head_dim: int, degree: int) -> int:
    """Number of features k = C(d + g, g)."""
    return math.comb(head_dim + degree, degree)


@functools.lru_cache(maxsize=None)
def _monomials(head_dim: int, degree: int):
    """For each order j = 1..g: (index rows [k_j][j], weights [k_j]) as Python lists.

    Lists, not tensors: a cached tensor would leak between compilations (or be fake); the
    tensors are created where they are used, which tracing records as graph constants.
    """
    out = []
    for j in range(1, degree + 1):
        combos = list(itertools.combinations_with_replacement(range(head_dim), j))
        weights = []
        for c in combos:
            denom = 1
            for _, group in itertools.groupby(c):
                denom *= math.factorial(len(list(group)))
            weights.append(1.0 / math.sqrt(denom))
        out.append((combos, weights))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _pair_table(head_dim: int):
    """[d][d] position of the degree-2 monomial x_a x_b within its order, and the derivative
    coefficient (2 on the diagonal: d(w x_a^2)/dx_a = 2 w x_a), as Python lists."""
    position = {c: i for i, c in enumerate(itertools.combinations_with_replacement(range(head_dim), 2))}
    index = [[position[(min(a, b), max(a, b))] for b in range(head_dim)] for a in range(head_dim)]
    coef = [[2.0 if a == b else 1.0 for b in range(head_dim)] for a in range(head_dim)]
    return index, coef


@torch.compiler.assume_constant_result
def feature_tables(head_dim: int, degree: int):
    """The constant tables of the feature map for (d, g), as plain Python data.

    Callers under torch.compile compute them once outside any traced branch and pass them in
    (`tables=`): Dynamo keeps the result as a constant there, but not inside a cond branch.
    """
    return _monomials(head_dim, degree), (_pair_table(head_dim) if degree >= 2 else None)


class FeatureTensors(tuple):
    """The tables as tensors: (idx_1, w_1, ..., idx_g, w_g, pair_index, pair_coef) for g >= 3.

    A flat tuple of tensors so that it can travel as cond operands: Inductor (2.13) does not
    bind tensor constants created inside a cond subgraph, so the op creates these outside and
    passes them in. Degrees 1 and 2 need no tables (empty tuple).
    """

    @classmethod
    def build(cls, head_dim: int, degree: int, device) -> "FeatureTensors":
        if degree <= 2:
            return cls(())
        monomials, pairs = feature_tables(head_dim, degree)
        out = []
        for combos, weights in monomials:
            out.append(torch.tensor(combos, dtype=torch.long, device=device).reshape(len(combos), -1))
            out.append(torch.tensor(weights, dtype=torch.float64, device=device))
        out.append(torch.tensor(pairs[0], dtype=torch.long, device=device))
        out.append(torch.tensor(pairs[1], dtype=torch.float64, device=device))
        return cls(out)

    def orders(self, degree):
        return [(self[2 * j], self[2 * j + 1]) for j in range(degree)]

    def pairs(self, degree):
        return self[2 * degree], self[2 * degree + 1]


# --- degree 2: pairs grouped by cyclic distance -----------------------------------------------------

_HALF = 0.5**0.5  # weight of x_a^2: (x . y)^2 / 2 = sum_a (x_a y_a)^2 / 2 + sum_{a<b} x_a x_b y_a y_b


def _doubled(x: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [..., 2n] = [x, x]: a new contiguous tensor, which the views below index into
    with explicit strides (offsets from the start of its storage)."""
    return torch.cat([x, x], dim=-1)


def _cyclic_rows(x: torch.Tensor) -> int:
    """Number of full rows s = 1 .. ceil(d / 2) - 1 of the cyclic pair layout."""
    return (x.shape[-1] - 1) // 2


def _shifted(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., S, d] view with out[..., s - 1, a] = x[..., (a + s) mod d], s = 1 .. S.

    A strided view of `_doubled(x)`: Inductor realises the doubled copy and reads the rows at
    affine offsets (a modular index would not be vectorised).
    """
    d, rows = x.shape[-1], _cyclic_rows(x)
    xx = _doubled(x)
    st = row_major_strides(xx.shape)
    return xx.as_strided(xx.shape[:-1] + (rows, d), st[:-1] + (1, 1), 1)


def _quadratic_features(x: torch.Tensor) -> list[torch.Tensor]:
    d = x.shape[-1]
    parts = [x * x * _HALF]
    if _cyclic_rows(x):
        parts.append((x[..., None, :] * _shifted(x)).flatten(-2))
    if d % 2 == 0:
        parts.append(x[..., : d // 2] * x[..., d // 2 :])  # s = d / 2: a and a + d / 2, a < d / 2
    return parts


def _quadratic_vjp(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """J^T g for the degree-2 block g [..., d (d + 1) / 2] laid out as `_quadratic_features`."""
    d, rows = x.shape[-1], _cyclic_rows(x)
    dx = g[..., :d] * x * (2 * _HALF)
    if rows:
        go = g[..., d : d + rows * d].unflatten(-1, (rows, d))  # go[s - 1, a]: pair (a, (a + s) mod d)
        # d/dx_a of x_a x_{a+s}: sum_s go[s, a] x_{a+s}
        dx = dx + (go * _shifted(x)).sum(-2)
        # d/dx_b of x_{b-s} x_b: sum_s gx[s, (b - s) mod d] with gx = go * x. Flattened, row s
        # starts at (s - 1) d, so gx[s, b - s] (b >= s) lies at (s - 1)(d - 1) + b - 1 and the
        # wrapped gx[s, b - s + d] (b < s) d further on: two views whose rows step by d - 1, of
        # gx padded with one zero in front and d behind (so that both views stay in bounds)
        gx = (go * x[..., None, :]).flatten(-2)
        gx = torch.cat([gx.new_zeros(gx.shape[:-1] + (1,)), gx, gx.new_zeros(gx.shape[:-1] + (d,))], dim=-1)
        st = row_major_strides(gx.shape)
        size, stride = gx.shape[:-1] + (rows, d), st[:-1] + (d - 1, 1)
        s = torch.arange(1, rows + 1, device=x.device)[:, None]
        b = torch.arange(d, device=x.device)
        wrapped = torch.where(b >= s, gx.as_strided(size, stride, 0), gx.as_strided(size, stride, d))
        dx = dx + wrapped.sum(-2)
    if d % 2 == 0:
        gh = g[..., d + rows * d :]
        dx = dx + torch.cat([gh * x[..., d // 2 :], gh * x[..., : d // 2]], dim=-1)
    return dx


def _as_tensors(x, degree, tables):
    if isinstance(tables, FeatureTensors):
        return tables
    return FeatureTensors.build(x.shape[-1], degree, x.device)


def _orders(x: torch.Tensor, degree: int, tables=None):
    for idx, w in _as_tensors(x, degree, tables).orders(degree):
        yield idx, w.to(x.dtype)


def taylor_features(x: torch.Tensor, degree: int, tables=None) -> torch.Tensor:
    """Phi(x): [..., d] -> [..., C(d + g, g)], in the dtype of x.

    Layout: [1, x, degree-2 block (cyclic pairs, see the module docstring)] for g <= 2; for
    g >= 3 one product per monomial in `_monomials` order, gathered through `tables`.
    """
    parts = [x.new_ones(x.shape[:-1] + (1,))]
    if degree <= 2:
        parts += [x] + (_quadratic_features(x) if degree == 2 else [])
        return torch.cat(parts, dim=-1)
    for idx, w in _orders(x, degree, tables):
        prod = x[..., idx[:, 0]]
        for p in range(1, idx.shape[1]):
            prod = prod * x[..., idx[:, p]]
        parts.append(prod * w)
    return torch.cat(parts, dim=-1)


def taylor_features_vjp(x: torch.Tensor, grad_features: torch.Tensor, degree: int, tables=None) -> torch.Tensor:
    """J_Phi(x)^T grad: [..., d], [..., k] -> [..., d], without a [..., k, d] Jacobian.

    For a monomial w * x_{i1} ... x_{ij}, the derivative along position p is w times the
    product of the other factors; those contributions are summed back onto x_{ip}.
    """
    d = x.shape[-1]
    if degree <= 2:
        dx = grad_features[..., 1 : 1 + d]
        return dx + _quadratic_vjp(x, grad_features[..., 1 + d :]) if degree == 2 else dx
    dx = torch.zeros_like(x)
    offset = 1  # feature 0 is the constant 1
    tables = _as_tensors(x, degree, tables)
    for idx, w in _orders(x, degree, tables):
        k_j, j = idx.shape
        g = grad_features[..., offset : offset + k_j] * w
        offset += k_j
        if j == 1:
            dx = dx + g
            continue
        if j == 2:
            # dx_a = sum_b c_ab g_(ab) x_b: a gather and a reduction that Inductor fuses into one
            # loop, O(rows d^2) instead of O(rows k d) for the general scatter below
            index, coef = tables.pairs(degree)
            dx = dx + (g[..., index] * coef.to(x.dtype) * x[..., None, :]).sum(-1)
            continue
        factors = [x[..., idx[:, p]] for p in range(j)]
        for p in range(j):
            others = g
            for q in range(j):
                if q != p:
                    others = others * factors[q]
            # scatter back onto x_{i_p} as a product with a one-hot [k_j, d] matrix: a GEMM
            # instead of an atomic scatter-add, deterministic on every backend
            onehot = torch.nn.functional.one_hot(idx[:, p], x.shape[-1]).to(x.dtype)
            dx = dx + others @ onehot
    return dx
