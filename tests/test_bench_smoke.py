"""Smoke tests of the benchmarks: each runs with its smallest settings, as the user would run it.

The benchmarks are run as subprocesses writing to a temporary directory; the tests check that
they finish and that their JSON and Markdown carry the fields the README's results rely on.
Settings are the smallest that still go through every stage (opt-tiny, L = 32, one step,
eager against the backend's exact mode; a 2 x 2 phase map at L = 64, 128, eager).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

pytest.importorskip("peft")
pytest.importorskip("tokenizers")


def run(script: str, *args: str, out: Path, timeout: float = 300, stem: str | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, str(BENCH / script), *args, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    stem = stem or Path(script).stem
    assert (out / f"{stem}.md").is_file()
    report = json.loads((out / f"{stem}.json").read_text())
    for key in ("command", "date", "torch", "device", "device_name"):
        assert report[key], key
    assert Path(script).stem in report["command"]
    return report


def test_opt_finetune_smallest(tmp_path):
    report = run("opt_finetune.py", "--models", "opt-tiny", "--seqs", "32", "--steps", "1", "--warmup", "0",
                 "--modes", "eager", "exact", "--warm-cache", "--wait-idle", "0", "--quiet", out=tmp_path)
    rows = {r["mode"]: r for r in report["rows"]}
    assert set(rows) == {"eager", "exact"}
    for mode, row in rows.items():
        assert row["error"] is None, (mode, row["error"])
        assert row["model"] == "opt-tiny" and row["seq"] == 32
        assert row["step_ms"] > 0 and row["tokens_per_s"] > 0
        assert row["loss_after_n"] is not None and row["eager_loss_after_n"] is not None
        assert row["grad_err"] is not None and row["grad_err"] < 1e-3, (mode, row["grad_err"])
    assert rows["eager"]["compile_s"] is None and rows["exact"]["compile_s"] >= 0
    # the backend's exact mode computes what eager computes, on the same batches
    assert abs(rows["exact"]["loss_delta"]) < 1e-4
    run_exact = next(r for r in report["runs"] if r["mode"] == "exact")
    backend = run_exact["backend"]
    assert backend["sites"] == 2 and backend["forward_lowrank"] == 0 and backend["forward_exact"] >= 2
    assert "BPE" in report["data"]  # the default token stream: English text through a local tokenizer
    assert "opt-tiny" in (tmp_path / "opt_finetune.md").read_text()


def test_phase_map_smallest(tmp_path):
    report = run("phase_map.py", "--quick", "--lengths", "64", "128", "--bounds", "0.1", "3.2", "--inputs", "aligned",
                 out=tmp_path)
    cells = report["cells"]
    assert {(c["length"], c["bound"]) for c in cells} == {(64, 0.1), (64, 3.2), (128, 0.1), (128, 3.2)}
    for c in cells:
        assert c["exact_ms"] > 0 and c["lowrank_ms"] > 0 and c["speedup"] > 0
        assert abs(c["measured_bound"] - c["bound"]) < 1e-3 * c["bound"]
        assert set(c["lowrank_errors"]) == {"out", "dq", "dk", "dv"}
        assert c["guard_passes"] == (c["bound"] <= report["r_max"])
        if c["guard_passes"]:  # below the guard's threshold the written bound holds
            assert c["lowrank_max_error"] <= c["error_bound"]
    assert 0.1 < report["r_max"] < 0.3
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    assert (tmp_path / "phase_map.png").is_file() == has_mpl
    assert report["png"] == ("phase_map.png" if has_mpl else None)


def test_attention_smallest(tmp_path):
    report = run("attention.py", "--quick", "--lengths", "128", "--causal", "true", "--threads", "1",
                 "--wait-idle", "0", out=tmp_path, timeout=600)
    text = json.dumps(report)
    for key in ("crossover", "exact", "lowrank"):
        assert key in text, key


def test_attention_interleaved_growth_smallest(tmp_path):
    """--growth-only: one process times the low-rank op at both lengths in interleaved rounds."""
    report = run("attention.py", "--quick", "--growth-only", "--lengths", "64", "128", "--interleave", "2",
                 "--causal", "true", "--threads", "1", "--wait-idle", "0", out=tmp_path, timeout=600,
                 stem="attention_growth")
    growth = report["interleaved_growth"]["causal"]
    assert "error" not in growth, growth
    assert [sorted(r) for r in growth["rounds"]] == [["128", "64"]] * 2
    assert list(growth["growth"]) == ["128"] and len(growth["growth_ratios"]["128"]) == 2
    assert growth["path_counts"]["forward_exact"] == 0 and growth["path_counts"]["backward_exact"] == 0
    assert report["rows"] == [] and not (tmp_path / "attention.json").exists()
    assert "interleaved" in (tmp_path / "attention_growth.md").read_text()


def _bench_module(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_attention_rounds_are_merged_into_one_median():
    """bench/attention.py --rounds: a configuration's time is the median of every round's samples
    (the guard's too), compile time and memory stay the first round's, an error in any round is
    the configuration's."""
    attention = _bench_module("attention")
    first = {"mode": "exact", "causal": True, "length": 1024, "compile_s": 9.0, "peak_mem_mb": 2.0,
             "time_s": 2.0, "samples_s": [1.0, 2.0, 3.0], "discarded_samples_s": [], "other_load": 0.1,
             "contended": False, "guard": {"time_s": 0.2, "samples_s": [0.2], "other_load": None}}
    second = {**first, "compile_s": 1.0, "peak_mem_mb": 2.5, "time_s": 10.0, "samples_s": [9.0, 10.0, 11.0],
              "other_load": 0.5, "guard": {"time_s": 0.4, "samples_s": [0.4, 0.6], "other_load": 0.2}}
    run = attention.merge_rounds([first, second])
    assert run["time_s"] == 6.0 and run["samples_s"] == [1.0, 2.0, 3.0, 9.0, 10.0, 11.0]
    assert run["round_medians_s"] == [2.0, 10.0] and run["rounds"] == 2
    assert run["compile_s"] == 9.0 and run["peak_mem_mb"] == 2.0 and run["other_load"] == 0.5
    assert run["guard"]["time_s"] == 0.4 and run["guard"]["round_medians_s"] == [0.2, 0.4]
    failed = attention.merge_rounds([first, {"mode": "exact", "causal": True, "length": 1024, "error": "boom"}])
    assert failed["error"] == "boom"
    with pytest.raises(SystemExit):
        attention.parse_args(["--rounds", "0"])


def test_attention_interleaved_growth_pairs_lengths_within_a_round():
    """bench/attention.py --interleave: each doubling's growth is the median over rounds of the
    ratio measured within one round, so a slow round (every time doubled) does not move it;
    the growth goal is checked on it as well as on the per-configuration medians."""
    attention = _bench_module("attention")
    rounds = [{"1024": 1.0, "2048": 2.0, "4096": 4.4},
              {"4096": 8.0, "2048": 4.2, "1024": 2.0},  # a slow round
              {"1024": 1.0, "2048": 2.1, "4096": 4.0}]
    growth = attention.paired_growth(rounds)
    assert growth["growth_ratios"]["2048"] == [2.0, 2.1, 2.1]
    assert growth["growth"]["2048"] == 2.1
    assert growth["growth"]["4096"] == pytest.approx(4.0 / 2.1)
    assert growth["time_s"] == {"1024": 1.0, "2048": 2.1, "4096": 4.4}
    goal = "lowrank time grows <= 2.2x per doubling, interleaved (causal)"
    assert attention.check_goals([], {}, {"causal": growth})[goal] is True
    steep = attention.paired_growth([{"1024": 1.0, "2048": 2.3}])
    assert attention.check_goals([], {}, {"causal": steep})[goal] is False
    assert goal not in attention.check_goals([], {}, {"causal": {"error": "boom"}})
    assert attention.parse_args(["--growth-only"]).interleave == 9
    for bad in (["--interleave", "-1"], ["--growth-only", "--lengths", "1024"]):
        with pytest.raises(SystemExit):
            attention.parse_args(bad)


def test_attention_model_path_smallest(tmp_path):
    """--path model: the LoRA block compiled with the backend (guarded, every call on the low-rank
    path: checked in the worker), with plain Inductor and without its attention; the model table
    joins them with the op-level ratio and the compile times, and its goals are reported."""
    report = run("attention.py", "--quick", "--path", "both", "--lengths", "320", "--causal", "true", "--heads", "2",
                 "--threads", "1", "--wait-idle", "0", out=tmp_path, timeout=900)
    (row,) = report["model_rows"]
    assert not row["errors"], row["errors"]
    assert row["length"] == 320 and row["causal"] is True
    for key in ("block_exact_ms", "block_lowrank_ms", "block_rest_ms", "attention_speedup", "op_speedup",
                "model_vs_op", "exact_compile_s", "lowrank_compile_s"):
        assert row[key] is not None and row[key] > 0, key
    lowrank = next(r for r in report["runs"] if r.get("path") == "model" and r["mode"] == "lowrank")
    assert lowrank["site_paths"] == "guarded" and lowrank["path_counts"]["forward_exact"] == 0
    assert any("model-path attention ratio" in goal for goal in report["goals"])
    assert "Through a model compiled with the backend" in (tmp_path / "attention.md").read_text()


def test_model_goals_compare_with_the_op_and_plain_inductor():
    attention = _bench_module("attention")
    row = {"causal": True, "length": 8192, "model_vs_op": 1.05, "compile_extra_s": 30.0, "lowrank_compile_s": 40.0}
    goals = attention.check_model_goals([row, {**row, "length": 16384, "lowrank_compile_s": 45.0}])
    assert all(v is True for k, v in goals.items() if "non-causal" not in k)
    goals = attention.check_model_goals([{**row, "model_vs_op": 0.85}, {**row, "compile_extra_s": 75.0,
                                                                         "lowrank_compile_s": 80.0}])
    assert not any(v for v in goals.values())


def test_convergence_smallest(tmp_path):
    report = run("convergence.py", "--seq", "512", "--steps", "3", "--pretrain-steps", "4", "--modes", "lowrank",
                 out=tmp_path)
    (row,) = report["rows"]
    assert row["mode"] == "lowrank" and row["step_ms"] > 0 and math.isfinite(row["final_loss"])
    run_ = report["runs"]["lowrank"]
    assert len(run_["losses"]) == 3 and len(run_["bounds"]) == 3 and len(run_["bounds"][0]) == 2
    assert all(paths == ["lowrank", "lowrank"] for paths in run_["paths"])  # forced: every call low-rank
    assert row["lowrank_steps"] == 3 and 0 < row["first_r"] < math.inf
    assert report["pretraining"]["steps"] == 4 and len(report["pretraining"]["losses"]) == 4
    assert (tmp_path / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
