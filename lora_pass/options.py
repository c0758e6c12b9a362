"""Options of the `lowrank_lora` backend, validated once per compilation."""

from __future__ import annotations

import dataclasses
import math
import numbers

from .guard import r_max

MODES = ("auto", "exact", "lowrank")


@dataclasses.dataclass(frozen=True)
class Options:
    """Parsed `torch.compile(..., backend="lowrank_lora", options={...})`.

    tolerance: largest normalised error allowed in the attention output and in dQ, dK, dV when the
        low-rank path runs (0 < tolerance < 1); it sets R_max (see docs/guard.md).
    degree: Taylor degree g >= 1 (feature rank C(d + g, g)).
    mode: "auto" (low-rank where the guard passes and the cost model says it pays),
        "exact" (always exact), "lowrank" (always low-rank; the bound is still recorded).
    require_lora: rewrite only attention with at least one LoRA-adapted projection.
    telemetry: keep per-site counters and bounds (lora_pass.sites()); False removes them.
    crossover: sequence length from which mode="auto" compiles the low-rank path; None uses the
        measured cost model (lora_pass.guard.crossover_length).
    inductor: Inductor config patches, passed through.
    """

    tolerance: float = 0.05
    degree: int = 2
    mode: str = "auto"
    require_lora: bool = True
    telemetry: bool = True
    crossover: int | None = None
    inductor: dict = dataclasses.field(default_factory=dict)

    @property
    def r_max(self) -> float:
        return r_max(self.degree, self.tolerance)

    @classmethod
    def parse(cls, options) -> "Options":
        if options is None:
            return cls()
        if isinstance(options, Options):
            return options
        if not isinstance(options, dict):
            raise ValueError(f"lowrank_lora: options must be a dict, got {type(options).__name__}")
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ValueError(
                f"lowrank_lora: unknown option(s) {unknown}; allowed options are {sorted(allowed)}"
            )
        opts = dict(options)
        _check(opts, "tolerance", lambda x: _real(x) and 0 < x < 1 and math.isfinite(x), "a float with 0 < tolerance < 1")
        _check(opts, "degree", lambda x: _int(x) and 1 <= x <= 6, "an int with 1 <= degree <= 6")
        _check(opts, "mode", lambda x: x in MODES, f"one of {list(MODES)}")
        _check(opts, "require_lora", lambda x: isinstance(x, bool), "True or False")
        _check(opts, "telemetry", lambda x: isinstance(x, bool), "True or False")
        _check(opts, "crossover", lambda x: x is None or (_int(x) and x >= 0), "None or an int >= 0")
        _check(opts, "inductor", lambda x: isinstance(x, dict), "a dict of Inductor config patches")
        if "tolerance" in opts:
            opts["tolerance"] = float(opts["tolerance"])
        return cls(**opts)


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check(opts, name, ok, allowed):
    if name in opts and not ok(opts[name]):
        raise ValueError(f"lowrank_lora: option {name!r} must be {allowed}, got {opts[name]!r}")
