"""Tiny random-weight LLaMA, BERT and GPT-2 models with PEFT LoRA, and their batches."""

from __future__ import annotations

import copy

import torch

VOCAB = 64


def _scale_qk(pairs, factors):
    """Multiply the q and k projections of each layer by its factor (bounded-logit regime)."""
    with torch.no_grad():
        for tensors, factor in zip(pairs, factors):
            for t in tensors:
                t.mul_(factor)


def tiny_llama(attn="sdpa", targets=("q_proj", "k_proj", "v_proj", "o_proj"), bounded=None, layers=2, positions=64):
    """LLaMA with rotary embeddings and grouped-query attention (4 query heads, 2 KV heads);
    `positions`: the longest sequence (each builder takes it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
                      attn_implementation=attn)
    model = LlamaForCausalLM(cfg)
    if bounded is not None:
        _scale_qk([(layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight) for layer in model.model.layers],
                  bounded)
    return _lora(model, targets, bounded)


def tiny_bert(attn="sdpa", targets=("query", "key", "value"), bounded=None, layers=2, positions=64):
    """A BERT encoder (bidirectional attention, padding mask) for sequence classification."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=positions, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, attn_implementation=attn, num_labels=2,
                     problem_type="single_label_classification")  # else set on the first call: a recompile
    model = BertForSequenceClassification(cfg)
    if bounded is not None:
        _scale_qk([(a.query.weight, a.query.bias, a.key.weight, a.key.bias)
                   for a in (layer.attention.self for layer in model.bert.encoder.layer)], bounded)
    return _lora(model, targets, bounded)


def tiny_gpt2(attn="sdpa", bounded=None, layers=2, positions=64):
    """GPT-2: one fused Conv1D `c_attn` makes q, k and v; LoRA on it with fan_in_fan_out."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=2, n_positions=positions, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=attn)
    model = GPT2LMHeadModel(cfg)
    model.loss_type = "ForCausalLM"  # unset for GPT-2, transformers warns on first use: a graph break
    if bounded is not None:
        with torch.no_grad():
            for block, factor in zip(model.transformer.h, bounded):
                block.attn.c_attn.weight[:, : 2 * cfg.n_embd].mul_(factor)  # Conv1D weight: [in, q|k|v]
                block.attn.c_attn.bias[: 2 * cfg.n_embd].mul_(factor)
    return _lora(model, ("c_attn",), bounded, fan_in_fan_out=True)


def _lora(model, targets, bounded, **kwargs):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), **kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02 if bounded is not None else 0.1)
    return model


def causal_batch(length=16, batch=2, seed=1, right_pad=None, left_pad=None):
    """input_ids and labels for a decoder; `right_pad` / `left_pad`: real lengths per row, the
    rest padded after / before them (padding is masked out and not a label)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    out = {"input_ids": ids, "labels": ids.clone(), "use_cache": False}
    real = right_pad or left_pad
    if real is not None:
        pos, real = torch.arange(length)[None, :], torch.tensor(real)[:, None]
        mask = (pos < real) if right_pad else (pos >= length - real)
        out["attention_mask"] = mask.long()
        out["labels"] = ids.masked_fill(~mask, -100)
    return out


def encoder_batch(lengths=(16, 11, 7), length=16, left=False, seed=1):
    """input_ids, a padding attention_mask (right padding, or left with `left=True`) and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), length), generator=g)
    pos = torch.arange(length)[None, :]
    real = torch.tensor(lengths)[:, None]
    mask = (pos >= length - real) if left else (pos < real)
    return {"input_ids": ids.masked_fill(~mask, 0), "attention_mask": mask.long(),
            "labels": torch.randint(0, 2, (len(lengths),), generator=g)}


def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def step(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), lora_grads(model)


def reference_step(model, batch):
    """Eager float64 copy: the reference loss and LoRA gradients."""
    return step(copy.deepcopy(model).double(), batch)
