"""Finds attention sites in a Dynamo FX graph and the LoRA projections feeding their Q, K, V.

A pattern family (lora_pass/patterns/*.py) recognises an attention core and returns a
`Candidate`. This module then does what every family shares: classify the mask, trace q, k
and v back through shape-only ops to their projections, recognise PEFT's LoRA form, and
decide whether the site is rewritten or skipped (with the reason).
"""

from __future__ import annotations

import dataclasses
import operator
import re

import torch
import torch.fx as fx

# ---------------------------------------------------------------------------------------------
# records


@dataclasses.dataclass
class Candidate:
    """An attention core found by a pattern family."""

    family: str
    output: fx.Node  # the node whose value is softmax(...) v
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float | None  # None: head_dim ** -0.5
    causal: bool
    mask: fx.Node | None
    nodes: list  # the core's own nodes, removed after the rewrite
    skip_reason: str | None = None  # set by the family when the core itself is unsupported


@dataclasses.dataclass
class Projection:
    """How one of q, k, v was produced: x -> [base linear (+ LoRA update)] -> * post_scale."""

    adapted: bool
    rank: int | None = None
    scaling: float | None = None
    lora_dropout: float = 0.0
    module: str | None = None
    post_scale: float = 1.0  # scalar factors applied after the projection (OPT's query scaling)
    # graph nodes of x, the frozen weight and bias, lora_A and lora_B weights (for telemetry)
    nodes: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "nodes"}


@dataclasses.dataclass
class Site:
    """A rewritten attention site (what `lora_pass.inspect` reports)."""

    index: int
    module: str
    family: str
    projections: dict  # "q"/"k"/"v" -> Projection
    causal: bool
    mask: str  # "none", "causal", "padding"
    batch: int
    heads: int
    kv_heads: int
    seq_len: int
    head_dim: int
    scale: float
    degree: int
    feature_rank: int
    r_max: float
    paths: str  # "guarded", "lowrank", "exact"
    decision: str  # why these paths were compiled in
    submodule: str = ""

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "projections"}
        out["projections"] = {name: p.to_dict() for name, p in self.projections.items()}
        return out


@dataclasses.dataclass
class Skipped:
    module: str
    family: str
    reason: str


# ---------------------------------------------------------------------------------------------
# node helpers

SHAPE_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "to", "float", "half", "bfloat16", "type_as"}
SHAPE_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute}
LINEAR = {torch._C._nn.linear, torch.nn.functional.linear}


def is_call(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def is_method(node, names) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def meta_value(node):
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def module_path(node: fx.Node) -> str:
    """'L['self'].__dict__['_modules']['base_model']...layers.0.self_attn' -> 'base_model....self_attn'."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<graph>"
    raw = list(stack.values())[-1][0]
    path = re.sub(r"^L\['self'\]", "", raw)
    path = re.sub(r"\.__dict__\['_modules'\]\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]|\[(\d+)\]", lambda m: "." + (m.group(1) or m.group(2)), path)
    return path.lstrip(".") or "<root>"


def scalar(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


# ---------------------------------------------------------------------------------------------
# projections


def trace_projection(node: fx.Node) -> Projection:
    """Walk back through shape-only ops and scalar rescaling to the projection."""
    seen, post_scale = 0, 1.0
    while isinstance(node, fx.Node) and seen < 32:
        seen += 1
        if is_method(node, SHAPE_METHODS) or is_call(node, SHAPE_FUNCTIONS):
            node = node.args[0]
        elif is_call(node, {operator.mul, operator.truediv, torch.mul}) and scalar(node.args[1]) is not None:
            factor = float(node.args[1])
            post_scale *= factor if node.target is not operator.truediv else 1.0 / factor
            node = node.args[0]
        elif is_call(node, {operator.mul, torch.mul}) and scalar(node.args[0]) is not None:
            post_scale *= float(node.args[0])
            node = node.args[1]
        else:
            break
    proj = _peft_lora(node)
    if proj is None:
        proj = Projection(adapted=False)
        if is_call(node, LINEAR):
            proj.nodes = _linear_nodes(node)
            proj.module = re.sub(r"\.base_layer$", "", module_path(node))
    proj.post_scale = post_scale
    return proj


def _linear_nodes(linear: fx.Node) -> dict:
    return {"x": linear.args[0], "weight": linear.args[1], "bias": arg(linear, 2, "bias")}


def _peft_lora(node) -> Projection | None:
    """base_layer(x) + lora_B(lora_A(dropout(x))) * scaling, in either order of the sum."""
    if not is_call(node, {operator.add, torch.add}) or len(node.args) != 2:
        return None
    for base, update in (node.args, node.args[::-1]):
        if not is_call(base, LINEAR):
            continue
        scaling = 1.0
        if is_call(update, {operator.mul, torch.mul}):
            a, b = update.args
            if scalar(b) is not None:
                update, scaling = a, float(b)
            elif scalar(a) is not None:
                update, scaling = b, float(a)
            else:
                continue
        if not (is_call(update, LINEAR) and is_call(update.args[0], LINEAR)):
            continue
        lora_a = update.args[0]
        x, dropout = lora_a.args[0], 0.0
        if is_call(x, {torch.nn.functional.dropout}):
            dropout = float(arg(x, 1, "p", 0.5))
            x = x.args[0]
        if x is not base.args[0]:
            continue
        a_weight = meta_value(lora_a.args[1])
        rank = int(a_weight.shape[0]) if a_weight is not None else None
        nodes = {**_linear_nodes(base), "lora_a": lora_a.args[1], "lora_b": update.args[1]}
        return Projection(True, rank, scaling, dropout, _lora_owner(lora_a), nodes=nodes)
    return None


def _lora_owner(lora_a: fx.Node) -> str:
    """Module path of the LoRA layer (the parent of lora_A.<adapter>)."""
    path = module_path(lora_a)
    return re.sub(r"\.lora_A(\.[^.]+)?$", "", path)


# ---------------------------------------------------------------------------------------------
# masks


def _placeholder_ancestors(node: fx.Node) -> bool:
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op in ("placeholder", "get_attr"):
            return True
        if n.op == "call_function" and getattr(n.target, "__name__", "") in {"rand", "randn", "dropout"}:
            return True
        todo.extend(n.all_input_nodes)
    return False


def evaluate_constant(node: fx.Node):
    """Evaluate a node that depends on no graph input (a mask built from aranges)."""
    env = {}
    order = []
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        order.append(n)
        todo.extend(n.all_input_nodes)
    position = {n: i for i, n in enumerate(node.graph.nodes)}
    for n in sorted(order, key=position.__getitem__):
        args = fx.node.map_arg(n.args, env.__getitem__)
        kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
        if n.op == "call_function":
            env[n] = n.target(*args, **kwargs)
        elif n.op == "call_method":
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        else:
            raise ValueError(f"cannot evaluate {n.op} {n.target}")
    return env[node]


def classify_mask(mask: fx.Node, lq: int | None, lk: int | None):
    """-> (kind, reason): kind is "none", "causal", "padding" or None (unsupported, with reason)."""
    if not _placeholder_ancestors(mask):
        try:
            value = evaluate_constant(mask)
        except Exception as exc:  # a constant we cannot evaluate is left alone
            return None, f"constant mask could not be evaluated ({type(exc).__name__})"
        if value.dtype == torch.bool:
            allowed = value
        else:
            low = torch.finfo(value.dtype).min / 2
            if not bool(((value == 0) | (value <= low)).all()):
                return None, "float mask with values other than 0 and -inf/finfo.min is not low-rank"
            allowed = value == 0
        allowed = allowed.reshape(-1, *allowed.shape[-2:]) if allowed.dim() >= 2 else allowed.reshape(1, 1, -1)
        if bool(allowed.all()):
            return "none", None
        rows, cols = allowed.shape[-2:]
        if lq is not None and rows == lq and cols == lk:
            tril = torch.ones(rows, cols, dtype=torch.bool).tril()
            if bool((allowed == tril).all()):
                return "causal", None
        return None, "constant mask that is neither causal nor all-true"
    value = meta_value(mask)
    if value is None:
        return None, "mask of unknown shape"
    shape = tuple(value.shape)
    if len(shape) == 4 and shape[1] == 1 and shape[2] == 1 and (lk is None or shape[3] == lk):
        return "padding", None
    return None, f"mask {list(shape)} depends on runtime data and is not key-padding-shaped [B, 1, 1, L]"
