"""The `lowrank_lora` torch.compile backend: parse options, rewrite attention, hand to Inductor."""

from __future__ import annotations

import torch.fx as fx

from . import compat
from .options import Options
from .rewrite import AttentionSite, GraphRecord, rewrite_graph

#: One GraphRecord per graph compiled by this process, oldest first (see `lora_pass.records()`).
_RECORDS: list[GraphRecord] = []
#: Site modules by id. Strong references: the compiled code holds the stats buffers but not the
#: graph module, which may be freed once compiled; `lora_pass.reset()` drops them.
_SITE_MODULES: "dict[int, AttentionSite]" = {}
#: Set by lora_pass.inspect: also capture the AOT graphs before and after the rewrite.
_CAPTURE: list = []


def lowrank_lora(gm: fx.GraphModule, example_inputs, options=None, mode=None, **unused):
    """torch.compile backend: `torch.compile(model, backend="lowrank_lora", options={...})`.

    Finds LoRA-adapted softmax attention in the Dynamo graph, replaces it by the guarded
    low-rank op (lora_pass.ops.attention) and compiles the result with Inductor. `mode`
    ("max-autotune", ...) and `options["inductor"]` are passed on to Inductor. A graph with
    nothing to rewrite is compiled exactly as `backend="inductor"` compiles it.
    """
    if unused:
        raise ValueError(f"lowrank_lora: unexpected arguments {sorted(unused)}; pass settings through options={{...}}")
    opts = Options.parse(options)
    capture = bool(_CAPTURE)
    before = _copy_graph(gm) if capture else None
    record = rewrite_graph(gm, opts, example_inputs)
    _RECORDS.append(record)
    for site in record.sites:
        module = gm.get_submodule(site.submodule)
        module.site = site
        _SITE_MODULES[id(module)] = module
    patches = dict(compat.list_mode_options(mode)) if mode else {}
    patches.update(opts.inductor)
    # key Inductor's FX-graph cache on this package's sources (see compat.SourceHashPass)
    if patches.get("post_grad_custom_pre_pass") is None and record.sites:
        patches["post_grad_custom_pre_pass"] = compat.SourceHashPass.get()
    if not capture:
        return compat.compile_fx(gm, example_inputs, config_patches=patches or None)
    return _compile_capturing(gm, before, example_inputs, record, patches)


def _copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the graph (node metadata shared) on the same module, for tracing before the rewrite."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, graph)


def _compile_capturing(gm, before, example_inputs, record, patches):
    """compile_fx, recording the forward and backward graphs before and after the rewrite."""
    from .report import region_graph

    record.aot_before = compat.aot_trace_graphs(before, example_inputs) if record.sites else {}
    record.aot_after = {}
    record.regions = [region_graph(gm, site) for site in record.sites]
    inner = compat.compile_fx_inner()

    def recording_inner(graph, inputs, **kwargs):
        name = "backward" if kwargs.get("is_backward") else "forward"
        record.aot_after[name] = graph.print_readable(print_output=False)
        return inner(graph, inputs, **kwargs)

    with compat.fresh_aot_compile():
        compiled = compat.compile_fx(gm, example_inputs, inner_compile=recording_inner, config_patches=patches or None)
    if not record.sites:
        record.aot_before = dict(record.aot_after)
    return compiled


compat.register_backend_once(lowrank_lora, "lowrank_lora")
