"""Attention pattern families, as data: each module here describes one family.

A family module defines
    FAMILY      its name, as reports and `lora_pass.sites()` show it;
    NORMALISER  the `AttentionConfig` fields its normaliser sets ({} for ordinary softmax,
                {"softmax_one": True} for softmax_1);
    MASK        how its mask acts on the logits: "additive" (added, whatever its dtype) or
                "by_dtype" (a bool mask selects keys, a float mask is added: SDPA's attn_mask);
    match(node) a `lora_pass.matcher.Candidate` for the node that gives softmax(q k^T) v, or None.
`match` below asks each family in FAMILIES order and stamps the candidate with the family's
NORMALISER and MASK; the rewrite, the op and the guard read those fields and never a family name.

Adding a family:
    1. a module here with FAMILY, NORMALISER, MASK and match() (matcher.py has the helpers:
       is_call, is_method, arg, factor_value; explicit_softmax.match_chain matches the chain
       matmul -> [scale] -> [mask] -> normaliser -> [cast] -> [dropout] -> matmul for any normaliser);
    2. the module in FAMILIES below (order matters only where two families could claim the same
       node; none do today);
    3. tests: a model whose attention has the new form, compiled with the backend, with its site
       count, forward and gradients against the model compiled with backend="inductor"
       (tests/models/ has one per family); a normaliser other than softmax also needs the op's
       paths for it (a new AttentionConfig field, ops/exact.py, ops/lowrank.py, ops/naive.py).
"""

from __future__ import annotations

import dataclasses

from . import explicit_softmax, sdpa, softmax_one

FAMILIES = (sdpa, explicit_softmax, softmax_one)


def match(node):
    """The candidate of the first family that matches `node`, with the family's data, or None."""
    for family in FAMILIES:
        cand = family.match(node)
        if cand is not None:
            return dataclasses.replace(cand, normaliser=dict(family.NORMALISER), mask_kind=family.MASK)
    return None
