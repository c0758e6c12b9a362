"""Classify a mask built from sizes alone (no data) by its structure, under symbolic sizes too.

Hugging Face builds its masks from position indices: `kv_idx <= q_idx` for causal attention,
`q_idx >= 0` (always true) for bidirectional attention, the key positions gathered from
`position_ids`, all of them `arange`s of the sequence length broadcast into [B, H, Lq, Lk].
With static shapes such a part is a constant, evaluated once (masks.decompose_mask). With
dynamic shapes the lengths are symbols, the part reads them, and it has no value at compile time.

This module reads the part's graph instead. Every integer tensor it meets is an affine function
of its own element position p, `const + sum_d coef[d] * p[d]` (an `arange` is p[0], broadcasting
and basic indexing move dimensions, gathering by index tensors composes the functions), and every
boolean tensor a conjunction of affine atoms `f(p) <= 0`, `f(p) == 0` or `f(p) != 0`. The mask is
then causal when its atoms, over the query and key positions 0 <= i, j < L of any length L, are
exactly j <= i, and all-true when each of them holds for every i, j and every L. Anything outside
this small language (a data-dependent value, an op it does not know, an atom on the batch or the
head, a window `j > i - w`) gives None: the caller then leaves the site alone, never guessing.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

__all__ = ["classify_size_only_mask"]


@dataclasses.dataclass(frozen=True)
class _Affine:
    """An integer tensor of `len(coef)` dims whose element at position p is const + coef . p."""

    coef: tuple
    const: int

    @property
    def ndim(self) -> int:
        return len(self.coef)


@dataclasses.dataclass(frozen=True)
class _Bools:
    """A boolean tensor of `ndim` dims: the conjunction of `atoms` (True when there are none),
    each (coef, const, op) meaning `coef . p + const <op> 0` with op "<=", "==" or "!="."""

    ndim: int
    atoms: frozenset = frozenset()


_FALSE = "false"  # a boolean tensor that is False everywhere (kept apart: it is never a mask)


def classify_size_only_mask(node: fx.Node) -> str | None:
    """"causal", "all" (every key visible) or None (not recognised) for a boolean mask part
    [..., Lq, Lk] computed from sizes only."""
    value = _Reader().read(node)
    if not isinstance(value, _Bools):
        return None
    if not value.atoms:
        return "all"
    if value.ndim < 2:
        return None
    q_axis, k_axis = value.ndim - 2, value.ndim - 1
    causal = False
    for coef, const, op in value.atoms:
        if any(c for d, c in enumerate(coef) if d not in (q_axis, k_axis)):
            return None  # depends on the batch or the head
        cq, ck = coef[q_axis], coef[k_axis]
        if op != "<=":
            return None  # a constant equality was folded already; any other one is not causal
        if cq <= 0 and ck <= 0 and const <= 0:
            continue  # holds at every 0 <= i, j (the maximum is at i = j = 0)
        # a (j - i) + c <= 0 with a > 0 and -a < c <= 0 is j - i <= 0 over the integers
        if ck > 0 and cq == -ck and -ck < const <= 0:
            causal = True
            continue
        return None
    return "causal" if causal else "all"


# ---------------------------------------------------------------------------------------------


_COMPARE = {
    operator.le: "le", operator.lt: "lt", operator.ge: "ge", operator.gt: "gt", operator.eq: "eq", operator.ne: "ne",
    torch.le: "le", torch.lt: "lt", torch.ge: "ge", torch.gt: "gt", torch.eq: "eq", torch.ne: "ne",
}
_COMPARE_METHODS = {"le": "le", "lt": "lt", "ge": "ge", "gt": "gt", "eq": "eq", "ne": "ne", "__le__": "le",
                    "__lt__": "lt", "__ge__": "ge", "__gt__": "gt", "__eq__": "eq", "__ne__": "ne"}
_AND = {operator.and_, torch.logical_and, torch.bitwise_and}
_AND_METHODS = {"__and__", "logical_and", "bitwise_and"}
_SAME_VALUE_METHODS = {"to", "contiguous", "clone", "long", "int"}


def _meta_shape(node):
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _meta_dtype(node):
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


def _int(x):
    """A Python int (not bool) or None."""
    return x if isinstance(x, int) and not isinstance(x, bool) else None


class _Reader:
    """Reads nodes into _Affine / _Bools / _FALSE values (None: outside the language)."""

    def __init__(self):
        self.memo = {}

    def read(self, x):
        if not isinstance(x, fx.Node):
            return _Affine((), x) if _int(x) is not None else None
        if x not in self.memo:
            self.memo[x] = None  # a cycle cannot happen in a graph; this guards the recursion depth
            try:
                self.memo[x] = self._read(x)
            except (TypeError, ValueError, IndexError, KeyError, AttributeError):
                self.memo[x] = None
        return self.memo[x]

    # --- dispatch ------------------------------------------------------------------------

    def _read(self, n: fx.Node):
        target, args, kwargs = n.target, n.args, n.kwargs
        if n.op == "call_function":
            if target is torch.arange:
                return self._arange(args, kwargs)
            if target in _COMPARE:
                return self._compare(_COMPARE[target], args[0], args[1])
            if target in _AND:
                return self._and(args[0], args[1])
            if target in (operator.add, torch.add):
                return self._add(args[0], args[1], 1)
            if target in (operator.sub, torch.sub):
                return self._add(args[0], args[1], -1)
            if target is operator.neg:
                return self._scale(self.read(args[0]), -1)
            if target is operator.getitem:
                return self._getitem(n, args[0], args[1])
            if target in (torch.ones, torch.ones_like, torch.full) and _meta_dtype(n) == torch.bool:
                return self._constant_bool(n, args, kwargs, target)
            if target is torch.diff:
                return self._diff(n, args, kwargs)
            if target is torch.cumsum:
                return self._cumsum(n, self.read(args[0]))
            return None
        if n.op == "call_method":
            this = args[0] if args else None
            if target in _COMPARE_METHODS:
                return self._compare(_COMPARE_METHODS[target], this, args[1])
            if target in _AND_METHODS:
                return self._and(this, args[1])
            if target in ("__add__", "add"):
                return self._add(this, args[1], 1)
            if target in ("__sub__", "sub"):
                return self._add(this, args[1], -1)
            if target in ("new_ones", "new_full") and _meta_dtype(n) == torch.bool:
                return self._constant_bool(n, args[1:], kwargs, target)
            if target in _SAME_VALUE_METHODS:
                return self._same_kind(n, this)
            if target in ("unsqueeze", "expand", "view", "reshape", "expand_as"):
                return self._broadcast(n, self.read(this))
            if target == "cumsum":
                return self._cumsum(n, self.read(this))
            return None
        return None

    # --- integers ------------------------------------------------------------------------

    def _arange(self, args, kwargs):
        if kwargs.get("dtype") not in (None, torch.int64, torch.int32):
            return None
        start, step = 0, kwargs.get("step", 1)
        if len(args) >= 2:
            start = args[0]
        if len(args) >= 3:
            step = args[2]
        start, step = _int(start), _int(step)
        if start is None or step is None:
            return None  # a symbolic start (a cache offset) is not read
        return _Affine((step,), start)

    def _add(self, a, b, sign):
        x, y = self.read(a), self.read(b)
        if not isinstance(x, _Affine) or not isinstance(y, _Affine):
            return None
        ndim = max(x.ndim, y.ndim)
        xc, yc = _align(x.coef, ndim), _align(y.coef, ndim)
        return _Affine(tuple(p + sign * q for p, q in zip(xc, yc)), x.const + sign * y.const)

    @staticmethod
    def _scale(x, factor):
        if not isinstance(x, _Affine):
            return None
        return _Affine(tuple(factor * c for c in x.coef), factor * x.const)

    # --- booleans ------------------------------------------------------------------------

    def _compare(self, op, a, b):
        x, y = self.read(a), self.read(b)
        if not isinstance(x, _Affine) or not isinstance(y, _Affine):
            return None
        ndim = max(x.ndim, y.ndim)
        xc, yc = _align(x.coef, ndim), _align(y.coef, ndim)
        diff = tuple(p - q for p, q in zip(xc, yc))  # x - y
        const = x.const - y.const
        if op in ("ge", "gt"):  # x >= y  <=>  y - x <= 0
            diff, const = tuple(-c for c in diff), -const
        if op in ("lt", "gt"):  # strict over the integers: f < 0  <=>  f + 1 <= 0
            const += 1
        kind = {"le": "<=", "lt": "<=", "ge": "<=", "gt": "<=", "eq": "==", "ne": "!="}[op]
        if not any(diff):
            holds = {"<=": const <= 0, "==": const == 0, "!=": const != 0}[kind]
            return _Bools(ndim) if holds else _FALSE
        return _Bools(ndim, frozenset({(diff, const, kind)}))

    def _and(self, a, b):
        x, y = self.read(a), self.read(b)
        if _FALSE in (x, y):
            return _FALSE
        if not isinstance(x, _Bools) or not isinstance(y, _Bools):
            return None
        ndim = max(x.ndim, y.ndim)
        atoms = {(_align(c, ndim), k, op) for c, k, op in x.atoms | y.atoms}
        return _Bools(ndim, frozenset(atoms))

    def _constant_bool(self, n, args, kwargs, target):
        fill = True
        if target in (torch.full, "new_full"):
            fill = args[1] if len(args) > 1 else kwargs.get("fill_value")
        shape = _meta_shape(n)
        if shape is None or not isinstance(fill, bool):
            return None
        return _Bools(len(shape)) if fill else _FALSE

    # --- shapes ----------------------------------------------------------------------------

    def _same_kind(self, n, this):
        """`.to(...)` and friends: the value itself, unless it changes between integer and boolean."""
        x = self.read(this)
        before, after = _meta_dtype(this), _meta_dtype(n)
        if before is None or after is None or (before == torch.bool) != (after == torch.bool):
            return None
        if after.is_floating_point:
            return None
        return x

    def _broadcast(self, n, x):
        """unsqueeze / expand / view / reshape that only add, drop or broadcast size-1 dimensions."""
        if x is None or x is _FALSE:
            return x
        before, after = _meta_shape(n.args[0]), _meta_shape(n)
        if before is None or after is None:
            return None
        mapping = _size_one_mapping(before, after)
        if mapping is None:
            return None
        if isinstance(x, _Affine):
            return _Affine(_remap(x.coef, mapping, len(after)), x.const)
        return _Bools(len(after), frozenset((_remap(c, mapping, len(after)), k, op) for c, k, op in x.atoms))

    def _getitem(self, n, base, index):
        if not isinstance(index, tuple):
            index = (index,)
        if any(isinstance(i, fx.Node) for i in index):
            return self._gather(n, base, index)
        x = self.read(base)
        shape = _meta_shape(base)
        if x is None or shape is None:
            return None
        if x is _FALSE:
            return _FALSE
        # basic indexing: None adds a dim, slice(start, stop, 1) keeps one (offset by start), int drops one
        if Ellipsis in index:
            at = index.index(Ellipsis)
            fill = len(shape) - sum(1 for i in index if i is not None and i is not Ellipsis)
            index = index[:at] + (slice(None),) * fill + index[at + 1:]
        index = index + (slice(None),) * (len(shape) - sum(1 for i in index if i is not None))
        coef = x.coef if isinstance(x, _Affine) else None
        mapping, shift, source = {}, {}, 0
        for item in index:
            if item is None:
                continue
            if isinstance(item, slice):
                if item.step not in (None, 1) or _int(item.start if item.start is not None else 0) is None:
                    return None
                shift[source] = item.start or 0
            elif _int(item) is not None:
                shift[source] = item
            else:
                return None
            source += 1
        new_dim, source = 0, 0
        for item in index:
            if item is None:
                new_dim += 1
                continue
            if isinstance(item, slice):
                mapping[source] = new_dim
                new_dim += 1
            source += 1
        ndim = new_dim
        if isinstance(x, _Affine):
            return _Affine(_remap(x.coef, mapping, ndim), x.const + sum(coef[d] * s for d, s in shift.items()))
        atoms = set()
        for c, k, op in x.atoms:
            atoms.add((_remap(c, mapping, ndim), k + sum(c[d] * s for d, s in shift.items()), op))
        return _Bools(ndim, frozenset(atoms))

    def _gather(self, n, base, index):
        """base[i0, i1, ...] with one index tensor per leading dim of base (advanced indexing):
        the base's function of its position, at the positions the index tensors hold."""
        x = self.read(base)
        shape = _meta_shape(base)
        out_shape = _meta_shape(n)
        if x is None or shape is None or out_shape is None or len(index) != len(shape):
            return None
        if not all(isinstance(i, fx.Node) for i in index):
            return None
        indices = [self.read(i) for i in index]
        if not all(isinstance(i, _Affine) for i in indices):
            return None
        ndim = len(out_shape)
        indices = [_Affine(_align(i.coef, ndim), i.const) for i in indices]

        def compose(coef, const):
            out_coef = [0] * ndim
            for d, c in enumerate(_align(coef, len(shape))):
                if c:
                    for e, ic in enumerate(indices[d].coef):
                        out_coef[e] += c * ic
                    const += c * indices[d].const
            return tuple(out_coef), const

        if x is _FALSE:
            return _FALSE
        if isinstance(x, _Affine):
            return _Affine(*compose(x.coef, x.const))
        atoms = set()
        for c, k, op in x.atoms:
            oc, ok = compose(c, k)
            if not any(oc):
                if not {"<=": ok <= 0, "==": ok == 0, "!=": ok != 0}[op]:
                    return _FALSE
                continue
            atoms.add((oc, ok, op))
        return _Bools(ndim, frozenset(atoms))

    # --- packed-sequence detection (GPT-2's mask under dynamic shapes) -----------------------

    def _diff(self, n, args, kwargs):
        """torch.diff(x, prepend=x[..., :1] - c, dim=-1) of an affine x with step a along the
        last dim: a everywhere but c first, so the constant a when c == a."""
        x = self.read(args[0])
        dim = kwargs.get("dim", -1)
        if not isinstance(x, _Affine) or kwargs.get("n", 1) != 1 or dim not in (-1, x.ndim - 1) or kwargs.get("append"):
            return None
        step = x.coef[-1]
        prepend = kwargs.get("prepend")
        if prepend is None:
            return None
        p = self.read(prepend)
        # prepend = x[..., :1] - c: the same function shifted by -c (its position along dim is 0)
        if not isinstance(p, _Affine) or _align(p.coef, x.ndim)[:-1] != x.coef[:-1] or x.const - p.const != step:
            return None
        return _Affine((0,) * x.ndim, step)

    def _cumsum(self, n, x):
        """cumsum of a tensor that is 0 (or False) everywhere: 0."""
        shape = _meta_shape(n)
        if shape is None:
            return None
        if x is _FALSE or (isinstance(x, _Affine) and not any(x.coef) and x.const == 0):
            return _Affine((0,) * len(shape), 0)
        return None


def _align(coef: tuple, ndim: int) -> tuple:
    """Broadcast a coefficient tuple to `ndim` dims (new leading dims, coefficient 0)."""
    if len(coef) > ndim:
        raise ValueError("cannot broadcast to fewer dims")
    return (0,) * (ndim - len(coef)) + tuple(coef)


def _remap(coef: tuple, mapping: dict, ndim: int) -> tuple:
    """Coefficients moved from old dims to new ones. A dim left out of `mapping` is one whose
    position is fixed: a size-1 dim (position 0) or one taken by an integer index, whose part the
    caller adds to the constant."""
    out = [0] * ndim
    for d, c in enumerate(coef):
        if d in mapping:
            out[mapping[d]] += c
    return tuple(out)


def _size_one_mapping(before: tuple, after: tuple):
    """Old dim -> new dim for a reshape that only inserts, removes or broadcasts size-1 dims
    (None otherwise). Sizes compare as objects: a symbolic size matches itself."""
    old = [d for d, s in enumerate(before) if not (isinstance(s, int) and s == 1)]
    mapping = {}
    # a broadcast (expand) may turn a size-1 dim into any size: match the non-1 dims in order, from the right
    j = len(after) - 1
    for d in reversed(old):
        while j >= 0 and not _same_size(after[j], before[d]):
            j -= 1
        if j < 0:
            return None
        mapping[d] = j
        j -= 1
    return mapping


def _same_size(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return a is b or str(a) == str(b)
