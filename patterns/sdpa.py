"""F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)."""

from __future__ import annotations

import torch

from lora_pass.matcher import Candidate, arg, is_call

FAMILY = "sdpa"
NORMALISER = {}  # ordinary softmax
MASK = "by_dtype"  # a bool attn_mask selects keys, a float one is added to the logits
TARGETS = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}


def match(node) -> Candidate | None:
    if not is_call(node, TARGETS):
        return None
    q, k, v = (arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
    mask = arg(node, 3, "attn_mask")
    dropout = arg(node, 4, "dropout_p", 0.0)
    causal = arg(node, 5, "is_causal", False)
    scale = arg(node, 6, "scale")
    reason = None
    if not isinstance(dropout, (int, float)) or dropout != 0.0:
        reason = f"attention dropout (dropout_p={dropout})"
    elif not isinstance(causal, bool):
        reason = "is_causal is not a Python bool"
    elif scale is not None and not isinstance(scale, (int, float)):
        reason = "scale is not a Python number"
    return Candidate(FAMILY, node, q, k, v, scale, bool(causal) if isinstance(causal, bool) else False,
                     mask, [node], reason)
