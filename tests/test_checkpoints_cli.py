"""`lora-pass inspect --weights PATH` on local checkpoints of every supported family and a GGUF
file, run as a user runs it: the report of sites and per-head bounds, the saved JSON, the plot."""

from __future__ import annotations

import json

import pytest
import torch

from lora_pass.__main__ import main
from lora_pass.checkpoints import load_lora_checkpoint
from tests.checkpoints import FAMILIES, MODEL_CLASS, TEXT, TINY, save_tiny_gguf, saved_checkpoints


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return saved_checkpoints(tmp_path_factory)


def _cli(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr()


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_inspects_a_checkpoint(family, checkpoints, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    torch._dynamo.reset()
    argv = ["inspect", "--weights", str(checkpoints[family]), "--seq-len", "40", "--batch", "2", "--text", str(text),
            "--out", str(tmp_path / "out"), "--plot", str(tmp_path / "heads.png")]
    # one decoder and one encoder family on the low-rank path with a backward pass; the others on
    # the exact path (forward only), where the site computes the same guard R
    mode = "lowrank" if family in ("llama", "bert") else "exact"
    argv += ["--mode", mode] + ([] if mode == "lowrank" else ["--no-backward"])
    code, out = _cli(argv, capsys)
    assert code == 0
    assert f"family {family}, {MODEL_CLASS[family]}" in out.out and "inputs: text, " in out.out
    assert "2 rewritten attention site(s)" in out.out and "tolerance to pass" in out.out
    data = json.loads((tmp_path / "out" / "sites.json").read_text())
    layers = data["layers"]
    assert len(layers) == 2 and data["inputs"].startswith("text, ")
    heads = TINY[family][2].get("num_attention_heads", TINY[family][2].get("n_head"))
    for layer, site in zip(layers, sorted(data["sites"], key=lambda s: s["module"])):
        assert layer["module"] == site["module"] and len(layer["heads"]) == heads
        assert layer["bound"] == max(layer["heads"]) and layer["path"] == mode
        # the guard's R, computed in float32 in the compiled graph, is the largest head's R
        assert layer["site_bound"] == pytest.approx(layer["bound"], rel=1e-4)
        assert layer["margin"] == pytest.approx(layer["bound"] / layer["r_max"])
        assert 0 <= layer["lora_share"] < 1 and layer["heads_over"] == sum(r > layer["r_max"] for r in layer["heads"])
    assert (tmp_path / "heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reads_a_gguf_file(tmp_path, capsys):
    path, written = save_tiny_gguf(tmp_path)
    model, info = load_lora_checkpoint(path)
    assert (info.family, info.gguf_file) == ("llama", "tiny-llama.gguf")
    loaded = {k.replace(".base_layer", ""): v for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    for name, tensor in written.state_dict().items():  # q and k rows back in transformers' order
        assert torch.equal(loaded[name], tensor), name
    torch._dynamo.reset()
    code, out = _cli(["inspect", "--weights", str(path), "--seq-len", "24", "--mode", "lowrank", "--no-backward",
                      "--text", __file__], capsys)
    assert code == 0 and "family llama" in out.out and "2 rewritten attention site(s)" in out.out
    assert "random tokens (no tokenizer in" in out.out


def test_inspect_takes_a_checkpoint_path(checkpoints):
    import lora_pass

    torch._dynamo.reset()
    report = lora_pass.inspect(str(checkpoints["gpt2"]), options={"mode": "exact"}, backward=False)
    assert report.inputs == "random tokens" and len(report.sites) == 2
    assert [layer["path"] for layer in report.layers] == ["exact", "exact"]
    assert all(layer["seq_len"] == 64 for layer in report.layers)  # GPT-2's 64 positions, not 512
