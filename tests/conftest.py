"""Shared builders: tiny random-weight OPT models with PEFT LoRA, and a float64 reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F


def tiny_opt(attn="sdpa", targets=("q_proj", "v_proj"), layers=2, hidden=32, heads=2, seq=64,
             bounded=None, seed=0, lora_dropout=0.0, attention_dropout=0.0, lora=True):
    """A 2-layer OPT from its config with PEFT LoRA (B initialised non-zero so every LoRA
    parameter gets a gradient). `bounded`: per-layer factors applied to the q/k base weights,
    small factors put a layer into the bounded-logit regime."""
    from peft import LoraConfig, get_peft_model
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=2 * hidden,
                    num_attention_heads=heads, max_position_embeddings=seq, word_embed_proj_dim=hidden,
                    dropout=0.0, attention_dropout=attention_dropout, attn_implementation=attn)
    model = OPTForCausalLM(cfg)
    if bounded is not None:
        with torch.no_grad():
            for layer, factor in zip(model.model.decoder.layers, bounded):
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    proj.weight.mul_(factor)
                    proj.bias.mul_(factor)
    if not lora:
        return model
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                             lora_dropout=lora_dropout))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02 if bounded is not None else 0.1)
    return model


def calls_op(code: str, name: str) -> bool:
    """Does Inductor's generated code call the custom op `lora_pass::<name>`? The Python wrapper
    calls `torch.ops.lora_pass.<name>`, the C++ wrapper (the backend's default on CPU when a
    low-rank path is compiled, see lora_pass.lowering.LOWRANK_CPU_INDUCTOR) the dispatcher by name."""
    return f"torch.ops.lora_pass.{name}" in code or f'aoti_torch_call_dispatcher("lora_pass::{name}"' in code


def loop_count(code: str) -> int:
    """How many loops (lowered scans) the generated code runs, with either wrapper: the Python
    wrapper writes each while_loop as `while should_loop:`, the C++ wrapper as `while (1) {`."""
    return code.count("while should_loop:") + code.count("while (1) {")


def uses_cpp_wrapper(code: str) -> bool:
    """Is this generated code Inductor's C++ wrapper (not the Python one)?"""
    return "cpp_wrapper_src" in code


def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train_step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), lora_grads(model)


def reference_step(model, ids):
    """Eager float64 copy of the model: the reference loss and LoRA gradients."""
    ref = copy.deepcopy(model).double()
    loss, grads = train_step(ref, ids)
    return loss, grads


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture
def ids():
    torch.manual_seed(1)
    return torch.randint(0, 64, (2, 16))


# --- helpers for the training-setup tests (tests/test_training.py, test_shapes.py, test_ddp.py)


class CountingBackend:
    """`torch._dynamo.testing.CompileCounterWithBackend("lowrank_lora")` that also passes backend
    options: `torch.compile(model, backend=CountingBackend({...}))`; `frame_count` counts the
    graphs Dynamo handed to the backend, `compiled_graphs()` those with at least one operation
    (with dynamic=True, Dynamo may first hand over an empty graph from an analysis it restarts)."""

    def __init__(self, options=None):
        self.options = options
        self.frame_count = 0
        self.graphs = []

    def __call__(self, gm, example_inputs):
        from lora_pass.backend import lowrank_lora

        self.frame_count += 1
        self.graphs.append(gm)
        return lowrank_lora(gm, example_inputs, options=self.options)

    def compiled_graphs(self):
        ops = ("call_function", "call_method", "call_module")
        return [g for g in self.graphs if any(n.op in ops for n in g.graph.nodes)]


def loss_and_grads(model, call, ids, autocast=None, loss_fn=None):
    """One forward and backward of `call` (the model or a compiled wrapper of it) on `ids`:
    (loss, logits, {name: grad} of the trainable parameters of `model`). `autocast`: a dtype to
    run the forward under torch.autocast("cpu", dtype); `loss_fn(output) -> loss` replaces the
    language-model loss."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = call(input_ids=ids, labels=ids, use_cache=False)
        loss = out.loss if loss_fn is None else loss_fn(out)
    loss.backward()
    return loss.detach(), out.logits.detach(), lora_grads(model)


def assert_grads_close(got: dict, expected: dict, rtol=1e-5, atol=1e-6, equal_nan=False):
    assert got.keys() == expected.keys() and got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, equal_nan=equal_nan,
                                   msg=lambda m, name=name: f"{name}: {m}")


def site_stats(submodule_prefix=""):
    """{module path: (Site, stats)} of the live rewritten sites (lora_pass.telemetry())."""
    import lora_pass

    return {site.module: (site, stats) for site, stats in lora_pass.telemetry()
            if site.submodule.startswith(submodule_prefix)}


def tiny_opt_with(lora_config, std=0.02, **kwargs):
    """`tiny_opt(lora=False, **kwargs)` adapted with the given peft.LoraConfig (rsLoRA, DoRA,
    other targets), lora_B initialised like tiny_opt's so every LoRA parameter gets a gradient."""
    from peft import get_peft_model

    model = get_peft_model(tiny_opt(lora=False, **kwargs), lora_config)
    init_lora_b(model, std)
    return model


def init_lora_b(model, std=0.02):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=std)


def lora_block(block_class) -> torch.nn.Module:
    """`block_class()`, a bare attention block with q_proj, k_proj, v_proj, built under seed 0 and
    adapted with PEFT LoRA (r = 2) on q and v, its q/k weights scaled into the bounded regime and
    lora_B initialised non-zero."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    block = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
                                    block_class())
    with torch.no_grad():
        block.q_proj.weight.mul_(0.05)
        block.k_proj.weight.mul_(0.05)
    init_lora_b(block)
    return block


class LoraAttention(torch.nn.Module):
    """A bare attention block for mask cases, adapted with PEFT by `conftest.lora_block`."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(d, d) for _ in range(3))

    def forward(self, x, mask=None, constant_mask=None):
        b, length, d = x.shape
        shape = (b, length, self.heads, d // self.heads)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if constant_mask == "triu":
            mask = torch.ones(length, length, dtype=torch.bool, device=x.device).triu()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, length, d)
