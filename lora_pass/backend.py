"""The `lowrank_lora` torch.compile backend: parse options, rewrite attention, hand to Inductor."""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings

import torch
import torch.fx as fx

from . import compat, ddp, matcher, state
from .lowering import compile_rewritten, default_inductor_patches
from .options import Options
from .rewrite import GraphRecord, rewrite_graph

log = logging.getLogger("lora_pass")


def lowrank_lora(gm: fx.GraphModule, example_inputs, options=None, mode=None, **unused):
    """torch.compile backend: `torch.compile(model, backend="lowrank_lora", options={...})`.

    Finds LoRA-adapted softmax attention in the Dynamo graph (also inside activation-checkpointed
    regions), replaces it by the guarded low-rank op (lora_pass.ops.attention) and compiles the
    result with Inductor. `mode` ("max-autotune", ...) and `options["inductor"]` are passed on to
    Inductor, over the backend's own settings (`default_inductor_patches`: the C++ wrapper for a
    graph that compiles a low-rank path on CPU). A graph with nothing to rewrite is compiled
    exactly as `backend="inductor"` compiles it. If compiling with the backend's own settings
    fails, they are dropped with a warning; if the rewrite, or compiling the rewritten graph,
    fails, a warning is issued and the graph is compiled unchanged (every site exact), with the
    reason in its record.
    """
    if unused:
        raise ValueError(f"lowrank_lora: unexpected arguments {sorted(unused)}; pass settings through options={{...}}")
    opts = Options.parse(options)
    capture = state.is_capturing()
    before = _copy_graph(gm) if capture else None
    snapshot = _Snapshot(gm)
    try:
        record = _rewrite(gm, opts, example_inputs)
    except Exception as exc:  # a failure outside a single site (a pattern, a subgraph)
        record = _fall_back(gm, snapshot, None, f"rewrite failed: {exc!r}")
    user = dict(compat.list_mode_options(mode)) if mode else {}
    user.update(opts.inductor)
    defaults = default_inductor_patches(record, example_inputs)
    patches = {**defaults, **user}

    def compile_now(record):
        if not capture:
            return compile_rewritten(gm, example_inputs, patches, rewritten=bool(record.sites))
        return _compile_capturing(gm, before, example_inputs, record, patches)

    try:
        try:
            compiled = compile_now(record)
        except Exception as exc:
            added = {name: value for name, value in defaults.items() if name not in user}
            if not added:
                raise
            # the backend's own additions failed: the same rewrite without them, before giving it up
            warnings.warn(f"lowrank_lora: compiling with Inductor settings {added} failed ({exc!r}); "
                          "compiling without them")
            for name in added:
                patches.pop(name)
            compiled = compile_now(record)
    except Exception as exc:
        if not snapshot.changed():
            raise  # not the rewrite's doing
        record = _fall_back(gm, snapshot, record, f"compiling the rewritten graph failed: {exc!r}")
        compiled = compile_now(record)
    modules = []
    for site in record.sites:
        module = gm.get_submodule(site.submodule)
        module.site = site
        modules.append(module)
    state.add_graph(record, modules)
    return compiled


# ---------------------------------------------------------------------------------------------
# the rewrite: the graph, its activation-checkpointed regions, DDP's split graphs


def _rewrite(gm: fx.GraphModule, opts: Options, example_inputs) -> GraphRecord:
    """rewrite_graph on `gm` and on every activation-checkpointed region it calls."""
    record = _rewrite_one(gm, opts, example_inputs)
    for name, body in _checkpoint_bodies(gm):
        sub = _rewrite(body, opts, ())
        for site in sub.sites:
            site.submodule = f"{name}.{site.submodule}"
            # AOTAutograd lifts every buffer of the graph module, a region's included
            if gm.get_submodule(site.submodule).stats is not None:
                compat.register_graph_buffer(gm, f"{site.submodule}.stats")
        record.sites += sub.sites
        record.skipped += sub.skipped
        if sub.sites or sub.skipped:
            record.graph_before += f"\n# {name} (activation-checkpointed region)\n{sub.graph_before}"
            record.graph_after += f"\n# {name} (activation-checkpointed region)\n{sub.graph_after}"
    return record


def _rewrite_one(gm: fx.GraphModule, opts: Options, example_inputs) -> GraphRecord:
    """rewrite_graph, then a second pass for attention whose LoRA projections DDP split off."""
    record = rewrite_graph(gm, opts, example_inputs)
    if opts.require_lora and ddp.split_candidates(gm):
        second = rewrite_graph(gm, dataclasses.replace(opts, require_lora=False), example_inputs)
        for site in second.sites:
            site.index = len(record.sites)
            record.sites.append(site)
        rewritten = {site.module for site in second.sites}
        record.skipped = [s for s in record.skipped if s.module not in rewritten]
        record.graph_after = gm.code
    ddp.complete_projections(gm, record)
    return record


def _checkpoint_bodies(gm: fx.GraphModule):
    """(attribute name, graph module) of each activation-checkpointed region `gm` calls.

    Dynamo turns torch.utils.checkpoint (reentrant or not, Hugging Face's
    gradient_checkpointing_enable included) into the tag_activation_checkpoint higher-order op,
    whose body is a graph module attribute of the calling graph.
    """
    hop = torch.ops.higher_order.tag_activation_checkpoint
    seen = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not hop:
            continue
        body = node.args[0]
        if isinstance(body, fx.Node) and body.op == "get_attr" and body.target not in seen:
            seen.add(body.target)
            module = getattr(gm, body.target, None)
            if isinstance(module, fx.GraphModule):
                yield body.target, module


# ---------------------------------------------------------------------------------------------
# falling back to the unchanged graph


class _Snapshot:
    """The graphs and submodule names of a graph module and of its checkpointed regions, to put
    back if the rewrite fails half-way."""

    def __init__(self, gm: fx.GraphModule):
        self.saved = []
        todo = [gm]
        while todo:
            m = todo.pop()
            self.saved.append((m, _copy_nodes(m.graph), set(m._modules)))
            todo.extend(body for _, body in _checkpoint_bodies(m))
        self.root = gm
        self.sources = dict(getattr(gm, "_param_name_to_source", None) or {})

    @staticmethod
    def _nodes(graph):
        return [(n.op, n.name, str(n.target)) for n in graph.nodes]

    def changed(self) -> bool:
        """Whether the rewrite changed any graph or added any submodule (a site that failed half-way included)."""
        return any(set(m._modules) != children or self._nodes(m.graph) != self._nodes(graph)
                   for m, graph, children in self.saved)

    def restore(self):
        for m, graph, children in self.saved:
            m.graph = graph
            for name in list(m._modules):
                if name not in children:
                    delattr(m, name)
            m.recompile()
        sources = getattr(self.root, "_param_name_to_source", None)
        if sources is not None:
            for name in [n for n in sources if n not in self.sources]:
                del sources[name]


def _copy_nodes(graph: fx.Graph) -> fx.Graph:
    """A copy of `graph` (node meta values shared) whose nodes keep the attributes Dynamo set on
    the originals (a placeholder's `_dynamo_source`, which AOTAutograd reads)."""
    result = copy.deepcopy(graph)
    originals = {n.name: n for n in graph.nodes}
    for node in result.nodes:
        original = originals.get(node.name)
        for name, value in vars(original).items() if original is not None else ():
            if name not in vars(node):
                setattr(node, name, value)
    return result


def _fall_back(gm, snapshot: _Snapshot, record, reason: str) -> GraphRecord:
    """Put the unchanged graph back; every site becomes a skipped candidate with `reason`."""
    snapshot.restore()
    warnings.warn(f"lowrank_lora: {reason}; the graph is compiled unchanged (every attention site exact)")
    log.info("lowrank_lora: %s; graph compiled unchanged", reason)
    skipped = [] if record is None else list(record.skipped)
    sites = [] if record is None else record.sites
    skipped += [matcher.Skipped(site.module, site.family, reason) for site in sites]
    if not skipped:
        skipped = [matcher.Skipped("<graph>", "-", reason)]
    return GraphRecord([], skipped, gm.code, gm.code)


# ---------------------------------------------------------------------------------------------
# lora_pass.inspect


def _copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the graph (node metadata shared) on the same module, for tracing before the
    rewrite; checkpointed regions, which the rewrite changes in place, are copied too."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    result = fx.GraphModule(gm, graph)
    for name, body in _checkpoint_bodies(gm):
        setattr(result, name, _copy_graph(body))
    return result


def _region(gm: fx.GraphModule, site):
    """The site's region graph, from the graph module (a checkpointed region's) that calls it."""
    from .regions import region_graph

    owner, _, local = site.submodule.rpartition(".")
    return region_graph(gm.get_submodule(owner) if owner else gm, dataclasses.replace(site, submodule=local))


def _compile_capturing(gm, before, example_inputs, record, patches):
    """compile_fx, recording the forward and backward graphs before and after the rewrite."""
    record.aot_before = compat.aot_trace_graphs(before, example_inputs) if record.sites else {}
    record.aot_after = {}
    record.regions = [_region(gm, site) for site in record.sites]
    inner = compat.compile_fx_inner()

    def recording_inner(graph, inputs, **kwargs):
        name = "backward" if kwargs.get("is_backward") else "forward"
        record.aot_after[name] = graph.print_readable(print_output=False)
        return inner(graph, inputs, **kwargs)

    with compat.fresh_aot_compile():
        compiled = compile_rewritten(gm, example_inputs, patches, rewritten=bool(record.sites),
                                     inner_compile=recording_inner)
    if not record.sites:
        record.aot_before = dict(record.aot_after)
    return compiled


compat.register_backend_once(lowrank_lora, "lowrank_lora")
ddp.annotate_before_ddp_split(ddp.annotate_projections, lowrank_lora)
