"""The logit bound R per attention layer and per head, measured on a model's own activations.

The guard compiled into a rewritten site computes one R per call: the maximum over batch and heads
(lora_pass.guard.norm_bound). A user deciding whether a checkpoint qualifies wants the picture
behind that number: which layers and which heads are far from R_max. `head_bounds` runs the model
once in eager mode, catches the query and key tensors that each attention layer hands to
transformers' attention function (after rotary embeddings, before the softmax; the same tensors
the backend's site receives), and computes per query head h, in float64,

    R_h = max over batch b of  scale * max_i ||q_{b,h,i}|| * max_j ||k_{b,g(h),j} - mu_{b,g(h)}||

where g(h) is the head's key/value head (grouped-query attention) and mu the mean of the keys the
mask leaves visible. The maximum of R_h over heads is the guard's R.

The probe replaces `get_interface` of transformers' shared attention registry for the duration of
one forward call (restored on exit, also on error), so every family that dispatches through it is
measured with its own attention implementation (sdpa, eager, softmax_1) and mask.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .ops.naive import key_center


def bound_per_head(query: torch.Tensor, key: torch.Tensor, *, scale: float, attention_mask=None) -> torch.Tensor:
    """R per query head, float64 [Hq], from query [B, Hq, Lq, D] and key [B, Hkv, Lk, D].

    `attention_mask`: None (all keys visible), a bool mask (True: attend) or an additive float mask
    (0: attend, a large negative number: masked), broadcastable to [B, H, Lq, Lk]; a key counts as
    visible when at least one query of its batch row may attend to it.
    """
    b, hq, _, _ = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    q, k = query.detach().double(), key.detach().double()
    valid = _visible_keys(attention_mask, b, lk, k.device)  # [B, Lk] float64 or None
    kn = torch.linalg.vector_norm(k - key_center(k, valid), dim=-1)  # [B, Hkv, Lk]
    if valid is not None:
        kn = kn * valid[:, None, :]
    kmax = kn.amax(-1).repeat_interleave(hq // hkv, dim=1)  # [B, Hq]
    qmax = torch.linalg.vector_norm(q, dim=-1).amax(-1)  # [B, Hq]
    return (scale * qmax * kmax).amax(0)


def _visible_keys(mask, batch: int, keys: int, device):
    if mask is None:
        return None
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    allowed = allowed[..., -keys:]  # some families pass a mask wider than the keys (cache slots)
    allowed = allowed.reshape(allowed.shape[0], -1, keys).any(1)  # [B or 1, Lk]
    return allowed.expand(batch, keys).to(device=device, dtype=torch.float64)


@contextlib.contextmanager
def _probe(on_call):
    """Route every attention call through `on_call(module, query, key, mask, scaling)` first."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as registry

    original = registry.get_interface

    def get_interface(attn_implementation, default):
        function = original(attn_implementation, default)

        def probed(module, query, key, value, attention_mask, *args, **kwargs):
            on_call(module, query, key, attention_mask, kwargs.get("scaling", args[0] if args else None))
            return function(module, query, key, value, attention_mask, *args, **kwargs)

        return probed

    registry.get_interface = get_interface  # an instance attribute: shadows the method
    try:
        yield
    finally:
        del registry.get_interface


def head_bounds(model: torch.nn.Module, *args, **kwargs) -> list[dict]:
    """Run `model(*args, **kwargs)` once in eager mode (no gradient) and return one dict per
    attention layer, in call order: "module" (its name in `model.named_modules()`), "heads" (R per
    query head, float64 values as Python floats), "kv_heads", "head_dim", "seq_len", "scale".

    Raises ValueError when no attention of the model dispatches through transformers'
    AttentionInterface (a model with its own attention code).
    """
    names = {id(m): n for n, m in model.named_modules()}
    layers: dict[str, dict] = {}

    def on_call(module, query, key, mask, scaling):
        d = query.shape[-1]
        scale = 1.0 / math.sqrt(d) if scaling is None else float(scaling)
        bounds = bound_per_head(query, key, scale=scale, attention_mask=mask)
        name = names.get(id(module), type(module).__name__)
        entry = layers.setdefault(name, {"module": name, "heads": None, "kv_heads": key.shape[1], "head_dim": d,
                                         "seq_len": key.shape[2], "scale": scale})
        entry["heads"] = bounds if entry["heads"] is None else torch.maximum(entry["heads"], bounds)

    with torch.no_grad(), _probe(on_call):
        model(*args, **kwargs)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no attention call went through transformers' AttentionInterface, "
                         "so its per-head bounds cannot be measured")
    return [{**e, "heads": [float(x) for x in e["heads"]]} for e in layers.values()]
