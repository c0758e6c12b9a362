"""matmul(q, k^T) [* scale | / scale] [+ mask] -> softmax(-1) [-> .to] [-> dropout] -> matmul(., v).

Hugging Face's `eager` attention (OPT, BERT, LLaMA): float32 softmax, additive finfo.min mask.
Every intermediate must feed only the next step: another consumer (returned attention weights,
a hook) would need the L x L matrix that the low-rank path never forms.
"""

from __future__ import annotations

import operator

import torch

from lora_pass.matcher import SYMBOLIC, Candidate, arg, factor_value, is_call, is_method

FAMILY = "explicit_softmax"
NORMALISER = {}  # ordinary softmax
MASK = "additive"  # the mask is added to the logits, whatever its dtype
MATMUL = {torch.matmul, operator.matmul}
SOFTMAX = {torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax}


def _only_user(node, user) -> bool:
    return list(node.users) == [user]


def _transposed_last(node):
    """k from k.transpose(-1, -2) / k.transpose(2, 3) / torch.transpose(k, ...), else None."""
    if is_method(node, {"transpose"}) or is_call(node, {torch.transpose}):
        dims = sorted(d % 4 for d in node.args[1:3]) if all(isinstance(d, int) for d in node.args[1:3]) else None
        if dims == [2, 3]:
            return node.args[0]
    return None


def _is_softmax(node) -> bool:
    return (is_call(node, SOFTMAX) or is_method(node, {"softmax"})) and arg(node, 1, "dim") in (-1, 3)


def match(node) -> Candidate | None:
    return match_chain(node, _is_softmax, FAMILY)


def match_chain(node, is_normaliser, family: str) -> Candidate | None:
    """The chain above with the normaliser recognised by `is_normaliser` (softmax or softmax_1)."""
    if not is_call(node, MATMUL):
        return None
    probs, v = node.args[0], node.args[1]
    chain = [node]
    reason = None
    p = probs
    if is_call(p, {torch.nn.functional.dropout}) or is_method(p, {"dropout"}):
        rate, training = arg(p, 1, "p", 0.5), arg(p, 2, "training", True)
        if rate != 0.0 and training:
            reason = f"attention dropout in training (p={rate})"
        chain.append(p)
        p = p.args[0]
    if is_method(p, {"to", "float", "type_as", "type"}):
        chain.append(p)
        p = p.args[0]
    if not is_normaliser(p):
        return None
    chain.append(p)
    s = p.args[0]
    if is_method(s, {"float", "to"}):  # logits cast to float32 before the normaliser
        chain.append(s)
        s = s.args[0]
    mask = None
    if is_call(s, {operator.add, torch.add}) and isinstance(s.args[1], torch.fx.Node):
        chain.append(s)
        s, mask = s.args[0], s.args[1]
    scale, symbolic_scale = 1.0, None
    if is_call(s, {operator.mul, torch.mul, operator.truediv}) and (factor := factor_value(s.args[1])) is not None:
        chain.append(s)
        divide = s.target is operator.truediv
        if factor == SYMBOLIC:  # a Python float Dynamo left unspecialized
            symbolic_scale = (s.args[1], divide)  # applied to q by the rewrite
        else:
            scale = 1.0 / factor if divide else factor
        s = s.args[0]
    if not is_call(s, MATMUL):
        return None
    q, kt = s.args
    k = _transposed_last(kt)
    if k is None:
        return None
    chain += [s, kt]
    for prev, user in zip(chain[1:], chain[:-1]):
        if not _only_user(prev, user):
            reason = reason or f"intermediate {prev.name} has another consumer"
    return Candidate(family, node, q, k, v, scale, False, mask, chain, reason, symbolic_scale=symbolic_scale)
