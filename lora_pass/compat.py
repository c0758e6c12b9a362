"""Every private torch._dynamo / torch._inductor API the project uses, in one place."""

from __future__ import annotations

import contextlib

import torch

from torch._inductor import list_mode_options  # noqa: F401  (re-exported)
from torch._inductor.compile_fx import compile_fx  # noqa: F401  (re-exported)

from .ops.layout import row_major_strides


def is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def register_backend_once(compiler_fn, name: str) -> None:
    """Register a backend unless Dynamo already has it or will load it from its entry point.

    Loading the `torch_dynamo_backends` entry point imports this package, and Dynamo registers
    the loaded function itself right after; registering here too would be a duplicate.
    """
    from torch._dynamo.backends import registry

    if name in registry._COMPILER_FNS or registry._BACKENDS.get(name) is not None:
        return
    registry.register_backend(compiler_fn=compiler_fn, name=name)


class PostGradPass:
    """Factory for the Inductor post-grad pass of every graph the backend rewrote
    (`post_grad_custom_pre_pass`): it runs `accumulate_carries_in_place`, and its uuid() is the
    hash of this package's source files, so Inductor's FX-graph cache never returns code compiled
    by another version of the op, the patterns, the rewrite or this pass (they are traced into the
    graphs it caches), nor code compiled by plain Inductor."""

    _instance = None

    @classmethod
    def get(cls):
        if cls._instance is None:
            import hashlib
            import pathlib

            from torch._inductor.custom_graph_pass import CustomGraphPass

            root = pathlib.Path(__file__).resolve().parent
            files = sorted(root.rglob("*.py"))
            try:
                import lora_pass.patterns as patterns

                files += sorted(pathlib.Path(patterns.__file__).resolve().parent.glob("*.py"))
            except ImportError:
                pass
            digest = hashlib.sha256()
            for path in files:
                digest.update(path.name.encode())
                digest.update(path.read_bytes())
            key = digest.hexdigest()

            class _Pass(CustomGraphPass):
                def __call__(self, graph):
                    accumulate_carries_in_place(graph)

                def uuid(self):
                    return key

            cls._instance = _Pass()
        return cls._instance


_VIEW_OPS = None


def _view_base(node):
    """The node that a chain of view ops starts from (`node` itself if it is not a view)."""
    global _VIEW_OPS
    if _VIEW_OPS is None:
        aten = torch.ops.aten
        _VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
                     aten.transpose.int, aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim,
                     aten.as_strided.default, aten.slice.Tensor, aten.select.int, aten.t.default, aten.alias.default}
    while getattr(node, "op", None) == "call_function" and node.target in _VIEW_OPS:
        node = node.args[0]
    return node


def with_post_grad_pass(user_pass):
    """The value of Inductor's `post_grad_custom_pre_pass` for a rewritten graph: the backend's
    pass (`PostGradPass`) after the one the user set through `options["inductor"]`, if any.

    Inductor takes a tuple of passes and runs them in order (`get_custom_graph_passes`); the
    user's pass sees the graph as it would without the backend (scans not yet lowered), and the
    FX-graph cache is keyed on both passes (a user pass without a uuid bypasses it, as it would
    alone). An Inductor without pass tuples takes one pass: there the user's replaces the
    backend's, as before (no in-place loop states, no cache key of the package's sources).
    """
    ours = PostGradPass.get()
    if user_pass is None:
        return ours
    try:
        from torch._inductor.custom_graph_pass import get_custom_graph_passes
    except ImportError:  # pragma: no cover - an Inductor that takes one pass only
        return user_pass
    return (*get_custom_graph_passes(user_pass), ours)


def _register_baddbmm_fallback() -> None:
    """Register ATen's `baddbmm_` as Inductor's fallback for it, as Inductor's implicit
    fallback would (inputs made contiguous), before Inductor meets the op.

    Inductor creates a fallback for an op without a lowering when it first lowers it, but where
    the environment variable `CI` is set (any CI service sets it) that implicit fallback raises
    for an op that has a decomposition ("make_fallback(aten.baddbmm_.default): a decomposition
    exists"), a check meant for PyTorch's own lowerings. The in-place GEMM is the point of
    `accumulate_carries_in_place`, so its decomposition (an out-of-place product and a copy) is
    not wanted; registering the fallback explicitly, with the decomposition knowingly
    overridden, gives the same lowering with or without `CI`.
    """
    from torch._inductor import lowering

    op = torch.ops.aten.baddbmm_.default
    if op not in lowering.lowerings:
        constraint = getattr(lowering, "require_contiguous", None)
        lowering.make_fallback(op, layout_constraint=constraint, warn=False, override_decomp=True)


def accumulate_carries_in_place(graph) -> int:
    """Post-grad pass: lower the graph's scans to while_loops now, with Inductor's own
    decomposition (`decompose_scan_to_while_loop`, which Inductor would run at the end of its
    post-grad passes), and in each loop body turn a carried state updated as `carry + A @ B` into
    `carry.view(...).baddbmm_(A, B)`: one GEMM accumulating into the carried buffer (beta = 1, no
    product buffer), which is returned as the new carry (the loop's ys are carried and written in
    place the same way). Inductor has no lowering for `baddbmm_` and calls ATen's (the C++
    wrapper through the C++ dispatcher): `_register_baddbmm_fallback` registers that fallback
    up front.

    Without it a functional loop body holds three buffers of the state at once: the product (which
    becomes the new state), the old state (the loop's carry list references it until the body
    returns), and the loop's initial state (the wrapper's own variable until the loop ends); for
    the causal backward's reverse scan that is 1.6 MiB per head at d = 64, next to the results.

    A carry is rewritten only when it is safe to overwrite: the add and its product have no other
    users, A and B are not views of the old state, the final state is not read after the loop (so
    its buffer is no one else's), and the initial state is computed in this graph for the loop
    alone (not a graph input). The in-place GEMM is the body's last node, so every other read of
    the old state comes before it (Inductor orders a mutation after the earlier reads). Returns
    the number of carries rewritten; a graph without scans is left as it is.
    """
    import operator

    import torch.fx as fx

    gm = graph.owning_module
    if not any(n.op == "call_function" and n.target is torch.ops.higher_order.scan for n in graph.nodes):
        return 0
    try:
        from torch._inductor.fx_passes.post_grad import decompose_scan_to_while_loop
    except ImportError:  # pragma: no cover - an Inductor without it lowers scan itself
        return 0
    decompose_scan_to_while_loop(gm)
    aten = torch.ops.aten
    views = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
    count = 0
    for loop in list(graph.nodes):
        if loop.op != "call_function" or loop.target is not torch.ops.higher_order.while_loop:
            continue
        body = getattr(gm, loop.args[1].target)
        carried = loop.args[2]
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        out = next(n for n in body.graph.nodes if n.op == "output")
        results = list(out.args[0])
        changed = False
        for i, res in enumerate(results[:len(carried)]):
            ph = placeholders[i]
            if not (isinstance(res, fx.Node) and res.target is aten.add.Tensor and len(res.args) == 2
                    and not res.kwargs and res.args[0] is ph and isinstance(res.args[1], fx.Node)):
                continue
            prod = res.args[1]
            mm = prod.args[0] if prod.target in views else prod
            if not (isinstance(mm, fx.Node) and mm.target is aten.bmm.default):
                continue
            if len(res.users) != 1 or len(prod.users) != 1 or len(mm.users) != 1:
                continue
            a, b = mm.args
            val, aval, bval = ph.meta["val"], a.meta["val"], b.meta["val"]
            if not all(isinstance(n, int) for n in (*val.shape, *aval.shape, *bval.shape)):
                continue  # symbolic sizes: left to Inductor
            if (not val.is_contiguous() or not val.dtype == aval.dtype == bval.dtype
                    or val.numel() != aval.shape[0] * aval.shape[1] * bval.shape[2]
                    or _view_base(a) is ph or _view_base(b) is ph):
                continue
            if any(u.target is operator.getitem and u.args[1] == i and u.users for u in loop.users):
                continue  # the final state is read after the loop
            init = carried[i]
            if not isinstance(init, fx.Node) or init.op == "placeholder" or len(init.users) != 1:
                continue  # the initial state is not the loop's alone
            _register_baddbmm_fallback()
            # placed last: after every read of the old state, and after the loop's own writes into
            # its ys (Inductor pairs a loop's mutated inputs with its outputs in the order it finds
            # the mutations, which must be index order)
            with body.graph.inserting_before(out):
                shape = [aval.shape[0], aval.shape[1], bval.shape[2]]
                view = body.graph.call_function(aten.view.default, (ph, shape))
                view.meta["val"] = val.view(shape)
                body.graph.call_function(aten.baddbmm_.default, (view, a, b))
            results[i] = ph
            changed = True
            count += 1
        if changed:
            out.args = (tuple(results),)
            body.graph.eliminate_dead_code()
            body.recompile()
    return count


def register_graph_buffer(gm, name: str) -> None:
    """Tell AOTAutograd where a buffer that the backend added to a Dynamo graph comes from.

    AOTAutograd maps every parameter and buffer of a Dynamo graph back to a Dynamo source;
    a buffer added after tracing has none, so it gets a constant source of its own.
    """
    from torch._dynamo.source import ConstantSource

    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        sources[name] = ConstantSource(f"__lowrank_lora_{name}")


def unregister_graph_buffer(gm, name: str) -> None:
    """Undo `register_graph_buffer` (nothing to do where it was not registered)."""
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        sources.pop(name, None)


def cond(pred, true_fn, false_fn, operands):
    """The cond higher-order op itself, without torch.cond's own Dynamo pass over the branches.

    The backend calls it while AOTAutograd traces (make_fx), which traces both branches into
    subgraphs; in eager it runs the branch that `pred` selects.
    """
    from torch._higher_order_ops.cond import cond_op

    return cond_op(pred, _canonical_strides(true_fn), _canonical_strides(false_fn), tuple(operands))


def scan(fn, init, xs, extra=(), sizes=()):
    """A loop over the leading dimension of `xs`, traced once: the scan higher-order op.

    `fn(carry, x, extra) -> (new_carry, ys)` with tuples of tensors: `x` holds one slice of each
    tensor in `xs`, `extra` the loop-invariant tensors (passed in, not closed over, so that the
    traced body has no lifted constants). Returns (final carry, each ys stacked along a new
    dimension 0). An empty `init` is allowed (a map): a dummy counter is carried instead.
    `sizes`: the symbolic sizes (SymInts) that the shapes of the ys are computed from, under
    dynamic shapes; Inductor's lowering allocates the ys from them (it binds the symbols of the
    loop's own inputs only), and `fn` never sees them.

    Under AOTAutograd the op is traced into a subgraph, which Inductor (2.11 - 2.14) lowers to a
    while_loop around the compiled body (`decompose_scan_to_while_loop`, run by the backend under
    `loop_lowering`), writing each step's ys into preallocated outputs; in eager it runs a Python
    loop. The number of steps may be symbolic (dynamic shapes): it becomes the loop's trip count.
    Only a loop of exactly one step (a static sequence of one chunk) is traced inline, without a
    loop; a loop is never unrolled.
    """
    init, xs, extra = tuple(init), tuple(xs), tuple(extra)
    sizes = tuple(s for s in sizes if isinstance(s, torch.SymInt))
    counter = len(init) == 0
    if counter:
        init = (torch.zeros((), dtype=torch.int64, device=xs[0].device),)
    n_init, n_xs, n_extra = len(init), len(xs), len(extra)

    def combine(*flat):
        carry, x = flat[:n_init], flat[n_init:n_init + n_xs]
        rest = flat[n_init + n_xs:n_init + n_xs + n_extra]
        new, ys = fn(() if counter else carry, x, rest)
        if counter:
            new = (carry[0] + 1,)
        return (*new, *ys)

    steps = xs[0].shape[0]
    if isinstance(steps, int) and steps == 1:  # one step needs no loop (short sequences: one chunk)
        out = combine(*init, *(t[0] for t in xs), *extra)
        carry, ys = out[:n_init], tuple(y.unsqueeze(0) for y in out[n_init:])
        return (() if counter else tuple(carry)), ys
    from torch._higher_order_ops.scan import scan_op

    if torch.compiler.is_dynamo_compiling():
        # Dynamo traces the op itself (the op called in a user's compiled function): it captures
        # scan only through the public wrapper, whose body may close over `extra`
        from torch._higher_order_ops.scan import scan as public_scan

        def body(carry, x):
            out = combine(*carry, *x, *extra)
            return tuple(out[:n_init]), tuple(out[n_init:])

        carry, ys = public_scan(body, init, xs)
        return (() if counter else tuple(carry)), tuple(ys)
    out = scan_op(combine, list(init), list(xs), extra + sizes)
    carry, ys = tuple(out[:n_init]), tuple(out[n_init:])
    return (() if counter else tuple(carry)), ys


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


def _canonical_strides(fn):
    """`fn` with every output tensor given the row-major strides of its shape.

    cond requires both branches to return outputs with the same stride order. `.contiguous()`
    keeps whatever stride a size-1 dimension had (a [B, H, 1] logsumexp from the flash kernel
    has stride (H, 1, H), a fresh [B, H, 1] tensor (H, 1, 1)), so at L = 1 two contiguous
    outputs could still differ. A dense row-major tensor whose strides differ only on size-1
    dimensions gets the canonical ones as a view of the same memory (`as_strided`, no copy: an
    L-sized copy of each gradient otherwise); any other layout is copied.
    """

    def canonical(t):
        if not isinstance(t, torch.Tensor):
            return t
        expected = row_major_strides(t.shape)
        if tuple(t.stride()) == expected:
            return t
        if t.is_contiguous():  # only size-1 dimensions differ: same memory, same element order
            return t.as_strided(t.shape, expected)
        return t.clone(memory_format=torch.contiguous_format)

    def wrapped(*args):
        out = fn(*args)
        return tuple(canonical(t) for t in out) if isinstance(out, (tuple, list)) else canonical(out)

    return wrapped


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


def register_torch_logs() -> None:
    """TORCH_LOGS="lowrank_lora" (decisions) and TORCH_LOGS="lowrank_lora_graphs" (rewritten graphs)."""
    import os

    from torch._logging import _internal

    if "lowrank_lora_graphs" in _internal.log_registry.artifact_names:
        return
    _internal.register_log("lowrank_lora", ["lora_pass"])
    # parsed at torch import as the module name of the shim, which would shadow the artifact
    _internal.log_registry.log_alias_to_log_qnames.pop("lowrank_lora_graphs", None)
    _internal.register_artifact(
        "lowrank_lora_graphs", "Dynamo graphs before and after the lowrank_lora rewrite", visible=True,
        off_by_default=True,
    )
    if os.environ.get("TORCH_LOGS"):
        # TORCH_LOGS was parsed at torch import, when these names were only the importable shims
        # of the same names (lora_pass/_logs); parse it again now that they mean what they should
        _internal._parse_log_settings.cache_clear()  # it is memoised on the settings string
        _internal._init_logs()


def artifact_logger(module_name: str, artifact: str):
    from torch._logging import getArtifactLogger

    return getArtifactLogger(module_name, artifact)


def force_eager_backward_compile():
    """AOTAutograd compiles the backward graph at compile time instead of at the first backward."""
    import torch._functorch.config as functorch_config

    return functorch_config.patch(force_non_lazy_backward_lowering=True)


def fresh_aot_compile():
    """AOTAutograd traces and lowers both graphs now, bypassing its on-disk cache.

    A cache hit returns compiled code without calling the inner compiler, so a graph recorded
    there would be missing; inspection needs the graphs themselves.
    """
    import torch._functorch.config as functorch_config

    return functorch_config.patch(force_non_lazy_backward_lowering=True, enable_autograd_cache=False)


def aot_trace_graphs(gm, example_inputs):
    """The forward and backward AOTAutograd graphs of `gm`, as code, without Inductor."""
    from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

    graphs = {}

    def recorder(name):
        def compiler(graph, inputs):
            graphs[name] = graph.print_readable(print_output=False)
            return make_boxed_func(graph.forward)

        return compiler

    with force_eager_backward_compile():
        aot_module_simplified(gm, example_inputs, fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
    return graphs


def compile_fx_inner():
    from torch._inductor.compile_fx import compile_fx_inner as inner

    return inner


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
    step on (silently wrong gradients; tests/test_compat.py has a backward whose loop is
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


register_torch_logs()
