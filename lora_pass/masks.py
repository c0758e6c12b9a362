"""Attention masks split into a compile-time part (none or causal) and per-key runtime factors
(`decompose_mask` -> `MaskPlan`), which the low-rank path takes as key weights.

Constant parts are evaluated at compile time; parts built from symbolic sizes only (dynamic
shapes) are classified by their structure (lora_pass.mask_structure); runtime parts must depend
on the key alone ([B or 1, 1, 1, Lk]: padding, an additive per-key bias).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from .mask_structure import classify_size_only_mask
from .matcher import ADD, _placeholder_ancestors, _sizes_only, evaluate_constant, is_call, is_method, meta_value


@dataclasses.dataclass
class MaskPlan:
    """A mask split into a compile-time part (none or causal) and per-key runtime factors.

    `factors`: (node, "bool" | "additive") pairs, each a [B or 1, 1, 1, Lk] tensor whose product
    (AND of the booleans, sum of the additive ones) with the causal part is the whole mask.
    """

    causal: bool = False
    factors: list = dataclasses.field(default_factory=list)
    reason: str | None = None  # set when the mask is not of this form

    @property
    def kind(self) -> str:
        """The site's mask as reports show it: "padding", "causal" or "none"."""
        return "padding" if self.factors else ("causal" if self.causal else "none")


AND = {operator.and_, torch.logical_and, torch.bitwise_and}
WHERE = {torch.where}


def _mask_leaves(node, additive: bool, const: list, runtime: list, depth=0):
    """Split a mask expression at AND (boolean) and + (additive) into leaves.

    Broadcasting (expand), same-kind casts and `where(m, 0, -big)` (boolean to additive) are
    looked through. Every other node is a leaf: constant (no graph input) or runtime.
    """
    value = meta_value(node)
    if depth < 64 and isinstance(node, fx.Node) and _placeholder_ancestors(node) and value is not None:
        inputs = [a for a in node.args if isinstance(a, fx.Node)]
        source = meta_value(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        same_kind = source is not None and (source.dtype == torch.bool) == (value.dtype == torch.bool)
        if not additive and (is_call(node, AND) or is_method(node, {"__and__", "logical_and", "bitwise_and"})) \
                and len(inputs) == 2 and value.dtype == torch.bool:
            for a in inputs:
                _mask_leaves(a, additive, const, runtime, depth + 1)
            return
        if additive and is_call(node, ADD) and len(inputs) == 2 and value.dtype.is_floating_point:
            for a in inputs:
                _mask_leaves(a, additive, const, runtime, depth + 1)
            return
        if (is_method(node, {"expand", "to", "contiguous"}) or is_call(node, {torch.broadcast_to})) and same_kind:
            _mask_leaves(node.args[0], additive, const, runtime, depth + 1)
            return
        if additive and is_call(node, WHERE) and len(node.args) == 3 and _is_zero(node.args[1]) \
                and _is_very_negative(node.args[2], value.dtype):
            _mask_leaves(node.args[0], False, const, runtime, depth + 1)
            return
    (runtime if isinstance(node, fx.Node) and _placeholder_ancestors(node) else const).append((node, additive))


def _constant_value(x):
    if isinstance(x, fx.Node):
        if _placeholder_ancestors(x):
            return None
        try:
            return evaluate_constant(x)
        except Exception:
            return None
    return torch.tensor(x) if isinstance(x, (int, float, bool)) else None


def _is_zero(x) -> bool:
    value = _constant_value(x)
    return value is not None and bool((value == 0).all())


def _is_very_negative(x, dtype) -> bool:
    value = _constant_value(x)
    return value is not None and bool((value.double() <= torch.finfo(dtype).min / 2).all())


def decompose_mask(mask: fx.Node, lq, lk, additive: bool) -> MaskPlan:
    """Whether `mask` is (causal or nothing) combined with per-key padding/bias factors.

    `additive`: the mask is added to the logits (float), else it is a boolean keep-mask.
    Constant parts are evaluated now; runtime parts must be [B or 1, 1, 1, Lk] (they depend
    on the key only), so the low-rank path can take them as per-key weights.
    """
    const, runtime = [], []
    _mask_leaves(mask, additive, const, runtime)
    allowed = None
    for node, is_additive in const:
        value = _constant_value(node)
        if value is None:
            return MaskPlan(reason="constant mask could not be evaluated")
        if is_additive:
            if value.dtype == torch.bool:
                return MaskPlan(reason="boolean tensor added to the logits")
            low = torch.finfo(value.dtype).min / 2
            if not bool(((value == 0) | (value <= low)).all()):
                return MaskPlan(reason="float mask with values other than 0 and -inf/finfo.min is not low-rank")
            value = value == 0
        elif value.dtype != torch.bool:
            return MaskPlan(reason=f"boolean mask expected, got {value.dtype}")
        allowed = value if allowed is None else allowed & value
    causal = False
    if allowed is not None and not bool(allowed.all()):
        if allowed.dim() < 2 or lq is None or lk is None or not isinstance(lq, int) or not isinstance(lk, int):
            return MaskPlan(reason="constant mask that is neither causal nor all-true")
        allowed = allowed.expand(*allowed.shape[:-2], lq, lk).reshape(-1, lq, lk)
        tril = torch.ones(lq, lk, dtype=torch.bool).tril()
        if lq != lk or not bool((allowed == tril).all()):
            return MaskPlan(reason="constant mask that is neither causal nor all-true")
        causal = True
    factors = []
    for node, is_additive in runtime:
        value = meta_value(node)
        if value is None:
            return MaskPlan(reason="mask of unknown shape")
        shape = tuple(value.shape)
        if _sizes_only(node):
            # built from the symbolic sizes of a dynamic-shape graph, no data: read its structure
            kind = None if is_additive else classify_size_only_mask(node)
            if kind is None:
                return MaskPlan(reason=f"mask part {list(shape)} computed from the symbolic sizes is neither "
                                       f"causal nor all-true (or is not built from position comparisons)")
            causal = causal or kind == "causal"
            continue
        if not (len(shape) == 4 and shape[1] == 1 and shape[2] == 1 and (lk is None or shape[3] == lk)):
            return MaskPlan(reason=f"mask part {list(shape)} depends on runtime data and is not "
                                   f"key-padding-shaped [B, 1, 1, L]")
        if (value.dtype == torch.bool) == is_additive:
            return MaskPlan(reason=f"mask part of dtype {value.dtype} where a "
                                   f"{'float additive' if is_additive else 'boolean'} mask is expected")
        factors.append((node, "additive" if is_additive else "bool"))
    return MaskPlan(causal=causal, factors=factors)
