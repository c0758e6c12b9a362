"""Symmetric Taylor feature map of exp(q . k) and its transposed Jacobian.

P_g(q . k) = sum_{j <= g} (q . k)^j / j! = Phi(q) . Phi(k) with one feature per monomial of degree
at most g (a multiset m of coordinates), weighted by sqrt(1 / prod_i m_i!). The rank is
C(d + g, g), for example 2,145 for d = 64, g = 2.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch


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
    """The tables as tensors: (idx_1, w_1, ..., idx_g, w_g[, pair_index, pair_coef]).

    A flat tuple of tensors so that it can travel as cond operands: Inductor (2.13) does not
    bind tensor constants created inside a cond subgraph, so the op creates these outside and
    passes them in.
    """

    @classmethod
    def build(cls, head_dim: int, degree: int, device) -> "FeatureTensors":
        monomials, pairs = feature_tables(head_dim, degree)
        out = []
        for combos, weights in monomials:
            out.append(torch.tensor(combos, dtype=torch.long, device=device).reshape(len(combos), -1))
            out.append(torch.tensor(weights, dtype=torch.float64, device=device))
        if pairs is not None:
            out.append(torch.tensor(pairs[0], dtype=torch.long, device=device))
            out.append(torch.tensor(pairs[1], dtype=torch.float64, device=device))
        return cls(out)

    def orders(self, degree):
        return [(self[2 * j], self[2 * j + 1]) for j in range(degree)]

    def pairs(self, degree):
        return self[2 * degree], self[2 * degree + 1]


def _as_tensors(x, degree, tables):
    if isinstance(tables, FeatureTensors):
        return tables
    return FeatureTensors.build(x.shape[-1], degree, x.device)


def _orders(x: torch.Tensor, degree: int, tables=None):
    for idx, w in _as_tensors(x, degree, tables).orders(degree):
        yield idx, w.to(x.dtype)


def taylor_features(x: torch.Tensor, degree: int, tables=None) -> torch.Tensor:
    """Phi(x): [..., d] -> [..., C(d + g, g)], in the dtype of x."""
    parts = [x.new_ones(x.shape[:-1] + (1,))]
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
