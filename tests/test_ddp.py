"""Data-parallel training with the backend: two CPU processes (gloo), DistributedDataParallel and
FSDP2, against a single-process run on the same global data.

One `torch.multiprocessing.spawn` runs every scenario (one compilation each per process) and
returns, from rank 0, the trained LoRA parameters and what the backend recorded; the tests then
compare them with three SGD steps of eager on the whole batch in this process. Each rank takes
half of every global batch of 4 sequences of SEQ tokens; with equal token counts per rank, DDP's
gradient average equals the gradient of the global mean loss. SEQ is five causal chunks of the
low-rank path (4 x 64 + 16), so every compiled graph with a site holds its chunk loops.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist

WORLD = 2
STEPS = 3
LR = 2.0  # SEQ-token sequences give small gradients: every LoRA matrix still moves by > 1e-2
GLOBAL_BATCH = 4
SEQ = 272
OPTIONS = {"crossover": 0}  # guarded sites: layer 0 takes the low-rank path, layer 1 the exact one
BOUNDED = (0.05, 40.0)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _batches():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 64, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(STEPS)]


def _train(model, call, rank=None):
    """STEPS of SGD on the LoRA parameters; with `rank`, on this rank's half of each batch.
    -> the code Inductor generated (all of it is generated in the first step)."""
    from torch._inductor.utils import run_and_get_code

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    per_rank = GLOBAL_BATCH // WORLD
    codes = []
    for ids in _batches():
        if rank is not None:
            ids = ids[rank * per_rank:(rank + 1) * per_rank]
        opt.zero_grad(set_to_none=True)

        def step(ids=ids):
            call(input_ids=ids, labels=ids, use_cache=False).loss.backward()

        if not codes:
            codes = run_and_get_code(step)[1]
        else:
            step()
        opt.step()
    return codes


def _trained(model):
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            value = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 shards are DTensors
            out[name.replace("_orig_mod.", "")] = value.detach().clone()
    return out


def _recorded(codes):
    import lora_pass

    from tests.conftest import loop_count

    records = [r for r in lora_pass.records() if r.sites or r.skipped]
    return {
        "graphs": len(records),
        "loops": [loop_count(code) for code in codes],  # per generated module, in compile order
        "sites": [(s.module, s.paths, s.decision, {n: p.adapted for n, p in s.projections.items()})
                  for r in records for s in r.sites],
        "skipped": [(s.module, s.reason) for r in records for s in r.skipped],
        "stats": [stats for _, stats in lora_pass.telemetry()],
    }


def _scenario(name, rank, mesh):
    import lora_pass
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tests.conftest import tiny_opt

    torch._dynamo.reset()
    lora_pass.reset()
    model = tiny_opt("sdpa", bounded=BOUNDED, seq=SEQ + 2)
    model.train()
    if name == "ddp":
        call = torch.compile(DDP(model), backend="lowrank_lora", options=OPTIONS)
    elif name == "ddp_split":
        # Buckets of about one LoRA matrix (512 bytes): DDPOptimizer splits the graph between
        # the LoRA projections and the attention they feed.
        first_bucket = torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
        torch.distributed._DEFAULT_FIRST_BUCKET_BYTES = 512
        try:
            call = torch.compile(DDP(model, bucket_cap_mb=1e-3), backend="lowrank_lora", options=OPTIONS)
            codes = _train(model, call, rank)
        finally:
            torch.distributed._DEFAULT_FIRST_BUCKET_BYTES = first_bucket
        return _trained(model), _recorded(codes)
    elif name.startswith("fsdp2"):
        from torch.distributed.fsdp import fully_shard

        layers = model.base_model.model.model.decoder.layers
        if name == "fsdp2_compile_first":
            for i, layer in enumerate(layers):
                layers[i] = torch.compile(layer, backend="lowrank_lora", options=OPTIONS)
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        call = model if name == "fsdp2_compile_first" else torch.compile(model, backend="lowrank_lora", options=OPTIONS)
    else:
        raise ValueError(name)
    codes = _train(model, call, rank)
    return _trained(model), _recorded(codes)


SCENARIOS = ("ddp", "ddp_split", "fsdp2", "fsdp2_compile_first")


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    results = {}
    for name in SCENARIOS:
        try:
            results[name] = _scenario(name, rank, mesh)
        except Exception:  # recorded for the test to report, the other scenarios still run
            results[name] = traceback.format_exc()[-4000:]
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.pt")
        mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
        return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def reference():
    """Eager, one process, the whole batch: the LoRA parameters after STEPS, and before."""
    from tests.conftest import tiny_opt

    model = tiny_opt("sdpa", bounded=BOUNDED, seq=SEQ + 2)
    model.train()
    initial = _trained(model)
    _train(model, model)
    return _trained(model), initial


def _result(runs, name):
    result = runs[name]
    if isinstance(result, str):
        pytest.fail(f"{name} failed in the worker:\n{result}")
    return result


def _assert_same_training(params, reference):
    expected, initial = reference
    assert params.keys() == expected.keys() and len(expected) == 8
    moved = {name: float((expected[name] - initial[name]).abs().max()) for name in expected}
    assert max(moved.values()) > 1e-2 and min(moved.values()) > 0  # the steps trained every matrix
    for name in expected:
        torch.testing.assert_close(params[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def _assert_both_paths_ran(recorded, graphs=None):
    """One site (layer 0, bounded logits) took the low-rank path on every step, the other (layer 1)
    the exact one. (Module paths are relative to the compiled frame, "self_attn" when FSDP2's
    hooks break the graph per layer, so the sites are told apart by what they did.)"""
    stats = recorded["stats"]
    assert len(stats) == 2 and not recorded["skipped"]
    lowrank = [s for s in stats if s["forward_lowrank"] == STEPS and s["backward_lowrank"] == STEPS and s["forward_exact"] == 0]
    exact = [s for s in stats if s["forward_exact"] == STEPS and s["backward_exact"] == STEPS and s["forward_lowrank"] == 0]
    assert len(lowrank) == 1 and len(exact) == 1
    if graphs is not None:
        assert recorded["graphs"] == graphs
    # each guarded site compiles its chunk loops once (three scans: one in the forward, two in the
    # backward), whichever graph, forward or backward, holds them: never unrolled
    assert sum(recorded["loops"]) == 2 * 3


def test_ddp_compiled_matches_single_process(runs, reference):
    """DDP + torch.compile(backend="lowrank_lora"), default buckets (the tiny model's LoRA
    gradients fit in one, so DDPOptimizer keeps one graph): both sites rewritten, each path
    taken where the guard says, parameters after 3 steps equal the single-process run."""
    params, recorded = _result(runs, "ddp")
    _assert_both_paths_ran(recorded, graphs=1)
    assert [paths for _, paths, _, _ in recorded["sites"]] == ["guarded", "guarded"]
    _assert_same_training(params, reference)


def test_ddp_graph_split_between_lora_and_attention_keeps_the_sites(runs, reference):
    """Buckets of one LoRA matrix make DDPOptimizer (optimize_ddp="ddp_optimizer", the default)
    split the graph into pieces compiled separately, some with an attention whose LoRA
    projections are in another piece. The backend traces the projections in the whole graph
    before the split (ddp.annotate_before_ddp_split), so both sites are still rewritten and
    record their LoRA projections; training equals the single-process run."""
    params, recorded = _result(runs, "ddp_split")
    assert recorded["graphs"] > 1  # the graph was split
    _assert_both_paths_ran(recorded)
    assert len(recorded["sites"]) == 2
    for _, paths, _, adapted in recorded["sites"]:
        assert paths == "guarded" and adapted["q"] and adapted["v"] and not adapted["k"]
    assert any("DistributedDataParallel split the graph" in decision for _, _, decision, _ in recorded["sites"])
    _assert_same_training(params, reference)


@pytest.mark.parametrize("order", ["fsdp2", "fsdp2_compile_first"], ids=["shard_then_compile", "compile_then_shard"])
def test_fsdp2_fully_shard_per_block_matches_single_process(runs, reference, order):
    """FSDP2 (fully_shard on each decoder layer and on the model) on CPU with gloo, compiled
    after sharding (Dynamo breaks the graph at FSDP's hooks: one graph per layer) or each layer
    compiled before sharding: both sites rewritten, both paths taken, parameters (gathered from
    their shards) after 3 steps equal the single-process run."""
    params, recorded = _result(runs, order)
    _assert_both_paths_ran(recorded)
    assert len(recorded["sites"]) == 2
    _assert_same_training(params, reference)
