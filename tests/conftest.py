"""Shared builders: tiny random-weight OPT models with PEFT LoRA, and a float64 reference."""

from __future__ import annotations

import copy

import pytest
import torch


def tiny_opt(attn="sdpa", targets=("q_proj", "v_proj"), layers=2, hidden=32, heads=2, seq=64,
             bounded=None, seed=0, lora_dropout=0.0, attention_dropout=0.0, lora=True):
    """A 2-layer OPT from its config with PEFT LoRA (B initialised non-zero so every LoRA
    parameter gets a gradient). `bounded`: per-layer factors applied to the q/k base weights,
    small factors put a layer into the bounded-logit regime."""
    from peft import LoraConfig, get_peft_model
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=2 * hidden,
                    num_attention_heads=heads, max_position_embeddings=seq, word_embed_proj_dim=hidden,
                    dropout=0.0, attention_dropout=attention_dropout, attn_implementation=attn)
    model = OPTForCausalLM(cfg)
    if bounded is not None:
        with torch.no_grad():
            for layer, factor in zip(model.model.decoder.layers, bounded):
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    proj.weight.mul_(factor)
                    proj.bias.mul_(factor)
    if not lora:
        return model
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                             lora_dropout=lora_dropout))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02 if bounded is not None else 0.1)
    return model


def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train_step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), lora_grads(model)


def reference_step(model, ids):
    """Eager float64 copy of the model: the reference loss and LoRA gradients."""
    ref = copy.deepcopy(model).double()
    loss, grads = train_step(ref, ids)
    return loss, grads


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture
def ids():
    torch.manual_seed(1)
    return torch.randint(0, 64, (2, 16))
