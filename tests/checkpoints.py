"""Tiny random checkpoints of every supported family, saved as a user's would be (save_pretrained),
with a character-level tokenizer, and a LLaMA written as a GGUF file."""

from __future__ import annotations

import pathlib
import string

import torch

VOCAB = 64
# family -> (config class, model class, config keyword arguments)
TINY = {
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2,
                                                      max_position_embeddings=64)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                                            num_attention_heads=4, num_key_value_heads=2,
                                                            max_position_embeddings=64, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2,
                                                      max_position_embeddings=64)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=2, n_positions=64)),
    "bert": ("BertConfig", "BertForMaskedLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                   intermediate_size=64, max_position_embeddings=64)),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                            intermediate_size=64, max_position_embeddings=66,
                                                            pad_token_id=1)),
}
FAMILIES = sorted(TINY)
MODEL_CLASS = {"opt": "OPTForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertForMaskedLM",
               "roberta": "RobertaForMaskedLM"}
TEXT = ("the quick brown fox jumps over the lazy dog. " * 3 + "attention is cheap while the logits are bounded; "
        "lora training needs gradients within a tolerance.\n")
CHARS = string.ascii_lowercase + string.digits + " .,;:'\"!?()-\n"


def tiny_model(family: str, seed: int = 0):
    import transformers

    config_cls, model_cls, kwargs = TINY[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(vocab_size=VOCAB, **kwargs)
    return getattr(transformers, model_cls)(config)


def char_tokenizer():
    """A character-level fast tokenizer over lower-case text (VOCAB ids), built offline."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def save_tiny(family: str, directory, tokenizer: bool = True, seed: int = 0) -> pathlib.Path:
    """Save a tiny random `family` checkpoint (and its tokenizer) to `directory`."""
    out = pathlib.Path(directory)
    tiny_model(family, seed).save_pretrained(out)
    if tokenizer:
        char_tokenizer().save_pretrained(out)
    return out


def _permute(weights, n_head: int, n_head_kv: int):
    """The row order llama.cpp stores LLaMA's q and k weights in (transformers undoes it on load)."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def save_tiny_gguf(directory, seed: int = 0) -> tuple[pathlib.Path, torch.nn.Module]:
    """Write the tiny LLaMA as a float32 GGUF file; returns (its path, the model written)."""
    import gguf

    model = tiny_model("llama", seed)
    cfg = model.config
    path = pathlib.Path(directory) / "tiny-llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    writer.add_vocab_size(VOCAB)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        data = tensor.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            data = _permute(data, cfg.num_attention_heads, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = _permute(data, cfg.num_attention_heads, cfg.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model


def saved_checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: save_tiny(family, root / family) for family in FAMILIES}
