"""Local Hugging Face checkpoints of every supported family, with PEFT LoRA on their attention.

`load_lora_checkpoint(path)` reads the checkpoint's config, picks the model class the checkpoint
was saved from (its `architectures` entry, else the family's default head), loads the weights in
float32 with every dropout set to 0, and applies LoRA to the family's attention projections.
`path` is a checkpoint directory (`save_pretrained` output: config.json and weights) or a GGUF
file, which transformers dequantises (`gguf_file=`; needs the `gguf` package).
`checkpoint_inputs` makes a batch: real text through the checkpoint's own tokenizer when it has
one, random token ids otherwise, and says which.
"""

from __future__ import annotations

import dataclasses
import pathlib

from .models import FAMILY_TARGETS, _attn, parse_lora_targets

ENCODERS = ("bert", "roberta")
# the class used when the checkpoint's config names none that transformers has
_DEFAULT_CLASS = {family: "AutoModel" if family in ENCODERS else "AutoModelForCausalLM" for family in FAMILY_TARGETS}


@dataclasses.dataclass
class Checkpoint:
    """What was loaded: the family (config.model_type), the model class, LoRA targets, and where
    the weights and tokenizer came from (`gguf_file` is None for a directory)."""

    path: str
    directory: str
    gguf_file: str | None
    family: str
    model_class: str
    targets: list
    vocab_size: int
    max_positions: int | None  # longest sequence of a learned position table; None for rotary embeddings


def supported_families() -> list[str]:
    return sorted(FAMILY_TARGETS)


def _locate(path) -> tuple[str, str | None]:
    p = pathlib.Path(path)
    if p.is_file() and p.suffix == ".gguf":
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise ImportError(f"{p} is a GGUF file: loading it needs the gguf package "
                              "(pip install 'lora-pass[gguf]')") from None
        return str(p.parent), p.name
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ValueError(f"--weights {path}: the directory has no config.json (not a Hugging Face checkpoint "
                             "saved with save_pretrained)")
        return str(p), None
    raise ValueError(f"--weights {path}: expected a checkpoint directory or a .gguf file, and none exists there")


def _no_dropout(config) -> None:
    for name, value in list(vars(config).items()):
        if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
            setattr(config, name, 0.0)


def load_lora_checkpoint(path, *, lora: str = "q,v", r: int = 8, alpha: int = 16, attn: str = "sdpa",
                         seed: int = 0, dtype=None):
    """(PEFT model, Checkpoint) for the checkpoint at `path` (directory or .gguf file).

    The weights load in `dtype` (float32 by default, whatever the checkpoint stores); every
    dropout probability in the config is set to 0; `attn` is "sdpa", "eager" or "softmax1".
    ValueError for a family outside `supported_families()`.
    """
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    directory, gguf_file = _locate(path)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    config = transformers.AutoConfig.from_pretrained(directory, **extra)
    family = config.model_type
    if family not in FAMILY_TARGETS:
        raise ValueError(f"{path}: model family {family!r} is not supported; supported families (config.model_type) "
                         f"are {supported_families()}")
    _no_dropout(config)
    config._attn_implementation = _attn(attn)
    names = [a for a in (config.architectures or []) if hasattr(transformers, a)]
    model_class = names[0] if names else _DEFAULT_CLASS[family]
    torch.manual_seed(seed)  # heads the checkpoint lacks start from this seed
    model = getattr(transformers, model_class).from_pretrained(
        directory, config=config, dtype=dtype or torch.float32, attn_implementation=config._attn_implementation,
        **extra)
    if family == "gpt2":
        model.loss_type = "ForCausalLM"  # unset for GPT-2, transformers warns on first use: a graph break
    targets = parse_lora_targets(lora, family)
    peft_config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                             fan_in_fan_out=family == "gpt2")
    peft_model = get_peft_model(model, peft_config)
    info = Checkpoint(path=str(path), directory=directory, gguf_file=gguf_file, family=family,
                      model_class=type(model).__name__, targets=targets, vocab_size=config.vocab_size,
                      max_positions=_max_positions(config))
    return peft_model, info


def checkpoint_inputs(info: Checkpoint, *, batch: int, seq_len: int, text: str | None = None, seed: int = 0):
    """(keyword arguments of one forward call, a line saying what the tokens are).

    With `text` and a tokenizer in the checkpoint (or its GGUF file), the text's tokens fill
    `batch` rows of `seq_len` (repeated when the text is shorter); otherwise random ids below the
    vocabulary size. Causal LMs get `labels` (the loss drives the backward pass) and
    `use_cache=False`; encoders get an all-ones `attention_mask`.
    """
    import torch

    if info.max_positions is not None and seq_len > info.max_positions:
        raise ValueError(f"--seq-len {seq_len}: the {info.family} checkpoint's position table holds "
                         f"{info.max_positions} positions")
    ids, source = None, None
    if text is not None:
        tokenizer = _tokenizer(info)
        if tokenizer is None:
            source = f"random tokens (no tokenizer in {info.path}; --text ignored)"
        else:
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not tokens:
                raise ValueError("--text: the file gives no tokens")
            need = batch * seq_len
            repeats = -(-need // len(tokens))
            ids = torch.tensor((tokens * repeats)[:need]).view(batch, seq_len)
            source = (f"text, {len(tokens)} tokens through the checkpoint's tokenizer"
                      + (f" (repeated {repeats}x to fill {batch} x {seq_len})" if repeats > 1 else ""))
    if ids is None:
        ids = torch.randint(0, info.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
        source = source or "random tokens"
    if info.family in ENCODERS:
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    else:
        kwargs = {"input_ids": ids, "use_cache": False}
        if info.model_class.endswith(("ForCausalLM", "LMHeadModel")):
            kwargs["labels"] = ids
    return kwargs, source


def _max_positions(config) -> int | None:
    if config.model_type in ("llama", "mistral", "qwen2"):
        return None  # rotary: no table to run out of
    if config.model_type == "gpt2":
        return config.n_positions
    # RoBERTa's positions start after the padding index
    return config.max_position_embeddings - (config.pad_token_id + 1 if config.model_type == "roberta" else 0)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model")


def _tokenizer(info: Checkpoint):
    """The checkpoint's own tokenizer, or None where it has none. A directory with tokenizer files
    whose tokenizer fails to load raises (a broken tokenizer is not "no tokenizer")."""
    from transformers import AutoTokenizer

    if info.gguf_file:
        from gguf import GGUFReader

        if "tokenizer.ggml.model" not in GGUFReader(pathlib.Path(info.directory) / info.gguf_file).fields:
            return None
        return AutoTokenizer.from_pretrained(info.directory, gguf_file=info.gguf_file)
    if not any((pathlib.Path(info.directory) / name).exists() for name in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(info.directory)
