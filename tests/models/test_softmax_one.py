"""Outlier-free OPT (softmax_1 attention) with PEFT LoRA, compiled with lowrank_lora."""

from __future__ import annotations

import pytest
import torch

import lora_pass
from lora_pass.softmax_one import register_attention, softmax_1
from tests.conftest import calls_op, reference_step, rel_err, tiny_opt, train_step
from tests.models.test_opt import compile_and_step

TOL = 0.05
LAYERS = 2


@pytest.fixture(scope="module", autouse=True)
def softmax1_attention():
    register_attention()


def test_softmax_1_definition():
    torch.manual_seed(0)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    with_null = torch.softmax(torch.cat([x, x.new_zeros(3, 1)], -1), -1)[:, :-1]
    torch.testing.assert_close(softmax_1(x), with_null, rtol=1e-12, atol=1e-15)
    assert torch.autograd.gradcheck(softmax_1, (x,))
    big = torch.tensor([1000.0, 0.0, -float("inf")])
    torch.testing.assert_close(softmax_1(big), torch.tensor([1.0, 0.0, 0.0]))
    assert softmax_1(torch.full((4,), -float("inf"))).eq(0).all()


def compiled_step(model, ids, options):
    torch._dynamo.reset()
    return compile_and_step(model, ids, options)


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj")], ids=["qv", "qkv"])
def test_exact_mode_equals_eager(targets, ids):
    model = tiny_opt("softmax1", targets)
    eager_loss, eager_grads = train_step(model, ids)
    _, loss, grads, code, telemetry = compiled_step(model, ids, {"mode": "exact"})
    assert len(telemetry) == LAYERS
    for site, stats in telemetry:
        assert site.family == "softmax_1" and site.causal and site.paths == "exact"
        assert stats["forward_exact"] == 1 and stats["backward_exact"] == 1
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == eager_grads.keys() and len(grads) == 2 * len(targets) * LAYERS
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    assert calls_op(code[0], "record_forward")
    assert calls_op(code[-1], "record_backward")


def test_guarded_mode_both_paths_against_float64(ids):
    model = tiny_opt("softmax1", ("q_proj", "k_proj", "v_proj"), bounded=(0.05, 40.0))
    ref_loss, ref_grads = reference_step(model, ids)
    compiled, loss, grads, code, telemetry = compiled_step(model, ids, {"crossover": 0, "tolerance": TOL})
    paths = {}
    for site, stats in telemetry:
        assert site.family == "softmax_1" and site.paths == "guarded"
        layer = 0 if ".layers.0." in site.module else 1
        paths[layer] = (stats["forward_lowrank"], stats["backward_lowrank"], stats["forward_exact"])
    assert paths == {0: (1, 1, 0), 1: (0, 0, 1)}, paths
    assert rel_err(loss, ref_loss) <= TOL
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) <= TOL, name
    for text, op in ((code[0], "record_forward"), (code[-1], "record_backward")):
        assert calls_op(text, op)
        assert "true_graph" in text and "false_graph" in text
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(input_ids=ids, labels=ids, use_cache=False).loss.backward()


def test_without_lora_softmax1_compiles_like_inductor(ids):
    """Nothing to rewrite: softmax_1 is decomposed and fused by Inductor, same numbers."""
    model = tiny_opt("softmax1", lora=False)
    torch._dynamo.reset()
    lora_pass.reset()
    ours = torch.compile(model, backend="lowrank_lora")(input_ids=ids, labels=ids, use_cache=False)
    assert sum(len(r.sites) for r in lora_pass.records()) == 0
    assert all("no LoRA" in s.reason for r in lora_pass.records() for s in r.skipped)
    torch._dynamo.reset()
    theirs = torch.compile(model, backend="inductor")(input_ids=ids, labels=ids, use_cache=False)
    assert torch.equal(ours.logits, theirs.logits)
