"""What the backend must leave alone, and why: each case records its reason."""

from __future__ import annotations

import pytest
import torch

import lora_pass
from tests.conftest import LoraAttention, lora_block, tiny_opt


def compiled_records(model, *args, options=None, **kwargs):
    lora_pass.reset()
    compiled = torch.compile(model, backend="lowrank_lora", options=options)
    out = compiled(*args, **kwargs)
    return out, lora_pass.records()


def reasons(records):
    return [s.reason for r in records for s in r.skipped]


def test_no_lora_compiles_exactly_as_inductor(ids):
    from transformers import OPTForCausalLM

    model = tiny_opt(lora=False)
    assert isinstance(model, OPTForCausalLM)
    torch._dynamo.reset()
    ours = torch.compile(model, backend="lowrank_lora")
    loss_a = ours(input_ids=ids, labels=ids, use_cache=False)
    records = lora_pass.records()[-1:]
    assert records[0].sites == [] and records[0].graph_before == records[0].graph_after
    assert all("no LoRA" in s.reason for s in records[0].skipped) and len(records[0].skipped) == 2
    torch._dynamo.reset()
    theirs = torch.compile(model, backend="inductor")
    loss_b = theirs(input_ids=ids, labels=ids, use_cache=False)
    assert torch.equal(loss_a.logits, loss_b.logits) and torch.equal(loss_a.loss, loss_b.loss)


def test_require_lora_false_rewrites_plain_attention(ids):
    model = tiny_opt(lora=False)
    torch._dynamo.reset()
    _, records = compiled_records(model, input_ids=ids, use_cache=False, options={"require_lora": False})
    assert len(records[-1].sites) == 2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_dropout_in_training_is_skipped(attn, ids):
    model = tiny_opt(attn, attention_dropout=0.1)
    model.train()
    torch._dynamo.reset()
    _, records = compiled_records(model, input_ids=ids, use_cache=False)
    assert sum(len(r.sites) for r in records) == 0
    assert len(reasons(records)) == 2 and all("dropout" in r for r in reasons(records))


def test_returned_attention_weights_are_another_consumer(ids):
    model = tiny_opt("eager")
    torch._dynamo.reset()
    _, records = compiled_records(model, input_ids=ids, use_cache=False, output_attentions=True)
    assert sum(len(r.sites) for r in records) == 0
    assert len(reasons(records)) == 2 and all("another consumer" in r for r in reasons(records))


def test_arbitrary_runtime_float_mask_is_skipped():
    block = lora_block(LoraAttention)
    x = torch.randn(2, 8, 16)
    torch._dynamo.reset()
    out, records = compiled_records(block, x, torch.randn(8, 8))
    assert sum(len(r.sites) for r in records) == 0
    assert any("not key-padding-shaped" in r for r in reasons(records))


def test_constant_non_causal_mask_is_skipped():
    block = lora_block(LoraAttention)
    x = torch.randn(2, 8, 16)
    torch._dynamo.reset()
    _, records = compiled_records(block, x, constant_mask="triu")
    assert sum(len(r.sites) for r in records) == 0
    assert any("neither causal" in r for r in reasons(records))


@pytest.mark.parametrize("mode", ["exact", "lowrank"])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32], ids=["bool", "float"])
def test_key_padding_mask_is_rewritten(mode, dtype):
    block = lora_block(LoraAttention)
    x = torch.randn(2, 8, 16)
    keep = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    keep[0, ..., 5:] = False
    mask = keep if dtype == torch.bool else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    ref_x = x.clone().requires_grad_()
    ref = block(ref_x, mask)
    dout = torch.randn_like(ref)
    ref.backward(dout)
    ref_grads = [ref_x.grad] + [p.grad.clone() for n, p in block.named_parameters() if p.requires_grad]
    block.zero_grad()
    torch._dynamo.reset()
    xx = x.clone().requires_grad_()
    out, records = compiled_records(block, xx, mask, options={"mode": mode})
    out.backward(dout)
    sites = [s for r in records for s in r.sites]
    assert len(sites) == 1 and sites[0].mask == "padding" and not sites[0].causal
    grads = [xx.grad] + [p.grad for n, p in block.named_parameters() if p.requires_grad]
    tol = 1e-5 if mode == "exact" else 0.05
    assert (out - ref).norm() <= tol * ref.norm()
    for g, r in zip(grads, ref_grads):
        assert (g - r).norm() <= tol * r.norm() + 1e-7
