"""How the backend has Inductor compile a graph it rewrote (`compile_rewritten`), and the Inductor
settings it adds (`default_inductor_patches`).

Every change to Inductor's behaviour lives here as a context that is open only while the backend
lowers a rewritten graph (`rewritten_graph_lowering`, `control_flow_under_checkpoint`): graphs
the backend does not rewrite, and every other compilation in the process, see torch as it is.
"""

from __future__ import annotations

import contextlib

import torch
import torch.fx as fx

from . import compat
from .inductor_pass import with_post_grad_pass

#: Inductor settings the backend adds for a graph that compiles a low-rank path on CPU, under the
#: user's `mode` and `options["inductor"]`, which override them (docs/design.md, "The C++ wrapper
#: on CPU"): the chunk loops run in C++ instead of one Python call per kernel and step.
LOWRANK_CPU_INDUCTOR = {"cpp_wrapper": True}


def compile_rewritten(gm: fx.GraphModule, example_inputs, patches: dict | None = None, *, rewritten: bool = True,
                      inner_compile=None):
    """Inductor's compile_fx with config `patches`. A `rewritten` graph (one holding the attention
    op) is traced with cond and scan allowed in checkpointed regions
    (`control_flow_under_checkpoint`), lowered, forward and backward at once, under
    `rewritten_graph_lowering` (loop indices allowed, so every chunk loop stays a loop
    whatever Dynamo's settings; subgraphs without donated inputs; Inductor's cond and while_loop
    fixes), and gets the backend's post-grad pass (`inductor_pass.PostGradPass`): loop states
    accumulated in place, and Inductor's FX-graph cache keyed on this package's sources, so that
    no cached code compiled by another version of the op is reused. A
    `post_grad_custom_pre_pass` in `patches` runs first, then the backend's
    (`inductor_pass.with_post_grad_pass`). A graph without sites is compiled exactly as
    `backend="inductor"` compiles it."""
    patches = dict(patches or {})
    if not rewritten:  # no inner_compile argument unless given: the call backend="inductor" makes
        given = {} if inner_compile is None else {"inner_compile": inner_compile}
        return compat.compile_fx(gm, example_inputs, config_patches=patches or None, **given)
    patches["post_grad_custom_pre_pass"] = with_post_grad_pass(patches.get("post_grad_custom_pre_pass"))
    inner = lowering_rewritten_graphs(inner_compile or compat.compile_fx_inner())
    # the backward is lowered now, not at the first backward call: a failure there (the C++
    # wrapper, a loop) reaches the backend's fallbacks instead of the user's training step
    with control_flow_under_checkpoint(), compat.force_eager_backward_compile():
        return compat.compile_fx(gm, example_inputs, inner_compile=inner, config_patches=patches)


def op_backend(patches: dict | None = None):
    """A torch.compile backend that compiles a function calling the attention op directly (no
    rewrite: bench/attention.py) as `lowrank_lora` compiles a rewritten graph: `compile_rewritten`
    with Inductor config `patches` (e.g. `lowrank_inductor_defaults`)."""

    def backend(gm, example_inputs):
        return compile_rewritten(gm, example_inputs, patches)  # copies patches

    return backend


def default_inductor_patches(record, example_inputs) -> dict:
    """The Inductor settings the backend adds for this graph: LOWRANK_CPU_INDUCTOR when a site
    compiles the low-rank path (paths "lowrank" or "guarded") and every tensor input is on CPU,
    else none. The user's `mode` and `options["inductor"]` override them."""
    lowrank = any(site.paths != "exact" for site in record.sites)
    devices = {t.device.type for t in example_inputs if isinstance(t, torch.Tensor)}
    return lowrank_inductor_defaults(devices.pop()) if lowrank and len(devices) == 1 else {}


def lowrank_inductor_defaults(device_type: str) -> dict:
    """Inductor settings the backend adds to a graph that compiles a low-rank path on
    `device_type` ("cpu": LOWRANK_CPU_INDUCTOR; other devices: none). bench/attention.py compiles
    the op with them, as the backend would."""
    return dict(LOWRANK_CPU_INDUCTOR) if device_type == "cpu" else {}

@contextlib.contextmanager
def loop_index_allowed(example_inputs):
    """Let the graph being lowered read its loop indices: the fake mode of `example_inputs`
    allows scalar outputs while this context is open.

    Inductor lowers scan to a while_loop whose body reads its index with `.item()` (an unbacked
    symbol), which the fake mode refuses unless scalar outputs are allowed: Dynamo's fake mode
    allows them only under `torch._dynamo.config.capture_scalar_outputs = True`, and DDP's
    split graphs never. The backend opens this context around Inductor's lowering of the graphs
    it rewrote (`rewritten_graph_lowering`), for those graphs alone, so that every chunk loop
    stays one loop whatever the user set; it changes nothing else of the trace.
    """
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode(example_inputs)
    if mode is None or mode.allow_scalar_outputs:
        yield
        return
    mode.allow_scalar_outputs = True
    try:
        yield
    finally:
        mode.allow_scalar_outputs = False


@contextlib.contextmanager
def _patched(owner, name: str, value):
    """`owner.name = value` while the context is open (re-entrant: an inner context of the same
    patch changes nothing), then the original back."""
    original = owner.__dict__[name]
    if getattr(original, "_lowrank_lora_patch", None) is getattr(value, "_lowrank_lora_patch", object()):
        yield
        return
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _conditional_create_pinning_operand_strides(original):
    """Inductor's `Conditional.create`, passing cond operands with the strides their subgraphs
    were compiled for.

    Inductor (2.11 - 2.14) compiles a cond subgraph for the operands' FakeTensor strides but
    realizes the operands with whatever layout it picked for them; a transposed gradient then
    reaches a subgraph compiled for a contiguous one. Requiring the traced strides fixes it
    (a copy only where the layouts really differ).
    """
    from torch._inductor import ir
    from torch._inductor.virtualized import V

    def create(cls, predicate, true_fn, false_fn, operands):
        fx_operands = V.graph.current_node.args[-1]
        pinned = []
        for x, fx_op in zip(operands, fx_operands):
            fake = fx_op.meta.get("val") if isinstance(fx_op, torch.fx.Node) else None
            if isinstance(fake, torch.Tensor) and isinstance(x, ir.TensorBox):
                x = ir.ExternKernel.require_exact_strides(x, fake.stride(), allow_padding=False)
            pinned.append(x)
        return original.__func__(cls, predicate, true_fn, false_fn, pinned)

    create._lowrank_lora_patch = "conditional"
    return classmethod(create)


def _while_loop_create_owning_carries(original):
    """Inductor's `WhileLoop.create`, giving the loop its own copy of every initial carry it did
    not allocate, and keeping the loop's outputs out of buffer reuse.

    The compiled loop body reuses the storage of its carried inputs for its outputs, so the
    initial carries are overwritten. Inductor (2.11 - 2.14) copies an initial carry only when two
    of them alias; a tensor that other code still reads (a zeros tensor that CSE shared between
    the forward's scan and the backward's, saved for the backward) was clobbered: wrong
    gradients. The preallocated scan outputs (`empty_strided`, see decompose_scan_to_while_loop)
    are owned by the loop and are not copied; the other carries (states of size k x d, a counter)
    are small; the copy is also the buffer that `accumulate_carries_in_place` updates in place.

    The C++ wrapper declares a handle named after each loop output (a mutated carry's output
    too) where the loop starts; Inductor 2.13's memory planner may later hand such an output's
    name to a buffer it reuses, which the C++ wrapper declares a second time (`conflicting
    declaration 'auto bufN'`: the graph does not compile). Loop outputs are never reused.
    """
    from torch._inductor import ir
    from torch._inductor.virtualized import V

    def create(cls, cond_fn, body_fn, carried_inputs, additional_inputs, stack_output=False):
        fx_carried = V.graph.current_node.args[2] if V.graph.current_node is not None else ()
        owned = []
        for x, fx_x in zip(carried_inputs, list(fx_carried) + [None] * len(carried_inputs)):
            fresh = isinstance(fx_x, torch.fx.Node) and fx_x.target is torch.ops.aten.empty_strided.default
            if isinstance(x, ir.IRNode) and not fresh:
                x = ir.ExternKernel.copy_input(x)
            owned.append(x)
        outputs = original.__func__(cls, cond_fn, body_fn, owned, additional_inputs, stack_output)
        loop = next(op for op in reversed(V.graph.operations) if isinstance(op, ir.WhileLoop))
        for out in [*(loop.outputs or ()), *getattr(loop, "mutation_outputs", ())]:
            V.graph.never_reuse_buffers.add(out.get_name())
        return outputs

    create._lowrank_lora_patch = "while_loop"
    return classmethod(create)


@contextlib.contextmanager
def rewritten_graph_lowering(example_inputs):
    """Inductor's lowering of a graph the backend rewrote (the forward's, and the backward's at
    its first call): its loop indices allowed (`loop_index_allowed`), its subgraphs lowered
    without donated inputs (`subgraphs_without_donation`), cond operands pinned to their traced
    strides and while_loops owning their carries (the two functions above). Every change is
    undone when the lowering returns: graphs the backend does not rewrite, and every other
    compilation in the process, see Inductor as it is.
    """
    from torch._inductor import ir

    with contextlib.ExitStack() as stack:
        stack.enter_context(loop_index_allowed(example_inputs))
        stack.enter_context(subgraphs_without_donation())
        for cls, name, patch in ((ir.Conditional, "create", _conditional_create_pinning_operand_strides),
                                 (ir.WhileLoop, "create", _while_loop_create_owning_carries)):
            stack.enter_context(_patched(cls, name, patch(cls.__dict__[name])))
        yield


@contextlib.contextmanager
def control_flow_under_checkpoint():
    """Let cond and scan be traced inside an activation-checkpointed region, while the context
    is open (the backend's AOTAutograd trace of a rewritten graph).

    AOTAutograd traces a checkpointed region (the tag_activation_checkpoint higher-order op)
    under the selective-checkpointing dispatch modes, which in torch 2.11 - 2.14 have rules for
    some higher-order ops (flex_attention, invoke_subgraph, ...) but not for cond: a guarded site
    inside gradient checkpointing failed with "no rule registered for HigherOrderOperator cond".
    Redirecting cond to the modes, as torch does for those ops, tags it for recomputation like
    any other op of the region. scan (the low-rank path's chunk loops) has no rule either. The
    rules are removed again when the context closes, unless torch had its own.
    """
    try:
        from torch._higher_order_ops.cond import cond_op
        from torch._higher_order_ops.scan import scan_op
        from torch._higher_order_ops.utils import redirect_to_mode
        from torch.utils.checkpoint import _CachedTorchDispatchMode, _CachingTorchDispatchMode
    except ImportError:  # a torch without these modes has nothing to redirect
        yield
        return
    added = []
    for op in (cond_op, scan_op):
        for mode in (_CachingTorchDispatchMode, _CachedTorchDispatchMode):
            if mode not in op.python_key_table:
                redirect_to_mode(op, mode)
                added.append((op, mode))
    try:
        yield
    finally:
        for op, mode in added:
            op.python_key_table.pop(mode, None)
            op._dispatch_cache.clear()


_NO_SUBGRAPH_DONATION_DEPTH = [0]


@contextlib.contextmanager
def subgraphs_without_donation():
    """Inductor lowers the subgraphs of higher-order ops (cond branches, while_loop bodies)
    without treating any of their inputs as donated buffers.

    A backward graph's donated buffers are saved tensors that the graph may overwrite once read
    (`bw_donated_idxs`, indices into its placeholders). Inductor gives every subgraph lowering
    the parent's index list, which it applies to the subgraph's
    own, unrelated placeholders (torch 2.13.0; the upstream change for it also keeps subgraph
    inputs non-donated): an input of a while_loop body at such an index may be overwritten in place by
    a pointwise kernel of the same size, and a loop-invariant input is then wrong from the second
    step on (silently wrong gradients; tests/test_lowering.py has a backward whose loop is
    corrupted this way without the fix). Subgraph inputs are owned by the parent graph, so
    none of them is donated here; the parent graph's own donation is unchanged.
    """
    from torch._inductor.graph import GraphLowering

    if _NO_SUBGRAPH_DONATION_DEPTH[0]:
        _NO_SUBGRAPH_DONATION_DEPTH[0] += 1
        try:
            yield
        finally:
            _NO_SUBGRAPH_DONATION_DEPTH[0] -= 1
        return
    original = GraphLowering.make_subgraph

    def make_subgraph(self, *args, **kwargs):
        subgraph = original(self, *args, **kwargs)
        subgraph.bw_donated_idxs = None  # read when its placeholders are lowered, after this
        return subgraph

    GraphLowering.make_subgraph = make_subgraph
    _NO_SUBGRAPH_DONATION_DEPTH[0] = 1
    try:
        yield
    finally:
        _NO_SUBGRAPH_DONATION_DEPTH[0] = 0
        GraphLowering.make_subgraph = original


def lowering_rewritten_graphs(inner_compile):
    """`inner_compile` (Inductor's compile_fx_inner or a wrapper of it) run under
    `rewritten_graph_lowering`: compile_fx calls it for the forward graph and, at the first
    backward, for the backward graph, so both are covered."""

    def inner(gm, example_inputs, *args, **kwargs):
        with rewritten_graph_lowering(example_inputs):
            return inner_compile(gm, example_inputs, *args, **kwargs)

    return inner
