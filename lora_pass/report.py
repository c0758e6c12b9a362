"""`lora_pass.inspect`: compile, run once, and report what the backend did."""

from __future__ import annotations

import json
import math
import pathlib

import networkx as nx
import torch
from tabulate import tabulate

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
    """

    def __init__(self, records, telemetry):
        self.sites, self.skipped, self.graphs, self.regions = [], [], {}, []
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

    def to_dict(self) -> dict:
        return {"sites": self.sites, "skipped": self.skipped, "graphs": dict(self.graphs)}

    def save(self, directory) -> pathlib.Path:
        """Write sites.json, graphs/*.py, and region_<i>.graphml / .dot per site; returns the dir."""
        out = pathlib.Path(directory)
        (out / "graphs").mkdir(parents=True, exist_ok=True)
        data = {"sites": self.sites, "skipped": self.skipped}
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
        return f"{len(self.sites)} rewritten attention site(s)\n{sites}\n\n{len(self.skipped)} skipped\n{skipped}"

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"Report({len(self.sites)} sites, {len(self.skipped)} skipped)"


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


def inspect(model, *args, options=None, backward=True, **kwargs) -> Report:
    """Compile `model` with `lowrank_lora`, run it once on the inputs (and a backward pass unless
    `backward=False`), and report what the backend did.

    Example:
        >>> report = lora_pass.inspect(peft_model, input_ids=ids, labels=ids, use_cache=False)
        >>> print(report)            # tables of rewritten sites and skipped candidates
        >>> report.save("report/")   # sites.json, graphs/*.py, region_<i>.graphml and .dot
    """
    from . import backend, state

    start = len(state.records())
    compiled = torch.compile(model, backend=backend.lowrank_lora, options=options)
    with state.capturing():
        out = compiled(*args, **kwargs)
        if backward:
            _scalar_output(out).backward()
    records = state.records()[start:]
    submodules = {site.submodule for r in records for site in r.sites}
    current = [(site, stats) for site, stats in state.telemetry() if site.submodule in submodules]
    return Report(records, current)


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
