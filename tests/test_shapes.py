"""Sequence lengths that change from step to step."""

from __future__ import annotations

import torch

import lora_pass
from tests.conftest import tiny_opt


def test_changing_lengths_compile_twice_and_stay_correct():
    torch._dynamo.reset()
    lora_pass.reset()
    model = tiny_opt("sdpa", bounded=(0.05, 0.05))
    compiled = torch.compile(model, backend="lowrank_lora", options={"crossover": 0})
    lengths = (16, 24, 19, 32, 13, 40)  # 19 and 13 are not multiples of anything the op uses
    with torch._dynamo.config.patch(recompile_limit=4):
        for length in lengths:
            ids = torch.randint(0, 64, (2, length), generator=torch.Generator().manual_seed(length))
            model.zero_grad(set_to_none=True)
            loss = compiled(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            model.zero_grad(set_to_none=True)
            ref = model(input_ids=ids, labels=ids, use_cache=False).loss
            ref.backward()
            # the first (static) graph runs the guarded low-rank path, later (dynamic) ones exact
            tol = 0.05 if length == lengths[0] else 1e-5
            assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
            for n, p in model.named_parameters():
                if p.requires_grad:
                    assert (got[n] - p.grad).norm() <= tol * p.grad.norm() + 1e-8, (length, n)
    records = lora_pass.records()
    assert len(records) == 2  # static, then one dynamic graph for every later length
    assert [len(r.sites) for r in records] == [2, 2]
    static, dynamic = records
    assert all(s.paths == "guarded" for s in static.sites)
    assert all(s.paths == "exact" and "dynamic" in s.decision for s in dynamic.sites)
