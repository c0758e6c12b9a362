"""Models built from their published architecture configs (random weights), with PEFT LoRA.

No download: `opt_config` spells out OPT's architecture; `--weights PATH` style loading goes
through `from_pretrained(PATH)` on a local directory.
"""

from __future__ import annotations

# Published OPT architectures (facebook/opt-*): hidden size, layers, heads, FFN, projection dim.
OPT_ARCHS = {
    "opt-tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32, vocab_size=512),
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072, word_embed_proj_dim=768),
    "opt-350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096, word_embed_proj_dim=512,
                     do_layer_norm_before=False),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192, word_embed_proj_dim=2048),
}

# model_type -> LoRA target module names for the letters q, k, v, o. GPT-2 makes q, k and v in one
# fused Conv1D (c_attn): any of q, k, v adapts all three; "attn.c_proj" leaves the MLP's c_proj alone.
_DECODER = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
_ENCODER = {"q": "query", "k": "key", "v": "value", "o": "attention.output.dense"}
FAMILY_TARGETS = {
    "opt": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"},
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "gpt2": {"q": "c_attn", "k": "c_attn", "v": "c_attn", "o": "attn.c_proj"},
    "bert": _ENCODER,
    "roberta": _ENCODER,
}
# attention implementations: transformers' own, and "softmax1", the outlier-free variant
# (lora_pass.softmax_one): OPT with softmax_1 in place of softmax, as in the paper's experiment
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "softmax1")


def _attn(attn: str) -> str:
    if attn not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn must be one of {list(ATTN_IMPLEMENTATIONS)}, got {attn!r}")
    if attn == "softmax1":
        from .softmax_one import register_attention

        register_attention()
    return attn


def opt_config(name: str, *, attn: str = "sdpa", max_positions: int | None = None, **overrides):
    """OPTConfig of a published OPT size; `max_positions` extends the position table."""
    from transformers import OPTConfig

    if name not in OPT_ARCHS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(OPT_ARCHS)}")
    kwargs = dict(OPT_ARCHS[name])
    kwargs.setdefault("vocab_size", 50272)
    kwargs.update(max_position_embeddings=max_positions or 2048, dropout=0.0, attention_dropout=0.0,
                  attn_implementation=_attn(attn))
    kwargs.update(overrides)
    return OPTConfig(**kwargs)


def parse_lora_targets(spec: str, family: str = "opt") -> list[str]:
    """'q,v' -> the family's module names (['q_proj', 'v_proj'] for OPT and LLaMA; ['c_attn'] for
    GPT-2); ValueError naming what is allowed."""
    table = FAMILY_TARGETS[family]
    letters = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in letters if n not in table]
    if not letters or bad:
        raise ValueError(f"LoRA targets must be a comma-separated subset of {sorted(table)}, got {spec!r}")
    return list(dict.fromkeys(table[n] for n in letters))


def build_opt_lora(name: str = "opt-125m", *, lora: str = "q,v", r: int = 8, alpha: int = 16, attn: str = "sdpa",
                   max_positions: int | None = None, weights: str | None = None, seed: int = 0, dtype=None):
    """OPTForCausalLM (random weights, or `weights` from a local directory) with PEFT LoRA.

    `attn`: "sdpa", "eager" or "softmax1" (outlier-free OPT: softmax_1 attention).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import OPTForCausalLM

    torch.manual_seed(seed)
    if weights:
        model = OPTForCausalLM.from_pretrained(weights, attn_implementation=_attn(attn), dropout=0.0,
                                               attention_dropout=0.0)
    else:
        model = OPTForCausalLM(opt_config(name, attn=attn, max_positions=max_positions))
    if dtype is not None:
        model = model.to(dtype)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=parse_lora_targets(lora), lora_dropout=0.0)
    return get_peft_model(model, config)
