"""LoRA fine-tuning benchmark: OPT-125m / 350m / 1.3b steps under eager, Inductor and lowrank_lora.

Each model is built from its published architecture config (random weights; `--weights PATH`
loads a local checkpoint) with PEFT LoRA (r = 8, alpha = 16) on (q, v) or (q, k, v), and trained
with AdamW on a real English token stream: the Python reference manual's topic pages that ship
with CPython (`pydoc_data.topics`), tokenized by a byte-level BPE trained here on that text
(deterministic, no download; vocabulary capped to the model's). `--data random` uses random
tokens instead. Modes, each in a fresh interpreter with an empty Inductor cache:

* eager:    the PEFT model as is;
* inductor: torch.compile(model, backend="inductor");
* auto, exact, lowrank: torch.compile(model, backend="lowrank_lora", options={"mode": ...}).

Per (model, sequence length, mode): compile time (first step minus a median step), median step
time (forward, backward, AdamW) over N steps after warm-up, tokens per second, peak memory of a
step, the training loss after N AdamW steps next to eager's, the relative error of the LoRA
gradients at step 0 against a float64 eager copy of the model on the same batch, and for the
backend how many attention calls took the low-rank path.

    python bench/opt_finetune.py --quick              # opt-125m, L = 128: a few minutes on 2 CPU cores
    python bench/opt_finetune.py                      # opt-125m, 350m, 1.3b at L = 128 and 512
    python bench/opt_finetune.py --models opt-125m --seqs 128 512 --steps 3
    python bench/opt_finetune.py --long               # position table extended to 16,384; L = 4,096 and 16,384

Writes `opt_finetune.json` and `opt_finetune.md` (`opt_finetune_long.*` with --long) to --out
(default bench/results/<machine>/).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py; also puts the checkout on sys.path)

MODELS = ("opt-125m", "opt-350m", "opt-1.3b")
MODES = ("eager", "inductor", "exact", "auto", "lowrank")
BACKEND_MODES = ("auto", "exact", "lowrank")
DEFAULT_SEQS = [128, 512]
LONG_SEQS = [4096, 16384]
LONG_POSITIONS = 16384
QUICK = dict(models=["opt-125m"], seqs=[128], steps=2, warmup=0)
TOKENIZER_VOCAB = 8192  # BPE vocabulary trained on the text, capped by the model's vocabulary
EXACT_GOAL = 1.03  # exact mode: step time within 3% of plain torch.compile (Inductor)


# --- data ----------------------------------------------------------------------------------------


def english_text() -> tuple[str, str]:
    """English prose that ships with Python, and where it came from."""
    try:
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k] for k in sorted(topics))
        return text, f"pydoc_data.topics of Python {platform.python_version()} ({len(topics)} reference-manual pages)"
    except ImportError:  # some distributions strip pydoc_data: module docstrings of the standard library
        import importlib

        names = ["argparse", "collections", "dataclasses", "decimal", "functools", "itertools", "json",
                 "logging", "pathlib", "pickle", "re", "statistics", "subprocess", "threading", "typing", "unittest"]
        docs = []
        for name in names:
            mod = importlib.import_module(name)
            docs.append(mod.__doc__ or "")
            docs += [getattr(mod, a).__doc__ or "" for a in sorted(dir(mod)) if not a.startswith("_")]
        return "\n\n".join(d for d in docs if d), f"docstrings of {len(names)} standard-library modules"


def build_tokenizer(text: str, vocab: int):
    """Byte-level BPE trained on `text` (deterministic; every byte is in the vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return tok


def token_stream(data: str, vocab: int, length: int, seed: int):
    """(int64 tensor of token ids, description): English text through a local BPE, or random ids."""
    import torch

    if data == "random":
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab, (length,), generator=gen), f"uniform random token ids < {vocab}"
    text, source = english_text()
    tok = build_tokenizer(text, min(vocab, TOKENIZER_VOCAB))
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.int64)
    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
    desc = (f"{source}: {len(text):,} characters, {len(ids):,} tokens of a byte-level BPE with "
            f"{tok.get_vocab_size():,} entries trained on it (token sha256 {digest})")
    return ids, desc


def batch_at(tokens, step: int, batch: int, length: int):
    """Batch `step` of the stream: consecutive windows of `length` tokens, wrapping around."""
    import torch

    need = batch * length
    if tokens.numel() < need + 1:
        tokens = tokens.repeat(math.ceil((need + 1) / tokens.numel()))
    span = tokens.numel() - need
    start = (step * need) % span
    return torch.as_tensor(tokens[start:start + need]).view(batch, length)


# --- worker: one (model, L, mode) in its own process -------------------------------------------------


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def extend_positions(model, positions: int) -> bool:
    """Grow OPT's learned position table to `positions` by repeating its rows (for --weights)."""
    import torch

    emb = _base(model).model.decoder.embed_positions
    old = emb.weight.data
    if positions + emb.offset <= old.shape[0]:
        return False
    rows = old[emb.offset:]
    reps = math.ceil(positions / rows.shape[0])
    new = torch.cat([old[:emb.offset], rows.repeat(reps, 1)[:positions]])
    emb.weight = torch.nn.Parameter(new, requires_grad=False)
    emb.num_embeddings = new.shape[0]
    _base(model).config.max_position_embeddings = positions
    return True


def make_model(spec: dict):
    """PEFT-LoRA OPT as the spec says (same seed, hence same weights, in every worker)."""
    import torch

    from lora_pass.models import build_opt_lora

    positions = spec["max_positions"]
    model = build_opt_lora(spec["model"], lora=spec["lora"], r=spec["r"], alpha=spec["alpha"], attn=spec["attn"],
                           max_positions=positions if not spec["weights"] else None, weights=spec["weights"],
                           seed=spec["seed"])
    if spec["weights"] and positions:
        extend_positions(model, positions)
    decoder = _base(model).model.decoder
    if spec["layers"]:
        decoder.layers = decoder.layers[: spec["layers"]]
        _base(model).config.num_hidden_layers = len(decoder.layers)
    if spec["bounded"] != 1.0:  # shrink the q/k base weights: small logits, the guard can pass
        with torch.no_grad():
            for layer in decoder.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    base = getattr(proj, "base_layer", proj)
                    base.weight.mul_(spec["bounded"])
                    if base.bias is not None:
                        base.bias.mul_(spec["bounded"])
    return model.to(spec["device"])


def _lora_grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def reference_grads(model, ids) -> tuple[float, dict]:
    """Loss and LoRA gradients of a float64 eager copy of the model on `ids`."""
    import copy

    ref = copy.deepcopy(model).double()
    ref.zero_grad(set_to_none=True)
    loss = ref(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {n: g.cpu() for n, g in _lora_grads(ref).items()}
    del ref
    return float(loss.detach()), grads


def grad_errors(grads: dict, ref: dict) -> dict:
    """Norm-wise relative error of each LoRA gradient against the reference: max, and overall.

    Parameters whose reference gradient is exactly zero (PEFT starts B at 0, so every lora_A
    gradient is 0 at step 0) are left out of the maximum and counted.
    """
    per, num, den, zero = {}, 0.0, 0.0, 0
    for name, r in ref.items():
        g = grads.get(name)
        if g is None:
            per[name] = math.inf
            continue
        r, g = r.double(), g.double().cpu()
        rn, dn = float(r.norm()), float((g - r).norm())
        num, den = num + dn**2, den + rn**2
        if rn == 0.0:
            zero += 1
            if dn != 0.0:
                per[name] = math.inf
            continue
        per[name] = dn / rn
    worst = max(per, key=per.get) if per else None
    return {
        "grad_err": per[worst] if worst else None,
        "grad_err_param": worst,
        "grad_err_global": math.sqrt(num / den) if den > 0 else None,
        "grad_zero_params": zero,
        "grad_params": len(ref),
    }


def _telemetry(mode: str) -> dict:
    """What the backend did: sites, their compiled paths, calls per path, largest bound R."""
    import collections

    import lora_pass

    tel = lora_pass.telemetry()
    out = {"sites": len(tel), "paths": dict(collections.Counter(s.paths for s, _ in tel)),
           "decisions": sorted({s.decision for s, _ in tel}), "graphs": len(lora_pass.records()),
           "skipped": sum(len(r.skipped) for r in lora_pass.records())}
    stats = [st for _, st in tel if st is not None]
    for field in ("forward_lowrank", "forward_exact", "backward_lowrank", "backward_exact"):
        out[field] = int(sum(st[field] for st in stats))
    bounds = [st["max_bound"] for st in stats if st["max_bound"] and math.isfinite(st["max_bound"])]
    out["max_bound"] = max(bounds) if bounds else None
    out["min_site_bound"] = min(bounds) if bounds else None
    out["r_max"] = tel[0][0].r_max if tel else None
    return out


def compile_mode(model, mode: str, spec: dict):
    """The callable that runs `model` in `mode`."""
    import torch

    if mode == "eager":
        return model
    if mode == "inductor":
        return torch.compile(model, backend="inductor")
    import lora_pass  # noqa: F401  (registers the backend, also found through its entry point)

    options = {"mode": mode}
    if mode == "auto" and spec.get("crossover") is not None:
        options["crossover"] = spec["crossover"]
    return torch.compile(model, backend="lowrank_lora", options=options)


def run_paired(spec: dict) -> dict:
    """Two modes in one process, their steps alternating (ABBA...): a ratio free of slow drifts
    in the load of the machine, which separate processes cannot give. Same weights, same batches."""
    import copy

    import torch

    from tqdm import tqdm

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device, modes = spec["device"], spec["pair"]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    now = time.process_time if spec.get("clock") == "cpu" else time.perf_counter
    tokens = torch.load(spec["tokens"])
    base = make_model(spec)
    runners = {}
    for mode in modes:
        model = copy.deepcopy(base).train()
        fn = compile_mode(model, mode, spec)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["lr"])
        runners[mode] = (model, fn, opt, [])
    del base

    def step(mode):
        model, fn, opt, losses = runners[mode]
        ids = batch_at(tokens, len(losses), spec["batch"], spec["seq"]).to(device)
        loss = fn(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    bar = tqdm(total=len(modes) * (1 + spec["warmup"] + spec["steps"]), desc=f"{spec['model']} L={spec['seq']} paired",
               unit="step", leave=False, file=sys.stderr, disable=spec.get("quiet", False))
    first = {}
    for mode in modes:
        start = time.perf_counter()
        step(mode)
        sync()
        first[mode] = time.perf_counter() - start
        bar.update()
    for _ in range(spec["warmup"]):
        for mode in modes:
            step(mode)
            bar.update()
    times = {mode: [] for mode in modes}
    for i in range(spec["steps"]):
        for mode in (modes if i % 2 == 0 else modes[::-1]):
            sync()
            start = now()
            step(mode)
            sync()
            times[mode].append(now() - start)
            bar.update()
    bar.close()
    a, b = modes
    ratios = sorted(tb / ta for ta, tb in zip(times[a], times[b]))
    q = lambda f: ratios[min(len(ratios) - 1, int(f * len(ratios)))]  # noqa: E731
    return {"model": spec["model"], "seq": spec["seq"], "mode": "paired", "pair": modes, "times_s": times,
            "median_s": {m: statistics.median(t) for m, t in times.items()}, "first_step_s": first,
            "ratio_median": statistics.median(ratios), "ratio_low": q(0.25), "ratio_high": q(0.75),
            "ratios": ratios, "losses": {m: runners[m][3] for m in modes}}


def run_worker(spec: dict) -> dict:
    if spec.get("pair"):
        return run_paired(spec)
    import torch
    import warnings

    from tqdm import tqdm

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    mode, device = spec["mode"], spec["device"]
    cuda = device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    model = make_model(spec)
    model.train()
    tokens = torch.load(spec["tokens"])
    batch = lambda i: batch_at(tokens, i, spec["batch"], spec["seq"]).to(device)  # noqa: E731
    result = {"model": spec["model"], "seq": spec["seq"], "mode": mode, "threads": torch.get_num_threads(),
              "build_s": time.perf_counter() - t0,
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "params": sum(p.numel() for p in model.parameters())}

    if spec.get("reference_out"):  # float64 eager reference on batch 0, shared with the other modes
        start = time.perf_counter()
        ref_loss, ref = reference_grads(model, batch(0))
        torch.save({"loss": ref_loss, "grads": ref}, spec["reference_out"])
        result["reference_s"] = time.perf_counter() - start
        del ref
        model.zero_grad(set_to_none=True)
        common.release_freed_memory()

    torch._dynamo.reset()
    if mode in BACKEND_MODES:
        import lora_pass

        lora_pass.reset()
    fn = compile_mode(model, mode, spec)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["lr"])
    losses = []

    def step(keep_grads=False):
        ids = batch(len(losses))
        loss = fn(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        grads = _lora_grads(model) if keep_grads else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # a host read: the step is finished
        return grads

    steps, warmup = spec["steps"], spec["warmup"]
    bar = tqdm(total=1 + warmup + steps + 1, desc=f"{spec['model']} L={spec['seq']} {mode}", unit="step",
               leave=False, file=sys.stderr, disable=spec.get("quiet", False))
    start = time.perf_counter()
    grads0 = step(keep_grads=True)  # compiles forward and backward
    sync()
    first = time.perf_counter() - start
    bar.update()
    if spec.get("reference_in") and Path(spec["reference_in"]).exists():
        ref = torch.load(spec["reference_in"])
        result.update(grad_errors(grads0, ref["grads"]), reference_loss=ref["loss"])
    del grads0
    for _ in range(warmup):
        step()
        bar.update()
    sync()

    def on_sample(seconds, clean):
        bar.update()
        bar.set_postfix_str(f"{1000 * seconds:.0f} ms{'' if clean else ' (busy machine, retaken)'}")

    timing = common.timed_samples(step, steps, sync, clock=spec.get("clock", "wall"), on_sample=on_sample)
    result["peak_mem_mb"], result["mem_method"] = common.peak_step_memory(step, sync, device)
    bar.update()
    bar.close()
    result.update(timing)
    result["first_step_s"] = first
    result["compile_s"] = None if mode == "eager" else max(0.0, first - timing["time_s"])
    result["tokens_per_s"] = spec["batch"] * spec["seq"] / timing["time_s"]
    result["losses"] = losses
    result["loss_after_n"] = losses[steps] if len(losses) > steps else None
    result["max_rss_mb"] = common.max_rss_mb()
    if cuda:
        result["max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if mode in BACKEND_MODES:
        result["backend"] = _telemetry(mode)
    else:
        from torch._dynamo.utils import counters

        result["graphs"] = counters["stats"].get("unique_graphs")
    return result


# --- driver -------------------------------------------------------------------------------------


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (model, L, mode) with the comparisons against eager and Inductor."""
    runs = [r for r in runs if r["mode"] != "paired"]
    by_key = {(r["model"], r["seq"], r["mode"]): r for r in runs}
    rows = []
    for r in runs:
        eager = by_key.get((r["model"], r["seq"], "eager"), {})
        ind = by_key.get((r["model"], r["seq"], "inductor"), {})
        t, t_ind = r.get("time_s"), ind.get("time_s")
        be = r.get("backend") or {}
        calls = be.get("forward_lowrank", 0) + be.get("forward_exact", 0)
        rows.append({
            "model": r["model"], "seq": r["seq"], "mode": r["mode"],
            "compile_s": r.get("compile_s"),
            "step_ms": None if t is None else 1000 * t,
            "spread": (max(r["samples_s"]) - min(r["samples_s"])) / t if t and r.get("samples_s") else None,
            "tokens_per_s": r.get("tokens_per_s"),
            "vs_inductor": t / t_ind if t and t_ind else None,
            "peak_mem_mb": r.get("peak_mem_mb"),
            "loss_after_n": r.get("loss_after_n"),
            "eager_loss_after_n": eager.get("loss_after_n"),
            "loss_delta": (r["loss_after_n"] - eager["loss_after_n"])
            if r.get("loss_after_n") is not None and eager.get("loss_after_n") is not None else None,
            "grad_err": r.get("grad_err"),
            "lowrank_calls": f"{be.get('forward_lowrank', 0)}/{calls}" if be else None,
            "compiled_paths": ",".join(f"{k}:{v}" for k, v in sorted(be.get("paths", {}).items())) if be else None,
            "max_bound": be.get("max_bound"),
            "other_load": r.get("other_load"),
            "contended": r.get("contended", False),
            "error": r.get("error"),
        })
    return rows


def paired_rows(runs: list[dict]) -> list[dict]:
    return [{"model": r["model"], "seq": r["seq"], "pair": "/".join(r["pair"][::-1]),
             "ratio_median": r.get("ratio_median"), "ratio_low": r.get("ratio_low"), "ratio_high": r.get("ratio_high"),
             "steps": len(r.get("ratios", [])), "error": r.get("error")}
            for r in runs if r["mode"] == "paired"]


def check_goals(rows: list[dict], paired: list[dict]) -> dict:
    out = {}
    pct = f"{100 * (EXACT_GOAL - 1):.0f}%"
    for r in rows:
        if r["mode"] == "exact":
            key = f"{r['model']} L={r['seq']}: exact step time within {pct} of Inductor (separate processes)"
            out[key] = None if r["vs_inductor"] is None else r["vs_inductor"] <= EXACT_GOAL
    for r in paired:
        key = f"{r['model']} L={r['seq']}: exact step time within {pct} of Inductor (one process, alternating steps)"
        out[key] = None if r["ratio_median"] is None else r["ratio_median"] <= EXACT_GOAL
    return out


HEADERS = {
    "model": "model", "seq": "L", "mode": "mode", "compile_s": "compile s", "step_ms": "step ms",
    "spread": "spread", "tokens_per_s": "tokens/s", "vs_inductor": "x Inductor", "peak_mem_mb": "peak MiB",
    "loss_after_n": "loss after N", "eager_loss_after_n": "eager loss", "grad_err": "grad rel err (step 0)",
    "lowrank_calls": "low-rank calls", "compiled_paths": "sites compiled", "max_bound": "max R",
    "other_load": "other load",
}


def render_table(rows: list[dict], fmt: str) -> str:
    from tabulate import tabulate

    def cell(key, value, row):
        if key == "step_ms" and row.get("error"):
            return "failed"
        if key in ("grad_err",):
            return common.fmt_sci(value)
        if key == "spread":
            return "-" if value is None else f"{100 * value:.0f}%"
        if key in ("vs_inductor", "other_load", "max_bound"):
            return common.fmt(value, 3 if key != "other_load" else 2)
        if key in ("loss_after_n", "eager_loss_after_n"):
            return common.fmt(value, 4)
        if key in ("tokens_per_s", "peak_mem_mb", "step_ms"):
            return common.fmt(value, 0 if (value or 0) >= 100 else 1)
        return common.fmt(value)

    body = []
    for r in rows:
        line = [cell(k, r[k], r) for k in HEADERS]
        if r["contended"]:  # no sample free of other processes: mark the time
            line[4] = f"{line[4]}*"
        body.append(line)
    return tabulate(body, headers=list(HEADERS.values()), tablefmt=fmt, disable_numparse=True)


def write_markdown(path: Path, report: dict, rows: list[dict]) -> None:
    s = report["settings"]
    lines = [
        "# LoRA fine-tuning of OPT: eager, Inductor and lowrank_lora",
        "",
        *common.environment_lines(report["environment"]),
        f"* models: {', '.join(s['models'])} ({'weights from ' + s['weights'] if s['weights'] else 'random weights from the published configs'}"
        f"{'; opt-tiny is a 2-layer toy config (hidden 32, head dim 16), not a published size' if 'opt-tiny' in s['models'] else ''}"
        f"{', first ' + str(s['layers']) + ' layers' if s['layers'] else ''}"
        f"{', q/k base weights x ' + str(s['bounded']) if s['bounded'] != 1.0 else ''}), attention `{s['attn']}`,"
        f" position table {report['max_positions'] or 2048}",
        f"* PEFT LoRA r = {s['r']}, alpha = {s['alpha']} on {s['lora']}; AdamW lr {s['lr']}; batch {s['batch']}; float32",
        f"* data: {report['data']}",
        f"* timing: median of {s['steps']} step(s) (forward, backward, AdamW) after {s['warmup']} warm-up step(s), "
        f"{'CPU time of the worker process' if s['clock'] == 'cpu' else 'wall clock'}; "
        f"each (model, L, mode) in a fresh process with {'a warm' if s['warm_cache'] else 'an empty'} Inductor cache",
        "",
        "Columns: `compile s` is the first step minus a median step (Dynamo, AOTAutograd and Inductor, forward and",
        "backward). `spread` is (slowest - fastest) / median of the timed steps. `x Inductor` is the step time over",
        "plain `torch.compile` (Inductor) at the same size. `peak MiB` is the growth of resident memory over one",
        "step above what is live before it (CPU; allocated memory on CUDA).",
        "`loss after N` is the training loss on batch N, after N AdamW steps; every mode sees the same batches.",
        "`grad rel err` is max over LoRA parameters of ||g - g64|| / ||g64|| at step 0, against a float64 eager copy on",
        "the same batch (PEFT starts lora_B at 0, so the lora_A gradients are exactly 0 at step 0 and the error is",
        "that of the lora_B gradients, which carry dQ, dK, dV). `low-rank calls` counts the attention forward calls",
        "that took the low-rank path, out of all calls of rewritten sites; `sites compiled` says which paths the",
        "backend compiled (`exact`: plain SDPA, `guarded`: both paths behind the norm guard, `lowrank`: forced);",
        "`max R` is the largest logit bound seen (R_max = " + common.fmt(report.get("r_max"), 4) + ").",
        *(["The machine is shared: a timed step during which other processes kept more than 0.25 cores busy is",
           "discarded and taken again (within a time budget); `other load` is the cores they used during the steps",
           "kept, and a time marked * had no clean step at all. Medians, not means."] if s["clock"] == "wall" else
          ["Step times are the CPU time of the worker (one thread: time slices given to other processes do not",
           "count); compile times are wall clock, so they grow with the load of other processes. `other load` is",
           "the cores other processes kept busy while the steps were timed. Medians, not means."]),
        "",
        render_table(rows, "github"),
    ]
    if report["paired"]:
        lines += ["", "## exact against Inductor in one process", "",
                  "Both compiled models (same weights, same batches) live in one worker and their steps alternate",
                  "(A B B A ...), so slow changes in the load of the machine hit both alike. Ratio of step times",
                  "exact / Inductor per pair of steps: median and interquartile range.", "",
                  "| model | L | steps | exact / Inductor | IQR |", "|---|---|---|---|---|"]
        for r in report["paired"]:
            lines.append(f"| {r['model']} | {r['seq']} | {r['steps']} | {common.fmt(r['ratio_median'], 3)} | "
                         f"{common.fmt(r['ratio_low'], 3)} to {common.fmt(r['ratio_high'], 3)} |" if not r["error"] else
                         f"| {r['model']} | {r['seq']} | - | failed: {r['error']} | |")
    lines += ["", "## Goals", ""]
    for name, ok in report["goals"].items():
        lines.append(f"* {'yes' if ok else 'no' if ok is not None else 'not measured'}: {name}")
    errors = [r for r in rows if r["error"]]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"* {r['model']} L={r['seq']} {r['mode']}: {r['error']}" for r in errors]
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, help=f"OPT sizes (default {' '.join(MODELS)}; also opt-tiny)")
    p.add_argument("--seqs", type=int, nargs="+", default=None, help="sequence lengths (default 128 512; --long: 4096 16384)")
    p.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES),
                   help="modes compared in separate processes (default all; none with --paired: the paired run only)")
    p.add_argument("--steps", type=int, default=None, help="timed steps N (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the compiling one (default 1)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lora", choices=("q,v", "q,k,v"), default="q,v", help="LoRA targets (default q,v)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--attn", choices=("sdpa", "eager", "softmax1"), default="sdpa",
                   help="attn_implementation (default sdpa); softmax1: outlier-free OPT (softmax_1 attention), "
                        "the paper's comparison of standard and outlier-free OPT")
    p.add_argument("--data", choices=("text", "random"), default="text", help="token stream (default: English text)")
    p.add_argument("--weights", metavar="PATH", help="local OPT checkpoint directory (one model)")
    p.add_argument("--long", action="store_true",
                   help=f"long sequences: position table extended to {LONG_POSITIONS:,}, L = {' and '.join(map(str, LONG_SEQS))} by default")
    p.add_argument("--max-positions", type=int, default=None, help="position table size (default: 2048, or what --long / --seqs need)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers (not OPT any more: say so)")
    p.add_argument("--bounded", type=float, default=1.0, metavar="FACTOR",
                   help="multiply every q_proj/k_proj base weight and bias by FACTOR (small logits; default 1 = unchanged)")
    p.add_argument("--crossover", type=int, default=None, help="lowrank_lora option crossover for mode auto (default: cost model)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: torch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this process's CPU time, robust on a shared machine; use with --threads 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="opt-125m at L = 128, 2 steps, no warm-up, warm Inductor cache")
    p.add_argument("--warm-cache", action="store_true", help="reuse the Inductor cache (compile times not cold)")
    p.add_argument("--no-reference", action="store_true", help="skip the float64 gradient reference")
    p.add_argument("--paired", type=int, default=0, metavar="STEPS",
                   help="also time exact against Inductor in one process, STEPS alternating steps each (default 0: off)")
    p.add_argument("--wait-idle", type=float, default=None,
                   help="before each configuration wait up to this many seconds for other processes to go idle (default 20; --quick 0)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per configuration")
    p.add_argument("--out", type=Path, default=None, help="default bench/results/<machine>/")
    p.add_argument("--name", default=None, help="file stem of the results (default opt_finetune, or opt_finetune_long)")
    p.add_argument("--quiet", action="store_true", help="no per-step progress bars")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    quick = QUICK if args.quick else {}
    args.models = args.models or quick.get("models") or list(MODELS)
    args.seqs = args.seqs or quick.get("seqs") or (LONG_SEQS if args.long else DEFAULT_SEQS)
    args.steps = args.steps if args.steps is not None else quick.get("steps", 5)
    args.warmup = args.warmup if args.warmup is not None else quick.get("warmup", 1)
    args.warm_cache = args.warm_cache or args.quick
    if args.wait_idle is None:
        args.wait_idle = 0.0 if args.quick else 20.0
    if args.long and args.max_positions is None:
        args.max_positions = max(LONG_POSITIONS, max(args.seqs))
    if args.max_positions is None and max(args.seqs) > 2048:
        args.max_positions = max(args.seqs)
    if args.weights and len(args.models) != 1:
        p.error("--weights loads one checkpoint: give one --models name for the table")
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if not args.modes and not args.paired:
        p.error("nothing to run: give --modes or --paired")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        common.worker_main(run_worker, args.worker)
        return

    import torch
    from tqdm import tqdm

    from lora_pass.guard import r_max
    from lora_pass.models import OPT_ARCHS, opt_config

    device = args.device or common.default_device()
    out_dir = common.results_dir(device, args.out)
    env = common.environment(device)
    if args.threads:
        env["threads"] = args.threads
    modes = [m for m in MODES if m in args.modes]  # eager first: it also computes the reference
    runs, data_desc = [], None
    with tempfile.TemporaryDirectory(prefix="lora_pass_opt_") as tmp:
        streams = {}
        specs = []
        for name in args.models:
            if name not in OPT_ARCHS and not args.weights:
                raise SystemExit(f"unknown model {name!r}; choose from {sorted(OPT_ARCHS)}")
            vocab = opt_config(name).vocab_size if not args.weights else _checkpoint_vocab(args.weights)
            if vocab not in streams:
                need = args.batch * max(args.seqs) * (args.steps + args.warmup + 40)
                ids, data_desc = token_stream(args.data, vocab, need, args.seed)
                streams[vocab] = Path(tmp) / f"tokens_{vocab}.pt"
                torch.save(ids, streams[vocab])
            for seq in args.seqs:
                ref = None if args.no_reference else str(Path(tmp) / f"ref_{name}_{seq}.pt")
                base = {
                    "model": name, "seq": seq, "device": device, "batch": args.batch,
                    "lora": args.lora, "r": args.r, "alpha": args.alpha, "lr": args.lr, "attn": args.attn,
                    "weights": args.weights, "max_positions": args.max_positions, "layers": args.layers,
                    "bounded": args.bounded, "crossover": args.crossover, "seed": args.seed,
                    "steps": args.steps, "warmup": args.warmup, "tokens": str(streams[vocab]),
                    "threads": args.threads, "clock": args.clock, "quiet": args.quiet,
                }
                for i, mode in enumerate(modes):
                    specs.append({**base, "mode": mode, "reference_out": ref if i == 0 else None, "reference_in": ref})
                if args.paired:
                    specs.append({**base, "mode": "paired", "pair": ["inductor", "exact"], "steps": args.paired})
        bar = tqdm(specs, unit="config", desc="configurations")
        for spec in bar:
            bar.set_description(f"{spec['model']} L={spec['seq']} {spec['mode']}")
            waited = common.wait_until_idle(args.wait_idle) if args.wait_idle > 0 and args.clock == "wall" else 0.0
            run = common.launch(Path(__file__), spec, timeout=args.timeout, warm_cache=args.warm_cache,
                                show_progress=not args.quiet, threads=args.threads)
            run = {"model": spec["model"], "seq": spec["seq"], "mode": spec["mode"], **run, "waited_for_idle_s": waited}
            if "error" in run:
                tqdm.write(f"failed: {spec['model']} L={spec['seq']} {spec['mode']}: {run['error']}")
            elif spec["mode"] == "paired":
                tqdm.write(f"{spec['model']} L={spec['seq']} exact/Inductor, alternating steps: {run['ratio_median']:.3f} "
                           f"(IQR {run['ratio_low']:.3f} to {run['ratio_high']:.3f})")
            else:
                tqdm.write(f"{spec['model']} L={spec['seq']} {spec['mode']}: {1000 * run['time_s']:.0f} ms/step, "
                           f"compile {common.fmt(run.get('compile_s'))} s, grad err {common.fmt_sci(run.get('grad_err'))}")
            runs.append(run)

    rows = summarise(runs)
    report = {
        "benchmark": "opt_finetune",
        "environment": env,
        **{k: env[k] for k in ("command", "date", "torch", "python", "device", "device_name", "threads")},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("worker", "out")},
        "max_positions": args.max_positions,
        "data": data_desc,
        "r_max": r_max(2, 0.05),
        "rows": rows,
        "runs": runs,
    }
    report["paired"] = paired_rows(runs)
    report["goals"] = check_goals(rows, report["paired"])
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("opt_finetune_long" if args.long else "opt_finetune")
    common.write_json(out_dir / f"{stem}.json", report)
    write_markdown(out_dir / f"{stem}.md", report, rows)
    print(render_table(rows, "simple"))
    for name, ok in report["goals"].items():
        print(f"{'yes' if ok else 'no' if ok is not None else 'n/a':>4}  {name}")
    print(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}")


def _checkpoint_vocab(path: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).vocab_size


if __name__ == "__main__":
    main()
