"""LLaMA (rotary, GQA), BERT (padding, bidirectional) and GPT-2 (fused Conv1D c_attn) with PEFT LoRA.

For each family and attention implementation: the exact count of rewritten sites, what the
matcher recorded, loss and every LoRA gradient against eager (exact mode) or a float64 eager
reference (guarded mode, one layer on each path), no graph break (fullgraph=True), no
recompilation on the next step, and the op in the generated forward and backward code.
"""

from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import lora_pass
from tests.conftest import calls_op, rel_err
from tests.models.families import (
    causal_batch, encoder_batch, lora_grads, reference_step, step, tiny_bert, tiny_gpt2, tiny_llama,
)

TOL = 0.05
LAYERS = 2

CASES = {
    # family/attn: (builder, batch, mask, adapted, kv_heads)
    "llama-sdpa": (lambda b=None: tiny_llama("sdpa", bounded=b), lambda: causal_batch(right_pad=(16, 12)),
                   "padding", "qkv", 2),
    "llama-eager": (lambda b=None: tiny_llama("eager", bounded=b), lambda: causal_batch(), "causal", "qkv", 2),
    # left padding under a causal mask: the first rows of the second sequence see no key at all
    "llama-sdpa-leftpad": (lambda b=None: tiny_llama("sdpa", bounded=b), lambda: causal_batch(left_pad=(16, 10)),
                           "padding", "qkv", 2),
    "bert-sdpa": (lambda b=None: tiny_bert("sdpa", bounded=b), lambda: encoder_batch(), "padding", "qkv", 2),
    "bert-eager": (lambda b=None: tiny_bert("eager", targets=("query", "value"), bounded=b),
                   lambda: encoder_batch(left=True), "padding", "qv", 2),
    "gpt2-sdpa": (lambda b=None: tiny_gpt2("sdpa", bounded=b), lambda: causal_batch(), "causal", "qkv", 2),
    "gpt2-eager": (lambda b=None: tiny_gpt2("eager", bounded=b), lambda: causal_batch(), "causal", "qkv", 2),
}
FAMILY = {"sdpa": "sdpa", "eager": "explicit_softmax"}


def compiled_step(model, batch, options):
    lora_pass.reset()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="lowrank_lora", options=options, fullgraph=True)
    (loss, _), code = run_and_get_code(lambda: step(compiled, batch))
    return compiled, loss, lora_grads(model), code, lora_pass.telemetry()


def check_sites(case, telemetry):
    _, _, mask, adapted, kv_heads = CASES[case]
    attn = case.split("-")[1]
    assert len(telemetry) == LAYERS
    for site, _ in telemetry:
        assert site.family == FAMILY[attn]
        assert site.mask == mask and site.kv_heads == kv_heads
        assert site.causal == (not case.startswith("bert"))
        assert "".join(n for n, p in site.projections.items() if p.adapted) == adapted
        if case.startswith("llama"):
            assert site.heads == 4
            assert site.projections["q"].rotary and site.projections["k"].rotary
            assert not site.projections["v"].rotary
        if case.startswith("gpt2"):
            assert [site.projections[n].fused for n in "qkv"] == [(0, 32), (32, 64), (64, 96)]
            assert site.projections["q"].module.endswith(".attn.c_attn")


@pytest.mark.parametrize("case", list(CASES))
def test_exact_mode_equals_eager(case):
    build, batch, *_ = CASES[case]
    model, data = build(), batch()
    eager_loss, eager_grads = step(model, data)
    _, loss, grads, code, telemetry = compiled_step(model, data, {"mode": "exact"})
    check_sites(case, telemetry)
    for _, stats in telemetry:
        assert stats["forward_exact"] == 1 and stats["forward_lowrank"] == 0
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == eager_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    assert calls_op(code[0], "record_forward")


@pytest.mark.parametrize("case", list(CASES))
def test_guarded_mode_both_paths_against_float64(case):
    build, batch, *_ = CASES[case]
    model, data = build((0.05, 40.0)), batch()  # layer 0 bounded logits, layer 1 large ones
    ref_loss, ref_grads = reference_step(model, data)
    compiled, loss, grads, code, telemetry = compiled_step(model, data, {"crossover": 0, "tolerance": TOL})
    check_sites(case, telemetry)
    paths = {}
    for site, stats in telemetry:
        assert site.paths == "guarded"
        layer = 0 if (".layers.0." in site.module or ".layer.0." in site.module or ".h.0." in site.module) else 1
        paths[layer] = (stats["forward_lowrank"], stats["backward_lowrank"], stats["forward_exact"])
        assert stats["composed_bound"] >= stats["last_bound"] > 0
    assert paths == {0: (1, 1, 0), 1: (0, 0, 1)}, paths
    assert rel_err(loss, ref_loss) <= TOL
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) <= TOL, name
    fwd, bwd = code[0], code[-1]
    for text, op in ((fwd, "record_forward"), (bwd, "record_backward")):
        assert calls_op(text, op)
        assert "true_graph" in text and "false_graph" in text
    with torch._dynamo.config.patch(error_on_recompile=True):
        step(compiled, batch())
    assert sum(s["forward_lowrank"] + s["forward_exact"] for _, s in lora_pass.telemetry()) == 2 * LAYERS


def test_gpt2_fused_projection_norms_use_each_slice():
    """The frozen-weight norm of a fused c_attn site is that of the q and k column blocks."""
    model = tiny_gpt2("sdpa", bounded=(0.05, 0.05), layers=1)
    _, _, _, _, telemetry = compiled_step(model, causal_batch(), {"mode": "lowrank"})
    (site, stats), = telemetry
    w = model.base_model.model.transformer.h[0].attn.c_attn.base_layer.weight.detach()
    expected = torch.linalg.matrix_norm(w[:, :32]) * torch.linalg.matrix_norm(w[:, 32:64])
    assert stats["frozen_norm"] == pytest.approx(float(expected), rel=1e-5)



def test_qwen2_shares_the_llama_form():
    """Qwen2 (biased q/k/v projections, rotary, GQA): rewritten and exact like LLaMA."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.models.families import _lora

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation="sdpa")
    model = _lora(Qwen2ForCausalLM(cfg), ("q_proj", "k_proj", "v_proj"), None)
    data = causal_batch()
    eager_loss, eager_grads = step(model, data)
    _, loss, grads, code, telemetry = compiled_step(model, data, {"mode": "exact"})
    (site, stats), = telemetry
    assert (site.kv_heads, site.heads, site.mask) == (2, 4, "causal")
    assert site.projections["q"].rotary and site.projections["k"].rotary
    assert "".join(n for n, p in site.projections.items() if p.adapted) == "qkv"
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    assert calls_op(code[0], "record_forward")
