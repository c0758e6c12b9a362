"""Training on the low-rank path: does LoRA fine-tuning converge as exact training does?

The text is real English: the Python reference manual that ships with CPython
(`pydoc_data.topics`), through a byte-level BPE trained on it. No weights can be downloaded, so
the base model is made here: a small OPT (opt-tiny: 2 layers, hidden 32, 2 heads of 16) is first
trained in full on the first half of the token stream at 256 tokens, with its query and key
projections frozen at their initialisation times `--bounded` (small logits: the attention starts
in the bounded regime); its position table is then repeated out to the fine-tuning length. That
base model is LoRA-fine-tuned on the second half at a sequence length where the low-rank path is
faster on this CPU. Three runs with the same seed, weights and batches, each in a fresh interpreter
with an empty Inductor cache:

* inductor: torch.compile(model, backend="inductor"), exact attention;
* auto:     torch.compile(model, backend="lowrank_lora"), the guard choosing per call;
* lowrank:  torch.compile(model, backend="lowrank_lora", options={"mode": "lowrank"}).

Per step: the training loss, the step time (CPU time of the worker, one thread by default), and
for the backend runs R of every layer (the guard's logit bound on that step's batch) and the path
each layer's attention took. The summary compares the final loss (mean of the last tenth of the
steps) with Inductor's, the median step times, and says at which step, if any, training pushed a
layer above R_max and `auto` fell back to exact.

    python bench/convergence.py --quick     # 8,192 tokens, 40 steps: under 10 minutes on 2 CPU cores
    python bench/convergence.py             # 8,192 tokens, 300 steps: the committed run

Writes convergence.json, convergence.md and convergence.png (--name changes the stem) to --out
(default bench/results/<machine>/).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py; also puts the checkout on sys.path)
from opt_finetune import batch_at, extend_positions, token_stream  # noqa: E402

from lora_pass.models import parse_lora_targets  # noqa: E402

MODES = ("inductor", "auto", "lowrank")
TARGETS = {  # OPT's module names; "mlp" adds its two feed-forward projections
    "q,v": parse_lora_targets("q,v"),
    "q,k,v": parse_lora_targets("q,k,v"),
    "q,v,o,mlp": parse_lora_targets("q,v,o") + ["fc1", "fc2"],
}
PRETRAIN = {"seq": 256, "batch": 8, "steps": 600, "lr": 3e-3}
LOSS_GOAL = 0.01  # final loss of each backend run within 1% of Inductor's
SPEED_GOAL = 1.05  # "faster": the run's total step time at most Inductor's / 1.05 (beyond timing noise)
QUICK = dict(seq=8192, steps=40)
DEFAULTS = dict(seq=8192, steps=300)


def run_worker(spec: dict) -> dict:
    """One training run: `spec["steps"]` AdamW steps of `spec["mode"]` on the shared batches."""
    import warnings

    import torch

    import lora_pass

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model = build_model(spec)
    model.train()
    tokens = torch.load(spec["tokens"])
    mode = spec["mode"]
    if mode == "inductor":
        fn = torch.compile(model, backend="inductor")
    else:
        lora_pass.reset()
        options = {"mode": mode, "degree": spec["degree"], "tolerance": spec["tolerance"]}
        if spec.get("crossover") is not None:
            options["crossover"] = spec["crossover"]
        fn = torch.compile(model, backend="lowrank_lora", options=options)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["lr"])
    losses, times, bounds, shares, paths = [], [], [], [], []
    previous = {}
    compile_wall = None
    for step in range(spec["steps"]):
        ids = batch_at(tokens, step, spec["batch"], spec["seq"])
        wall, cpu = time.perf_counter(), time.process_time()
        loss = fn(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        times.append(time.process_time() - cpu)
        if step == 0:
            compile_wall = time.perf_counter() - wall
        if mode != "inductor":
            tel = sorted(lora_pass.telemetry(), key=lambda item: item[0].module)
            bounds.append([st["last_bound"] for _, st in tel])
            shares.append([st["lora_share"] for _, st in tel])
            took = []
            for site, st in tel:
                low = st["forward_lowrank"] - previous.get(site.module, 0)
                previous[site.module] = st["forward_lowrank"]
                took.append("lowrank" if low else "exact")
            paths.append(took)
        if spec.get("progress"):
            print(f"{mode} step {step}: loss {losses[-1]:.4f}, {1000 * times[-1]:.0f} ms", file=sys.stderr, flush=True)
    result = {"mode": mode, "losses": losses, "step_cpu_s": times, "threads": torch.get_num_threads(),
              "compile_s": compile_wall - statistics.median(times[1:]) if len(times) > 1 else None}
    if mode != "inductor":  # `tel`: the sites of the last step, the same at every step
        result.update(sites=[site.module for site, _ in tel], site_paths=[site.paths for site, _ in tel],
                      r_max=tel[0][0].r_max, bounds=bounds, lora_share=shares, paths=paths)
    return result


def _opt(spec: dict, positions: int):
    import torch
    from transformers import OPTForCausalLM

    from lora_pass.models import opt_config

    torch.manual_seed(spec["seed"])
    return OPTForCausalLM(opt_config(spec["model"], max_positions=positions))


def pretrain(spec: dict, tokens, out: Path) -> dict:
    """Train the base model in full on `tokens` (query and key projections frozen at their
    initialisation times spec["bounded"]); save its weights to `out`; its loss curve."""
    import torch

    model = _opt(spec, PRETRAIN["seq"])
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                for p in proj.parameters():
                    p.mul_(spec["bounded"])
                    p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=PRETRAIN["lr"])
    losses = []
    for step in range(spec["pretrain_steps"]):
        ids = batch_at(tokens, step, PRETRAIN["batch"], PRETRAIN["seq"])
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    torch.save(model.state_dict(), out)
    return {**PRETRAIN, "steps": spec["pretrain_steps"], "losses": losses, "final_loss": final_loss(losses)}


def build_model(spec: dict):
    """The pretrained base model, its position table repeated to spec["seq"], with PEFT LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = _opt(spec, PRETRAIN["seq"])
    model.load_state_dict(torch.load(spec["base"]))
    extend_positions(model, spec["seq"])
    config = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], target_modules=TARGETS[spec["lora"]], lora_dropout=0.0)
    torch.manual_seed(spec["seed"])
    return get_peft_model(model, config)


# --- driver --------------------------------------------------------------------------------------


def final_loss(losses: list[float]) -> float:
    """Mean training loss over the last tenth of the steps (at least one)."""
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail)


def first_loss(losses: list[float]) -> float:
    """Mean training loss over the first tenth of the steps (at least one)."""
    head = losses[:max(1, len(losses) // 10)]
    return sum(head) / len(head)


def summarise(runs: dict) -> dict:
    base = runs.get("inductor")
    rows = []
    for mode, run in runs.items():
        if "error" in run:
            rows.append({"mode": mode, "error": run["error"]})
            continue
        row = {"mode": mode, "final_loss": final_loss(run["losses"]), "first_loss": first_loss(run["losses"]),
               "step_ms": 1000 * statistics.median(run["step_cpu_s"][1:] or run["step_cpu_s"]),
               "total_s": sum(run["step_cpu_s"][1:]), "compile_s": run["compile_s"]}
        if base and "error" not in base:
            row["loss_vs_inductor"] = row["final_loss"] / final_loss(base["losses"]) - 1
            row["max_step_loss_gap"] = max(abs(a - b) / b for a, b in zip(run["losses"], base["losses"]))
            row["max_step_loss_diff"] = max(abs(a - b) for a, b in zip(run["losses"], base["losses"]))
            row["speedup"] = sum(base["step_cpu_s"][1:]) / row["total_s"] if row["total_s"] else None
        if "bounds" in run:
            r_max = run["r_max"]
            flat = [b for step in run["bounds"] for b in step if b is not None and math.isfinite(b)]
            row.update(r_max=r_max, first_r=max(run["bounds"][0]), last_r=max(run["bounds"][-1]),
                       max_r=max(flat) if flat else None,
                       lowrank_steps=sum(all(p == "lowrank" for p in step) for step in run["paths"]),
                       exact_calls=sum(p == "exact" for step in run["paths"] for p in step),
                       first_over=next((i for i, step in enumerate(run["bounds"]) if max(step) > r_max), None),
                       first_exact=next((i for i, step in enumerate(run["paths"]) if "exact" in step), None))
        rows.append(row)
    return rows


def check_goals(rows: list[dict]) -> dict:
    goals = {}
    for row in rows:
        if row["mode"] == "inductor" or "loss_vs_inductor" not in row:
            continue
        goals[f"{row['mode']}: final loss within {LOSS_GOAL:.0%} of Inductor's"] = abs(row["loss_vs_inductor"]) <= LOSS_GOAL
        goals[f"{row['mode']}: faster than Inductor over the run (total step time, by {SPEED_GOAL}x or more)"] = (
            row["speedup"] is not None and row["speedup"] >= SPEED_GOAL)
    return goals


def plot(path: Path, runs: dict, title: str) -> bool:
    """Loss curves overlaid, and R per layer against R_max over the steps; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_r) = plt.subplots(2, 1, figsize=(9, 8), sharex=True)
    colours = {"inductor": "black", "auto": "tab:blue", "lowrank": "tab:orange"}
    styles = {"inductor": "-", "auto": "--", "lowrank": ":"}
    for mode, run in runs.items():
        if "error" in run:
            continue
        losses = run["losses"]
        ax_loss.plot(losses, styles[mode], color=colours[mode], linewidth=0.5, alpha=0.4)
        window = max(1, min(20, len(losses) // 10))
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        ax_loss.plot(smooth, styles[mode], color=colours[mode], linewidth=1.6,
                     label=f"{mode} (mean of the last {window} steps)")
        if "bounds" in run:
            for layer in range(len(run["sites"])):
                series = [step[layer] for step in run["bounds"]]
                ax_r.plot(series, styles[mode], color=f"C{layer}", label=f"{mode}, layer {layer}", linewidth=1.0)
            exact = [(i, max(b)) for i, (b, p) in enumerate(zip(run["bounds"], run["paths"])) if "exact" in p]
            if exact:
                ax_r.scatter(*zip(*exact), marker="x", color=colours[mode], label=f"{mode}: a layer ran exact")
            r_max = run["r_max"]
    ax_loss.set_ylabel("training loss")
    ax_loss.legend()
    ax_loss.set_title(title)
    if any("bounds" in run for run in runs.values() if "error" not in run):
        ax_r.axhline(r_max, color="red", linestyle="--", label=f"R_max = {r_max:.3g}")
    ax_r.set_yscale("log")
    ax_r.set_xlabel("step")
    ax_r.set_ylabel("logit bound R per layer")
    ax_r.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_markdown(path: Path, report: dict) -> None:
    s, pre = report["settings"], report["pretraining"]
    lines = ["# LoRA fine-tuning on the low-rank path: convergence", "", *common.environment_lines(report),
             f"* base model: {s['model']} (attention heads of {report['head_dim']}) from its config, trained here in full "
             f"for {pre['steps']} steps of {pre['batch']} x {pre['seq']} tokens on the first half of the text (loss "
             f"{pre['losses'][0]:.3f} -> {pre['final_loss']:.3f}), query and key projections frozen at their "
             f"initialisation x {s['bounded']}; position table repeated out to {s['seq']:,}",
             f"* fine-tuning: PEFT LoRA r = {s['r']}, alpha = {s['alpha']} on {', '.join(TARGETS[s['lora']])}; "
             f"AdamW lr {s['lr']}; batch {s['batch']} x {s['seq']:,} tokens of the second half of the text; "
             f"{s['steps']} steps; seed {s['seed']}; float32; backend degree {s['degree']}, tolerance {s['tolerance']}",
             f"* data: {report['data']}",
             "* each run in a fresh interpreter with an empty Inductor cache; same weights and batches in every run",
             "", "| run | loss, first tenth | final loss | vs Inductor | largest step gap | step ms | steps s | speed-up | "
             "compile s | R first / last / max | R_max | steps all low-rank | first step above R_max | first exact call |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['mode']} | error: {r['error'][:200]} |" + " |" * 12)
            continue
        rs = f"{r['first_r']:.3g} / {r['last_r']:.3g} / {r['max_r']:.3g}" if "first_r" in r else "-"
        backend = r["mode"] != "inductor" and "loss_vs_inductor" in r
        vs = f"{100 * r['loss_vs_inductor']:+.2f}%" if backend else "-"
        gap = f"{100 * r['max_step_loss_gap']:.1e}%" if backend else "-"
        lines.append(
            f"| {r['mode']} | {r['first_loss']:.4f} | {r['final_loss']:.4f} | {vs} | {gap} | "
            f"{r['step_ms']:.0f} | {r['total_s']:.1f} | {r.get('speedup') or 1.0:.2f}x | {common.fmt(r['compile_s'])} | {rs} | "
            f"{common.fmt(r.get('r_max'), 4)} | {r.get('lowrank_steps', '-')} | {common.fmt(r.get('first_over'))} | "
            f"{common.fmt(r.get('first_exact'))} |")
    lines += ["", "Columns: `final loss` is the mean training loss of the last tenth of the steps (the first tenth "
              "beside it); `vs Inductor` its "
              "relative difference from the Inductor run's; `largest step gap` the largest relative difference of one "
              "step's loss from Inductor's on the same batch; `step ms` the median CPU time of a step (forward, "
              "backward, AdamW) after the compiling one; `steps s` the CPU time of all steps after the compiling "
              "one, and `speed-up` Inductor's over it (so `auto` counts its exact steps too); `compile s` the first step's wall time minus a median step. "
              "R is the largest of the layers' logit bounds on a step's batch (the guard's, in the compiled graph).",
              "", "## Goals", ""]
    lines += [f"* {'yes' if ok else 'NO'}: {name}" for name, ok in report["goals"].items()]
    if report.get("reading"):
        lines += ["", "## Reading", "", report["reading"]]
    if report.get("plot"):
        lines += ["", f"![loss and R per step]({report['plot']})"]
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="opt-tiny", help="OPT size built from its config (default opt-tiny)")
    p.add_argument("--seq", type=int, default=None, help=f"tokens per sequence (default {DEFAULTS['seq']})")
    p.add_argument("--steps", type=int, default=None, help=f"training steps per run (default {DEFAULTS['steps']})")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lora", choices=sorted(TARGETS), default="q,v,o,mlp",
                   help="LoRA targets: q,v,o,mlp is q_proj, v_proj, out_proj, fc1, fc2 (default)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the fine-tuning (default 1e-3)")
    p.add_argument("--bounded", type=float, default=0.5, metavar="FACTOR",
                   help="the base model's q and k projections: their initialisation times FACTOR, frozen while "
                        "it is trained (default 0.5)")
    p.add_argument("--degree", type=int, default=2, help="lowrank_lora option degree (default 2)")
    p.add_argument("--tolerance", type=float, default=0.05, help="lowrank_lora option tolerance (default 0.05)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--crossover", type=int, default=None, help="lowrank_lora crossover for auto (default: cost model)")
    p.add_argument("--pretrain-steps", type=int, default=PRETRAIN["steps"],
                   help=f"full-training steps of the base model (default {PRETRAIN['steps']})")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=f"{QUICK['steps']} steps at {QUICK['seq']:,} tokens")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per run")
    p.add_argument("--progress", action="store_true", help="print every step's loss")
    p.add_argument("--reading", default=None, help="a short reading of the results for the markdown")
    p.add_argument("--out", type=Path, default=None, help="default bench/results/<machine>/")
    p.add_argument("--name", default="convergence", help="file stem of the results (default convergence)")
    p.add_argument("--from-json", type=Path, default=None, metavar="FILE",
                   help="write the markdown and the plot again from a results JSON (with a new --reading)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    args.seq = args.seq or preset["seq"]
    args.steps = args.steps or preset["steps"]
    for name in ("seq", "steps", "batch", "threads", "pretrain_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(args, name)}")
    if not 0 < args.tolerance < 1:
        p.error(f"--tolerance must be in (0, 1), got {args.tolerance}")
    if not 1 <= args.degree <= 6:
        p.error(f"--degree must be 1 to 6, got {args.degree}")
    if not 0 < args.lr < 1:
        p.error(f"--lr must be in (0, 1), got {args.lr}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        common.worker_main(run_worker, args.worker)
        return
    if args.from_json:
        return render(args)
    import torch

    from lora_pass.models import OPT_ARCHS, opt_config

    if args.model not in OPT_ARCHS:
        raise SystemExit(f"unknown model {args.model!r}; choose from {sorted(OPT_ARCHS)}")
    device = "cpu"
    out_dir = common.results_dir(device, args.out)
    env = common.environment(device)
    env["threads"] = args.threads
    config = opt_config(args.model)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="lora_pass_convergence_") as tmp:
        ids, data = token_stream("text", config.vocab_size, 0, args.seed)
        half = ids.numel() // 2
        tokens = Path(tmp) / "tokens.pt"
        torch.save(ids[half:], tokens)
        base = Path(tmp) / "base.pt"
        common_spec = {"model": args.model, "seq": args.seq, "batch": args.batch, "lora": args.lora, "r": args.r,
                       "alpha": args.alpha, "lr": args.lr, "bounded": args.bounded, "seed": args.seed,
                       "steps": args.steps, "tokens": str(tokens), "base": str(base), "threads": args.threads,
                       "degree": args.degree, "tolerance": args.tolerance, "crossover": args.crossover,
                       "progress": args.progress, "pretrain_steps": args.pretrain_steps}
        start = time.perf_counter()
        torch.set_num_threads(args.threads)
        pretrained = pretrain(common_spec, ids[:half], base)
        print(f"base model: {args.pretrain_steps} full-training steps, loss {pretrained['losses'][0]:.3f} -> "
              f"{pretrained['final_loss']:.3f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        for mode in args.modes:
            spec = {**common_spec, "mode": mode}
            start = time.perf_counter()
            print(f"{mode}: {args.steps} steps at {args.seq:,} tokens ...", file=sys.stderr, flush=True)
            runs[mode] = common.launch(Path(__file__), spec, timeout=args.timeout, warm_cache=False,
                                       show_progress=args.progress, threads=args.threads)
            run = runs[mode]
            print(f"{mode}: " + (f"error {run['error']}" if "error" in run else
                                 f"final loss {final_loss(run['losses']):.4f}, "
                                 f"{1000 * statistics.median(run['step_cpu_s'][1:] or run['step_cpu_s']):.0f} ms/step")
                  + f" ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    rows = summarise(runs)
    report = {"benchmark": "convergence", **env, "settings": {k: v for k, v in vars(args).items()
                                                                            if k not in ("worker", "out")},
              "data": data, "head_dim": config.hidden_size // config.num_attention_heads, "rows": rows,
              "pretraining": pretrained,
              "goals": check_goals(rows), "reading": args.reading, "runs": runs}
    write_all(out_dir, args.name, report)


def write_all(out_dir: Path, name: str, report: dict) -> None:
    s = report["settings"]
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{name}.png"
    title = f"{s['model']}, LoRA on {s['lora']}, {s['seq']:,} tokens, {s['steps']} steps, lr {s['lr']}"
    report["plot"] = png.name if plot(png, report["runs"], title) else None
    common.write_json(out_dir / f"{name}.json", report)
    write_markdown(out_dir / f"{name}.md", report)
    print((out_dir / f"{name}.md").read_text())


def render(args) -> None:
    """--from-json: the summary, markdown and plot again from saved runs (keeps the JSON's command)."""
    import json

    report = json.loads(args.from_json.read_text())
    report["rows"] = summarise(report["runs"])
    report["goals"] = check_goals(report["rows"])
    if args.reading is not None:
        report["reading"] = args.reading
    write_all(args.out or args.from_json.parent, args.from_json.stem, report)


if __name__ == "__main__":
    main()
