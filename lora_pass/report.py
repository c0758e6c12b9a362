"""`lora_pass.inspect`: compile, run once, and report what the backend did."""

from __future__ import annotations

import json
import math
import os
import pathlib

import networkx as nx
import torch
from tabulate import tabulate

from .options import Options
from .regions import to_dot


class Report:
    """What `lowrank_lora` did to a model: rewritten sites, skipped candidates, graphs.

    Attributes:
        sites: one dict per rewritten attention (module path, pattern family, LoRA on Q/K/V with
            rank and scaling, causal/padding, heads, KV heads, head dim, feature rank k, R_max,
            R measured on this call, the path taken, and the telemetry counters).
        skipped: one dict per attention-like candidate left alone, with its reason.
        graphs: readable code: "dynamo_before", "dynamo_after" and, per AOT graph,
            "forward_before", "backward_before", "forward_after", "backward_after".
        regions: networkx graphs of the rewritten regions, one per site.
        layers: one dict per attention layer of a transformers model, in call order, measured on
            the same inputs in eager mode (lora_pass.heads): "heads" (R per query head, float64),
            "bound" (their maximum), "r_max", "margin" (bound / r_max), "heads_over" (heads above
            R_max), "tolerance_to_pass" (the smallest tolerance under which the layer passes at
            this degree; >= 1: none), "degree_to_pass" (the smallest degree that passes at this
            tolerance; None: none up to 6), and for a rewritten site its "path", the guard's
            "site_bound" and "lora_share" (the share of the composed norm bound due to LoRA).
            Empty where the model's attention does not go through transformers' AttentionInterface.
        inputs: what the tokens were (set by the command line; None otherwise).
    """

    def __init__(self, records, telemetry, layers=(), options=None, inputs=None):
        self.sites, self.skipped, self.graphs, self.regions = [], [], {}, []
        self.options, self.inputs = options, inputs
        stats_by_submodule = {site.submodule: stats for site, stats in telemetry}
        for i, record in enumerate(records):
            suffix = f"_{i}" if len(records) > 1 else ""
            self.graphs[f"dynamo_before{suffix}"] = record.graph_before
            self.graphs[f"dynamo_after{suffix}"] = record.graph_after
            for name, code in record.aot_before.items():
                self.graphs[f"{name}_before{suffix}"] = code
            for name, code in record.aot_after.items():
                self.graphs[f"{name}_after{suffix}"] = code
            self.regions += record.regions
            for site in record.sites:
                entry = site.to_dict()
                stats = stats_by_submodule.get(site.submodule)
                entry["stats"] = stats
                entry["bound"] = None if stats is None else stats["last_bound"]
                entry["path"] = _path_taken(stats)
                self.sites.append(entry)
            self.skipped += [{"module": s.module, "family": s.family, "reason": s.reason} for s in record.skipped]
        self.layers = [_layer_entry(layer, self.sites, options) for layer in layers]

    def to_dict(self) -> dict:
        return {"sites": self.sites, "skipped": self.skipped, "layers": self.layers, "inputs": self.inputs,
                "graphs": dict(self.graphs)}

    def save(self, directory) -> pathlib.Path:
        """Write sites.json, graphs/*.py, and region_<i>.graphml / .dot per site; returns the dir."""
        out = pathlib.Path(directory)
        (out / "graphs").mkdir(parents=True, exist_ok=True)
        data = {"sites": self.sites, "skipped": self.skipped, "layers": self.layers, "inputs": self.inputs}
        (out / "sites.json").write_text(json.dumps(data, indent=2, default=_json_default, allow_nan=True) + "\n")
        for name, code in self.graphs.items():
            (out / "graphs" / f"{name}.py").write_text(code)
        for i, graph in enumerate(self.regions):
            nx.write_graphml(graph, out / f"region_{i}.graphml")
            (out / f"region_{i}.dot").write_text(to_dot(graph))
        return out

    def table(self) -> str:
        rows = []
        for s in self.sites:
            adapted = ",".join(f"{n.upper()}(r={p['rank']},s={_scaling(p['scaling'])})" for n, p in s["projections"].items()
                               if p["adapted"]) or "-"
            bound = s["bound"]
            rows.append([
                s["module"], s["family"], adapted, s["mask"], s["heads"], s["kv_heads"], s["head_dim"], s["seq_len"],
                s["feature_rank"], f"{s['r_max']:.3g}", "-" if bound is None or math.isnan(bound) else f"{bound:.3g}",
                s["path"], s["paths"],
            ])
        sites = tabulate(rows, headers=["module", "family", "LoRA", "mask", "heads", "kv", "d", "L", "k", "R_max", "R",
                                        "path taken", "compiled"])
        skipped = tabulate([[s["module"], s["family"], s["reason"]] for s in self.skipped],
                           headers=["skipped module", "family", "reason"])
        text = f"{len(self.sites)} rewritten attention site(s)\n{sites}\n\n{len(self.skipped)} skipped\n{skipped}"
        if self.layers:
            text += "\n\n" + self.layer_table()
        if self.inputs:
            text += f"\n\ninputs: {self.inputs}"
        return text

    def layer_table(self) -> str:
        """Per layer: R (the largest over heads), R_max, the margin R / R_max, heads above R_max,
        the smallest tolerance and degree under which the layer passes, and LoRA's share of the
        composed norm bound."""
        opts = self.options
        rows = []
        for i, layer in enumerate(self.layers):
            worst = max(range(len(layer["heads"])), key=layer["heads"].__getitem__)
            tol, deg = layer["tolerance_to_pass"], layer["degree_to_pass"]
            share = layer["lora_share"]
            rows.append([i, layer["module"], f"{layer['bound']:.3g}", f"{layer['r_max']:.3g}", f"{layer['margin']:.3g}",
                         f"{layer['heads_over']}/{len(layer['heads'])}", worst,
                         "none" if not tol < 1 else f"{tol:.3g}", "none" if deg is None else deg,
                         "-" if share is None or math.isnan(share) else f"{share:.3f}", layer["path"]])
        table = tabulate(rows, headers=["layer", "module", "R", "R_max", "R/R_max", "heads over", "worst head",
                                        "tolerance to pass", "degree to pass", "lora_share", "path"])
        setting = "" if opts is None else f" (degree {opts.degree}, tolerance {opts.tolerance:g})"
        return f"logit bound R per layer, largest over {len(self.layers[0]['heads'])} head(s){setting}\n{table}"

    def plot(self, path) -> pathlib.Path:
        """Draw R per layer and head against R_max (log scale), with LoRA's share of the composed
        norm bound per layer beside it, to the PNG file `path`. Needs matplotlib."""
        if not self.layers:
            raise ValueError("no per-head bounds to plot: the model's attention does not go through transformers' "
                             "AttentionInterface")
        try:
            import matplotlib
        except ImportError:
            raise ImportError("--plot needs matplotlib: pip install 'lora-pass[plot]'") from None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = len(self.layers)
        fig, (ax, share_ax) = plt.subplots(1, 2, figsize=(min(4 + 0.5 * n, 16) + 4, 4.5),
                                           gridspec_kw={"width_ratios": [3, 1]})
        for i, layer in enumerate(self.layers):
            heads = layer["heads"]
            offsets = [(h - (len(heads) - 1) / 2) * 0.6 / max(len(heads), 1) for h in range(len(heads))]
            colours = ["tab:red" if r > layer["r_max"] else "tab:blue" for r in heads]
            ax.scatter([i + o for o in offsets], [max(r, 1e-12) for r in heads], c=colours, s=14)
        r_max_value = self.layers[0]["r_max"]
        ax.axhline(r_max_value, color="black", linestyle="--", label=f"R_max = {r_max_value:.3g}")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("logit bound R per head")
        ticks = range(0, n, max(1, n // 16))
        ax.set_xticks(ticks)
        ax.legend(loc="best")
        ax.set_title("R per head; a layer with a head above R_max (red) fails the guard")
        shares = [(i, layer["lora_share"]) for i, layer in enumerate(self.layers)
                  if layer["lora_share"] is not None and math.isfinite(layer["lora_share"])]
        if shares:  # layers that are not rewritten sites have no composed-norm telemetry: no bar
            share_ax.bar(*zip(*shares), color="tab:green")
        share_ax.set_ylim(0, 1)
        share_ax.set_xlim(-0.5, n - 0.5)
        share_ax.set_xlabel("layer")
        share_ax.set_title("lora_share (0: a fresh adapter)")
        share_ax.set_xticks(ticks[::2] if n > 16 else ticks)
        fig.tight_layout()
        out = pathlib.Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png", dpi=100)
        plt.close(fig)
        return out

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"Report({len(self.sites)} sites, {len(self.skipped)} skipped)"


def _layer_entry(layer: dict, sites: list, options) -> dict:
    from .guard import degree_for, tolerance_for

    opts = options or Options()
    site = next((s for s in sites if s["module"] == layer["module"]), None)
    stats = None if site is None else site["stats"]
    bound = max(layer["heads"])
    limit = site["r_max"] if site is not None else opts.r_max
    return {
        **layer,
        "bound": bound,
        "r_max": limit,
        "margin": bound / limit,
        "heads_over": sum(r > limit for r in layer["heads"]),
        "tolerance_to_pass": tolerance_for(bound, opts.degree),
        "degree_to_pass": degree_for(bound, opts.tolerance),
        "path": "not rewritten" if site is None else site["path"],
        "site_bound": None if site is None else site["bound"],
        "lora_share": None if stats is None else stats["lora_share"],
    }


def _path_taken(stats) -> str:
    if stats is None:
        return "unknown (telemetry off)"
    low, exact = stats["forward_lowrank"], stats["forward_exact"]
    if low and exact:
        return f"mixed ({int(low)} low-rank, {int(exact)} exact)"
    return "lowrank" if low else ("exact" if exact else "not run")


def _json_default(obj):
    if isinstance(obj, torch.dtype):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def inspect(model, *args, options=None, backward=True, per_head=True, **kwargs) -> Report:
    """Compile `model` with `lowrank_lora`, run it once on the inputs (and a backward pass unless
    `backward=False`), and report what the backend did. With `per_head` (default), the model also
    runs once in eager mode on the same inputs to measure R per layer and head (Report.layers).

    `model` may also be the path of a local checkpoint (a `save_pretrained` directory or a .gguf
    file): it is loaded with `lora_pass.load_lora_checkpoint` (LoRA r = 8 on q and v; load it
    yourself for other settings) and, without inputs, run on one sequence of random tokens, as
    long as the position table allows up to 512 (the report's `inputs` says so).

    Example:
        >>> report = lora_pass.inspect(peft_model, input_ids=ids, labels=ids, use_cache=False)
        >>> print(report)            # tables of rewritten sites and skipped candidates
        >>> report.save("report/")   # sites.json, graphs/*.py, region_<i>.graphml and .dot
        >>> report.plot("heads.png")  # R per layer and head against R_max
    """
    from . import backend, state

    source = None
    if isinstance(model, (str, os.PathLike)):
        from .checkpoints import checkpoint_inputs, load_lora_checkpoint

        model, info = load_lora_checkpoint(model)
        if not args and not kwargs:
            kwargs, source = checkpoint_inputs(info, batch=1, seq_len=min(512, info.max_positions or 512))
    start = len(state.records())
    compiled = torch.compile(model, backend=backend.lowrank_lora, options=options)
    with state.capturing():
        out = compiled(*args, **kwargs)
        if backward:
            _scalar_output(out).backward()
    records = state.records()[start:]
    submodules = {site.submodule for r in records for site in r.sites}
    current = [(site, stats) for site, stats in state.telemetry() if site.submodule in submodules]
    layers = []
    if per_head:
        from .heads import head_bounds

        try:
            layers = head_bounds(model, *args, **kwargs)
        except ValueError:  # attention not dispatched through transformers: no per-head picture
            layers = []
    return Report(records, current, layers=layers, options=Options.parse(options), inputs=source)


def _scalar_output(out) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    tensor = out if isinstance(out, torch.Tensor) else next(
        t for t in (out.values() if isinstance(out, dict) else out) if isinstance(t, torch.Tensor))
    return tensor.float().sum()


def _scaling(value) -> str:
    """A LoRA scaling for the table; "mixed" for adapters of different scalings on one projection,
    "symbolic" for a scaling that is a graph input (torch.compile(dynamic=True))."""
    if value is None:
        return "mixed"
    return value if isinstance(value, str) else f"{value:g}"
