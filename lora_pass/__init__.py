"""lora_pass: a torch.compile backend for LoRA fine-tuning of attention.

    import lora_pass  # optional: the backend is also found through its entry point
    compiled = torch.compile(model, backend="lowrank_lora", options={"tolerance": 0.05})

Public API: `lowrank_lora` (the backend), `inspect` and its `Report`, `Options`, `records()`,
`sites()`, `telemetry()`, `reset()`, `guarded_attention` and `AttentionConfig` (the op),
`op_backend` (a torch.compile backend for functions that call the op directly), `softmax_1`
(outlier-free attention; `lora_pass.softmax_one.register_attention()` adds it to transformers),
`load_lora_checkpoint` and `checkpoint_inputs` (a local checkpoint of any supported family with
LoRA, and a batch for it), `head_bounds` (the logit bound R per layer and head).

Importing the package loads nothing else: each name is imported when first used (PEP 562), so a
user who only compiles never loads the report's networkx and tabulate, and Inductor is loaded
when a graph is compiled.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "lowrank_lora": "backend",
    "op_backend": "lowering",
    "inspect": "report",
    "Report": "report",
    "Options": "options",
    "AttentionConfig": "ops.attention",
    "guarded_attention": "ops.attention",
    "STATS_FIELDS": "ops.attention",
    "softmax_1": "softmax_one",
    "load_lora_checkpoint": "checkpoints",
    "checkpoint_inputs": "checkpoints",
    "head_bounds": "heads",
    "records": "state",
    "sites": "state",
    "telemetry": "state",
    "reset": "state",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lora_pass' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def _register_without_entry_point() -> None:
    """Register the backend now when Dynamo cannot find it through the package's entry point
    (a source tree on sys.path that is not installed); an installed package loads lora_pass.backend
    only when `backend="lowrank_lora"` is first looked up."""
    from importlib import metadata

    try:
        found = any(ep.name == "lowrank_lora" for ep in metadata.entry_points(group="torch_dynamo_backends"))
    except Exception:  # unreadable metadata: register to be safe
        found = False
    if not found:
        importlib.import_module(".backend", __name__)


_register_without_entry_point()
