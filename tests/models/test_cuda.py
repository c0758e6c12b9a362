"""On a GPU: a LoRA attention block compiled with the backend takes the fused Triton kernels
(ops/lowrank_triton.py) inside the guard's cond, and its forward and every gradient match the same
block's low-rank path in float64 on CPU. Skipped without CUDA (bench/gpu_check.sh runs it)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import LoraAttention, lora_block, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _step(fn, block, x):
    out = fn(x)
    out.square().sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in block.named_parameters() if p.requires_grad}
    return out.detach(), x.grad.detach().clone(), grads


def test_lora_block_on_cuda_runs_the_fused_kernels_and_matches_float64():
    from torch._inductor.utils import run_and_get_code

    import lora_pass
    from lora_pass.ops import lowrank_triton

    block = lora_block(lambda: LoraAttention(d=128, heads=2))  # head dim 64, L = 1,000: 16 chunks, 4 super-chunks
    x = torch.randn(2, 1000, 128, generator=torch.Generator().manual_seed(1))
    ref_block = copy.deepcopy(block).double()
    xr = x.double().requires_grad_()
    torch._dynamo.reset()
    ref = _step(torch.compile(ref_block, backend="lowrank_lora", options={"mode": "lowrank"}), ref_block, xr)

    gpu = copy.deepcopy(block).cuda()
    xg = x.cuda().requires_grad_()
    assert lowrank_triton.supported(xg.view(2, 1000, 2, 64).transpose(1, 2), xg.view(2, 1000, 2, 64).transpose(1, 2), 2)
    torch._dynamo.reset()
    lora_pass.reset()
    compiled = torch.compile(gpu, backend="lowrank_lora", options={"crossover": 0})
    got, codes = run_and_get_code(lambda: _step(compiled, gpu, xg))
    ((_site, stats),) = lora_pass.telemetry()
    assert stats["forward_lowrank"] == 1 and stats["backward_lowrank"] == 1  # the guard passed
    code = "\n".join(codes)
    # the fused kernels in the generated code: the state and output kernels of the forward, the
    # dQ and dK/dV kernels of the backward (user Triton kernels keep their names)
    for kernel in ("_state_kernel", "_out_kernel", "_dq_kernel", "_dkdv_kernel"):
        assert kernel in code, kernel
    # fp32 on the GPU runs TF32 dots (about 1e-3 relative, docs/gpu.md)
    assert rel_err(got[0].cpu(), ref[0]) < 5e-3
    assert rel_err(got[1].cpu(), ref[1]) < 5e-3
    for name, g in ref[2].items():
        assert rel_err(got[2][name].cpu(), g) < 5e-3, name
