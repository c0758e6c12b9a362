"""Chunk loops through `torch.compile(model, backend="lowrank_lora")`, default Dynamo and Inductor
settings: sequences of several chunks, for every supported family.

The low-rank path runs over chunks of 64 rows in loops (`scan`s lowered to while_loops): one in
the forward and two in the backward of a causal site, two and three of a non-causal one. Each
loop must reach the generated code as one loop, never unrolled: the code and its compile time
are then the same whatever the length. Lengths here are not multiples of the chunk (a partial
last chunk), and each case checks the loss and every LoRA gradient against a float64 eager copy,
within the guard's error bound at the R measured on the call.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import lora_pass
from lora_pass.guard import error_bounds
from tests.conftest import loop_count, rel_err, tiny_opt
from tests.models.families import causal_batch, encoder_batch, lora_grads, reference_step, step, tiny_bert, tiny_gpt2, tiny_llama

#: loops of one site: (forward, backward)
LOOPS = {True: (1, 2), False: (2, 3)}


def _opt_batch(length, batch=2, seed=1):
    ids = torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids, "use_cache": False}


CASES = {
    # case: (builder of a one-layer model with bounded logits, batch, causal, mask)
    "opt-sdpa-L300": (lambda: tiny_opt("sdpa", layers=1, bounded=(0.05,), seq=302), lambda: _opt_batch(300),
                      True, "causal"),
    "llama-sdpa-L300-padding": (lambda: tiny_llama("sdpa", layers=1, bounded=(0.02,), positions=300),
                                lambda: causal_batch(300, right_pad=(300, 211)), True, "padding"),
    "bert-sdpa-L150-padding": (lambda: tiny_bert("sdpa", layers=1, bounded=(0.05,), positions=150),
                               lambda: encoder_batch(lengths=(150, 120, 77), length=150), False, "padding"),
    "gpt2-eager-L300": (lambda: tiny_gpt2("eager", layers=1, bounded=(0.05,), positions=300),
                        lambda: causal_batch(300), True, "causal"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_chunk_loop_stays_one_loop(case):
    """Guarded site (crossover=0), bounded logits: the low-rank path runs, its loops are in the
    generated forward and backward code (as many as the op has, no more: nothing unrolled),
    and loss and gradients are within the guard's bound of float64 eager."""
    build, batch, causal, mask = CASES[case]
    model, data = build(), batch()
    ref_loss, ref_grads = reference_step(model, data)
    torch._dynamo.reset()
    lora_pass.reset()
    compiled = torch.compile(model, backend="lowrank_lora", options={"crossover": 0}, fullgraph=True)
    (loss, _), codes = run_and_get_code(lambda: step(compiled, data))
    grads = lora_grads(model)

    ((site, stats),) = lora_pass.telemetry()
    assert site.paths == "guarded" and site.causal == causal and site.mask == mask
    assert stats["forward_lowrank"] == 1 and stats["backward_lowrank"] == 1
    forward, backward = codes[0], codes[-1]
    assert (loop_count(forward), loop_count(backward)) == LOOPS[causal]
    bound = max(error_bounds(stats["last_bound"], site.degree).values())
    assert rel_err(loss, ref_loss) <= bound + 1e-5
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) <= bound + 1e-5, name


def _generated_code(model_for, data_for, length):
    """Generated code (forward, backward) of one compiled step at `length`."""
    torch._dynamo.reset()
    lora_pass.reset()
    model = model_for(length)
    compiled = torch.compile(model, backend="lowrank_lora", options={"mode": "lowrank"})
    _, codes = run_and_get_code(lambda: step(compiled, data_for(length)))
    return codes


def _without_numbers(code: str) -> str:
    """Every number replaced by '#': sizes, strides, buffer and kernel numbers, the site's hash."""
    return re.sub(r"\d+", "#", code)


SIZE_CASES = {
    "causal": (lambda n: tiny_opt("sdpa", layers=1, bounded=(0.05,), seq=n + 2), lambda n: _opt_batch(n, batch=1)),
    "non-causal": (lambda n: tiny_bert("sdpa", layers=1, bounded=(0.05,), positions=n),
                   lambda n: encoder_batch(lengths=(n, n - 100), length=n)),
}


@pytest.mark.parametrize("kind", list(SIZE_CASES))
def test_generated_code_does_not_grow_with_the_length(kind):
    """A model compiled at L = 512 (8 chunks) and at L = 2,048 (32 chunks): the same loops and the
    same code up to its constants. Inductor may vectorise a kernel's tail differently for other
    sizes (a few lines); an unrolled loop would make the code four times larger."""
    model_for, data_for = SIZE_CASES[kind]
    short, long = (_generated_code(model_for, data_for, n) for n in (512, 2048))
    assert len(short) == len(long) == 2  # forward, backward
    for a, b in zip(short, long):
        assert loop_count(a) == loop_count(b) > 0
        a, b = _without_numbers(a), _without_numbers(b)
        assert abs(len(b) - len(a)) <= 0.03 * len(a), (len(a), len(b))
