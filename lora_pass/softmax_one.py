"""Outlier-free attention: softmax_1 and a transformers attention implementation that uses it.

    softmax_1(x)_i = exp(x_i) / (1 + sum_j exp(x_j))

(Hu et al. 2024, "Outlier-efficient Hopfield layers"): softmax with an extra logit fixed at 0,
so a head can put its weight on "nothing". `softmax_1` is the op `torch.ops.lora_pass.softmax_1`,
CompositeImplicitAutograd: Dynamo keeps it as one node (the `softmax_1` pattern family matches
it), AOTAutograd decomposes it into plain ops that Inductor fuses where it is not rewritten.

`register_attention()` makes `attn_implementation="softmax1"` available to every transformers
model that dispatches through `AttentionInterface` (OPT, LLaMA, ...):

    from lora_pass.softmax_one import register_attention
    register_attention()
    model = OPTForCausalLM(OPTConfig(..., attn_implementation="softmax1"))
"""

from __future__ import annotations

import torch

ATTN_IMPLEMENTATION = "softmax1"

_lib = torch.library.Library("lora_pass", "FRAGMENT")
_lib.define("softmax_1(Tensor x, int dim=-1) -> Tensor")


def _softmax_1_impl(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    # shift by max(max_j x_j, 0): the implicit extra logit 0 takes part in the maximum
    m = x.detach().amax(dim, keepdim=True).clamp_min(0)
    e = torch.exp(x - m)
    return e / (torch.exp(-m) + e.sum(dim, keepdim=True))


_lib.impl("softmax_1", _softmax_1_impl, "CompositeImplicitAutograd")


def softmax_1(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(x_i) / (1 + sum_j exp(x_j)) along `dim`; rows of -inf give zeros.

    Example:
        >>> softmax_1(torch.zeros(3))  # each 1 / (1 + 3)
        tensor([0.2500, 0.2500, 0.2500])
    """
    return torch.ops.lora_pass.softmax_1(x, dim)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, Hkv * groups, L, D] (the form of transformers' repeat_kv)."""
    if groups == 1:
        return x
    b, h, length, d = x.shape
    return x[:, :, None, :, :].expand(b, h, groups, length, d).reshape(b, h * groups, length, d)


def softmax1_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function: the `eager` implementation with softmax_1.

    Same contract as transformers' eager attention: q [B, H, L, D], k and v [B, Hkv, L, D], an
    additive float mask [B, 1, Lq, Lk] (or None); returns ([B, L, H, D], the attention weights).
    """
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = softmax_1(weights.float(), dim=-1).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value)
    return out.transpose(1, 2).contiguous(), weights


def register_attention(name: str = ATTN_IMPLEMENTATION) -> str:
    """Register softmax_1 attention with transformers as `attn_implementation=name` (idempotent).

    Its mask is the eager one (additive float). Returns the name.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(name, softmax1_attention_forward)
    AttentionMaskInterface.register(name, eager_mask)
    return name
