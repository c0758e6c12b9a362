"""lora_pass: a torch.compile backend for LoRA fine-tuning of attention.

    import lora_pass  # optional: the backend is also found through its entry point
    compiled = torch.compile(model, backend="lowrank_lora", options={"tolerance": 0.05})

Public API: `lowrank_lora` (the backend), `inspect` and its `Report`, `Options`, `records()`,
`sites()`, `telemetry()`, `guarded_attention` and `AttentionConfig` (the op), `op_backend` (a
torch.compile backend for functions that call the op directly), `softmax_1`
(outlier-free attention; `lora_pass.softmax_one.register_attention()` adds it to transformers).
"""

from __future__ import annotations

from .backend import lowrank_lora, op_backend
from .ops.attention import STATS_FIELDS, AttentionConfig, guarded_attention
from .options import Options
from .report import Report, inspect
from .softmax_one import softmax_1

__all__ = ["lowrank_lora", "op_backend", "inspect", "Report", "Options", "AttentionConfig", "guarded_attention",
           "softmax_1", "records", "sites", "telemetry", "reset"]


def records():
    """GraphRecords of every graph compiled by the backend in this process, oldest first."""
    from .backend import _RECORDS

    return list(_RECORDS)


def sites():
    """Every site rewritten in this process (since `reset()`), in compile order."""
    from .backend import _SITE_MODULES

    return [m.site for m in _SITE_MODULES.values()]


def telemetry():
    """Per rewritten site (since `reset()`): its Site record and its counters (one host read each)."""
    from .backend import _SITE_MODULES

    out = []
    for module in _SITE_MODULES.values():
        stats = None if module.stats is None else dict(zip(STATS_FIELDS, module.stats.tolist()))
        out.append((module.site, stats))
    return out


def reset():
    """Forget the records of earlier compilations (the compiled models keep working)."""
    from .backend import _RECORDS, _SITE_MODULES

    _RECORDS.clear()
    _SITE_MODULES.clear()
