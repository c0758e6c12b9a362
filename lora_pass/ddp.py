"""DistributedDataParallel: the LoRA projections of each attention, traced in the whole Dynamo
graph before DDP's graph split could separate them from the attention.

Under DDP, Dynamo's DDPOptimizer (torch._dynamo.config.optimize_ddp) splits each graph at
gradient-bucket boundaries and calls the backend once per piece. The one hook the backend
installs when it is imported is here (`annotate_before_ddp_split`): it wraps
`DDPOptimizer.compile_fn` and acts only on graphs compiled by this backend (every other backend's
graphs pass through unchanged, `_is_backend`); nothing runs before a graph is split otherwise.
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from . import matcher

#: Node meta key: the q/k/v projections of an attention site, traced in the whole Dynamo graph
#: before DistributedDataParallel's graph splitting could separate them from the attention.
SPLIT_PROJECTIONS = "lowrank_lora_projections"


def annotate_before_ddp_split(annotate, backend) -> None:
    """Call `annotate(gm)` on the whole Dynamo graph before DDPOptimizer splits it.

    Under DistributedDataParallel, Dynamo's DDPOptimizer (torch._dynamo.config.optimize_ddp)
    splits each graph at gradient-bucket boundaries and calls the backend once per piece; a split
    between a LoRA projection and its attention hides the LoRA from the piece with the attention.
    `annotate` records what it needs in node meta, which the split copies into the pieces. Only
    graphs compiled by `backend` are annotated.
    """
    try:
        from torch._dynamo.backends.distributed import DDPOptimizer
    except ImportError:
        return
    original = DDPOptimizer.compile_fn
    if getattr(original, "_lowrank_lora_annotated", False):
        return

    def compile_fn(self, gm, example_inputs, **kwargs):
        if _is_backend(self.backend_compile_fn, backend):
            try:
                annotate(gm)
            except Exception as exc:  # the annotation only adds information; never fail the compile
                import warnings

                warnings.warn(f"lowrank_lora: could not trace LoRA projections before DDP's graph split: {exc!r}")
        return original(self, gm, example_inputs, **kwargs)

    compile_fn._lowrank_lora_annotated = True
    DDPOptimizer.compile_fn = compile_fn


def _is_backend(fn, backend) -> bool:
    """Whether the compiler function Dynamo holds is `backend` (possibly wrapped by torch.compile)."""
    for _ in range(8):
        if fn is backend:
            return True
        inner = None
        for attr in ("compiler_fn", "_torchdynamo_orig_backend", "func"):
            inner = getattr(fn, attr, None)
            if inner is not None and inner is not fn:
                break
        if inner is None or inner is fn:
            return False
        fn = inner
    return False


def complete_projections(gm: fx.GraphModule, record) -> None:
    """Where DDP split a site's LoRA projection off its attention, the site records the
    projection as traced in the whole graph (telemetry norms stay those of the visible part)."""
    calls = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    for site in record.sites:
        node = calls.get(site.submodule)
        traced = node.meta.get(SPLIT_PROJECTIONS) if node is not None else None
        if not traced:
            continue
        completed = [name for name, p in site.projections.items() if not p.adapted and traced[name].adapted]
        for name in completed:
            site.projections[name] = dataclasses.replace(traced[name])
        if completed:
            site.decision += "; LoRA projections traced before DistributedDataParallel split the graph"


def split_candidates(gm: fx.GraphModule) -> bool:
    """True when every attention left in `gm` without a visible LoRA projection had one in the
    whole graph (DDP split it off); a second pass without require_lora then rewrites exactly those."""
    from .rewrite import _candidates

    found = False
    for cand in _candidates(gm.graph):
        if any(matcher.trace_projection(x).adapted for x in (cand.q, cand.k, cand.v)):
            continue  # skipped for another reason, which the second pass finds again
        traced = cand.output.meta.get(SPLIT_PROJECTIONS)
        if not traced or not any(p.adapted for p in traced.values()):
            return False  # not adapted in the whole graph either: require_lora must stay on
        found = True
    return found


def annotate_projections(gm: fx.GraphModule) -> None:
    """Record on each attention node the projections traced in the whole graph.

    Called (`annotate_before_ddp_split`) before DistributedDataParallel's DDPOptimizer
    splits the Dynamo graph at bucket boundaries: a split between a LoRA projection and its
    attention would otherwise hide the LoRA from the rewrite of the attention's part.
    """
    from .rewrite import _candidates

    for cand in _candidates(gm.graph):
        projections = {}
        for name, x in zip("qkv", (cand.q, cand.k, cand.v)):
            proj = matcher.trace_projection(x)
            proj.nodes = {}  # plain data: the meta is copied into the split graphs
            projections[name] = proj
        cand.output.meta[SPLIT_PROJECTIONS] = projections
