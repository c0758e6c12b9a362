"""Local checkpoints of every supported family (saved from tiny random configs, as a user's would
be) and a GGUF file: the right class and LoRA targets, the per-head bounds against a float64
computation from the q and k activations, and the command line's errors for what is not
supported. The command line's reports and plots: tests/test_checkpoints_cli.py."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from lora_pass.__main__ import main
from lora_pass.checkpoints import checkpoint_inputs, load_lora_checkpoint, supported_families
from lora_pass.guard import degree_for, r_max, tolerance_for
from lora_pass.heads import bound_per_head, head_bounds
from tests.checkpoints import CHARS, FAMILIES, MODEL_CLASS, TEXT, saved_checkpoints

# the modules whose outputs are q and k (GPT-2: one fused c_attn output [q | k | v])
QK = {"opt": ("q_proj", "k_proj"), "llama": ("q_proj", "k_proj"), "mistral": ("q_proj", "k_proj"),
      "qwen2": ("q_proj", "k_proj"), "gpt2": ("c_attn", "c_attn"), "bert": ("query", "key"),
      "roberta": ("query", "key")}
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return saved_checkpoints(tmp_path_factory)


def _randomise_lora(model, seed=0):
    """LoRA B starts at zero: give it values so that the bound includes the LoRA update."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _reference_bounds(model, family, inputs, key_valid=None):
    """R per head of each layer in float64, from q and k caught at the projections' outputs
    (rotary embeddings applied again for the LLaMA-like families)."""
    base = model.get_base_model()
    cfg = base.config
    outputs = {}
    hooks = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in QK[family]:
            hooks.append(module.register_forward_hook(
                lambda m, args, out, name=name: outputs.__setitem__(name, out.detach().double())))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    ids = inputs["input_ids"]
    batch, length = ids.shape
    heads = cfg.num_attention_heads if family != "gpt2" else cfg.n_head
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = cfg.hidden_size if family != "gpt2" else cfg.n_embd
    d = hidden // heads
    split = lambda t, h: t.view(batch, length, h, d).transpose(1, 2)  # noqa: E731
    q_names = sorted(n for n in outputs if n.endswith(QK[family][0]))
    k_names = sorted(n for n in outputs if n.endswith(QK[family][1]))
    bounds = []
    for qn, kn in zip(q_names, k_names):
        if family == "gpt2":
            q, k = split(outputs[qn][..., :hidden], heads), split(outputs[qn][..., hidden:2 * hidden], heads)
        else:
            q, k = split(outputs[qn], heads), split(outputs[kn], kv_heads)
        scale = d ** -0.5
        if family in ("llama", "mistral", "qwen2"):
            modeling = importlib.import_module(type(base).__module__)
            positions = torch.arange(length)[None].expand(batch, length)
            cos, sin = base.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
            q, k = modeling.apply_rotary_pos_emb(q, k, cos.double(), sin.double())
        kc_mean = (k.mean(-2, keepdim=True) if key_valid is None else
                   (k * key_valid[:, None, :, None]).sum(-2, keepdim=True) / key_valid.sum(-1)[:, None, None, None])
        kn_ = torch.linalg.vector_norm(k - kc_mean, dim=-1)
        if key_valid is not None:
            kn_ = kn_ * key_valid[:, None, :]
        kmax = kn_.amax(-1).repeat_interleave(heads // kv_heads, dim=1)
        qmax = torch.linalg.vector_norm(q, dim=-1).amax(-1)
        bounds.append((scale * qmax * kmax).amax(0))
    return bounds


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_loads_and_head_bounds_match_float64(family, checkpoints):
    model, info = load_lora_checkpoint(checkpoints[family], lora="q,v")
    assert (info.family, info.model_class) == (family, MODEL_CLASS[family])
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if "lora_A" in name}
    assert adapted == {"gpt2": {"c_attn"}, "bert": {"query", "value"}, "roberta": {"query", "value"}}.get(
        family, {"q_proj", "v_proj"})
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    _randomise_lora(model)
    inputs, source = checkpoint_inputs(info, batch=2, seq_len=24, text=TEXT)
    assert source.startswith("text, ") and inputs["input_ids"].max() < len(CHARS) + 2
    key_valid = None
    if family in ("bert", "roberta"):  # a padded second row: its last 5 keys masked out
        inputs["attention_mask"][1, -5:] = 0
        key_valid = inputs["attention_mask"].double()
    layers = head_bounds(model, **inputs)
    reference = _reference_bounds(model, family, inputs, key_valid)
    assert len(layers) == len(reference) == 2
    for layer, ref in zip(layers, reference):
        assert len(layer["heads"]) == ref.numel()
        torch.testing.assert_close(torch.tensor(layer["heads"], dtype=torch.float64), ref, rtol=1e-6, atol=0)
    if key_valid is not None:  # the padded keys are left out: unmasking them changes the row's bound
        row = {name: t[1:] for name, t in inputs.items()}
        padded = head_bounds(model, **row)[0]["heads"]
        row["attention_mask"][:, -5:] = 1
        assert all(a != b for a, b in zip(head_bounds(model, **row)[0]["heads"], padded))


def test_bound_per_head_is_the_guards_bound():
    from lora_pass.guard import norm_bound

    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 9, 8, generator=gen), torch.randn(2, 2, 9, 8, generator=gen) + 0.5
    weight = torch.ones(2, 9)
    weight[0, -3:] = 0
    per_head = bound_per_head(q, k, scale=0.3, attention_mask=weight[:, None, None, :] > 0)
    assert float(per_head.max()) == pytest.approx(float(norm_bound(q, k, scale=0.3, key_weight=weight)), rel=1e-6)
    additive = torch.zeros(2, 1, 9, 9).masked_fill(weight[:, None, None, :] == 0, torch.finfo(torch.float32).min)
    torch.testing.assert_close(bound_per_head(q, k, scale=0.3, attention_mask=additive), per_head)


def test_tolerance_and_degree_to_pass_invert_r_max():
    for degree in (1, 2, 3):
        for bound in (0.05, 0.3, 0.9):
            tol = tolerance_for(bound, degree)
            if tol < 1:
                assert r_max(degree, tol) == pytest.approx(bound, rel=1e-6)
                assert r_max(degree, tol * 0.99) < bound
    assert degree_for(0.0, 0.05) == 1
    for bound in (0.01, 0.2, 0.6, 1.2):
        g = degree_for(bound, 0.05)
        assert g is not None and r_max(g, 0.05) >= bound and (g == 1 or r_max(g - 1, 0.05) < bound)
    assert degree_for(50.0, 0.05) is None and tolerance_for(math.inf, 2) == math.inf


def _error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_cli_names_what_is_supported(tmp_path, capsys, checkpoints):
    from transformers import GPTNeoXConfig

    GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    err = _error(["inspect", "--weights", str(tmp_path)], capsys)
    assert "'gpt_neox' is not supported" in err and str(supported_families()) in err
    assert "no config.json" in _error(["inspect", "--weights", str(tmp_path / "..")], capsys)
    assert "none exists there" in _error(["inspect", "--weights", str(tmp_path / "missing")], capsys)
    assert "--model" in _error(["inspect", "--model", "opt-tiny", "--weights", str(checkpoints["opt"])], capsys)
    assert "--text" in _error(["inspect", "--text", __file__], capsys)
    assert "--plot" in _error(["inspect", "--plot", "heads.jpg"], capsys)
    assert "position table holds 64" in _error(["inspect", "--weights", str(checkpoints["gpt2"]), "--seq-len", "65"],
                                               capsys)
