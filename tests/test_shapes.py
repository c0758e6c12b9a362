"""Sequence lengths that change from step to step."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lora_pass
from tests.conftest import lora_block, tiny_opt


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
            # both graphs, the static first one and the dynamic one, run the guarded low-rank path
            tol = 0.05
            assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
            for n, p in model.named_parameters():
                if p.requires_grad:
                    assert (got[n] - p.grad).norm() <= tol * p.grad.norm() + 1e-8, (length, n)
    records = lora_pass.records()
    assert len(records) == 2  # static, then one dynamic graph for every later length
    assert [len(r.sites) for r in records] == [2, 2]
    static, dynamic = records
    assert all(s.paths == "guarded" for s in static.sites)
    assert all(s.paths == "guarded" and "symbolic L" in s.decision and isinstance(s.seq_len, str)
               for s in dynamic.sites)
    stats = [s for _, s in lora_pass.telemetry()]
    assert [s["forward_lowrank"] for s in stats] == [1, 1, len(lengths) - 1, len(lengths) - 1]


def _step_and_reference(model, compiled, ids):
    """(compiled loss, grads), (eager loss, grads) on the same batch."""
    from tests.conftest import loss_and_grads

    loss, _, grads = loss_and_grads(model, compiled, ids)
    ref_loss, _, ref_grads = loss_and_grads(model, model, ids)
    return (loss, grads), (ref_loss, ref_grads)


DYNAMIC_SHAPES = [(2, 16), (2, 23), (3, 9), (2, 40), (3, 2), (2, 31)]


def _run_dynamic(specialize_float):
    """torch.compile(dynamic=True) over DYNAMIC_SHAPES (lengths 2..40, none a multiple of anything
    the op uses; sizes 0 and 1 are left out: Dynamo specialises them even with dynamic=True),
    every step checked against eager; a second compilation would fail. -> the records."""
    from tests.conftest import CountingBackend, assert_grads_close

    torch._dynamo.reset()
    lora_pass.reset()
    model = tiny_opt("sdpa", bounded=(0.05, 0.05))
    counter = CountingBackend({"crossover": 0})
    compiled = torch.compile(model, backend=counter, dynamic=True)
    patch = dict(recompile_limit=1, fail_on_recompile_limit_hit=True, specialize_float=specialize_float)
    with torch._dynamo.config.patch(**patch):
        for batch, length in DYNAMIC_SHAPES:
            ids = torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(batch * 100 + length))
            (loss, grads), (ref_loss, ref_grads) = _step_and_reference(model, compiled, ids)
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
            assert_grads_close(grads, ref_grads)
    assert len(counter.compiled_graphs()) == 1
    return [r for r in lora_pass.records() if r.sites or r.skipped]


def _assert_rewritten_dynamic(records):
    (record,) = records
    assert len(record.sites) == 2 and not record.skipped
    for site in record.sites:
        # one graph for every length: the guard (and L >= crossover, 0 here) decides per call
        assert site.paths == "guarded" and "symbolic L" in site.decision and site.min_length == 0
        assert isinstance(site.seq_len, str) and isinstance(site.batch, str)  # symbolic sizes
        assert site.projections["q"].adapted and site.projections["v"].adapted
    stats = [s for _, s in lora_pass.telemetry()]
    assert [s["forward_lowrank"] for s in stats] == [len(DYNAMIC_SHAPES)] * 2
    assert [s["backward_lowrank"] for s in stats] == [len(DYNAMIC_SHAPES)] * 2
    assert all(s["forward_exact"] == 0 for s in stats)


@pytest.fixture(scope="module")
def dynamic_default_records():
    return _run_dynamic(specialize_float=False)


def test_dynamic_true_rewrites_every_site(dynamic_default_records):
    """Default Dynamo settings: one graph, every step equal to eager (the low-rank path, within
    float32 rounding at these bounded logits), both sites rewritten and guarded for a symbolic
    batch and length. With dynamic=True Dynamo also turns Python floats into graph
    inputs (specialize_float=False), LoRA's `scaling` and OPT's query scaling among them: the
    matcher takes them as symbolic factors and records them as such."""
    _assert_rewritten_dynamic(dynamic_default_records)
    for site in dynamic_default_records[0].sites:
        q, v = site.projections["q"], site.projections["v"]
        assert q.scaling == v.scaling == "symbolic" and q.post_scale == "symbolic" and v.post_scale == 1.0
    # the report names them; the composed-norm telemetry, which needs their values, is not traced
    report = lora_pass.Report(dynamic_default_records, lora_pass.telemetry())
    assert "Q(r=4,s=symbolic)" in report.table() and "V(r=4,s=symbolic)" in report.table()
    assert json.loads(json.dumps(report.to_dict(), allow_nan=True))["sites"][0]["projections"]["q"]["scaling"] == "symbolic"
    for site in report.sites:
        assert math.isnan(site["stats"]["composed_bound"]) and site["stats"]["last_bound"] > 0


def test_dynamic_true_with_specialized_floats_rewrites_every_site():
    """torch._dynamo.config.specialize_float = True keeps the LoRA scalings constants: one graph,
    both sites rewritten and guarded for a symbolic length, equal to eager."""
    records = _run_dynamic(specialize_float=True)
    _assert_rewritten_dynamic(records)
    for site in records[0].sites:
        q, v = site.projections["q"], site.projections["v"]
        assert q.scaling == v.scaling == 2.0 and q.post_scale == pytest.approx(16 ** -0.5) and v.post_scale == 1.0


def test_lengths_across_chunk_boundaries_compile_at_most_twice():
    """A first length of 300 (five chunks of the low-rank scan, 4 x 64 + 44) compiles a static graph
    that runs the low-rank path (mode="lowrank": only that path is compiled); every later length,
    above, below or across the chunk size, runs one dynamic graph, on the low-rank path too (its
    chunk count a symbolic trip count). Every step is within the guard's bound of eager. Dynamo's
    recompile limit is set to 2 and made an error, so a third compilation would fail the test."""
    from lora_pass.guard import error_bounds
    from lora_pass.ops.lowrank import chunk_size
    from tests.conftest import CountingBackend, rel_err

    torch._dynamo.reset()
    lora_pass.reset()
    first = 300
    assert first % chunk_size(first, causal=True) != 0  # the last chunk is a partial one
    model = tiny_opt("sdpa", layers=1, bounded=(0.05,), seq=first + 2)
    counter = CountingBackend({"mode": "lowrank"})
    compiled = torch.compile(model, backend=counter)
    lengths = (first, 272, 257, 19, first, 64)
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        for i, length in enumerate(lengths):
            ids = torch.randint(0, 64, (1, length), generator=torch.Generator().manual_seed(length + i))
            (loss, grads), (ref_loss, ref_grads) = _step_and_reference(model, compiled, ids)
            # every graph runs the low-rank path: its error is within the guard's bound at the
            # measured R (under 1e-4 here), plus float32 rounding
            site, stats = lora_pass.telemetry()[-1]
            assert site.paths == "lowrank" and stats["forward_lowrank"] == stats["backward_lowrank"] == (1 if i == 0 else i)
            bound = max(error_bounds(stats["last_bound"], site.degree).values())
            assert bound < 1e-4
            assert rel_err(loss, ref_loss) <= bound + 1e-5
            for name in ref_grads:
                assert rel_err(grads[name], ref_grads[name]) <= bound + 1e-5, name
    assert len(counter.compiled_graphs()) == 2
    static, dynamic = [r for r in lora_pass.records() if r.sites or r.skipped]
    assert [s.paths for s in static.sites] == ["lowrank"] and static.sites[0].seq_len == first
    assert [s.paths for s in dynamic.sites] == ["lowrank"] and isinstance(dynamic.sites[0].seq_len, str)


class ExplicitScaledAttention(torch.nn.Module):
    """Eager-style attention whose logit scale is a Python float attribute: Dynamo makes it a
    graph input where floats are unspecialized (dynamic=True, or after the value changed)."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads, self.scaling = heads, (d // heads) ** -0.5
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(d, d) for _ in range(3))

    def forward(self, x, mask):
        b, length, d = x.shape
        shape = (b, length, self.heads, d // self.heads)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        logits = torch.matmul(q, k.transpose(2, 3)) * self.scaling + mask
        return torch.matmul(logits.softmax(-1), v).transpose(1, 2).reshape(b, length, d)


def _block_step(block, call, length, seed):
    """Output and every gradient (x and the LoRA weights) of one padded batch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, length, 16, generator=g).requires_grad_()
    mask = torch.zeros(2, 1, 1, length)
    mask[0, ..., length - 2:] = float("-inf")  # key padding: a runtime per-key factor
    block.zero_grad(set_to_none=True)
    out = call(x, mask)
    out.backward(torch.randn(out.shape, generator=g))
    grads = {"x": x.grad, **{n: p.grad for n, p in block.named_parameters() if p.requires_grad}}
    return out.detach(), grads


def test_symbolic_softmax_scale_under_dynamic_true_is_applied_to_q():
    """dynamic=True: the explicit chain's `* self.scaling` is a symbolic factor. The site is
    rewritten (guarded for a symbolic length; these lengths are below the cost model's crossover,
    so every call takes the exact branch), the factor multiplies q in the rewritten graph and the
    op runs with scale 1; one graph for every length, forward and every gradient equal to eager."""
    from lora_pass.guard import crossover_length
    from tests.conftest import CountingBackend, assert_grads_close

    torch._dynamo.reset()
    lora_pass.reset()
    block = lora_block(ExplicitScaledAttention)
    counter = CountingBackend({})
    compiled = torch.compile(block, backend=counter, dynamic=True)
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for length in (8, 11, 5, 19):
            out, grads = _block_step(block, compiled, length, seed=length)
            ref, ref_grads = _block_step(block, block, length, seed=length)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
            assert_grads_close(grads, ref_grads)
    assert len(counter.compiled_graphs()) == 1
    ((record,),) = [[r for r in lora_pass.records() if r.sites]]
    (site,) = record.sites
    assert site.scale == "symbolic" and site.paths == "guarded" and site.mask == "padding" and not record.skipped
    assert site.min_length == crossover_length(site.head_dim, site.degree, "cpu", causal=False) > 19
    code = record.graph_after.splitlines()
    (call,) = [line for line in code if "= self.lowrank_lora_site_0" in line]
    q_arg = call.split("(", 1)[1].split(",")[0]
    (q_def,) = [line.split(";")[0].strip() for line in code if line.strip().startswith(f"{q_arg} = ")]
    assert q_def.startswith(f"{q_arg} = q * item"), q_def  # q times the factor
    ((_, stats),) = lora_pass.telemetry()
    assert stats["forward_exact"] == stats["backward_exact"] == 4 and stats["forward_lowrank"] == 0
    assert math.isnan(stats["composed_bound"])


def test_changed_float_scale_recompiles_symbolic_and_runs_the_lowrank_path():
    """Static shapes, a logit scale that changes between calls: Dynamo recompiles once with the
    scale as a graph input (automatic dynamic). The low-rank path then runs on q times the
    factor with scale 1: equal, within float32 rounding, to a graph compiled with that scale as a
    constant, and within the guard's bound of eager, forward and every gradient."""
    from lora_pass.guard import error_bounds
    from tests.conftest import assert_grads_close, rel_err

    torch._dynamo.reset()
    lora_pass.reset()
    block = lora_block(ExplicitScaledAttention)
    compiled = torch.compile(block, backend="lowrank_lora", options={"mode": "lowrank"})
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        for scaling in (0.3, 0.2, 0.1):  # 0.3 constant, then one graph for 0.2 and 0.1
            block.scaling = scaling
            out, grads = _block_step(block, compiled, 8, seed=int(scaling * 10))
    records = [r for r in lora_pass.records() if r.sites]
    assert [s.scale for r in records for s in r.sites] == [pytest.approx(0.3), "symbolic"]
    assert all(s.paths == "lowrank" for r in records for s in r.sites)
    ((_, first), (_, symbolic)) = lora_pass.telemetry()
    assert first["forward_lowrank"] == 1 and symbolic["forward_lowrank"] == symbolic["backward_lowrank"] == 2
    bound = max(error_bounds(symbolic["last_bound"], 2).values())
    assert bound < 1e-3
    # the last call (scaling 0.1) against a graph with 0.1 as a constant, and against eager
    torch._dynamo.reset()
    constant = torch.compile(block, backend="lowrank_lora", options={"mode": "lowrank"})
    const_out, const_grads = _block_step(block, constant, 8, seed=1)
    assert [s.scale for s in lora_pass.records()[-1].sites] == [pytest.approx(0.1)]
    torch.testing.assert_close(out, const_out, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, const_grads)
    ref, ref_grads = _block_step(block, block, 8, seed=1)
    assert rel_err(out, ref) <= bound + 1e-5
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) <= bound + 1e-5, name


def test_masks_built_from_symbolic_sizes_are_classified_by_their_structure():
    """dynamic=True on Llama's eager attention: the causal mask is computed from the symbolic
    length (`kv_idx <= q_idx` of two aranges), which the matcher reads as causal
    (lora_pass.mask_structure); both sites are rewritten for a symbolic length, and the step
    equals eager."""
    from tests.conftest import CountingBackend, assert_grads_close
    from tests.models.families import causal_batch, lora_grads, step, tiny_llama

    torch._dynamo.reset()
    lora_pass.reset()
    model = tiny_llama("eager", bounded=(0.05, 0.05))
    counter = CountingBackend({"crossover": 0})
    compiled = torch.compile(model, backend=counter, dynamic=True)
    batch = causal_batch()
    loss, grads = step(compiled, batch)[0], lora_grads(model)  # the wrapper names them _orig_mod.*
    ref_loss, ref_grads = step(model, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads)
    (record,) = [r for r in lora_pass.records() if r.sites or r.skipped]
    assert len(record.sites) == 2 and not record.skipped
    assert all(s.mask == "causal" and s.causal and isinstance(s.seq_len, str) for s in record.sites)
    assert all(stats["forward_lowrank"] == 1 for _, stats in lora_pass.telemetry())


def _within_bound(got, ref):
    """Loss and every gradient of `got` within the guard's error bound (at the largest R the live
    sites measured) of `ref`, plus float32 rounding."""
    from lora_pass.guard import error_bounds
    from tests.conftest import rel_err

    (loss, grads), (ref_loss, ref_grads) = got, ref
    r = max(stats["max_bound"] for _, stats in lora_pass.telemetry())
    bound = max(error_bounds(r, 2).values())
    assert rel_err(loss, ref_loss) <= bound + 1e-5
    assert grads.keys() == ref_grads.keys() and grads
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) <= bound + 1e-5, name


def test_two_families_in_one_process_keep_all_their_sites():
    """A LLaMA and then a BERT compiled in one process, each for two lengths (Dynamo's automatic
    dynamic shapes compile the second one with a symbolic length, and the masking code they share
    with symbolic sizes): every graph keeps both of its sites, guarded, with its mask classified
    (causal + padding, padding), and every step takes the low-rank path within the guard's bound."""
    from tests.models.families import causal_batch, encoder_batch, lora_grads, step, tiny_bert, tiny_llama

    torch._dynamo.reset()
    lora_pass.reset()
    runs = (
        ("llama", tiny_llama("sdpa", targets=("q_proj", "v_proj"), bounded=(0.02, 0.02)),
         [causal_batch(16, right_pad=(16, 11)), causal_batch(40, right_pad=(40, 29), seed=2)]),
        ("bert", tiny_bert("sdpa", targets=("query", "value"), bounded=(0.05, 0.05)),
         [encoder_batch(), encoder_batch(lengths=(24, 20, 9), length=24, seed=2)]),
    )
    for name, model, batches in runs:
        compiled = torch.compile(model, backend="lowrank_lora", options={"crossover": 0})
        for data in batches:
            got = step(compiled, data)[0], lora_grads(model)
            _within_bound(got, step(model, data))
    records = [r for r in lora_pass.records() if r.sites or r.skipped]
    assert not any(r.skipped for r in records) and all(len(r.sites) == 2 for r in records)
    assert all(s.paths == "guarded" and s.mask == "padding" for r in records for s in r.sites)
    llama = [r for r in records if r.sites[0].causal]
    bert = [r for r in records if not r.sites[0].causal]
    # LLaMA: static, then symbolic. Both models run PeftModel.forward, whose automatic-dynamic
    # state Dynamo keeps per code object: the BERT is compiled for a symbolic length at once.
    assert [isinstance(r.sites[0].seq_len, str) for r in llama] == [False, True]
    assert bert and all(isinstance(r.sites[0].seq_len, str) for r in bert)
    for causal in (True, False):  # two steps of two layers on the low-rank path, none exact
        stats = [st for site, st in lora_pass.telemetry() if site.causal == causal]
        assert sum(st["forward_lowrank"] for st in stats) == sum(st["backward_lowrank"] for st in stats) == 4
        assert sum(st["forward_exact"] for st in stats) == 0


@pytest.mark.parametrize("change", ["batch", "length"])
def test_batch_or_length_changes_across_chunks_keep_the_guarded_sites(change):
    """Guarded sites (crossover=0) through a run whose batch, or length, changes (lengths across the
    chunk boundaries of the low-rank loops: 300 = 4 x 64 + 44 rows, 257, 64, 130): at most two
    compilations (a static graph, then one with a symbolic batch or length), every step on the
    low-rank path within the guard's bound of eager, forward and every gradient. (Dynamo makes
    symbolic only the sizes that changed, so a run that changes the batch and later the length
    compiles a third graph, with or without this backend.)"""
    from tests.conftest import CountingBackend, loss_and_grads

    torch._dynamo.reset()
    lora_pass.reset()
    model = tiny_opt("sdpa", layers=1, bounded=(0.05,), seq=302)
    counter = CountingBackend({"crossover": 0})
    compiled = torch.compile(model, backend=counter)
    shapes = {"batch": ((2, 300), (3, 300), (4, 300), (2, 300)),
              "length": ((2, 300), (2, 257), (2, 64), (2, 130), (2, 300))}[change]
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        for i, (batch, length) in enumerate(shapes):
            ids = torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(i))
            loss, _, grads = loss_and_grads(model, compiled, ids)
            ref_loss, _, ref_grads = loss_and_grads(model, model, ids)
            _within_bound((loss, grads), (ref_loss, ref_grads))
    assert len(counter.compiled_graphs()) == 2
    static, dynamic = [r for r in lora_pass.records() if r.sites]
    assert static.sites[0].seq_len == 300 and static.sites[0].batch == 2
    symbolic = dynamic.sites[0].batch if change == "batch" else dynamic.sites[0].seq_len
    assert isinstance(symbolic, str)
    assert all(r.sites[0].paths == "guarded" for r in (static, dynamic))
    (_, first), (_, second) = lora_pass.telemetry()
    # the last shape is the first one again, which the newer, symbolic graph serves (Dynamo tries it first)
    assert first["forward_lowrank"] == 1 and second["forward_lowrank"] == second["backward_lowrank"] == len(shapes) - 1
