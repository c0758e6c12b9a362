"""Finds attention sites in a Dynamo FX graph and the LoRA projections feeding their Q, K, V.

A pattern family (the modules of `lora_pass.patterns`, in the repository's patterns/)
recognises an attention core and returns a `Candidate`. This module holds what every family
shares: the records (Candidate, Projection, Site, Skipped), the node helpers the families use,
and the tracing of q, k and v back through shape-only ops to their projections, recognising
PEFT's LoRA form. The masks are classified in lora_pass.masks; whether a site is rewritten or
skipped is decided by lora_pass.rewrite (`_plan`).
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
    # stamped by `patterns.match` from the family's module (patterns/__init__.py):
    normaliser: dict = dataclasses.field(default_factory=dict)  # AttentionConfig fields it sets
    mask_kind: str = "additive"  # "additive" (added to the logits) or "by_dtype" (bool selects)
    # (node, divide): a further logit scale known only at run time (a Python float Dynamo left
    # unspecialized), multiplied into (divide: divided out of) q by the rewrite
    symbolic_scale: tuple | None = None


@dataclasses.dataclass
class Projection:
    """How one of q, k, v was produced: x -> [base linear (+ LoRA update)] -> * post_scale."""

    adapted: bool
    rank: int | None = None
    # LoRA's scaling; None for several adapters of different scalings, SYMBOLIC where it is a
    # graph input (below)
    scaling: float | str | None = None
    lora_dropout: float | str = 0.0
    module: str | None = None
    # scalar factors applied after the projection (OPT's query scaling), or SYMBOLIC
    post_scale: float | str = 1.0
    rotary: bool = False  # a rotary position embedding was applied after the projection (norm-preserving)
    fused: tuple | None = None  # (start, stop) of this output in a fused projection (GPT-2's c_attn)
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
    scale: float | str  # SYMBOLIC: a factor known only at run time (Candidate.symbolic_scale)
    degree: int
    feature_rank: int
    r_max: float
    paths: str  # "guarded", "lowrank", "exact"
    decision: str  # why these paths were compiled in
    submodule: str = ""
    # symbolic L (dynamic shapes) in mode "auto": the low-rank branch runs only for L >= this
    # (the cost model's crossover), checked per call with the guard; 0 otherwise
    min_length: int = 0

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

SHAPE_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "to", "float", "half", "bfloat16", "type_as",
                 "type"}
SHAPE_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute}
LINEAR = {torch._C._nn.linear, torch.nn.functional.linear}
MUL = {operator.mul, torch.mul}
ADD = {operator.add, torch.add}
CAT = {torch.cat, torch.concat, torch.concatenate}
GETITEM = {operator.getitem}


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


#: A scalar known only when the graph runs: torch.compile(dynamic=True) leaves Python floats
#: unspecialized (torch._dynamo.config.specialize_float=False), so a module attribute such as
#: LoRA's `scaling` or OPT's query scaling reaches the graph as a 0-d input read by `.item()`.
SYMBOLIC = "symbolic"


def is_symbolic_scalar(x) -> bool:
    """A graph node whose value is a Python number traced symbolically (SymFloat, SymInt)."""
    return isinstance(x, fx.Node) and isinstance(meta_value(x), (torch.SymFloat, torch.SymInt))


def factor_value(x):
    """A scalar factor: its value as a float for a constant, SYMBOLIC for a symbolic number,
    None when `x` is not a scalar."""
    if scalar(x) is not None:
        return float(x)
    return SYMBOLIC if is_symbolic_scalar(x) else None


def _times(a, b, divide=False):
    """a * b (a / b) of two factor values, SYMBOLIC when either is."""
    if SYMBOLIC in (a, b):
        return SYMBOLIC
    return a / b if divide else a * b


# ---------------------------------------------------------------------------------------------
# projections


def trace_projection(node: fx.Node) -> Projection:
    """Walk back from q, k or v to its projection.

    Steps taken: shape-only ops, scalar rescaling (`post_scale`), a KV cache that concatenates
    the new keys to an empty tensor, a rotary position embedding (`rotary`), and one output of
    a fused projection split along its last dimension (`fused`).
    """
    seen, post_scale, rotary, fused = 0, 1.0, False, None
    while isinstance(node, fx.Node) and seen < 64:
        seen += 1
        if is_method(node, SHAPE_METHODS) or is_call(node, SHAPE_FUNCTIONS):
            node = node.args[0]
        elif is_call(node, MUL | {operator.truediv}) and (f := factor_value(node.args[1])) is not None:
            post_scale = _times(post_scale, f, divide=node.target is operator.truediv)
            node = node.args[0]
        elif is_call(node, MUL) and (f := factor_value(node.args[0])) is not None:
            post_scale = _times(post_scale, f)
            node = node.args[1]
        elif (inner := _empty_cache_concat(node)) is not None:
            node = inner
        elif (inner := _rotary_input(node)) is not None:
            node, rotary = inner, True
        elif fused is None and (split := _split_output(node)) is not None:
            node, fused = split
        else:
            break
    proj = _peft_lora(node)
    if proj is None:
        proj = Projection(adapted=False)
        base = _base_linear(node)
        if base is not None:
            proj.nodes = base[1]
            proj.module = re.sub(r"\.base_layer$", "", module_path(base[0]))
    proj.post_scale, proj.rotary, proj.fused = post_scale, rotary, fused
    if SYMBOLIC in (proj.scaling, proj.post_scale):
        proj.nodes = {}  # the telemetry's composed norms need the factors' values: not traced
    return proj


def _empty_cache_concat(node):
    """torch.cat([empty, x], dim): a KV cache's update on its first call -> x."""
    if not is_call(node, CAT):
        return None
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    if not isinstance(parts, (list, tuple)):
        return None
    real = []
    for part in parts:
        value = meta_value(part)
        if value is None:
            return None
        if value.numel() != 0:
            real.append(part)
    return real[0] if len(real) == 1 else None


def _half_slice(node):
    """x[..., :h] -> (x, "low", h) or x[..., h:] -> (x, "high", h)."""
    if not is_call(node, GETITEM) or not isinstance(node.args[1], tuple):
        return None
    index = node.args[1]
    if len(index) != 2 or index[0] is not Ellipsis or not isinstance(index[1], slice) or index[1].step not in (None, 1):
        return None
    sl = index[1]
    if sl.start is None and isinstance(sl.stop, int):
        return node.args[0], "low", sl.stop
    if isinstance(sl.start, int) and sl.stop is None:
        return node.args[0], "high", sl.start
    return None


def _rotate_half_input(node):
    """cat((-x[..., h:], x[..., :h]), -1) (Hugging Face's rotate_half) -> x."""
    if not is_call(node, CAT):
        return None
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = arg(node, 1, "dim", 0)
    value = meta_value(node)
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or value is None or dim not in (-1, value.dim() - 1):
        return None
    neg, low = parts
    if not (is_call(neg, {operator.neg, torch.neg}) or is_method(neg, {"neg"})):
        return None
    high, low = _half_slice(neg.args[0]), _half_slice(low)
    if high is None or low is None or high[0] is not low[0] or (high[1], low[1]) != ("high", "low"):
        return None
    x = meta_value(high[0])
    if x is None or high[2] != low[2] or 2 * high[2] != x.shape[-1]:
        return None
    return high[0]


def _tensor_factor(node):
    """a * b with one side a tensor product factor: -> (the other side, the factor) pairs."""
    if not is_call(node, MUL) or len(node.args) != 2:
        return ()
    a, b = node.args
    return tuple((x, f) for x, f in ((a, b), (b, a)) if isinstance(x, fx.Node) and isinstance(f, fx.Node))


def _rotary_input(node):
    """x * cos + rotate_half(x) * sin (rotary position embedding) -> x.

    The rotation keeps every row's norm when cos^2 + sin^2 = 1 (plain RoPE); the guard measures
    the rotated q and k in any case, so its bound never depends on that.
    """
    if not is_call(node, ADD) or len(node.args) != 2:
        return None
    for left, right in (node.args, node.args[::-1]):
        for x, _cos in _tensor_factor(left):
            for rot, _sin in _tensor_factor(right):
                if _rotate_half_input(rot) is x:
                    return x
    return None


def _split_output(node):
    """split(x, size, dim=-1)[i] -> (x, (start, stop)) for a split of the last dimension."""
    if not is_call(node, GETITEM) or not isinstance(node.args[1], int):
        return None
    split = node.args[0]
    if not (is_method(split, {"split"}) or is_call(split, {torch.split})):
        return None
    x = split.args[0]
    size = arg(split, 1, "split_size", split.kwargs.get("split_size_or_sections"))
    dim = arg(split, 2, "dim", 0)
    value = meta_value(x)
    if value is None or not isinstance(size, int) or dim not in (-1, value.dim() - 1):
        return None
    i = node.args[1]
    return x, (i * size, min((i + 1) * size, value.shape[-1]))


def _linear_nodes(linear: fx.Node) -> dict:
    return {"x": linear.args[0], "weight": linear.args[1], "bias": arg(linear, 2, "bias"), "layout": "out_in"}


def _base_linear(node):
    """The frozen projection: F.linear(x, W, b), or transformers' Conv1D (GPT-2):
    addmm(b, x.view(-1, d_in), W).view(..., d_out) with W stored [d_in, d_out].
    -> (the node that names the module, its nodes: x, weight, bias, layout) or None."""
    if is_call(node, LINEAR):
        return node, _linear_nodes(node)
    if is_method(node, {"view", "reshape"}) and is_call(node.args[0], {torch.addmm}):
        addmm = node.args[0]
        flat = addmm.args[1]
        if is_method(flat, {"view", "reshape"}) and len(addmm.args) >= 3:
            return addmm, {"x": flat.args[0], "weight": addmm.args[2], "bias": addmm.args[0], "layout": "in_out"}
    return None


def _peft_lora(node) -> Projection | None:
    """base_layer(x) + lora_B(lora_A(dropout(x))) * scaling, the terms in any order; with several
    active adapters, one such update per adapter added onto the base layer."""
    terms = _sum_terms(node)
    if len(terms) < 2:
        return None
    for i, base in enumerate(terms):
        linear = _base_linear(base)
        if linear is None:
            continue
        updates = [_lora_update(t, linear[1]["x"]) for j, t in enumerate(terms) if j != i]
        if any(u is None for u in updates):
            continue
        # several adapters: the record sums their ranks and keeps a scaling only where they share
        # one; the telemetry's composed norms read a single (lora_A, lora_B) pair, so their nodes
        # are kept only for one adapter and the norms otherwise stay NaN rather than leave some out
        weights = [meta_value(u[2].args[1]) for u in updates]
        rank = sum(int(w.shape[0]) for w in weights) if all(w is not None for w in weights) else None
        scalings = {u[0] for u in updates}
        scaling = SYMBOLIC if SYMBOLIC in scalings else (scalings.pop() if len(scalings) == 1 else None)
        rates = {u[1] for u in updates}
        dropout = SYMBOLIC if SYMBOLIC in rates else max(rates)
        nodes = {**linear[1], "lora_a": updates[0][2].args[1], "lora_b": updates[0][3]} if len(updates) == 1 else {}
        return Projection(True, rank, scaling, dropout, _lora_owner(updates[0][2]), nodes=nodes)
    return None


def _sum_terms(node) -> list:
    """The terms of a chain of two-operand additions whose inner sums have no other user."""
    if not is_call(node, ADD) or len(node.args) != 2:
        return [node]
    terms = []
    for operand in node.args:
        inner = isinstance(operand, fx.Node) and is_call(operand, ADD) and len(operand.users) == 1
        terms.extend(_sum_terms(operand) if inner else [operand])
    return terms


def _lora_update(update, x_node):
    """(scaling, dropout p, lora_A call, lora_B weight) of lora_B(lora_A(dropout(x))) * scaling
    reading `x_node`, or None."""
    scaling = 1.0
    if is_call(update, MUL):
        a, b = update.args
        if (f := factor_value(b)) is not None:
            update, scaling = a, f
        elif (f := factor_value(a)) is not None:
            update, scaling = b, f
        else:
            return None
    if not (is_call(update, LINEAR) and is_call(update.args[0], LINEAR)):
        return None
    lora_a = update.args[0]
    x, dropout = lora_a.args[0], 0.0
    if x is not x_node and is_call(x, {torch.nn.functional.dropout}):  # LoRA's own dropout
        dropout = factor_value(arg(x, 1, "p", 0.5))
        x = x.args[0]
    if x is not x_node:
        return None
    return scaling, dropout, lora_a, update.args[1]


def _lora_owner(lora_a: fx.Node) -> str:
    """Module path of the LoRA layer (the parent of lora_A.<adapter>)."""
    path = module_path(lora_a)
    return re.sub(r"\.lora_A(\.[^.]+)?$", "", path)


# ---------------------------------------------------------------------------------------------
# masks


def _ancestors(node: fx.Node):
    """`node` and every node it reads, directly or not, each once."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        yield n
        todo.extend(n.all_input_nodes)


def _placeholder_ancestors(node: fx.Node) -> bool:
    """`node` reads a graph input, a parameter or a random number."""
    return any(n.op in ("placeholder", "get_attr")
               or (n.op == "call_function" and getattr(n.target, "__name__", "") in {"rand", "randn", "dropout"})
               for n in _ancestors(node))


def _sizes_only(node: fx.Node) -> bool:
    """Every graph input `node` reads is a symbolic size (a SymInt placeholder, dynamic shapes)."""
    return all(n.op != "placeholder" or isinstance(meta_value(n), torch.SymInt) for n in _ancestors(node))


def evaluate_constant(node: fx.Node):
    """Evaluate a node that depends on no graph input (a mask built from aranges)."""
    env = {}
    position = {n: i for i, n in enumerate(node.graph.nodes)}
    for n in sorted(_ancestors(node), key=position.__getitem__):
        args = fx.node.map_arg(n.args, env.__getitem__)
        kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
        if n.op == "call_function":
            env[n] = n.target(*args, **kwargs)
        elif n.op == "call_method":
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        else:
            raise ValueError(f"cannot evaluate {n.op} {n.target}")
    return env[node]


def strip_repeat_kv(node):
    """hidden[:, :, None].expand(B, Hkv, n, L, D).reshape(B, Hkv * n, L, D) -> hidden.

    Hugging Face's `repeat_kv` (eager GQA); the op reads the KV heads without the copy.
    """
    if not (is_method(node, {"reshape", "view"}) or is_call(node, {torch.reshape})):
        return None
    expand = node.args[0]
    if not is_method(expand, {"expand"}):
        return None
    src = expand.args[0]
    if is_call(src, GETITEM) and src.args[1] == (slice(None), slice(None), None, slice(None), slice(None)):
        base = src.args[0]
    elif is_method(src, {"unsqueeze"}) and src.args[1:] in ((2,), (-3,)):
        base = src.args[0]
    else:
        return None
    before, after = meta_value(base), meta_value(node)
    if before is None or after is None or before.dim() != 4 or after.dim() != 4:
        return None
    b, h, length, d = before.shape
    if (after.shape[0], after.shape[2], after.shape[3]) != (b, length, d) or after.shape[1] % h:
        return None
    return base
