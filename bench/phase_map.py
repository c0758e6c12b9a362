"""Phase map: the low-rank attention path against exact attention over sequence length L and logit bound R.

For each L, random q, k, v (head dim d) are drawn once; for each R, q and k are scaled so that
the guard's bound `R = scale * max ||q_i|| * max ||k_j - mu||` (lora_pass.guard.norm_bound) is
exactly R. On each (L, R) the benchmark measures

* the forward + backward time of the guarded op with `paths="exact"` (fused SDPA kernels) and
  with `paths="lowrank"` (degree-g Taylor features, chunked causal scan), both compiled by
  Inductor (`--compile eager` runs them eagerly), and the speedup exact / lowrank (each path's
  time depends on L alone, so it is timed once per L; its compile time is reported per L);
* on two kinds of inputs (q and k aligned along one direction, so that the largest logit nears R;
  and i.i.d. Gaussian), the errors of the low-rank path's output and dQ, dK, dV against float64 exact attention, in
  the normalisation of `lora_pass.guard.measured_errors` (the one the guard's bound is written
  in), next to the bound `error_bounds(R, g)` and to the float32 exact path's own error (the
  float64 reference is computed REFERENCE_ROWS query rows at a time, so L = 32,768 fits);

and draws them with the guard's threshold R_max(g, tolerance): below it the low-rank path is
accurate, above it the error grows as the Taylor remainder does, which is the phase transition
of Hu et al. (ICLR 2025) in the form the backend uses it.

    python bench/phase_map.py                 # L in {1,024 .. 32,768}, R in {0.05 .. 6.4}, d = 64
    python bench/phase_map.py --quick         # L in {128, 256}, R in {0.1, 3.2}, d = 16, eager
    python bench/phase_map.py --lengths 1024 8192 --bounds 0.1 0.2 0.4 --threads 1 --clock cpu

Writes `phase_map.json`, `phase_map.md` and `phase_map.png` to --out (default bench/results/<machine>/).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py; also puts the checkout on sys.path)

DEFAULT_LENGTHS = [1024 * 2**i for i in range(6)]  # 1,024 .. 32,768: where the low-rank path pays off
REFERENCE_ROWS = 512  # query rows per block of the float64 reference (an L x L matrix does not fit at 32,768)
DEFAULT_BOUNDS = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4]
QUICK = dict(lengths=[128, 256], bounds=[0.1, 3.2], head_dim=16, repeats=1, compile="eager")
MIN_SAMPLE_S = 0.05  # a timing sample repeats short calls up to this long
GRADS = ("out", "dq", "dk", "dv")


def scaled_inputs(base: dict, target: float, scale: float):
    """q, k scaled by the same factor so that norm_bound(q, k) == target; v, dout unchanged."""
    import torch

    from lora_pass.guard import norm_bound

    r0 = float(norm_bound(base["q"], base["k"], scale=scale))
    c = math.sqrt(target / r0)  # R is bilinear in (q, k): R(cq, ck) = c^2 R(q, k)
    q = (base["q"] * c).detach().requires_grad_()
    k = (base["k"] * c).detach().requires_grad_()
    v = base["v"].detach().clone().requires_grad_()
    with torch.no_grad():
        measured = float(norm_bound(q, k, scale=scale))
    return q, k, v, measured


def reference(q, k, v, dout, *, scale: float, causal: bool) -> dict:
    """float64 exact attention and its gradients, REFERENCE_ROWS query rows at a time (each block
    an explicit softmax over every key: the same numbers as the whole L x L matrix, in memory
    O(rows x L)); dK and dV are the sums of the blocks' contributions."""
    import torch

    k64, v64 = (t.detach().double().requires_grad_() for t in (k, v))
    q64, do64 = q.detach().double(), dout.double()
    length = q.shape[-2]
    outs, dqs = [], []
    dk, dv = torch.zeros_like(k64), torch.zeros_like(v64)
    for start in range(0, length, REFERENCE_ROWS):
        stop = min(start + REFERENCE_ROWS, length)
        qb = q64[..., start:stop, :].clone().requires_grad_()
        s = scale * qb @ k64.transpose(-1, -2)
        if causal:  # row i of the block is query start + i: it sees keys 0 .. start + i
            rows = torch.arange(start, stop, device=s.device)[:, None]
            s = s.masked_fill(torch.arange(length, device=s.device)[None, :] > rows, float("-inf"))
        out = torch.softmax(s, dim=-1) @ v64
        gq, gk, gv = torch.autograd.grad(out, (qb, k64, v64), do64[..., start:stop, :])
        outs.append(out.detach())
        dqs.append(gq)
        dk += gk
        dv += gv
    return {"out": torch.cat(outs, -2), "dq": torch.cat(dqs, -2), "dk": dk, "dv": dv}


_OPS = {}  # path -> the op, opaque to Dynamo; read by the two entry points below


def _exact_entry(a, b, c):
    return _OPS["exact"](a, b, c)


def _lowrank_entry(a, b, c):
    return _OPS["lowrank"](a, b, c)


def make_path(paths: str, cfg_kw: dict, compile_mode: str, device_type: str = "cpu"):
    """fn(q, k, v) -> out through the guarded op with `paths` compiled in, eager or by Inductor
    (the low-rank path with the Inductor settings the backend adds for it on `device_type`).

    Each path gets its own entry function: Dynamo caches compiled code per code object and does
    not guard on what an allow_in_graph function captures, so one shared wrapper compiled for
    both paths would silently run the first path's graph for the second.
    """
    import torch

    from lora_pass.lowering import lowrank_inductor_defaults, op_backend
    from lora_pass.ops.attention import AttentionConfig, guarded_attention

    cfg = AttentionConfig(paths=paths, **cfg_kw)

    def op(a, b, c):
        return guarded_attention(a, b, c, cfg)

    if compile_mode == "eager":
        return op
    # Opaque to Dynamo, traced by AOTAutograd and compiled by Inductor: the route of the op
    # that the backend inserts into a Dynamo graph (as in bench/attention.py).
    _OPS[paths] = torch.compiler.allow_in_graph(op)
    entry = {"exact": _exact_entry, "lowrank": _lowrank_entry}[paths]
    settings = lowrank_inductor_defaults(device_type) if paths == "lowrank" else {}
    return torch.compile(entry, backend=op_backend(settings), fullgraph=True, dynamic=False)


def make_inputs(kind: str, shape, gen) -> dict:
    """q, k, v, dout before scaling.

    "aligned": q_i = a_i u and k_j = t_j u along one shared direction u (plus 5% noise), so the
    largest centred logit comes close to the bound R, as with the outlier features of real
    models; and v_j = t_j w (plus noise), so the output is the attention-weighted mean of the key
    coordinate, which feels any tilt of the weights (a hard case, not the worst one).
    "gaussian": i.i.d. entries; logits stay near R / sqrt(d), far inside the bound.
    """
    import torch

    dout = torch.randn(shape, generator=gen)
    if kind == "gaussian":
        q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
        return {"q": q, "k": k, "v": v, "dout": dout}
    b, h, length, d = shape

    def unit():
        u = torch.randn(b, h, 1, d, generator=gen)
        return u / torch.linalg.vector_norm(u, dim=-1, keepdim=True)

    u, w, noise = unit(), unit(), 0.05 / math.sqrt(d)
    a, t = torch.randn(b, h, length, 1, generator=gen), torch.randn(b, h, length, 1, generator=gen)
    q = a * u + noise * torch.randn(shape, generator=gen)
    k = t * u + noise * torch.randn(shape, generator=gen)
    v = t * w + noise * torch.randn(shape, generator=gen)
    return {"q": q, "k": k, "v": v, "dout": dout}


def max_logit(q, k, scale: float, causal: bool) -> float:
    """max |S_ij - shift_i| actually reached (keys centred as the guard does), for the table."""
    import torch

    from lora_pass.ops.naive import key_center

    with torch.no_grad():
        kc = (k.double() - key_center(k.double(), None)).transpose(-1, -2)
        length, largest = q.shape[-2], 0.0
        for start in range(0, length, REFERENCE_ROWS):  # REFERENCE_ROWS query rows at a time
            stop = min(start + REFERENCE_ROWS, length)
            s = scale * q[..., start:stop, :].double() @ kc
            if causal:
                rows = torch.arange(start, stop, device=s.device)[:, None]
                s = s.masked_fill(torch.arange(length, device=s.device)[None, :] > rows, 0.0)
            largest = max(largest, float(s.abs().amax()))
        return largest


def run_length(length: int, bounds: list[float], args, bar) -> tuple[list[dict], dict]:
    import torch

    from lora_pass.guard import error_bounds, measured_errors, r_max

    device = torch.device(args.device)
    scale = args.head_dim**-0.5
    rmax = r_max(args.degree, args.tolerance)
    shape = (args.batch, args.heads, length, args.head_dim)
    cfg_kw = dict(scale=scale, causal=args.causal, degree=args.degree, r_max=rmax)
    paths = {name: make_path(name, cfg_kw, args.compile, device.type) for name in ("exact", "lowrank")}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    compile_s, cells, timed = {}, [], {}
    for kind in args.inputs:
        gen = torch.Generator().manual_seed(args.seed + length)
        base = {n: t.to(device) for n, t in make_inputs(kind, shape, gen).items()}
        for target in bounds:
            q, k, v, measured = scaled_inputs(base, target, scale)
            dout = base["dout"]
            ref = reference(q, k, v, dout, scale=scale, causal=args.causal)
            cell = {"inputs": kind, "length": length, "bound": target, "measured_bound": measured,
                    "max_logit": max_logit(q, k, scale, args.causal), "guard_passes": measured <= rmax,
                    "error_bound": max(error_bounds(measured, args.degree).values())}
            for name, fn in paths.items():
                def step(fn=fn):
                    out = fn(q, k, v)
                    grads = torch.autograd.grad(out, (q, k, v), dout)
                    return out, grads

                if name not in compile_s:  # the first call compiles forward and backward
                    start = time.perf_counter()
                    step()
                    sync()
                    compile_s[name] = time.perf_counter() - start
                out, (dq, dk, dv) = step()
                errs = measured_errors({"out": out, "dq": dq, "dk": dk, "dv": dv}, ref, q, k, v, dout, scale=scale)
                cell[f"{name}_errors"] = errs
                cell[f"{name}_max_error"] = max(errs.values())
                if name not in timed:  # each path's time depends on L alone (not on R or the values): once per L
                    for _ in range(args.warmup):
                        step()
                    timed[name] = common.timed_samples(step, args.repeats, sync, clock=args.clock,
                                                       min_sample_s=MIN_SAMPLE_S)
                timing = timed[name]
                cell[f"{name}_ms"] = 1000 * timing["time_s"]
                cell[f"{name}_other_load"] = timing["other_load"]
                cell[f"{name}_contended"] = timing["contended"]
            cell["speedup"] = cell["exact_ms"] / cell["lowrank_ms"]
            cell["within_tolerance"] = cell["lowrank_max_error"] <= args.tolerance
            cells.append(cell)
            bar.update()
            bar.set_postfix_str(f"{kind} L={length} R={target}: {cell['speedup']:.2f}x, err {cell['lowrank_max_error']:.1e}")
    return cells, compile_s


# --- output ---------------------------------------------------------------------------------------


def plot(path: Path, report: dict) -> bool:
    """The phase map as a PNG; False (and a note) where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import TwoSlopeNorm
    except ImportError:
        return False
    import numpy as np

    from lora_pass.guard import error_bounds

    s = report["settings"]
    kinds = s["inputs"]
    cells = [c for c in report["cells"] if c["inputs"] == kinds[0]]  # the heatmap's input kind
    lengths, bounds = sorted({c["length"] for c in cells}), sorted({c["bound"] for c in cells})
    rmax, tol = report["r_max"], s["tolerance"]
    by = {(c["length"], c["bound"]): c for c in cells}
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1, 1.15]})

    # left: error against R, one line per L, with the written bound and the guard's threshold
    grid = np.geomspace(min(bounds) / 1.5, max(bounds) * 1.5, 200)
    ax0.axvspan(grid[0], rmax, color="tab:green", alpha=0.08, lw=0)
    bound = [max(error_bounds(r, s["degree"]).values()) for r in grid]
    ax0.plot(grid, [b if math.isfinite(b) else np.nan for b in bound], "k--", lw=1.2,
             label=f"written bound, degree {s['degree']}")
    for j, kind in enumerate(kinds):
        kb = {(c["length"], c["bound"]): c for c in report["cells"] if c["inputs"] == kind}
        for i, length in enumerate(lengths):
            xs = [b for b in bounds if (length, b) in kb]
            ax0.plot(xs, [kb[length, b]["lowrank_max_error"] for b in xs], "o-" if j == 0 else "s--", color=f"C{i}",
                     alpha=1.0 if j == 0 else 0.5, ms=5 if j == 0 else 3, label=f"low-rank, {kind}, L = {length}")
    floor = [max(c["exact_max_error"] for c in report["cells"] if c["bound"] == b) for b in bounds]
    ax0.plot(bounds, floor, ":", color="0.5", label="exact path (float32)")
    ax0.axhline(tol, color="tab:red", lw=1, label=f"tolerance {tol}")
    ax0.axvline(rmax, color="tab:green", lw=1.5, label=f"guard R_max = {rmax:.3f}")
    errs = [c[f"{p}_max_error"] for c in report["cells"] for p in ("lowrank", "exact") if c[f"{p}_max_error"] > 0]
    ax0.set_ylim(min(errs + [tol]) / 3, max(errs + [10.0]) * 3)
    ax0.set(xscale="log", yscale="log", xlabel="logit bound R", ylabel="max normalised error (out, dQ, dK, dV)",
            title="Accuracy: error of the low-rank path vs R")
    ax0.legend(fontsize=8, loc="lower right")
    ax0.grid(True, which="both", alpha=0.2)

    # right: speedup (colour) and error (text) over the grid; hatched where the error is above tolerance
    speed = np.array([[by[length, b]["speedup"] if (length, b) in by else np.nan for b in bounds] for length in lengths])
    logs = np.log2(speed)
    lim = max(1.0, float(np.nanmax(np.abs(logs))))
    im = ax1.imshow(logs, origin="lower", cmap="RdBu", norm=TwoSlopeNorm(0.0, -lim, lim), aspect="auto")
    for yi, length in enumerate(lengths):
        for xi, b in enumerate(bounds):
            c = by.get((length, b))
            if c is None:
                continue
            dark = abs(logs[yi, xi]) > 0.6 * lim
            ax1.text(xi, yi, f"{c['speedup']:.2f}x\n{c['lowrank_max_error']:.0e}", ha="center", va="center", fontsize=8,
                     color="white" if dark else "black")
            if not c["within_tolerance"]:
                ax1.add_patch(plt.Rectangle((xi - 0.5, yi - 0.5), 1, 1, fill=False, hatch="///", ec="0.35", lw=0))
    # R_max between the columns, interpolated on the log scale of R
    lb = np.log(bounds)
    xr = float(np.interp(np.log(rmax), lb, np.arange(len(bounds)))) if len(bounds) > 1 else 0.0
    if len(bounds) > 1 and bounds[0] <= rmax <= bounds[-1]:
        ax1.axvline(xr, color="tab:green", lw=2.5)
        ax1.text(xr, -0.45, f" R_max {rmax:.3f}", color="tab:green", va="bottom", ha="left", fontsize=9,
                 fontweight="bold")
    ax1.set_xticks(range(len(bounds)), [f"{b:g}" for b in bounds])
    ax1.set_yticks(range(len(lengths)), [str(length) for length in lengths])
    ax1.set(xlabel="logit bound R", ylabel="sequence length L",
            title=f"Speedup exact/low-rank (colour), max error on {kinds[0]} inputs (text)\nhatched: error above tolerance")
    fig.colorbar(im, ax=ax1, label="log2 speedup (blue: low-rank faster)")
    fig.suptitle(f"Phase map of low-rank attention: d = {s['head_dim']}, degree {s['degree']}, "
                 f"{'causal' if s['causal'] else 'non-causal'}, {s['compile']}, {report['environment']['device_name']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


HEADERS = {
    "inputs": "inputs", "length": "L", "bound": "R", "max_logit": "max |S|", "guard_passes": "guard", "exact_ms": "exact ms", "lowrank_ms": "lowrank ms",
    "speedup": "exact/lowrank", "err_out": "err out", "err_dq": "err dQ", "err_dk": "err dK", "err_dv": "err dV",
    "error_bound": "bound", "exact_max_error": "exact fp32 err",
}


def render_table(cells: list[dict], fmt: str) -> str:
    from tabulate import tabulate

    body = []
    for c in cells:
        e = c["lowrank_errors"]
        line = [c["inputs"], c["length"], f"{c['bound']:g}", f"{c['max_logit']:.3f}", "low-rank" if c["guard_passes"] else "exact",
                common.fmt(c["exact_ms"], 2), common.fmt(c["lowrank_ms"], 2), common.fmt(c["speedup"], 2),
                *(common.fmt_sci(e[g]) for g in GRADS), common.fmt_sci(c["error_bound"]), common.fmt_sci(c["exact_max_error"])]
        if c["exact_contended"] or c["lowrank_contended"]:
            line[7] = f"{line[7]}*"
        body.append(line)
    return tabulate(body, headers=list(HEADERS.values()), tablefmt=fmt, disable_numparse=True)


def headline(report: dict) -> list[str]:
    """Plain sentences: where the low-rank path is accurate, where it is faster, and both."""
    tol, rmax = report["settings"]["tolerance"], report["r_max"]
    lines = [f"* guard threshold R_max = {rmax:.4f} (degree {report['settings']['degree']}, tolerance {tol})"]
    for kind in report["settings"]["inputs"]:
        cells = [c for c in report["cells"] if c["inputs"] == kind]
        lines.append(
            f"* {kind} inputs: every cell with R <= R_max within tolerance: "
            f"{all(c['within_tolerance'] for c in cells if c['guard_passes'])}; largest R within tolerance at every L: "
            f"{max((b for b in {c['bound'] for c in cells} if all(c['within_tolerance'] for c in cells if c['bound'] == b)), default=None)}; "
            f"smallest R above tolerance: {min((c['bound'] for c in cells if not c['within_tolerance']), default=None)}; "
            f"largest error with R <= R_max: {max((c['lowrank_max_error'] for c in cells if c['guard_passes']), default=float('nan')):.1e}")
    cells = [c for c in report["cells"] if c["inputs"] == report["settings"]["inputs"][0]]
    by_length = {}
    for c in cells:
        by_length.setdefault(c["length"], []).append(c["speedup"])
    lines.append("* speedup exact/low-rank, median over R: "
                 + ", ".join(f"L={length}: {sorted(v)[len(v) // 2]:.2f}x" for length, v in sorted(by_length.items())))
    both = [c for c in cells if c["within_tolerance"] and c["guard_passes"] and c["speedup"] > 1]
    lines.append("* guard passes and low-rank faster (the regime `mode=\"auto\"` is for): "
                 + (", ".join(f"L={c['length']} R={c['bound']:g} ({c['speedup']:.2f}x)" for c in both) or "none in this grid"))
    return lines


def write_markdown(path: Path, report: dict, png: bool) -> None:
    s = report["settings"]
    lines = [
        "# Phase map: low-rank attention against exact over (L, R)",
        "",
        *common.environment_lines(report["environment"]),
        f"* B = {s['batch']}, H = {s['heads']}, d = {s['head_dim']}, degree {s['degree']}, "
        f"{'causal' if s['causal'] else 'non-causal'}, float32, "
        f"{'compiled by Inductor' if s['compile'] == 'inductor' else 'eager (not compiled)'}; "
        f"time: median of {s['repeats']} sample(s), {'CPU time, ' if s['clock'] == 'cpu' else 'wall clock, '}"
        f"{s['threads'] or report['environment']['threads']} thread(s)",
        "* compile time (first forward + backward), s: "
        + ", ".join(f"L={length}: exact {c['exact']:.1f}, lowrank {c['lowrank']:.1f}" for length, c in report["compile_s"].items()),
        "",
        *headline(report),
        "",
        "Times are forward + backward of the guarded op with `paths=\"exact\"` and `paths=\"lowrank\"`. Errors are",
        "those of `lora_pass.guard.measured_errors` against float64 exact attention (out: max row error over",
        "max ||v||; dQ, dK, dV normalised as in docs/guard.md); `bound` is `error_bounds(R, degree)`, the",
        "largest of the four; `guard` is the path the guard would pick (R <= R_max); `exact fp32 err` is the",
        "exact path's own float32 error, the floor; `max |S|` is the largest centred logit actually reached.",
        "Inputs: `aligned` puts q and k along one shared direction (plus 5% noise), so the largest logit comes",
        "close to R, as with the outlier features of real models, and v along the key coordinate, so the output",
        "is the attention-weighted mean of that coordinate and feels any tilt of the weights (a hard case, not",
        "the worst one: the bound holds for every v); `gaussian` has i.i.d. entries, whose logits stay near",
        "R / sqrt(d), well inside the bound, so its errors are far below the bound. Timing does not depend on",
        "the values, so it is taken on the first input kind only and a row's speedup differs from the other rows",
        "of the same L only by noise.",
        "",
    ]
    if png:
        lines += ["![phase map](phase_map.png)", ""]
    else:
        lines += ["(matplotlib not installed: no picture)", ""]
    lines += [render_table(report["cells"], "github"), ""]
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths (default 1024 .. 32768)")
    p.add_argument("--bounds", type=float, nargs="+", default=None, help="logit bounds R (default 0.05 .. 6.4)")
    p.add_argument("--head-dim", type=int, default=None, help="head dim d (default 64)")
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--degree", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=0.05, help="the guard's tolerance (sets R_max)")
    p.add_argument("--causal", choices=("true", "false"), default="true")
    p.add_argument("--inputs", nargs="+", choices=("aligned", "gaussian"), default=["aligned", "gaussian"],
                   help="input kinds (default both; the first is timed and drawn in the heatmap)")
    p.add_argument("--compile", choices=("inductor", "eager"), default=None, help="default inductor")
    p.add_argument("--repeats", type=int, default=None, help="timing samples per path and length (default 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this process's CPU time, robust on a shared machine; use with --threads 1")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="L in {128, 256}, R in {0.1, 3.2}, d = 16, eager, 1 repeat")
    p.add_argument("--out", type=Path, default=None, help="default bench/results/<machine>/")
    args = p.parse_args(argv)
    quick = QUICK if args.quick else {}
    args.lengths = sorted(set(args.lengths or quick.get("lengths") or DEFAULT_LENGTHS))
    args.bounds = sorted(set(args.bounds or quick.get("bounds") or DEFAULT_BOUNDS))
    args.head_dim = args.head_dim or quick.get("head_dim") or 64
    args.repeats = args.repeats or quick.get("repeats") or 3
    args.compile = args.compile or quick.get("compile") or "inductor"
    if args.quick:
        args.warmup = 0
    args.causal = args.causal == "true"
    if not 0 < args.tolerance < 1 or min(args.bounds) <= 0:
        p.error("need 0 < tolerance < 1 and positive bounds")
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch
    from tqdm import tqdm

    from lora_pass.guard import r_max

    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = args.device or common.default_device()
    out_dir = common.results_dir(args.device, args.out)
    env = common.environment(args.device)
    cells, compile_s = [], {}
    bar = tqdm(total=len(args.lengths) * len(args.bounds) * len(args.inputs), unit="cell", desc="phase map")
    for length in args.lengths:
        bar.set_description(f"L={length} (compiling)" if args.compile == "inductor" else f"L={length}")
        torch._dynamo.reset()
        got, compile_s[length] = run_length(length, args.bounds, args, bar)
        cells += got
    bar.close()
    report = {
        "benchmark": "phase_map",
        "environment": env,
        **{k: env[k] for k in ("command", "date", "torch", "python", "device", "device_name", "threads")},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "r_max": r_max(args.degree, args.tolerance),
        "compile_s": compile_s,
        "cells": cells,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(out_dir / "phase_map.png", report)
    report["png"] = "phase_map.png" if png else None
    common.write_json(out_dir / "phase_map.json", report)
    write_markdown(out_dir / "phase_map.md", report, png)
    print(render_table(cells, "simple"))
    print("\n".join(headline(report)))
    print(f"wrote {out_dir / 'phase_map.json'}, {out_dir / 'phase_map.md'}" + (f" and {out_dir / 'phase_map.png'}" if png else ""))


if __name__ == "__main__":
    main()
