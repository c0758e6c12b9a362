"""matmul(q, k^T) * scale [+ mask] -> softmax_1(-1) [-> .to] [-> dropout] -> matmul(., v).

Outlier-free attention (lora_pass.softmax_one): the explicit chain of `explicit_softmax` with
`torch.ops.lora_pass.softmax_1` as the normaliser. NORMALISER sets
`AttentionConfig(softmax_one=True)`: the extra 1 of the denominator is a null key of logit 0.
"""

from __future__ import annotations

import torch

import lora_pass.softmax_one  # noqa: F401  (defines the op)
from lora_pass.matcher import arg, is_call

from .explicit_softmax import match_chain

FAMILY = "softmax_1"
NORMALISER = {"softmax_one": True}  # softmax_1: e^{s_ij} / (1 + sum_l e^{s_il})
MASK = "additive"
TARGETS = {torch.ops.lora_pass.softmax_1, torch.ops.lora_pass.softmax_1.default}


def _is_softmax_one(node) -> bool:
    return is_call(node, TARGETS) and arg(node, 1, "dim", -1) in (-1, 3)


def match(node):
    return match_chain(node, _is_softmax_one, FAMILY)
