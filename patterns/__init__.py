"""Attention pattern families. Each module exposes FAMILY and `match(node) -> Candidate | None`.

A new family is one new file here and one line in FAMILIES. The order matters only where two
families could claim the same node; none do today.
"""

from . import explicit_softmax, sdpa, softmax_one

FAMILIES = (sdpa, explicit_softmax, softmax_one)
