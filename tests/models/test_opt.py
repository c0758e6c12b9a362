"""OPT from OPTConfig with PEFT LoRA, compiled with lowrank_lora: counts, numbers, generated code."""

from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import lora_pass
from lora_pass.guard import r_max
from tests.conftest import calls_op, reference_step, rel_err, tiny_opt, train_step, uses_cpp_wrapper

TOL = 0.05
LAYERS = 2


def compile_and_step(model, ids, options):
    lora_pass.reset()
    compiled = torch.compile(model, backend="lowrank_lora", options=options, fullgraph=True)
    model.zero_grad(set_to_none=True)

    def step():
        loss = compiled(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach()

    loss, code = run_and_get_code(step)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return compiled, loss, grads, code, lora_pass.telemetry()


def by_module(telemetry):
    return {site.module: (site, stats) for site, stats in telemetry}


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    return torch.randint(0, 64, (2, 16))


EXACT_CASES = [(attn, targets) for attn in ("sdpa", "eager") for targets in (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj"))]


@pytest.mark.parametrize("attn,targets", EXACT_CASES, ids=lambda x: x if isinstance(x, str) else ",".join(t[0] for t in x))
def test_exact_mode_equals_eager(attn, targets, batch):
    model = tiny_opt(attn, targets)
    eager_loss, eager_grads = train_step(model, batch)
    _, loss, grads, code, telemetry = compile_and_step(model, batch, {"mode": "exact"})
    assert len(telemetry) == LAYERS
    for site, stats in telemetry:
        assert site.paths == "exact"
        assert set(n for n, p in site.projections.items() if p.adapted) == {t[0] for t in targets}
        assert stats["forward_exact"] == 1 and stats["forward_lowrank"] == 0
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == eager_grads.keys() and len(grads) == 2 * len(targets) * LAYERS
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-5, atol=1e-5)
    assert calls_op(code[0], "record_forward")
    assert not any(uses_cpp_wrapper(c) for c in code)  # exact only: Inductor's own defaults


@pytest.mark.parametrize("attn,targets", [("sdpa", ("q_proj", "k_proj", "v_proj")), ("eager", ("q_proj", "v_proj"))])
def test_lowrank_mode_within_tolerance_in_bounded_regime(attn, targets, batch):
    model = tiny_opt(attn, targets, bounded=(0.05, 0.05))
    ref_loss, ref_grads = reference_step(model, batch)
    _, loss, grads, code, telemetry = compile_and_step(model, batch, {"mode": "lowrank", "tolerance": TOL})
    assert len(telemetry) == LAYERS
    for site, stats in telemetry:
        assert stats["forward_lowrank"] == 1 and stats["backward_lowrank"] == 1
        assert 0 < stats["last_bound"] <= r_max(2, TOL)  # bounded regime: the guard would pass
    assert rel_err(loss, ref_loss) <= TOL
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) <= TOL, name
    fwd, bwd = code[0], code[-1]
    assert calls_op(fwd, "record_forward")
    assert calls_op(bwd, "record_backward")
    assert uses_cpp_wrapper(fwd) and uses_cpp_wrapper(bwd)  # the backend's default on CPU


@pytest.mark.parametrize("attn,targets", [("sdpa", ("q_proj", "v_proj")), ("eager", ("q_proj", "k_proj", "v_proj"))])
def test_guarded_mode_takes_each_path_where_it_should(attn, targets, batch):
    # layer 0 in the bounded regime, layer 1 with large logits
    model = tiny_opt(attn, targets, bounded=(0.05, 40.0))
    ref_loss, ref_grads = reference_step(model, batch)
    compiled, loss, grads, code, telemetry = compile_and_step(model, batch, {"crossover": 0, "tolerance": TOL})
    sites = by_module(telemetry)
    assert len(sites) == LAYERS
    layer0 = next(v for k, v in sites.items() if ".layers.0." in k)
    layer1 = next(v for k, v in sites.items() if ".layers.1." in k)
    assert layer0[0].paths == layer1[0].paths == "guarded"
    assert layer0[1]["forward_lowrank"] == 1 and layer0[1]["backward_lowrank"] == 1
    assert layer1[1]["forward_exact"] == 1 and layer1[1]["backward_exact"] == 1
    assert layer1[1]["last_bound"] > r_max(2, TOL)
    assert rel_err(loss, ref_loss) <= TOL
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) <= TOL, name
    fwd, bwd = code[0], code[-1]
    for text, op in ((fwd, "record_forward"), (bwd, "record_backward")):
        assert calls_op(text, op)
        assert "true_graph" in text and "false_graph" in text  # both paths compiled in
    # a second step reuses the compiled graph: no recompilation, counters advance
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    stats = by_module(lora_pass.telemetry())
    assert sum(s["forward_lowrank"] + s["forward_exact"] for _, s in stats.values()) == 2 * LAYERS


def test_default_auto_mode_keeps_short_sequences_exact(batch):
    model = tiny_opt("sdpa")
    eager_loss, _ = train_step(model, batch)
    _, loss, _, _, telemetry = compile_and_step(model, batch, None)
    assert len(telemetry) == LAYERS
    for site, _ in telemetry:
        assert site.paths == "exact" and "crossover" in site.decision
        assert site.module.startswith("base_model.model.model.decoder.layers.")
        assert site.module.endswith(".self_attn")
        assert site.projections["q"].rank == 4 and site.projections["q"].scaling == 2.0
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)


def test_guarded_mode_with_several_chunks():
    """L above the chunk size: the chunk loops inside both cond branches."""
    length = 300
    model = tiny_opt("sdpa", ("q_proj", "v_proj"), bounded=(0.02, 40.0), seq=length + 2)
    torch.manual_seed(2)
    ids = torch.randint(0, 64, (1, length))
    ref_loss, ref_grads = reference_step(model, ids)
    _, loss, grads, _, telemetry = compile_and_step(model, ids, {"crossover": 0, "tolerance": TOL})
    assert sorted(s["forward_lowrank"] for _, s in telemetry) == [0, 1]
    assert rel_err(loss, ref_loss) <= TOL
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) <= TOL, name
