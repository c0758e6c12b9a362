"""The backend's Inductor post-grad pass for the graphs it rewrote: loop states accumulated in
place (`accumulate_carries_in_place`), and a cache key of this package's sources (`PostGradPass`).

Set as Inductor's `post_grad_custom_pre_pass` for a rewritten graph only (`lowering.compile_rewritten`);
graphs the backend leaves alone, and every other compilation, never run it.
"""

from __future__ import annotations

import torch


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
