"""lora_pass.mask_structure: masks built from symbolic sizes, read by their structure.

Each case is a small mask builder traced by Dynamo with dynamic=True (the sizes are symbols,
as in a model compiled for changing shapes); the classifier must name causal and all-true masks
and refuse everything else, sliding windows included (a window is causal at any length shorter
than the window, which a classifier that evaluated the mask at a few sizes would miss).
"""

from __future__ import annotations

import pytest
import torch

from lora_pass.mask_structure import classify_size_only_mask


def _indices(x):
    b, length = x.shape[0], x.shape[1]
    q = torch.arange(length)[None, None, :, None]
    kv = torch.arange(length)[None, None, None, :]
    return torch.arange(b)[:, None, None, None], q, kv


def causal(x):
    _, q, kv = _indices(x)
    return (q.new_ones((), dtype=torch.bool) & (kv <= q)).expand(x.shape[0], -1, x.shape[1], x.shape[1])


def causal_strict_plus_diagonal(x):  # kv < q + 1 is kv <= q
    _, q, kv = _indices(x)
    return kv < q + 1


def causal_from_positions(x):  # GPT-2's form: positions gathered by batch and position indices
    b, q, kv = _indices(x)
    pos = (torch.arange(x.shape[1]) + 0).unsqueeze(0).expand(x.shape[0], -1)
    return pos[b, kv] <= pos[b, q]


def bidirectional(x):
    _, q, kv = _indices(x)
    return q.new_ones((), dtype=torch.bool) & (q >= 0)


def sliding_window(x):
    _, q, kv = _indices(x)
    return (kv <= q) & (kv > q - 4)


def strictly_causal(x):
    _, q, kv = _indices(x)
    return kv < q


def shifted(x):
    _, q, kv = _indices(x)
    return kv <= q + 1


def anti_causal(x):
    _, q, kv = _indices(x)
    return kv >= q


def batch_dependent(x):
    b, q, kv = _indices(x)
    return kv <= q + b


def causal_or_far_future(x):  # an OR is outside the classifier's language
    _, q, kv = _indices(x)
    return (kv <= q) | (kv >= q + 3)


CASES = {
    causal: "causal", causal_strict_plus_diagonal: "causal", causal_from_positions: "causal",
    bidirectional: "all", sliding_window: None, strictly_causal: None, shifted: None, anti_causal: None,
    batch_dependent: None, causal_or_far_future: None,
}


def _mask_node(fn):
    """The output node of `fn`'s Dynamo graph, traced with symbolic sizes."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=capture, dynamic=True, fullgraph=True)
    compiled(torch.zeros(3, 10))
    (gm,) = graphs
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    node = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    assert any(n.op == "placeholder" and isinstance(n.meta.get("example_value"), torch.SymInt)
               for n in gm.graph.nodes), "the sizes were not symbolic"
    return node


@pytest.mark.parametrize("fn", list(CASES), ids=lambda f: f.__name__)
def test_masks_are_classified_by_structure(fn):
    assert classify_size_only_mask(_mask_node(fn)) == CASES[fn]


@pytest.mark.parametrize("fn", list(CASES), ids=lambda f: f.__name__)
def test_the_classification_holds_at_every_length(fn):
    """What the classifier says of the symbolic mask is true of the mask at lengths 1 to 40."""
    kind = CASES[fn]
    for length in range(1, 41):
        m = fn(torch.zeros(2, length)).expand(2, 1, length, length)
        causal_mask = torch.ones(length, length, dtype=torch.bool).tril()
        if kind == "causal":
            assert bool((m == causal_mask).all()), length
        elif kind == "all":
            assert bool(m.all()), length
    if kind is None:  # refused: at some length the mask is neither
        assert any(not bool((fn(torch.zeros(2, n)).expand(2, 1, n, n) == torch.ones(n, n, dtype=torch.bool).tril()).all())
                   and not bool(fn(torch.zeros(2, n)).all()) for n in range(2, 41))
