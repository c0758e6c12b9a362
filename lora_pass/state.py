"""What the backend has compiled in this process: the records of its graphs, its rewritten sites
and their telemetry, and whether `lora_pass.inspect` is capturing graphs.

The backend writes this state (`add_graph`, `capturing`); the report and the package's public
functions read it through `records()`, `sites()`, `telemetry()` and `is_capturing()`.
"""

from __future__ import annotations

import contextlib

#: One GraphRecord per graph compiled by this process, oldest first.
_RECORDS: list = []
#: Site modules (lora_pass.rewrite.AttentionSite) by id, in compile order. Strong references: the
#: compiled code holds the stats buffers but not the graph module, which may be freed once
#: compiled. Every compilation adds its own (a recompile adds new modules); `reset()` drops them.
_SITE_MODULES: dict = {}
#: Depth of open `capturing()` contexts.
_CAPTURE = [0]


def add_graph(record, site_modules) -> None:
    """Record one compiled graph and its rewritten site modules (each with its `.site`)."""
    _RECORDS.append(record)
    for module in site_modules:
        _SITE_MODULES[id(module)] = module


def records() -> list:
    """GraphRecords of every graph compiled by the backend in this process (since `reset()`), oldest first."""
    return list(_RECORDS)


def sites() -> list:
    """Every site rewritten in this process (since `reset()`), in compile order."""
    return [m.site for m in _SITE_MODULES.values()]


def telemetry() -> list:
    """Per rewritten site (since `reset()`): its Site record and its counters as a dict keyed by
    `lora_pass.ops.attention.STATS_FIELDS` (one host read each), or None where it has none."""
    from .ops.attention import STATS_FIELDS

    out = []
    for module in _SITE_MODULES.values():
        stats = None if module.stats is None else dict(zip(STATS_FIELDS, module.stats.tolist()))
        out.append((module.site, stats))
    return out


def reset() -> None:
    """Forget the records of earlier compilations (the compiled models keep working)."""
    _RECORDS.clear()
    _SITE_MODULES.clear()


def is_capturing() -> bool:
    """Whether the backend should also capture the AOT graphs before and after its rewrite."""
    return _CAPTURE[0] > 0


@contextlib.contextmanager
def capturing():
    """Within this context the backend captures the graphs of what it compiles (`lora_pass.inspect`)."""
    _CAPTURE[0] += 1
    try:
        yield
    finally:
        _CAPTURE[0] -= 1
