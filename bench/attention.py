"""Attention benchmark: the low-rank path of the guarded op against exact attention.

Times forward + backward of

* exact:   `torch.nn.functional.scaled_dot_product_attention`, compiled by Inductor;
* lowrank: `guarded_attention(..., AttentionConfig(degree=2, r_max=R_max(2, 0.05)))`, the op as the
  backend inserts it (guard, `cond` on both paths), compiled by Inductor, on inputs whose bound R
  passes the guard; the op's telemetry must show that every call took the low-rank path, else the
  run fails;
* guard:   `norm_bound` alone, compiled (forward only: the backward reuses the saved predicate),

for d = 64, causal and non-causal, over a range of sequence lengths, and derives the crossover
length (smallest L from which the low-rank path is faster) that `lora_pass.guard.CROSSOVER_D64_G2`
is set from. Every (mode, causal, L) runs in a fresh subprocess with its own Inductor cache, so
compile times are cold and peak memory is not polluted by other configurations (the guard is
timed in the exact run's process). With `--rounds N` every configuration is timed N times, one
round of all configurations after another, and its time is the median of all rounds' samples: on a
shared machine a slow spell then lands on every row instead of on the one timed during it.
With `--interleave N` (or `--growth-only`: that alone, N = 9 by default) one process per
causality then compiles the low-rank op for every length and times them in N interleaved rounds
(each length once per round, ascending, then descending); the growth per doubling is the median
over rounds of t(2L) / t(L) measured in the same round, a ratio from which the machine's drift
between configurations cancels.

    python bench/attention.py                      # L = 1,024 .. 32,768, causal and non-causal
    python bench/attention.py --quick              # L in {256, 512}, one repeat: a smoke test
    python bench/attention.py --lengths 4096 8192 --causal true --repeats 3
    python bench/attention.py --threads 1 --clock cpu  # on a shared machine: CPU time, one thread
    python bench/attention.py --threads 1 --clock cpu --rounds 3 --repeats 3  # ... spread over rounds
    python bench/attention.py --threads 1 --clock cpu --growth-only --interleave 15  # growth per doubling
    python bench/attention.py --path both --heads 12 --threads 2 --causal true  # also through a model

With `--path model` (or `both`) the same attention is also timed in the model a user compiles: a
LoRA block (`lora_block`) under `torch.compile(block, backend="lowrank_lora")` against
`backend="inductor"`, with each compile time, and the attention's share of the block (the block
less the same block without its attention) set beside the op-level ratio.

Writes `attention.json` and `attention.md` (with --growth-only `attention_growth.json` and
`attention_growth.md`) to --out (default bench/results/<machine>/).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py; also puts the checkout on sys.path)
from common import ROOT, machine_slug, wait_until_idle  # noqa: E402

_rss_mb, _reset_peak_rss, _release_freed_memory = common.rss_mb, common.reset_peak_rss, common.release_freed_memory
_cpu_seconds, _machine_busy = common.cpu_seconds, common.machine_busy

HEAD_DIM = 64
DEGREE = 2
TOLERANCE = 0.05  # the backend's default; only used to report R_max next to the measured R
DEFAULT_LENGTHS = [1024 * 2**i for i in range(6)]  # 1,024 .. 32,768
QUICK_LENGTHS = [256, 512]
MODES = ("exact", "lowrank")
MIN_SAMPLE_S = 0.1  # a timing sample repeats short calls up to this long

# Targets the low-rank path is meant to meet (checked and reported, never enforced).
GOALS = {
    "crossover_causal_at_most": 8192,
    "speedup_at_32768_at_least": 3.0,
    "growth_per_doubling_at_most": 2.2,
    "memory_not_above_exact_from": 8192,
    "guard_percent_at_most": 2.0,
}


# --- worker: one (mode, causal, L) in its own process ---------------------------------------------


def _peak_step_memory(step, sync, cuda, device, base_rss) -> tuple[float, str]:
    """MiB that one more step needs above what is live before it, and how it was measured."""
    import torch

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync()
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20, "torch.cuda.max_memory_allocated"
    _release_freed_memory()
    before = _rss_mb("VmRSS")
    if _reset_peak_rss():
        step()
        return _rss_mb("VmHWM") - before, "VmHWM growth over one step (reset by clear_refs, mmap threshold 64 KiB)"
    step()  # no reset: the high-water mark of the whole process, compile included
    return _rss_mb("VmHWM") - base_rss, "VmHWM growth since the inputs were made (compile included)"


def _compile_and_time(step, spec, sync, min_sample_s) -> dict:
    start = time.perf_counter()
    step()  # compiles the forward and, on the first backward, the backward
    sync()
    compile_s = time.perf_counter() - start
    for _ in range(spec["warmup"]):
        step()
    sync()
    return {"compile_s": compile_s, **common.timed_samples(step, spec["repeats"], sync, clock=spec["clock"],
                                                            min_sample_s=min_sample_s)}


def _inputs(spec: dict, length: int, device, dtype):
    """q, k, v (requiring grad) and dO of [B, H, length, 64], with small q, k so that the guard
    passes: R = scale * max||q|| * max||k - mu|| ~ 0.15."""
    import torch

    gen = torch.Generator().manual_seed(spec["seed"])
    shape = (spec["batch"], spec["heads"], length, HEAD_DIM)

    def make(std):
        return (std * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype)

    q, k, v, dout = make(spec["qk_std"]), make(spec["qk_std"]), make(1.0), make(1.0)
    for t in (q, k, v):
        t.requires_grad_()
    return q, k, v, dout


def _compiled(mode: str, causal: bool, device, dynamic=None, kernels: str = "auto"):
    """(compiled attention, telemetry buffer or None, Inductor settings) for `mode`.

    The low-rank op is compiled as the backend compiles a rewritten graph (lora_pass.op_backend:
    the Inductor settings it adds on CPU, its post-grad pass, subgraphs without donated inputs);
    exact attention is plain SDPA under backend="inductor". `kernels`: the low-rank path's
    implementation (AttentionConfig.kernels: "auto" takes the fused Triton kernels on CUDA, "scan"
    the chunked scan).
    """
    import torch
    import torch.nn.functional as F

    from lora_pass.lowering import lowrank_inductor_defaults, op_backend
    from lora_pass.guard import r_max
    from lora_pass.ops.attention import AttentionConfig, guarded_attention, new_stats

    scale = HEAD_DIM**-0.5
    if mode == "exact":
        def model(a, b, c):
            return F.scaled_dot_product_attention(a, b, c, is_causal=causal, scale=scale)

        return torch.compile(model, backend="inductor", fullgraph=True, dynamic=dynamic), None, {}
    cfg = AttentionConfig(scale=scale, causal=causal, degree=DEGREE, r_max=r_max(DEGREE, TOLERANCE), kernels=kernels)
    stats = new_stats(device)

    # Opaque to Dynamo, traced by AOTAutograd and compiled by Inductor: the same route as
    # the op the backend inserts into a Dynamo graph.
    @torch.compiler.allow_in_graph
    def guarded(a, b, c, s):
        return guarded_attention(a, b, c, cfg, s)

    def model(a, b, c):
        return guarded(a, b, c, stats)

    settings = lowrank_inductor_defaults(device.type)
    return torch.compile(model, backend=op_backend(settings), fullgraph=True, dynamic=dynamic), stats, settings


def _path_counts(stats) -> dict:
    """The op's forward and backward path counts; raises unless every call took the low-rank path."""
    from lora_pass.ops.attention import STATS_FIELDS

    counts = {name: int(n) for name, n in zip(STATS_FIELDS, stats.tolist()) if name.startswith(("forward", "backward"))}
    if counts["forward_exact"] or counts["backward_exact"] or not counts["forward_lowrank"]:
        raise RuntimeError(f"the guard did not pass on every call (R above R_max): {counts}")
    return counts


def _setup(spec: dict):
    """A worker's thread count, then (device, dtype, sync): sync waits for the device's queue (CUDA)."""
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    return device, getattr(torch, spec["dtype"]), sync


def run_worker(spec: dict) -> dict:
    """One (mode, causal, L): compile, time and measure; the exact worker also times the guard.
    A spec with "lengths" is an interleaved growth run instead (run_growth_worker)."""
    import torch

    from lora_pass.guard import norm_bound, r_max

    if "lengths" in spec:
        return run_growth_worker(spec)
    if spec.get("path") == "model":
        return run_model_worker(spec)
    device, dtype, sync = _setup(spec)
    causal, length, mode = spec["causal"], spec["length"], spec["mode"]
    scale = HEAD_DIM**-0.5
    cuda = device.type == "cuda"

    q, k, v, dout = _inputs(spec, length, device, dtype)
    sync()
    base_rss = _rss_mb("VmRSS")
    fn, stats, settings = _compiled(mode, causal, device, kernels=spec.get("kernels", "auto"))

    def step():
        return torch.autograd.grad(fn(q, k, v), (q, k, v), dout)

    result = {"mode": mode, "causal": causal, "length": length, "threads": torch.get_num_threads(),
              "inductor_settings": settings}
    result.update(_compile_and_time(step, spec, sync, MIN_SAMPLE_S))
    result["compile_peak_rss_mb"] = _rss_mb("VmHWM") - base_rss  # the compiler's own memory
    if cuda:
        result["peak_mem_mb"], result["mem_method"] = _peak_step_memory(step, sync, cuda, device, base_rss)
    else:  # tensor memory (the goal), and resident memory with the allocator's and pages' slack
        result["peak_mem_mb"], result["mem_method"] = common.allocated_peak_mb(step), "CPU allocator peak (profiler)"
        result["peak_rss_mb"], result["rss_method"] = _peak_step_memory(step, sync, cuda, device, base_rss)
    if mode == "lowrank":  # every call must have taken the low-rank path (the guard passed)
        result["path_counts"] = _path_counts(stats)

    if mode == "exact":  # the guard, as the op computes it once per forward
        guard = torch.compile(lambda a, b: norm_bound(a, b, scale=scale), backend="inductor", fullgraph=True)
        qd, kd = q.detach(), k.detach()
        timed = _compile_and_time(lambda: guard(qd, kd), spec, sync, MIN_SAMPLE_S)
        result["guard"] = timed
        result["bound"] = float(guard(qd, kd))
        result["r_max"] = r_max(DEGREE, TOLERANCE)
    return result


# --- worker: the same attention through a model compiled with the backend ---------------------------

MODEL_MODES = ("exact", "lowrank", "rest")
QK_WEIGHT_STD = 0.08  # the block's q and k weights: std QK_WEIGHT_STD / sqrt(width) (lora_block)


def lora_block(heads: int, causal: bool, seed: int = 0):
    """The attention block a user compiles: four `nn.Linear` of width H * 64 (q, k, v, out), PEFT
    LoRA (r = 8, alpha = 16) on q and v, `scaled_dot_product_attention` in between. Its q and k
    weights are drawn small (std 0.08 / sqrt(width)) so that on unit-variance inputs the entries of
    q and k have std 0.08 and the guard passes at every length up to 32,768: R, a product of the
    largest q and key norms, grows with L (0.16 at L = 1,024 to 0.195 at 8,192 with std 0.1,
    against R_max = 0.1965; about 0.64 times that with 0.08)."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, inject_adapter_in_model

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            width = heads * HEAD_DIM
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (torch.nn.Linear(width, width) for _ in range(4))

        def forward(self, x):
            b, length, width = x.shape
            shape = (b, length, heads, HEAD_DIM)
            q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
            out = self.attention(q, k, v)
            return self.o_proj(out.transpose(1, 2).reshape(b, length, width))

        def attention(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    torch.manual_seed(seed)
    block = inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), Block())
    width = heads * HEAD_DIM
    with torch.no_grad():
        for proj in (block.q_proj.base_layer, block.k_proj):
            proj.weight.normal_(std=QK_WEIGHT_STD / width**0.5)
            proj.bias.zero_()
        for name, param in block.named_parameters():
            if "lora_B" in name:
                param.normal_(std=1e-3)
    return block


def run_model_worker(spec: dict) -> dict:
    """One (mode, causal, L) of the model path: the LoRA block compiled as a user compiles it and
    timed forward + backward (every gradient: x's and the LoRA weights').

    exact: `backend="inductor"`; lowrank: `backend="lowrank_lora"` with `crossover=0` (the site
    guarded, the guard passing on every call: checked); rest: the same block without its
    attention (`v + 0 * (q + k)`: q and k stay live, so their projections and the projections'
    backward still run), under `backend="inductor"`, whose time is subtracted to give the
    attention's share of the other two.
    """
    import torch

    import lora_pass

    device, dtype, sync = _setup(spec)
    causal, length, mode, heads = spec["causal"], spec["length"], spec["mode"], spec["heads"]
    block = lora_block(heads, causal, spec["seed"]).to(device=device, dtype=dtype)
    if mode == "rest":  # q and k kept live: `v` alone would drop their projections from the graph
        block.attention = lambda q, k, v: v + 0.0 * (q + k)
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    shape = (spec["batch"], length, heads * HEAD_DIM)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    dout = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    if mode == "lowrank":
        fn = torch.compile(block, backend="lowrank_lora", options={"crossover": 0})
    else:
        fn = torch.compile(block, backend="inductor")

    def step():
        torch.autograd.backward(fn(x), dout)

    base_rss = _rss_mb("VmRSS")
    lora_pass.reset()
    result = {"path": "model", "mode": mode, "causal": causal, "length": length, "heads": heads,
              "threads": torch.get_num_threads()}
    result.update(_compile_and_time(step, spec, sync, MIN_SAMPLE_S))
    result["compile_peak_rss_mb"] = _rss_mb("VmHWM") - base_rss
    if mode == "lowrank":
        ((site, stats),) = lora_pass.telemetry()
        counts = {k: int(stats[k]) for k in ("forward_lowrank", "forward_exact", "backward_lowrank", "backward_exact")}
        if counts["forward_exact"] or counts["backward_exact"] or not counts["forward_lowrank"]:
            raise RuntimeError(f"the guard did not pass on every call (R above R_max): {counts}")
        result.update(path_counts=counts, bound=stats["max_bound"], site_paths=site.paths)
    return result


def run_growth_worker(spec: dict) -> dict:
    """The low-rank op at every length of `spec["lengths"]` in one process, timed in interleaved
    rounds: each round times every length once (ascending in even rounds, descending in odd ones),
    so that a slow spell of a shared machine lands on neighbouring lengths alike and cancels in
    their ratio (paired_growth)."""
    import torch

    device, dtype, sync = _setup(spec)
    lengths = sorted(spec["lengths"])
    # one static graph per length (dynamic shapes would compile the exact path only)
    fn, stats, settings = _compiled("lowrank", spec["causal"], device, dynamic=False, kernels=spec.get("kernels", "auto"))
    steps = {}
    with torch._dynamo.config.patch(recompile_limit=len(lengths) + 1):
        for length in lengths:
            q, k, v, dout = _inputs(spec, length, device, dtype)

            def step(q=q, k=k, v=v, dout=dout):
                return torch.autograd.grad(fn(q, k, v), (q, k, v), dout)

            step()  # compiles this length's forward and backward
            sync()
            steps[length] = step
        rounds = []
        for rnd in range(spec["rounds"]):
            times = {}
            for length in (lengths if rnd % 2 == 0 else lengths[::-1]):
                steps[length]()  # warm-up: this length's buffers and code back in the caches
                sync()
                timed = common.timed_samples(steps[length], 1, sync, clock=spec["clock"], min_sample_s=MIN_SAMPLE_S)
                times[str(length)] = timed["time_s"]
            rounds.append(times)
    return {"causal": spec["causal"], "lengths": lengths, "rounds": rounds, "path_counts": _path_counts(stats),
            "threads": torch.get_num_threads(), "inductor_settings": settings, **paired_growth(rounds)}


def paired_growth(rounds: list[dict]) -> dict:
    """Per doubling L -> 2L: the median over rounds of t(2L) / t(L) measured in the same round
    (`growth`), every round's ratio (`growth_ratios`), and each length's median time (`time_s`).
    `rounds` is a list of {str(L): seconds}."""
    lengths = sorted({int(x) for r in rounds for x in r})
    growth, ratios = {}, {}
    for l0 in lengths:
        key0, key1 = str(l0), str(2 * l0)
        pairs = [r[key1] / r[key0] for r in rounds if r.get(key0) and r.get(key1)]
        if pairs:
            growth[key1], ratios[key1] = statistics.median(pairs), pairs
    times = {str(n): statistics.median([r[str(n)] for r in rounds if r.get(str(n))]) for n in lengths}
    return {"growth": growth, "growth_ratios": ratios, "time_s": times}


# --- driver -----------------------------------------------------------------------------------------


def launch(spec: dict, timeout: float, warm_cache: bool, cache_dir=None) -> dict:
    """Run one configuration in a fresh interpreter; on failure return the error instead."""
    result = common.launch(Path(__file__), spec, timeout=timeout, warm_cache=warm_cache, show_progress=False,
                           threads=spec["threads"], cache_dir=cache_dir)
    return {**_key(spec), **result} if "error" in result else result


def _merge_timing(timings: list[dict]) -> dict:
    """One timing from several rounds' (common.timed_samples): the median of all their samples."""
    samples = [t for x in timings for t in x.get("samples_s") or []]
    loads = [x["other_load"] for x in timings if x.get("other_load") is not None]
    return {
        **timings[0],
        "time_s": statistics.median(samples) if samples else None,
        "samples_s": samples,
        "discarded_samples_s": [t for x in timings for t in x.get("discarded_samples_s") or []],
        "round_medians_s": [x.get("time_s") for x in timings],
        "other_load": max(loads) if loads else None,
        "contended": any(x.get("contended") for x in timings),
    }


def merge_rounds(rounds: list[dict]) -> dict:
    """One configuration's runs from several rounds as one run.

    Times (and the guard's) are the median of every round's samples, with each round's median
    kept in `round_medians_s`; compile time, memory and the rest come from the first round (the
    one that compiled with an empty cache); an error in any round is the run's error.
    """
    errors = [r for r in rounds if "error" in r]
    if errors:
        return {**errors[0], "rounds": len(rounds)}
    run = {**_merge_timing(rounds), "rounds": len(rounds)}
    if "guard" in rounds[0]:
        run["guard"] = _merge_timing([r["guard"] for r in rounds])
    return run


def _key(spec):
    return {"path": spec.get("path", "op"), "mode": spec["mode"], "causal": spec["causal"], "length": spec["length"]}


def summarise(runs: list[dict], lengths, causals) -> list[dict]:
    """One row per (causal, L) joining the exact run (with its guard timing) and the lowrank run."""
    by_key = {(r["mode"], r["causal"], r["length"]): r for r in runs if r.get("path", "op") == "op"}
    if not by_key:
        return []
    rows = []
    for causal in causals:
        for length in lengths:
            ex, lr = (by_key.get((m, causal, length), {}) for m in MODES)
            gd = ex.get("guard", {})
            t_ex, t_lr, t_gd = ex.get("time_s"), lr.get("time_s"), gd.get("time_s")
            timed = (ex, lr, gd)
            rows.append({
                "causal": causal,
                "length": length,
                "exact_ms": _ms(t_ex),
                "lowrank_ms": _ms(t_lr),
                "speedup": t_ex / t_lr if t_ex and t_lr else None,
                "guard_ms": _ms(t_gd),
                "guard_percent": 100 * t_gd / t_ex if t_gd and t_ex else None,
                "exact_peak_mb": ex.get("peak_mem_mb"),
                "lowrank_peak_mb": lr.get("peak_mem_mb"),
                "exact_rss_mb": ex.get("peak_rss_mb"),
                "lowrank_rss_mb": lr.get("peak_rss_mb"),
                "exact_compile_s": ex.get("compile_s"),
                "lowrank_compile_s": lr.get("compile_s"),
                "bound": ex.get("bound"),
                "other_load": max(r.get("other_load") or 0.0 for r in timed),
                "contended": any(r.get("contended") for r in timed),
                "errors": {m: r["error"] for m, r in zip(MODES, (ex, lr)) if "error" in r},
                "lowrank_inductor_settings": lr.get("inductor_settings"),
            })
    return rows


def _ms(t):
    return None if t is None else 1000 * t


def summarise_model(runs: list[dict], lengths, causals, op_rows: list[dict]) -> list[dict]:
    """One row per (causal, L) of the model path: the block under plain Inductor (exact), under
    the backend (lowrank) and without its attention (rest); the attention's share of each is its
    time less the rest's, and their ratio is set beside the op-level ratio of the same run."""
    by_key = {(r["mode"], r["causal"], r["length"]): r for r in runs if r.get("path") == "model"}
    if not by_key:
        return []
    op = {(r["causal"], r["length"]): r for r in op_rows}
    rows = []
    for causal in causals:
        for length in lengths:
            ex, lr, rest = (by_key.get((m, causal, length), {}) for m in MODEL_MODES)
            t_ex, t_lr, t_rest = ex.get("time_s"), lr.get("time_s"), rest.get("time_s")
            attn_ex = t_ex - t_rest if t_ex and t_rest else None
            attn_lr = t_lr - t_rest if t_lr and t_rest else None
            attn_speedup = attn_ex / attn_lr if attn_ex and attn_lr and attn_lr > 0 else None
            op_speedup = (op.get((causal, length)) or {}).get("speedup")
            rows.append({
                "causal": causal,
                "length": length,
                "block_exact_ms": _ms(t_ex),
                "block_lowrank_ms": _ms(t_lr),
                "block_rest_ms": _ms(t_rest),
                "block_speedup": t_ex / t_lr if t_ex and t_lr else None,
                "attention_speedup": attn_speedup,
                "op_speedup": op_speedup,
                "model_vs_op": attn_speedup / op_speedup if attn_speedup and op_speedup else None,
                "exact_compile_s": ex.get("compile_s"),
                "lowrank_compile_s": lr.get("compile_s"),
                "compile_extra_s": (lr["compile_s"] - ex["compile_s"]) if lr.get("compile_s") and ex.get("compile_s")
                else None,
                "bound": lr.get("bound"),
                "contended": any(r.get("contended") for r in (ex, lr, rest)),
                "errors": {m: r["error"] for m, r in zip(MODEL_MODES, (ex, lr, rest)) if "error" in r},
            })
    return rows


#: goals of the model path (issue: what users run), checked and reported, never enforced
MODEL_GOALS = {"model_vs_op_within": 0.10, "compile_extra_at_most_s": 60.0, "compile_growth_at_most": 1.3}


def check_model_goals(rows: list[dict]) -> dict:
    """The model path's goals: its attention ratio within 10% of the op's at every L where both
    were measured, its compile time at most plain Inductor's + 60 s at every L, and flat in L
    (the slowest compile at most 1.3x the fastest)."""
    g, out = MODEL_GOALS, {}
    pairs = [r["model_vs_op"] for r in rows if r["model_vs_op"] is not None]
    out[f"model-path attention ratio within {g['model_vs_op_within']:.0%} of the op-level ratio at every L"] = (
        all(abs(p - 1) <= g["model_vs_op_within"] for p in pairs) if pairs else None)
    extra = [r["compile_extra_s"] for r in rows if r["compile_extra_s"] is not None]
    out[f"model compile time at most plain Inductor's + {g['compile_extra_at_most_s']:.0f} s at every L"] = (
        max(extra) <= g["compile_extra_at_most_s"] if extra else None)
    for causal in (True, False):
        times = [r["lowrank_compile_s"] for r in rows if r["causal"] == causal and r["lowrank_compile_s"]]
        out[f"model compile time flat in L: slowest <= {g['compile_growth_at_most']}x fastest "
            f"({'causal' if causal else 'non-causal'})"] = (
            max(times) <= g["compile_growth_at_most"] * min(times) if len(times) > 1 else None)
    return out


MODEL_HEADERS = {
    "causal": "causal", "length": "L", "block_exact_ms": "block exact ms", "block_lowrank_ms": "block lowrank ms",
    "block_rest_ms": "block w/o attention ms", "block_speedup": "block exact/lowrank",
    "attention_speedup": "attention exact/lowrank", "op_speedup": "op exact/lowrank", "model_vs_op": "model/op",
    "exact_compile_s": "Inductor compile s", "lowrank_compile_s": "backend compile s", "bound": "R",
}


def render_model_table(rows, fmt):
    from tabulate import tabulate

    def cell(key, value):
        if value is None:
            return "-"
        if key == "length" or isinstance(value, bool):
            return value
        if key in ("block_speedup", "attention_speedup", "op_speedup", "model_vs_op"):
            return f"{value:.2f}"
        if key == "bound":
            return f"{value:.3f}"
        return f"{value:.1f}"

    body = [[cell(k, r[k]) for k in MODEL_HEADERS] for r in rows]
    for line, r in zip(body, rows):
        if r["contended"]:
            line[1] = f"{line[1]}*"
    return tabulate(body, headers=list(MODEL_HEADERS.values()), tablefmt=fmt, disable_numparse=True)


def crossover(rows: list[dict], causal: bool) -> dict:
    """Smallest measured L from which the low-rank path is faster at every larger measured L.

    `interpolated` places speedup = 1 by log-log interpolation between the two lengths around it.
    """
    pts = sorted((r["length"], r["speedup"]) for r in rows if r["causal"] == causal and r["speedup"])
    if not pts:
        return {"length": None, "interpolated": None, "note": "not measured"}
    idx = len(pts)
    while idx > 0 and pts[idx - 1][1] > 1.0:
        idx -= 1
    if idx == len(pts):
        return {"length": None, "interpolated": None, "note": f"exact faster up to L = {pts[-1][0]}"}
    length = pts[idx][0]
    if idx == 0:
        return {"length": length, "interpolated": None, "note": "faster at the smallest length measured"}
    (l0, s0), (l1, s1) = pts[idx - 1], pts[idx]
    frac = -math.log(s0) / (math.log(s1) - math.log(s0))
    interp = math.exp(math.log(l0) + frac * (math.log(l1) - math.log(l0)))
    return {"length": length, "interpolated": round(interp), "note": ""}


def check_goals(rows: list[dict], cross: dict, interleaved: dict | None = None) -> dict:
    """Each goal of GOALS: True, False, or None where not measured. With `interleaved` (the
    --interleave runs by causality), the growth goal is also checked on their paired ratios."""
    g = GOALS
    out = {}
    limit = g["crossover_causal_at_most"]
    c = cross.get("causal", {}).get("length")
    measured = any(r["causal"] and r["length"] == limit and r["speedup"] for r in rows)
    out[f"lowrank faster than exact from L <= {limit} (causal)"] = (
        (c is not None and c <= limit) if measured else None
    )
    for causal in (True, False):
        name = "causal" if causal else "non-causal"
        at = [r["speedup"] for r in rows if r["causal"] == causal and r["length"] == 32768 and r["speedup"]]
        out[f"speedup >= {g['speedup_at_32768_at_least']}x at L = 32768 ({name})"] = (
            at[0] >= g["speedup_at_32768_at_least"] if at else None
        )
        times = sorted((r["length"], r["lowrank_ms"]) for r in rows if r["causal"] == causal and r["lowrank_ms"])
        growth = [t1 / t0 for (l0, t0), (l1, t1) in zip(times, times[1:]) if l1 == 2 * l0]
        out[f"lowrank time grows <= {g['growth_per_doubling_at_most']}x per doubling ({name})"] = (
            max(growth) <= g["growth_per_doubling_at_most"] if growth else None
        )
        paired = ((interleaved or {}).get("causal" if causal else "non_causal") or {}).get("growth")
        if paired:
            out[f"lowrank time grows <= {g['growth_per_doubling_at_most']}x per doubling, interleaved ({name})"] = (
                max(paired.values()) <= g["growth_per_doubling_at_most"]
            )
    big = [r for r in rows if r["length"] >= g["memory_not_above_exact_from"]
           and r["lowrank_peak_mb"] is not None and r["exact_peak_mb"] is not None]
    out[f"lowrank peak memory <= exact from L >= {g['memory_not_above_exact_from']}"] = (
        all(r["lowrank_peak_mb"] <= r["exact_peak_mb"] for r in big) if big else None
    )
    pct = [r["guard_percent"] for r in rows if r["guard_percent"] is not None]
    out[f"guard < {g['guard_percent_at_most']}% of exact attention time"] = (
        max(pct) < g["guard_percent_at_most"] if pct else None
    )
    return out


def growth_table(rows):
    """Low-rank time ratio t(2L) / t(L) for each doubling, per causality."""
    out = {}
    for causal in (True, False):
        times = sorted((r["length"], r["lowrank_ms"]) for r in rows if r["causal"] == causal and r["lowrank_ms"])
        out["causal" if causal else "non_causal"] = {
            str(l1): round(t1 / t0, 3) for (l0, t0), (l1, t1) in zip(times, times[1:]) if l1 == 2 * l0
        }
    return out


HEADERS = {
    "causal": "causal", "length": "L", "exact_ms": "exact ms", "lowrank_ms": "lowrank ms",
    "speedup": "exact/lowrank", "guard_ms": "guard ms", "guard_percent": "guard %",
    "exact_peak_mb": "exact peak MiB", "lowrank_peak_mb": "lowrank peak MiB",
    "exact_rss_mb": "exact RSS MiB", "lowrank_rss_mb": "lowrank RSS MiB",
    "exact_compile_s": "exact compile s", "lowrank_compile_s": "lowrank compile s", "bound": "R",
    "other_load": "other load",
}


def render_table(rows, fmt):
    from tabulate import tabulate

    def cell(key, value):
        if value is None:
            return "-"
        if key == "length" or isinstance(value, bool):
            return value
        if key in ("bound", "guard_ms", "speedup", "other_load"):
            return f"{value:.3f}" if key != "speedup" else f"{value:.2f}"
        if key == "guard_percent":
            return f"{value:.2f}"
        return f"{value:.1f}"

    body = [[cell(k, r[k]) for k in HEADERS] for r in rows]
    for line, r in zip(body, rows):  # no sample free of other processes: mark the row
        if r["contended"]:
            line[1] = f"{line[1]}*"
    return tabulate(body, headers=list(HEADERS.values()), tablefmt=fmt, disable_numparse=True)


def _settings_text(rows, key) -> str:
    """The Inductor settings of the low-rank runs (lora_pass.lowering.lowrank_inductor_defaults)."""
    seen = {json.dumps(r.get(key) or {}, sort_keys=True) for r in rows}
    return "; ".join(", ".join(f"{k}={v}" for k, v in json.loads(x).items()) or "none" for x in sorted(seen))


def _rounds_text(rounds: int) -> str:
    if rounds <= 1:
        return ""
    return (f"; {rounds} rounds (every configuration once per round, in a fresh process; the median is "
            "over all rounds' samples; compile time and memory from the first round, with an empty cache)")


def write_markdown(path, report, rows):
    measured = bool(rows or report.get("model_rows"))
    lines = [
        "# Attention benchmark: low-rank path against exact attention",
        "",
        f"* command: `{report['command']}`",
        f"* date: {report['date']}",
        f"* device: {report['device_name']} ({report['device']}, {report['threads']} thread(s) per run)",
        f"* torch {report['torch']}, Python {report['python']}",
        f"* B = {report['settings']['batch']}, H = {report['settings']['heads']}, d = {HEAD_DIM}, "
        f"degree {DEGREE}, {report['settings']['dtype']}" + (
            f", median of {report['settings']['repeats']} after {report['settings']['warmup']} warm-up call(s)"
            + _rounds_text(report['settings']['rounds']) if measured else ""),
        f"* R_max(degree {DEGREE}, tolerance {TOLERANCE}) = {report['r_max']:.3f}"
        + ("; measured R in the table" if measured else ""),
        *(["* interrupted: only the configurations listed were measured"] if report["interrupted"] else []),
        "",
    ]
    clock = "CPU time of the benchmark process" if report["settings"]["clock"] == "cpu" else "wall clock"
    if not measured:  # --growth-only
        lines.append(
            f"Times ({clock}) are forward + backward of the guarded op as the backend inserts it, every call of "
            "which took the low-rank path (its telemetry is checked), compiled with the Inductor settings the "
            f"backend adds ({_settings_text(list((report.get('interleaved_growth') or {}).values()), 'inductor_settings')}).")
    elif rows:
        lines += [
            f"Times ({clock}) are forward + backward (guard: forward only, it runs once per forward). Exact is",
            "`scaled_dot_product_attention` compiled by Inductor; lowrank is the guarded op as the backend inserts it",
            "(guard and `cond` included), every call of which took the low-rank path (its telemetry is checked),",
            "compiled with the Inductor settings the backend adds where a low-rank path compiles "
            f"({_settings_text(rows, 'lowrank_inductor_settings')}).",
            "Peak memory is the tensor memory one compiled step allocates above what is live before it",
            "(inputs, compiled code): `torch.cuda.max_memory_allocated` on CUDA, the CPU allocator's running",
            "total as the profiler records it on CPU. RSS is the growth of resident memory over the step on",
            "CPU (tensors plus the allocator's and pages' slack). Compile time is the first",
            f"forward + backward call with {'a warm' if report['settings']['warm_cache'] else 'an empty'} "
            "Inductor cache "
            "(wall clock). `other load` is the number of cores other processes kept busy while a row was timed.",
            *(["With the wall clock a sample during which they used more than 0.25 cores is discarded and",
               "taken again; rows marked * had no clean sample."] if report["settings"]["clock"] == "wall" else
              ["CPU time of a one-thread process does not count the time slices other processes get."]),
            "", render_table(rows, "github"), "", "## Crossover (smallest L from which lowrank is faster)", "",
        ]
        for name, c in report["crossover"].items():
            if isinstance(c, dict):
                extra = f", interpolated {c['interpolated']}" if c.get("interpolated") else ""
                note = f" ({c['note']})" if c.get("note") else ""
                lines.append(f"* {name}: {c['length']}{extra}{note}")
        lines += ["", "## Low-rank time per doubling of L", ""]
        for name, g in report["growth_per_doubling"].items():
            lines.append(f"* {name}: " + ", ".join(f"{k}: {v:.2f}x" for k, v in g.items()))
    interleaved = report.get("interleaved_growth") or {}
    if interleaved:
        heading = f"## Low-rank time per doubling of L, interleaved ({report['settings']['interleave']} rounds)"
        lines += ["", heading, "",
                  "One process per causality times the low-rank op at every length once per round (ascending,",
                  "then descending); each doubling's growth is the median over rounds of t(2L) / t(L) of the",
                  "same round, [lowest, highest] of those ratios in brackets, so that the machine's slow spells",
                  "cancel in the ratio.", ""]
        for name, run in interleaved.items():
            if "error" in run:
                lines.append(f"* {name}: failed: {run['error']}")
                continue
            lines.append(f"* {name}: " + ", ".join(
                f"{k}: {v:.2f}x [{min(run['growth_ratios'][k]):.2f}, {max(run['growth_ratios'][k]):.2f}]"
                for k, v in run["growth"].items()))
            lines.append("  (median ms: " + ", ".join(f"{k}: {1000 * t:.1f}" for k, t in run["time_s"].items()) + ")")
    model_rows = report.get("model_rows") or []
    if model_rows:
        lines += [
            "", f"## Through a model compiled with the backend (H = {report['settings']['heads']})", "",
            "The same attention in a LoRA block (`bench/attention.py` `lora_block`: q, k, v and output",
            "projections of width H x 64, PEFT LoRA r = 8 on q and v, `scaled_dot_product_attention`), compiled",
            "as a user compiles it: `torch.compile(block, backend=\"inductor\")` (exact) and",
            "`torch.compile(block, backend=\"lowrank_lora\", options={\"crossover\": 0})` (lowrank: guarded,",
            "the guard passing on every call, checked), default Dynamo and Inductor settings, forward +",
            "backward of every gradient. `block w/o attention` is the block with its attention replaced by",
            "`v + 0 * (q + k)` (Inductor; q and k stay live, so their projections still run); the attention ratio is (exact - it) / (lowrank - it), `model/op` that ratio over",
            "the op-level one of this run. Compile time: the first step, cold (wall clock).",
            "", render_model_table(model_rows, "github"),
        ]
    lines += ["", "## Goals", ""]
    for name, ok in report["goals"].items():
        if rows or model_rows or ok is not None:  # --growth-only: the growth goals alone
            lines.append(f"* {'yes' if ok else 'no' if ok is not None else 'not measured'}: {name}")
    errors = [(r["causal"], r["length"], e) for r in [*rows, *model_rows] for e in r["errors"].items()]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"* causal={c} L={length} {m}: {msg}" for c, length, (m, msg) in errors]
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths (default 1024 .. 32768)")
    p.add_argument("--causal", choices=("both", "true", "false"), default="both")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per configuration (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls after the compiling one (default 1)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--path", choices=("op", "model", "both"), default="op",
                   help="op: the guarded op called directly (default); model: the same attention in a LoRA "
                        "block compiled with backend='lowrank_lora' (against backend='inductor'), with compile "
                        "times; both: each, in one table per path")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--lowrank-kernels", choices=("auto", "scan"), default="auto",
                   help="the low-rank op's implementation: auto (fused Triton kernels on CUDA where they apply, "
                        "the chunked scan elsewhere) or scan (the chunked scan everywhere)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: torch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this process's CPU time, robust on a shared machine; use with --threads 1")
    p.add_argument("--qk-std", type=float, default=0.1, help="std of q and k entries (sets R)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: L in {256, 512}, 1 repeat, no warm-up, reuses the Inductor cache")
    p.add_argument("--warm-cache", action="store_true", help="reuse the Inductor cache (compile times not cold)")
    p.add_argument("--rounds", type=int, default=1,
                   help="time every configuration this many times, one round after another, each in a fresh "
                        "process (later rounds reuse the first round's compiled code); the median is over all "
                        "rounds' samples, so a slow spell of a shared machine is spread over the rows (default 1)")
    p.add_argument("--interleave", type=int, default=0,
                   help="then time the low-rank op at every length in one process per causality, this many "
                        "interleaved rounds, and report the growth per doubling as the median of the ratios "
                        "measured in the same round (default 0: not run)")
    p.add_argument("--growth-only", action="store_true",
                   help="only the interleaved growth runs (--interleave rounds, default 9), written to "
                        "attention_growth.json and .md")
    p.add_argument("--wait-idle", type=float, default=60,
                   help="before each configuration, wait up to this many seconds for other processes to go idle")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per configuration")
    p.add_argument("--out", type=Path, default=None, help="default bench/results/<machine>/")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be an integer >= 1, got {args.rounds}")
    if args.interleave < 0:
        p.error(f"--interleave must be an integer >= 0, got {args.interleave}")
    if args.growth_only and args.interleave == 0:
        args.interleave = 9
    if args.interleave and len(set(args.lengths or DEFAULT_LENGTHS)) < 2:
        p.error("--interleave and --growth-only need at least two --lengths")
    if args.lengths is None:
        args.lengths = QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.warmup is None:
        args.warmup = 0 if args.quick else 1
    args.warm_cache = args.warm_cache or args.quick
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        common.worker_main(run_worker, args.worker)
        return

    import torch
    from tqdm import tqdm

    from lora_pass.guard import r_max

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    causals = {"both": [True, False], "true": [True], "false": [False]}[args.causal]
    lengths = sorted(set(args.lengths))
    out_dir = args.out or ROOT / "bench" / "results" / machine_slug(device)
    common_spec = {"device": device, "dtype": args.dtype, "batch": args.batch, "heads": args.heads,
                   "repeats": args.repeats, "warmup": args.warmup, "qk_std": args.qk_std, "seed": args.seed,
                   "threads": args.threads, "clock": args.clock, "kernels": args.lowrank_kernels}
    paths = {"op": ["op"], "model": ["model"], "both": ["op", "model"]}[args.path]
    specs = [
        {"path": path, "mode": mode, "causal": causal, "length": length, **common_spec}
        for path in paths for causal in causals for length in lengths
        for mode in (MODES if path == "op" else MODEL_MODES)
    ]
    by_spec = [[] for _ in specs]  # each configuration's run in every round
    interleaved = {}  # --interleave: the growth run of each causality
    todo = [] if args.growth_only else [(rnd, i, spec) for rnd in range(args.rounds) for i, spec in enumerate(specs)]
    bar = tqdm(total=len(todo), unit="config")
    interrupted = False
    # with several rounds each configuration keeps its own Inductor cache from round to round:
    # cold in the first (its compile time), warm after
    caches = tempfile.TemporaryDirectory(prefix="lora_pass_bench_rounds_") if args.rounds > 1 else None
    try:
        for rnd, i, spec in todo:
            bar.set_description(f"round {rnd + 1}/{args.rounds} {spec['path']:>5} {spec['mode']:>7} "
                                f"causal={spec['causal']!s:<5} L={spec['length']}")
            waited = wait_until_idle(args.wait_idle) if args.wait_idle > 0 and args.clock == "wall" else 0.0
            cache_dir = None
            if caches is not None and not args.warm_cache:
                cache_dir = Path(caches.name) / f"{spec['path']}-{spec['mode']}-{spec['causal']}-{spec['length']}"
                cache_dir.mkdir(exist_ok=True)
            run = {**launch(spec, args.timeout, args.warm_cache, cache_dir), "waited_for_idle_s": waited}
            if "error" in run:
                tqdm.write(f"failed: {spec['path']} {spec['mode']} causal={spec['causal']} L={spec['length']}: "
                           f"{run['error']}")
            by_spec[i].append(run)
            bar.update()
        for causal in causals if args.interleave else ():
            bar.set_description(f"interleaved growth causal={causal!s:<5}")
            spec = {**common_spec, "mode": "lowrank", "causal": causal, "lengths": lengths, "rounds": args.interleave}
            run = common.launch(Path(__file__), spec, timeout=args.timeout, warm_cache=args.warm_cache,
                                show_progress=False, threads=args.threads)
            if "error" in run:
                tqdm.write(f"failed: interleaved growth causal={causal}: {run['error']}")
            interleaved["causal" if causal else "non_causal"] = run
    except KeyboardInterrupt:  # keep what was measured
        interrupted = True
    finally:
        bar.close()
        if caches is not None:
            caches.cleanup()
    runs = [merge_rounds(r) if len(r) > 1 else r[0] for r in by_spec if r]

    rows = [] if args.growth_only else summarise(runs, lengths, causals)
    model_rows = [] if args.growth_only else summarise_model(runs, lengths, causals, rows)
    cross = {"device": device, "head_dim": HEAD_DIM, "degree": DEGREE}
    for causal in causals:
        cross["causal" if causal else "non_causal"] = crossover(rows, causal)
    report = {
        **common.environment(device),
        "threads": next((r["threads"] for r in [*runs, *interleaved.values()] if "threads" in r), None),
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
        "interrupted": interrupted,
        "r_max": r_max(DEGREE, TOLERANCE),
        "crossover": cross,
        "growth_per_doubling": growth_table(rows),
        "interleaved_growth": interleaved,
        "rows": rows,
        "model_rows": model_rows,
        "runs": runs,
    }
    report["goals"] = check_goals(rows, cross, interleaved) if rows or not model_rows else {}
    if model_rows:
        report["goals"].update(check_model_goals(model_rows))
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "attention_growth" if args.growth_only else "attention"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    write_markdown(out_dir / f"{stem}.md", report, rows)

    if rows:
        print(render_table(rows, "simple"))
    if model_rows:
        print(render_model_table(model_rows, "simple"))
    for name, run in interleaved.items():
        print(f"interleaved growth {name}: " + (run.get("error") or
              ", ".join(f"{k}: {v:.2f}x" for k, v in run["growth"].items())))
    for name in ("causal", "non_causal"):
        if rows and name in cross:  # not with --growth-only: no exact runs
            print(f"crossover {name}: {cross[name]}")
    for name, ok in report["goals"].items():
        if rows or model_rows or ok is not None:
            print(f"{'yes' if ok else 'no' if ok is not None else 'n/a':>4}  {name}")
    print(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}")


if __name__ == "__main__":
    main()
