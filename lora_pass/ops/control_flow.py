"""The op's control flow: `cond` (the guard's two paths) and `scan` (the chunk loops), traced
once into higher-order ops that Inductor compiles as a branch and as a loop."""

from __future__ import annotations

import torch

from .layout import row_major_strides


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
