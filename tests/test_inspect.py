"""lora_pass.inspect, telemetry during training, the command line and TORCH_LOGS."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import networkx as nx
import pytest
import torch
from torch._inductor.utils import run_and_get_code

import lora_pass
from lora_pass.guard import r_max
from tests.conftest import calls_op, tiny_opt

LAYERS = 2


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def report(request, tmp_path_factory):
    torch._dynamo.reset()
    model = tiny_opt(request.param, ("q_proj", "k_proj", "v_proj"), bounded=(0.05, 40.0))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    rep = lora_pass.inspect(model, input_ids=ids, labels=ids, use_cache=False, options={"crossover": 0})
    return request.param, rep, rep.save(tmp_path_factory.mktemp(f"report-{request.param}"))


def test_report_sites_and_fields(report):
    attn, rep, _ = report
    assert len(rep.sites) == LAYERS and rep.skipped == []
    family = {"sdpa": "sdpa", "eager": "explicit_softmax"}[attn]
    for i, site in enumerate(sorted(rep.sites, key=lambda s: s["module"])):
        assert site["module"] == f"base_model.model.model.decoder.layers.{i}.self_attn"
        assert site["family"] == family
        assert {n for n, p in site["projections"].items() if p["adapted"]} == {"q", "k", "v"}
        assert site["projections"]["q"]["rank"] == 4 and site["projections"]["q"]["scaling"] == 2.0
        assert (site["causal"], site["mask"], site["heads"], site["kv_heads"], site["head_dim"]) == (True, "causal", 2, 2, 16)
        assert site["feature_rank"] == math.comb(16 + 2, 2)
        assert site["r_max"] == pytest.approx(r_max(2, 0.05))
        assert site["bound"] > 0
        assert site["path"] == ("lowrank" if site["bound"] <= site["r_max"] else "exact")
    assert [s["path"] for s in sorted(rep.sites, key=lambda s: s["module"])] == ["lowrank", "exact"]
    text = str(rep)
    assert "2 rewritten attention site(s)" in text and "layers.1.self_attn" in text
    # per layer and head, measured in eager mode on the same inputs: the largest head is the guard's R
    assert [layer["module"] for layer in rep.layers] == [s["module"] for s in sorted(rep.sites, key=lambda s: s["module"])]
    for layer, site in zip(rep.layers, sorted(rep.sites, key=lambda s: s["module"])):
        assert len(layer["heads"]) == 2 and layer["bound"] == max(layer["heads"])
        assert layer["bound"] == pytest.approx(site["bound"], rel=1e-4) and layer["path"] == site["path"]
        assert (layer["heads_over"] > 0) == (site["path"] == "exact")
    assert "logit bound R per layer" in text and "tolerance to pass" in text


def test_report_graphs_before_and_after(report):
    _, rep, _ = report
    for key in ("dynamo_before", "dynamo_after", "forward_before", "backward_before", "forward_after", "backward_after"):
        assert key in rep.graphs and rep.graphs[key]
    assert "lowrank_lora_site" in rep.graphs["dynamo_after"] and "lowrank_lora_site" not in rep.graphs["dynamo_before"]
    assert "record_forward" in rep.graphs["forward_after"] and "record_forward" not in rep.graphs["forward_before"]
    assert "record_backward" in rep.graphs["backward_after"]
    assert "cond" in rep.graphs["forward_after"] and "cond" in rep.graphs["backward_after"]



def test_report_saved_files_parse_back(report):
    _, rep, out = report
    data = json.loads((out / "sites.json").read_text())
    assert len(data["sites"]) == LAYERS
    expected = {key: value for key, value in rep.to_dict().items() if key != "graphs"}
    assert data == json.loads(json.dumps(expected, default=str))
    assert rep.to_dict()["graphs"] == rep.graphs
    assert set(rep.to_dict()) == {"sites", "skipped", "layers", "inputs", "graphs"}
    for name in rep.graphs:
        code = (out / "graphs" / f"{name}.py").read_text()
        compile(code, name, "exec")  # readable, valid Python
    for i in range(LAYERS):
        g = nx.read_graphml(out / f"region_{i}.graphml")
        ops = [a["op"] for _, a in g.nodes(data=True)]
        targets = [a["target"] for _, a in g.nodes(data=True)]
        assert ops.count("lowrank_lora_site") == 1
        assert targets.count("linear") >= 3 * 3  # base + lora_A + lora_B for q, k, v
        site = next(n for n, a in g.nodes(data=True) if a["op"] == "lowrank_lora_site")
        assert g.in_degree(site) >= 3
        assert (out / f"region_{i}.dot").read_text().startswith("digraph")


def test_telemetry_counts_steps_times_sites():
    torch._dynamo.reset()
    lora_pass.reset()
    model = tiny_opt("sdpa", bounded=(0.05, 40.0))
    compiled = torch.compile(model, backend="lowrank_lora", options={"crossover": 0})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    steps = 3
    for step in range(steps):
        ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(step))
        compiled(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()
    telemetry = lora_pass.telemetry()
    assert len(telemetry) == LAYERS
    for site, stats in telemetry:
        assert stats["forward_lowrank"] + stats["forward_exact"] == steps
        assert stats["backward_lowrank"] + stats["backward_exact"] == steps
        assert stats["forward_lowrank"] == stats["backward_lowrank"]
        assert stats["max_bound"] >= stats["last_bound"] > 0
        assert stats["composed_bound"] >= stats["last_bound"]  # the composed norms bound R
        assert 0 <= stats["lora_share"] < 1
        assert stats["input_norm"] > 0 and stats["frozen_norm"] > 0 and stats["lora_norm"] > 0


def test_telemetry_off_removes_the_ops():
    torch._dynamo.reset()
    lora_pass.reset()
    model = tiny_opt("sdpa", bounded=(0.05, 0.05))
    compiled = torch.compile(model, backend="lowrank_lora", options={"crossover": 0, "telemetry": False})
    ids = torch.randint(0, 64, (2, 16))
    _, code = run_and_get_code(lambda: compiled(input_ids=ids, labels=ids, use_cache=False).loss.backward())
    assert all(stats is None for _, stats in lora_pass.telemetry()) and len(lora_pass.telemetry()) == LAYERS
    assert not any(calls_op(c, op) for c in code for op in ("record_forward", "record_backward", "record_norms"))


def _run(args, env=None, timeout=600):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=full_env)


def test_cli_end_to_end(tmp_path):
    # twice on one fresh compile cache: the second run hits AOTAutograd's on-disk cache, which
    # returns compiled code without tracing, and must still report the graphs after the rewrite
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")}
    for run in ("cold", "warm"):
        out_dir = tmp_path / run
        out = _run(["-m", "lora_pass", "inspect", "--model", "opt-tiny", "--seq-len", "24", "--lora", "q,v",
                    "--attn", "eager", "--mode", "lowrank", "--out", str(out_dir)], env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "2 rewritten attention site(s)" in out.stdout
        data = json.loads((out_dir / "sites.json").read_text())
        assert [s["path"] for s in data["sites"]] == ["lowrank", "lowrank"]
        assert (out_dir / "region_0.graphml").exists()
        for name in ("forward_after", "backward_after"):
            assert "record_" in (out_dir / "graphs" / f"{name}.py").read_text(), (run, name)


@pytest.mark.parametrize("flags,message", [
    (["--seq-len", "0"], "--seq-len"),
    (["--lora", "q,w"], "--lora"),
    (["--tolerance", "2"], "--tolerance"),
    (["--model", "gpt-17"], "--model"),
    (["--crossover", "-4"], "--crossover"),
])
def test_cli_bad_flags_exit_2(flags, message):
    out = _run(["-m", "lora_pass", "inspect", *flags], timeout=120)
    assert out.returncode == 2 and message in out.stderr


def test_cli_help_documents_every_flag():
    out = _run(["-m", "lora_pass", "inspect", "--help"], timeout=120)
    assert out.returncode == 0
    for flag in ("--model", "--weights", "--text", "--plot", "--seq-len", "--lora", "--out", "--mode", "--tolerance",
                 "--attn"):
        assert flag in out.stdout


SCRIPT = """
import torch, lora_pass
from tests.conftest import tiny_opt
m = tiny_opt("sdpa", attention_dropout=0.0)
ids = torch.randint(0, 64, (2, 16))
torch.compile(m, backend="lowrank_lora", options={"mode": "exact"})(input_ids=ids, use_cache=False)
bare = torch.nn.Linear(4, 4)
torch.compile(lambda x: torch.nn.functional.scaled_dot_product_attention(x, x, x), backend="lowrank_lora")(torch.randn(1, 1, 4, 4))
"""


@pytest.mark.parametrize("setting,expected", [
    ("lowrank_lora", ["lowrank_lora: rewrite base_model.model.model.decoder.layers.0.self_attn", "lowrank_lora: skip"]),
    ("lowrank_lora_graphs", ["graph after the rewrite", "lowrank_lora_site_0"]),
])
def test_torch_logs(setting, expected):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = _run(["-c", SCRIPT], env={"TORCH_LOGS": setting, "PYTHONPATH": root})
    assert out.returncode == 0, out.stderr[-3000:]
    for text in expected:
        assert text in out.stderr, (text, out.stderr[-3000:])
