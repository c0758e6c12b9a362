"""lowering.subgraphs_without_donation: a loop in a backward keeps its loop-invariant inputs; the
backend's loop lowering under default Dynamo settings."""

import pytest
import torch

from lora_pass import inductor_pass, lowering
from lora_pass.lowering import op_backend
from lora_pass.ops import control_flow

N, D = 4, 8


class _LoopInBackward(torch.autograd.Function):
    """x -> w.repeat(N) * prod_i t_i(x) with a scan in the backward whose body reads the
    loop-invariant w in a pointwise op of w's size, whose result a matmul reads.

    The six matmul products are saved for the backward, which makes them donated buffers of the
    backward graph (placeholders 1 to 6); the scan body's inputs are (index, ys, carry, xs, w, m2),
    so w is body input 4, an index of that list. Inductor 2.13.0 without the fix writes
    2 w + g_0 into w's buffer at the first step: every later row of the gradient is wrong."""

    @staticmethod
    def forward(ctx, x, w, m):
        ts = [x @ (m * (i + 1)).sin() for i in range(6)]
        ctx.save_for_backward(w, *ts)
        ctx.m2 = m.cos()
        out = w.repeat(N, 1)
        for t in ts:
            out = out * t
        return out

    @staticmethod
    def backward(ctx, g):
        w, *ts = ctx.saved_tensors

        def step(carry, xs, extra):
            wt, mt = extra
            y = wt * 2.0 + xs[0]  # w's last use; a matmul reads y, so y gets a buffer of its own
            return (carry[0] + 1.0,), ((y.view(1, D) @ mt).view(D),)

        _, (gx,) = control_flow.scan(step, (g.new_zeros(()),), (g,), (w, ctx.m2))
        for t in ts:
            gx = gx * t
        return gx, None, None


@torch.compiler.allow_in_graph
def _apply(x, w, m):
    return _LoopInBackward.apply(x, w, m)


def _loss(x, w, m):
    return _apply(x, w, m).sum()


def _grad(fn, seed):
    gen = torch.Generator().manual_seed(seed)  # float64: the compiled gradient is exact to ~1e-15
    x = torch.randn(N, D, generator=gen, dtype=torch.float64).requires_grad_()
    w, m = torch.randn(D, generator=gen, dtype=torch.float64), torch.randn(D, D, generator=gen, dtype=torch.float64)
    fn(x, w, m).backward()
    return x.grad


@pytest.mark.parametrize("seed", [0, 1])
def test_loop_invariant_input_of_a_backward_loop_is_not_overwritten(seed):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    compiled = torch.compile(_loss, backend=op_backend(), fullgraph=True)  # default settings: the scan stays a loop
    got, codes = run_and_get_code(lambda: _grad(compiled, seed))
    assert any("while_loop_body" in code for code in codes), "the backward's scan was not a loop"
    torch.testing.assert_close(got, _grad(_loss, seed), rtol=1e-10, atol=1e-10)


def test_subgraph_lowerings_get_no_donated_inputs_and_the_patch_is_undone():
    from torch._inductor.graph import GraphLowering

    original = GraphLowering.make_subgraph
    with lowering.subgraphs_without_donation():
        assert GraphLowering.make_subgraph is not original
        with lowering.subgraphs_without_donation():  # nested: one patch
            pass
        assert GraphLowering.make_subgraph is not original
    assert GraphLowering.make_subgraph is original


def _state_loop(return_state):
    """A scan carrying h [1, 4, 3] updated as h + x_i^T @ b (a bmm), each step emitting the old h's
    row sums; the final h returned or not."""

    def step(carry, xs, extra):
        (h,), (b,) = carry, extra
        return (h + xs[0].transpose(-1, -2) @ b,), (h.sum(-1),)

    def f(xs, b):
        (h,), (ys,) = control_flow.scan(step, (b.new_zeros(1, 4, 3),), (xs,), (b,))
        return (ys, h) if return_state else (ys,)

    return f


def _compiled_state_loop(return_state, seed, patches=None) -> str:
    """Compile `_state_loop` as the backend compiles a rewritten graph, check its results against
    eager on fresh float64 inputs, and return the generated code."""
    from torch._inductor.utils import run_and_get_code

    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(5, 1, 2, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(1, 2, 3, generator=gen, dtype=torch.float64)
    f = _state_loop(return_state)
    torch._dynamo.reset()
    got, (code,) = run_and_get_code(torch.compile(f, backend=op_backend(patches), fullgraph=True), xs, b)
    want = f(xs, b)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    return code


@pytest.mark.parametrize("return_state", [False, True], ids=["state-unused", "state-returned"])
def test_carried_state_is_accumulated_in_place_only_when_its_buffer_is_the_loops(return_state, monkeypatch):
    """inductor_pass.accumulate_carries_in_place: the state becomes an in-place baddbmm_ on the carried
    buffer when the final state is not read after the loop, and stays a loop output otherwise;
    the results equal eager either way. Compiled with the environment variable CI set and no
    lowering registered for baddbmm_ yet: there Inductor's implicit fallback raises for an op
    with a decomposition, so the pass must register the fallback itself."""
    from torch._inductor import lowering

    monkeypatch.setenv("CI", "true")
    monkeypatch.delitem(lowering.lowerings, torch.ops.aten.baddbmm_.default, raising=False)

    code = _compiled_state_loop(return_state, seed=3)
    assert "while_loop_body" in code
    assert ("baddbmm_" in code) is not return_state


def test_a_user_post_grad_pass_runs_before_the_backends():
    """A `post_grad_custom_pre_pass` given through the Inductor options runs (on the graph as
    Inductor gives it, scans not yet lowered), and the backend's pass still runs after it (the
    state accumulated in place); the FX-graph cache key includes both passes' uuids."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    seen = []

    class UserPass(CustomGraphPass):
        def __call__(self, graph):
            seen.append(sum(n.target is torch.ops.higher_order.scan for n in graph.nodes))

        def uuid(self):
            return "user-pass"

    user = UserPass()
    combined = inductor_pass.with_post_grad_pass(user)
    assert combined == (user, inductor_pass.PostGradPass.get()) and inductor_pass.with_post_grad_pass(None) is combined[1]
    code = _compiled_state_loop(False, seed=4, patches={"post_grad_custom_pre_pass": user})
    # the user's pass ran on the graph before its scan was lowered (and on the scan's body, a
    # subgraph Inductor runs the post-grad passes on as well)
    assert sorted(seen) == [0, 1]
    assert "baddbmm_" in code  # and the backend's after it
