"""The backend in real training setups: mixed precision, activation checkpointing, LoRA variants
and bad input. Every case compares with eager (or, where eager's random numbers differ, with
Inductor) and asserts what the backend recorded.

Models are tiny OPTs (tests/conftest.py): `bounded=(0.05, ...)` puts a layer's attention logits
in the bounded regime (R around 0.003, where the low-rank path's error bound is below 1e-7),
40.0 puts it far outside (R over 100: the guard takes the exact path). `crossover=0` compiles
every site guarded at these short lengths.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import lora_pass
from lora_pass.guard import error_bounds
from lora_pass.ops.features import feature_rank
from tests.conftest import (
    assert_grads_close,
    init_lora_b,
    lora_grads,
    loss_and_grads,
    rel_err,
    site_stats,
    tiny_opt,
    tiny_opt_with,
)

GUARDED = {"crossover": 0}
CHUNKED = 272  # a causal length of five chunks of the low-rank loops (4 x 64 + 16)


def fresh():
    torch._dynamo.reset()
    lora_pass.reset()


def batch(seed, shape=(2, 16)):
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


def live_records():
    """Records of graphs that had attention in them (graph breaks add empty ones)."""
    return [r for r in lora_pass.records() if r.sites or r.skipped]


def by_layer(stats):
    """{layer index: (Site, stats)} from site_stats()."""
    out = {}
    for module, value in stats.items():
        layer = int(module.split("layers.")[1].split(".")[0])
        out[layer] = value
    return out


# ---------------------------------------------------------------------------------------------
# mixed precision

#: bfloat16 unit roundoff; the small absolute term of the low-precision rule is 1/16 of it
BF16_U = 2.0**-8
LOWP_ATOL = BF16_U / 16
#: batches over which the errors are averaged (see test_bf16_training_within_low_precision_rule)
LOWP_BATCHES = 6


def _lowp_mean_errors(model, compiled, ref, autocast):
    """Mean over LOWP_BATCHES fresh batches of the relative error against the float64 reference
    of the loss and of each LoRA gradient: ({name: eager's}, {name: compiled's})."""
    eager_err, comp_err = {}, {}
    for i in range(LOWP_BATCHES):
        ids = batch(1000 + i)
        ref_loss, _, ref_grads = loss_and_grads(ref, ref, ids)
        results = {}
        for key, call in (("eager", model), ("compiled", compiled)):
            loss, _, grads = loss_and_grads(model, call, ids, autocast=autocast)
            results[key] = {"loss": rel_err(loss, ref_loss), **{n: rel_err(grads[n], ref_grads[n]) for n in ref_grads}}
        for name in results["eager"]:
            eager_err[name] = eager_err.get(name, 0.0) + results["eager"][name] / LOWP_BATCHES
            comp_err[name] = comp_err.get(name, 0.0) + results["compiled"][name] / LOWP_BATCHES
    return eager_err, comp_err


def eager_and_compiled_steps(model, ids, options=GUARDED):
    """(loss, LoRA gradients) of one eager step and of one step compiled with lowrank_lora."""
    ref_loss, _, ref_grads = loss_and_grads(model, model, ids)
    compiled = torch.compile(model, backend="lowrank_lora", options=options)
    loss, _, grads = loss_and_grads(model, compiled, ids)
    return (ref_loss, ref_grads), (loss, grads)


@pytest.mark.parametrize("precision", ["autocast", "bf16_weights"])
@pytest.mark.parametrize("path", ["guarded", "lowrank"])
def test_bf16_training_within_low_precision_rule(precision, path):
    """Loss and every LoRA gradient under torch.autocast("cpu", bfloat16) (float32 weights) or
    with bfloat16 weights: the compiled model's error against a float64 copy is at most twice
    eager's own error (same autocast, same weights) plus 1/16 of bfloat16's unit roundoff.

    "guarded": layer 0 takes the low-rank branch, layer 1 the exact branch of the guarded op;
    "lowrank": mode="lowrank" on a one-layer model with bounded logits.

    The errors are averaged over LOWP_BATCHES batches: a different but equally accurate rounding
    gives an independent sample of bfloat16 noise, and eager's error on one batch varies by a
    factor of 3 to 5 between batches (0.008 to 0.044 here), so on a single batch the ratio of
    two such samples exceeds 2 for a good op too (measured: eager with the low-rank op in place
    of SDPA, no compilation, reaches 3.5 on single batches). On the captured q, k, v of these
    models the low-rank op's own error is at or below the flash kernel's.
    """
    fresh()
    if path == "guarded":
        model, options = tiny_opt("sdpa", bounded=(0.05, 40.0)), GUARDED
    else:
        model, options = tiny_opt("sdpa", layers=1, bounded=(0.05,)), {"mode": "lowrank"}
    ref = copy.deepcopy(model).double()
    autocast = torch.bfloat16 if precision == "autocast" else None
    if precision == "bf16_weights":
        model = model.to(torch.bfloat16)
    compiled = torch.compile(model, backend="lowrank_lora", options=options)
    eager_err, comp_err = _lowp_mean_errors(model, compiled, ref, autocast)

    layers = by_layer(site_stats())
    assert len(layers) == (2 if path == "guarded" else 1)
    assert layers[0][1]["forward_lowrank"] == LOWP_BATCHES and layers[0][1]["backward_lowrank"] == LOWP_BATCHES
    if path == "guarded":
        assert layers[1][1]["forward_exact"] == LOWP_BATCHES and layers[1][1]["backward_exact"] == LOWP_BATCHES
    assert len(comp_err) == 1 + 4 * len(layers)  # the loss and A, B of q and v per layer
    for name in comp_err:
        assert comp_err[name] <= 2 * eager_err[name] + LOWP_ATOL, (
            f"{name}: mean error {comp_err[name]:.3g} > 2 x eager's {eager_err[name]:.3g} + {LOWP_ATOL:.3g}")


def test_lowrank_op_is_not_downcast_by_autocast():
    """The low-rank path computes in float32 for bfloat16 inputs (ops/lowrank.compute_dtype).
    Its branches turn autocast off: under torch.autocast its float32 matmuls were cast back to
    bfloat16, and its output error grew by about 1.5x (0.0033 against 0.0021 here) over the
    same call without autocast."""
    from lora_pass.ops.attention import AttentionConfig, guarded_attention

    g = torch.Generator().manual_seed(0)
    shape = (2, 2, 64, 16)
    q64, k64 = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.1 for _ in range(2))
    v64, dout = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    cfg = AttentionConfig(scale=16**-0.5, causal=True, r_max=0.2, paths="lowrank")

    def run(fn, dtype, autocast):
        q, k, v = (t.detach().to(dtype).clone().requires_grad_() for t in (q64, k64, v64))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(q, k, v)
        out.backward(dout.to(out.dtype))
        return [out.detach(), q.grad, k.grad, v.grad]

    ref = run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), torch.float64, False)
    plain = run(lambda q, k, v: guarded_attention(q, k, v, cfg), torch.bfloat16, False)
    under = run(lambda q, k, v: guarded_attention(q, k, v, cfg), torch.bfloat16, True)
    for name, a, p, r in zip(("out", "dq", "dk", "dv"), under, plain, ref):
        assert rel_err(a, r) <= 1.01 * rel_err(p, r), name


# ---------------------------------------------------------------------------------------------
# activation checkpointing


def enable_checkpointing(model, use_reentrant: bool):
    """Hugging Face's activation checkpointing under the name the installed transformers has:
    `activation_checkpointing_enable` (the newer name; `gradient_checkpointing_enable` is its
    deprecated alias there) or `gradient_checkpointing_enable` (older releases)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_rewrites_sites_and_keeps_gradients(reentrant):
    """Hugging Face's activation (gradient) checkpointing: Dynamo turns each checkpointed decoder layer
    (reentrant or not) into a tag_activation_checkpoint region; the backend rewrites the sites
    inside the regions, and the gradients equal those of eager without checkpointing. Sequences of
    five chunks: the chunk loops stay loops inside the regions (the forward's, and in the backward
    the recomputed forward's and the backward's own, of both guarded sites).

    The checkpointed forward runs again in the backward, so each step counts two forward calls
    per site (forward and recomputation) and one backward call."""
    from torch._inductor.utils import run_and_get_code

    from tests.conftest import loop_count

    fresh()
    model = tiny_opt("sdpa", bounded=(0.05, 40.0), seq=CHUNKED + 2)
    model.train()
    batches = [batch(10, (2, CHUNKED)), batch(11, (2, CHUNKED))]
    expected = [loss_and_grads(model, model, ids) for ids in batches]
    enable_checkpointing(model, use_reentrant=reentrant)
    compiled = torch.compile(model, backend="lowrank_lora", options=GUARDED)
    for i, (ids, (ref_loss, _, ref_grads)) in enumerate(zip(batches, expected)):
        if i == 0:
            (loss, _, grads), codes = run_and_get_code(lambda: loss_and_grads(model, compiled, ids))
        else:
            loss, _, grads = loss_and_grads(model, compiled, ids)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert_grads_close(grads, ref_grads)
    # the graph with the sites (Hugging Face's checkpointing breaks the graph around it): its
    # forward, then its backward (the recomputed forward's loop and the backward's own two)
    assert [n for n in map(loop_count, codes) if n] == [2 * 1, 2 * (1 + 2)]

    sites = [s for r in lora_pass.records() for s in r.sites]
    assert len(sites) == 2 and not any(r.skipped for r in lora_pass.records())
    for site in sites:
        assert site.paths == "guarded"
        region, _, local = site.submodule.rpartition(".")
        assert region.startswith("wrap_body") and local.startswith("lowrank_lora_site_")  # inside the region
    layers = by_layer(site_stats())
    steps = len(batches)
    assert layers[0][1]["forward_lowrank"] == 2 * steps and layers[0][1]["backward_lowrank"] == steps
    assert layers[1][1]["forward_exact"] == 2 * steps and layers[1][1]["backward_exact"] == steps
    assert layers[0][1]["forward_exact"] == layers[1][1]["forward_lowrank"] == 0


class LoraAttention(torch.nn.Module):
    """A bare causal attention block with q/k/v projections, for PEFT to adapt."""

    def __init__(self, d=32, heads=2):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(d, d) for _ in range(3))

    def forward(self, x):
        b, length, d = x.shape
        shape = (b, length, self.heads, d // self.heads)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, length, d)


class Checkpointed(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)
        return torch.nn.functional.gelu(h) + x


def test_torch_utils_checkpoint_around_a_block():
    """torch.utils.checkpoint around a LoRA attention block, compiled with fullgraph=True: the
    site inside the checkpointed region is rewritten and takes the low-rank path, its chunk loops
    loops in the generated code; output, input gradient and LoRA gradients equal eager's."""
    from peft import LoraConfig, inject_adapter_in_model

    fresh()
    torch.manual_seed(0)
    block = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), LoraAttention())
    with torch.no_grad():
        block.q_proj.base_layer.weight.mul_(0.01)
        block.k_proj.weight.mul_(0.01)
    init_lora_b(block)
    model = Checkpointed(block)
    x = torch.randn(2, CHUNKED, 32, generator=torch.Generator().manual_seed(3))
    dout = torch.randn(2, CHUNKED, 32, generator=torch.Generator().manual_seed(4))

    def run(call):
        model.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        out = call(xx)
        out.backward(dout)
        return out.detach(), xx.grad, lora_grads(model)

    from torch._inductor.utils import run_and_get_code

    from tests.conftest import loop_count

    ref_out, ref_dx, ref_grads = run(model)
    compiled = torch.compile(model, backend="lowrank_lora", options=GUARDED, fullgraph=True)
    (out, dx, grads), codes = run_and_get_code(lambda: run(compiled))
    assert (loop_count(codes[0]), loop_count(codes[-1])) == (1, 1 + 2)  # forward; recomputed forward, backward
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads)
    ((site, stats),) = lora_pass.telemetry()
    assert site.submodule.startswith("wrap_body") and site.paths == "guarded"
    assert stats["forward_lowrank"] == 2 and stats["backward_lowrank"] == 1  # forward, recomputation
    assert max(error_bounds(stats["last_bound"], site.degree).values()) < 1e-4  # the guard's guarantee


# ---------------------------------------------------------------------------------------------
# LoRA variants


def test_lora_dropout_follows_inductors_random_numbers():
    """LoRA dropout (p = 0.3) in training. Inductor draws its own random numbers (Philox) rather
    than eager's, so with the same seed a compiled step differs from eager by the dropout masks
    (checked), with any backend. Two ways to compare like with like, both exact:
    * torch._inductor.config.fallback_random=True (Inductor calls eager's RNG): equal to eager;
    * default settings: equal to backend="inductor" with the same seed, for two seeds (the
      rewrite adds no random op and changes none, so the masks are Inductor's)."""
    fresh()
    model = tiny_opt("sdpa", layers=1, bounded=(0.05,), lora_dropout=0.3)
    model.train()
    ids = batch(20)

    def seeded(call, seed):
        torch.manual_seed(seed)
        return loss_and_grads(model, call, ids)

    eager = seeded(model, 5)
    with torch._inductor.config.patch(fallback_random=True):
        ours = torch.compile(model, backend="lowrank_lora", options=GUARDED)
        same_rng = seeded(ours, 5)
    torch.testing.assert_close(same_rng[0], eager[0], rtol=1e-5, atol=1e-6)
    assert_grads_close(same_rng[2], eager[2])

    fresh()
    ours = torch.compile(model, backend="lowrank_lora", options=GUARDED)
    ours_runs = [seeded(ours, seed) for seed in (5, 6)]
    torch._dynamo.reset()
    inductor = torch.compile(model, backend="inductor")
    inductor_runs = [seeded(inductor, seed) for seed in (5, 6)]
    for (loss, _, grads), (ind_loss, _, ind_grads) in zip(ours_runs, inductor_runs):
        torch.testing.assert_close(loss, ind_loss, rtol=1e-5, atol=1e-6)
        assert_grads_close(grads, ind_grads)
    # other masks than eager's, and the seed matters (dropout is on)
    assert max(rel_err(ours_runs[0][2][n], eager[2][n]) for n in eager[2]) > 1e-2
    assert max(rel_err(ours_runs[0][2][n], ours_runs[1][2][n]) for n in eager[2]) > 1e-2

    ((site, stats),) = lora_pass.telemetry()
    assert site.projections["q"].lora_dropout == 0.3 and site.projections["v"].lora_dropout == 0.3
    assert stats["forward_lowrank"] == 2


def test_several_lora_modules_with_rslora_scaling():
    """LoRA on q, k, v, out_proj, fc1 and fc2 with rsLoRA (scaling alpha / sqrt(r) = 8 / 2 = 4,
    not alpha / r = 2): the site records the rsLoRA scaling for q, k and v, and the step equals
    eager's for all twelve LoRA matrices."""
    from peft import LoraConfig

    fresh()
    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    model = tiny_opt_with(LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=True), layers=1, bounded=(0.05,))
    model.train()
    ids = batch(30)
    (ref_loss, ref_grads), (loss, grads) = eager_and_compiled_steps(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert len(grads) == 2 * len(targets)
    assert_grads_close(grads, ref_grads)
    ((site, stats),) = lora_pass.telemetry()
    for name in "qkv":
        proj = site.projections[name]
        assert proj.adapted and proj.rank == 4 and proj.scaling == pytest.approx(8 / math.sqrt(4))
    assert stats["forward_lowrank"] == 1 and stats["backward_lowrank"] == 1


def test_disable_adapter_does_not_reuse_the_adapted_graph():
    """`with model.disable_adapter():` flips an attribute of every LoRA layer, which Dynamo
    guards on: the call recompiles a graph without LoRA (its site is left to Inductor, with the
    reason) and equals the base model; after the block the adapted graph is used again."""
    fresh()
    model = tiny_opt("sdpa", layers=1, bounded=(0.05,))
    model.train()
    ids = batch(40)
    compiled = torch.compile(model, backend="lowrank_lora", options=GUARDED)
    ref_loss, adapted_logits, ref_grads = loss_and_grads(model, model, ids)
    loss, logits, grads = loss_and_grads(model, compiled, ids)
    torch.testing.assert_close(logits, adapted_logits, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads)
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=ids, use_cache=False).logits
        disabled_logits = compiled(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(disabled_logits, base_logits, rtol=1e-5, atol=1e-6)
    assert (base_logits - adapted_logits).abs().max() > 1e-3  # the adapter changes the output
    loss, logits, grads = loss_and_grads(model, compiled, ids)
    torch.testing.assert_close(logits, adapted_logits, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads)

    adapted, disabled = live_records()  # no third graph: the adapted one was reused
    assert len(adapted.sites) == 1 and adapted.sites[0].paths == "guarded"
    assert not disabled.sites and [s.reason for s in disabled.skipped] == ["no LoRA-adapted projection (require_lora=True)"]
    ((site, stats),) = lora_pass.telemetry()
    assert stats["forward_lowrank"] == 2  # the two adapted steps, none from the disabled call


def test_dora_is_left_untouched_with_a_reason():
    """DoRA (use_dora=True): PEFT's DoRA code breaks Dynamo's graph, so the projections and the
    attention land in different graphs; the attention is left to Inductor with the reason
    recorded, and the step equals eager's (the magnitude vectors included)."""
    from peft import LoraConfig

    fresh()
    model = tiny_opt_with(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
                          layers=1, bounded=(0.05,))
    model.train()
    ids = batch(50)
    (ref_loss, ref_grads), (loss, grads) = eager_and_compiled_steps(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert any("magnitude" in n for n in grads) and len(grads) == 6
    assert_grads_close(grads, ref_grads)
    records = live_records()
    assert records and not any(r.sites for r in records)
    reasons = [s.reason for r in records for s in r.skipped]
    assert reasons and all(r == "no LoRA-adapted projection (require_lora=True)" for r in reasons)


@pytest.fixture(scope="module")
def two_adapters():
    """A model with two active LoRA adapters on q and v, compiled once; eager and compiled steps."""
    from peft import LoraConfig

    fresh()
    model = tiny_opt("sdpa", layers=1, bounded=(0.05,))
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    model.base_model.set_adapter(["default", "second"])
    init_lora_b(model)
    model.train()
    ids = batch(60)
    expected = loss_and_grads(model, model, ids)
    compiled = torch.compile(model, backend="lowrank_lora", options=GUARDED)
    got = loss_and_grads(model, compiled, ids)
    return expected, got, live_records()


def test_multiple_active_adapters_equal_eager_and_are_accounted_for(two_adapters):
    """Two active adapters on the same projections: the step equals eager's for both adapters'
    matrices, and the site is either rewritten or left untouched with a recorded reason (it is
    rewritten: see the test below)."""
    (ref_loss, _, ref_grads), (loss, _, grads), records = two_adapters
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert len(grads) == 8 and {n.split(".")[-2] for n in grads} == {"default", "second"}
    assert_grads_close(grads, ref_grads)
    (record,) = records
    assert len(record.sites) + len(record.skipped) == 1
    for site in record.sites:  # if rewritten, the record must name both adapters' projections
        assert site.projections["q"].adapted and site.projections["v"].adapted
    for skipped in record.skipped:
        assert skipped.reason == "no LoRA-adapted projection (require_lora=True)"


def test_multiple_active_adapters_are_rewritten(two_adapters):
    """base(x) + u1 + u2 is recognised as one adapted projection: the ranks add up (4 + 2), the
    shared scaling (8 / 4 = 4 / 2) is kept, and no nodes are kept for the composed norms, which
    read one adapter pair."""
    _, _, records = two_adapters
    (record,) = records
    assert len(record.sites) == 1
    for name in "qv":
        proj = record.sites[0].projections[name]
        assert proj.adapted and proj.rank == 6 and proj.scaling == 2.0 and not proj.nodes
    assert not record.sites[0].projections["k"].adapted


# ---------------------------------------------------------------------------------------------
# bad input, float64, degenerate and odd shapes


def test_nan_and_inf_in_activations_take_the_exact_path():
    """An embedding row set to NaN, then to Inf (LayerNorm turns Inf into NaN), in one sequence
    of the batch: the guard's bound is NaN, so the guarded op takes the exact path, and logits,
    loss and gradients equal Inductor's, NaN where Inductor gives NaN; no error. The clean batch
    before takes the low-rank path."""
    fresh()
    model = tiny_opt("sdpa", layers=1, bounded=(0.05,))
    model.train()
    inductor = torch.compile(model, backend="inductor")
    ours = torch.compile(model, backend="lowrank_lora", options=GUARDED)
    ids = batch(70)
    token = 5
    ids[ids == token] = 6
    ids[0, 7] = token  # sequence 0 reads the bad row at position 7, sequence 1 never does
    embedding = model.base_model.model.model.decoder.embed_tokens.weight

    def both():
        a = loss_and_grads(model, ours, ids)
        b = loss_and_grads(model, inductor, ids)
        return a, b

    (loss, logits, grads), (ind_loss, ind_logits, ind_grads) = both()
    torch.testing.assert_close(logits, ind_logits, rtol=1e-5, atol=1e-6)
    ((_, stats),) = lora_pass.telemetry()
    assert stats["forward_lowrank"] == 1 and math.isfinite(stats["last_bound"])
    clean = embedding.detach().clone()
    for bad in (float("nan"), float("inf")):
        with torch.no_grad():
            embedding[token] = bad
        (loss, logits, grads), (ind_loss, ind_logits, ind_grads) = both()
        with torch.no_grad():
            embedding.copy_(clean)
        # only sequence 0 reads the row; the tied LM head makes logit column `token` NaN everywhere
        others = torch.ones(logits.shape[-1], dtype=torch.bool)
        others[token] = False
        assert logits[0].isnan().all() and not logits[1][:, others].isnan().any()
        torch.testing.assert_close(logits, ind_logits, rtol=1e-5, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(loss, ind_loss, equal_nan=True)
        assert_grads_close(grads, ind_grads, equal_nan=True)
    ((_, stats),) = lora_pass.telemetry()
    assert stats["forward_lowrank"] == 1 and stats["forward_exact"] == 2
    assert stats["backward_lowrank"] == 1 and stats["backward_exact"] == 2
    assert math.isnan(stats["last_bound"])


def test_float64_model_matches_eager():
    """A float64 model: both branches of the guarded op (layer 0 low-rank, layer 1 exact) run in
    float64 and the step equals eager's far beyond float32 precision."""
    fresh()
    model = tiny_opt("sdpa", bounded=(0.05, 40.0)).double()
    model.train()
    ids = batch(80)
    (ref_loss, ref_grads), (loss, grads) = eager_and_compiled_steps(model, ids)
    layers = by_layer(site_stats())
    assert layers[0][1]["forward_lowrank"] == 1 and layers[1][1]["forward_exact"] == 1
    torch.testing.assert_close(loss, ref_loss, rtol=1e-8, atol=1e-12)
    assert_grads_close(grads, ref_grads, rtol=1e-8, atol=1e-12)
    assert all(g.dtype == torch.float64 for g in grads.values())


def test_length_one_and_batch_one():
    """One sequence of one token, every site guarded: the op compiles (the two branches' outputs
    have matching strides) and equals eager. With one key the centred logits are 0, so R = 0
    and the low-rank path is exact. The language-model loss has no target at L = 1, so the
    gradients come from a loss on the logits."""
    fresh()
    model = tiny_opt("sdpa", layers=1, bounded=(0.05,))
    model.train()
    ids = batch(90, shape=(1, 1))

    def loss_fn(out):
        return out.logits.float().square().mean()

    ref_loss, _, ref_grads = loss_and_grads(model, model, ids, loss_fn=loss_fn)
    compiled = torch.compile(model, backend="lowrank_lora", options=GUARDED)
    loss, _, grads = loss_and_grads(model, compiled, ids, loss_fn=loss_fn)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads)
    stats = site_stats()
    assert len(stats) == 1
    for site, s in stats.values():
        assert site.seq_len == 1 and site.batch == 1 and site.paths == "guarded"
        assert s["last_bound"] == 0 and s["forward_lowrank"] == 1 and s["backward_lowrank"] == 1


@pytest.mark.parametrize("hidden,heads,batch_size", [(48, 2, 2), (36, 3, 1)], ids=["d24", "d12_batch1"])
def test_head_dims_that_are_not_powers_of_two(hidden, heads, batch_size):
    """Head dims 24 and 12 (feature ranks C(d + 2, 2) = 325 and 91): the site is rewritten, the
    low-rank path runs, and the step equals eager's."""
    fresh()
    model = tiny_opt("sdpa", layers=1, hidden=hidden, heads=heads, bounded=(0.05,))
    model.train()
    ids = batch(100 + hidden, shape=(batch_size, 16))
    (ref_loss, ref_grads), (loss, grads) = eager_and_compiled_steps(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads)
    ((site, stats),) = lora_pass.telemetry()
    d = hidden // heads
    assert site.head_dim == d and site.heads == heads and site.feature_rank == feature_rank(d, 2) == math.comb(d + 2, 2)
    assert stats["forward_lowrank"] == 1 and stats["backward_lowrank"] == 1


# ---------------------------------------------------------------------------------------------
# failures inside the rewrite


def _compile_with_failure(monkeypatch, target, name, first_only=False):
    """Compile a two-layer model with `target.name` raising (only on its first call with
    `first_only`) and take one step. -> (compiled step, eager step, lowrank_lora warnings)."""
    fresh()
    model = tiny_opt("sdpa", bounded=(0.05, 40.0))
    model.train()
    ids = batch(110)
    expected = loss_and_grads(model, model, ids)
    original = getattr(target, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if first_only and len(calls) > 1:
            return original(*args, **kwargs)
        raise RuntimeError("injected failure")

    monkeypatch.setattr(target, name, failing)
    compiled = torch.compile(model, backend="lowrank_lora", options=GUARDED)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = loss_and_grads(model, compiled, ids)
    messages = [str(w.message) for w in caught if "lowrank_lora" in str(w.message)]
    return got, expected, messages


def _assert_equal_steps(got, expected):
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    assert_grads_close(got[2], expected[2])


def test_failure_in_a_site_rewrite_leaves_it_exact_with_a_warning(monkeypatch):
    """The rewrite of each site raises before touching the graph: each site is left unchanged
    with a warning and a recorded reason; the compile succeeds and the step equals eager's."""
    import lora_pass.rewrite

    got, expected, messages = _compile_with_failure(monkeypatch, lora_pass.rewrite, "_replace")
    _assert_equal_steps(got, expected)
    assert len(messages) == 2 and all("left unchanged after an error in the rewrite" in m for m in messages)
    (record,) = live_records()
    assert not record.sites
    assert [s.reason for s in record.skipped] == ["rewrite failed: RuntimeError('injected failure')"] * 2


def test_failure_half_way_through_every_site_leaves_the_graph_unchanged(monkeypatch):
    """The rewrite of each site fails after it added the site's submodule (registering the
    telemetry buffer with AOTAutograd raises): each site removes what it added, so the graph
    is the unchanged one, compiled without a whole-graph fall-back; the step equals eager's."""
    from lora_pass import compat

    got, expected, messages = _compile_with_failure(monkeypatch, compat, "register_graph_buffer")
    _assert_equal_steps(got, expected)
    assert len(messages) == 2 and all("left unchanged after an error in the rewrite" in m for m in messages)
    assert not any("the graph is compiled unchanged" in m for m in messages)
    (record,) = live_records()
    assert not record.sites and len(record.skipped) == 2
    assert all(s.reason.startswith("rewrite failed") for s in record.skipped)
    assert "lowrank_lora_site" not in record.graph_after and record.graph_after == record.graph_before


def test_failure_compiling_the_rewritten_graph_falls_back_to_the_unchanged_graph(monkeypatch):
    """The rewritten graph fails to compile (the site's forward raises while AOTAutograd traces
    it): the backend puts the unchanged graph back, warns, and compiles it; the step equals eager's."""
    import lora_pass.rewrite

    got, expected, messages = _compile_with_failure(monkeypatch, lora_pass.rewrite.AttentionSite, "forward")
    _assert_equal_steps(got, expected)
    assert any("compiling the rewritten graph failed" in m and "the graph is compiled unchanged" in m
               for m in messages)
    (record,) = live_records()
    assert not record.sites and len(record.skipped) == 2
    assert all("compiling the rewritten graph failed" in s.reason for s in record.skipped)
    assert "lowrank_lora_site" not in record.graph_after


def test_failure_outside_any_site_falls_back_to_the_unchanged_graph(monkeypatch):
    """A pattern matcher raises (an error outside the per-site handling): the compile still
    succeeds on the unchanged graph, with a warning and the reason recorded."""
    import lora_pass.rewrite

    got, expected, messages = _compile_with_failure(monkeypatch, lora_pass.rewrite, "_candidates")
    _assert_equal_steps(got, expected)
    assert any("rewrite failed" in m and "the graph is compiled unchanged" in m for m in messages)
    (record,) = live_records()
    assert not record.sites and "injected failure" in record.skipped[0].reason


def test_failure_half_way_through_one_site_leaves_the_others_rewritten(monkeypatch):
    """Only the first site's rewrite fails after adding its submodule: that site is rolled back
    and left exact, the second is rewritten, the graph compiles, the step equals eager's."""
    from lora_pass import compat

    got, expected, _ = _compile_with_failure(monkeypatch, compat, "register_graph_buffer", first_only=True)
    _assert_equal_steps(got, expected)
    (record,) = live_records()
    assert len(record.sites) == 1 and len(record.skipped) == 1
