"""What stays unsupported in the LLaMA, BERT and GPT-2 families: left alone, with its reason."""

from __future__ import annotations

import torch

import lora_pass
from tests.models.families import _lora, causal_batch, encoder_batch, tiny_bert, tiny_gpt2


def records_after(model, batch, options=None):
    lora_pass.reset()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="lowrank_lora", options=options)
    out = compiled(**batch)
    return out, lora_pass.records()


def skipped(records):
    return [s.reason for r in records for s in r.skipped]


def test_sliding_window_mask_is_left_alone():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                        sliding_window=4, attn_implementation="sdpa")
    model = _lora(MistralForCausalLM(cfg), ("q_proj", "v_proj"), None)
    batch = causal_batch()
    eager = model(**batch).loss
    out, records = records_after(model, batch, {"crossover": 0})
    assert sum(len(r.sites) for r in records) == 0
    assert skipped(records) == ["constant mask that is neither causal nor all-true"]
    torch.testing.assert_close(out.loss, eager, rtol=1e-5, atol=1e-5)


def test_bert_attention_dropout_in_training_is_left_alone():
    model = tiny_bert("eager", layers=1)
    for module in model.modules():
        if type(module).__name__ == "BertSelfAttention":
            module.dropout.p = 0.1
    model.train()
    _, records = records_after(model, encoder_batch())
    assert sum(len(r.sites) for r in records) == 0
    assert len(skipped(records)) == 1 and "attention dropout in training (p=0.1)" in skipped(records)[0]


def test_gpt2_returned_attention_weights_are_left_alone():
    model = tiny_gpt2("eager", layers=1)
    batch = {**causal_batch(), "output_attentions": True}
    eager = model(**batch)
    out, records = records_after(model, batch, {"crossover": 0})
    assert sum(len(r.sites) for r in records) == 0
    assert len(skipped(records)) == 1 and "has another consumer" in skipped(records)[0]
    torch.testing.assert_close(out.attentions[0], eager.attentions[0], rtol=1e-5, atol=1e-5)
