"""The fused low-rank kernels compile for GPUs that are not here: sm_90a (H100) and sm_80 (A100).

For every entry of `lowrank_triton.kernel_configs()` (the op launches nothing else) and both
targets: `triton.compile` without a GPU, and the output of `ptxas -v` on its PTX (the ptxas of
Triton's package that Triton runs for the target, backends/nvidia/bin/ptxas-blackwell for sm_90a
and ptxas for sm_80, with Triton's flags: the log Triton prints while it builds the cubin, or the
same command run again when Triton's cache already had the kernel). Checked: no register spills, shared memory within what one block may use
(227 KB on sm_90, 163 KB on sm_80: the opt-in maxima under the 228 KB / 164 KB per SM), and
tensor-core instructions in the PTX (wgmma on sm_90a, mma.sync on sm_80).

The kernels must be jitted, not interpreted, and the interpreter is switched on by the other test
module of the kernels (before Triton is imported): the compiles run once, in a child process
without TRITON_INTERPRET (two worker processes where there are two cores), and their results are
shared by the tests of this module. The same
child traces the registered ops with fake tensors (what torch.compile does), which also needs the
jitted kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("triton")

from lora_pass.ops import lowrank_triton as lt

ROOT = Path(__file__).resolve().parents[2]
TARGETS = {"sm_90a": 90, "sm_80": 80}
SHARED_LIMIT = {"sm_90a": 227 * 1024, "sm_80": 163 * 1024}
TENSOR_CORE_OP = {"sm_90a": "wgmma.mma_async", "sm_80": "mma.sync.aligned"}
CONFIGS = [f"{name}-d{cfg['D']}-{lt._TRITON_DTYPE[cfg['dtype']]}" for name, cfg in lt.kernel_configs()]

CHILD = r'''
import concurrent.futures, contextlib, hashlib, io, json, os, re, subprocess, sys, tempfile, time
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from triton.runtime.cache import get_cache_manager
from lora_pass.ops import lowrank_triton as lt

assert not lt.INTERPRETED
triton.knobs.nvidia.dump_ptxas_log = True
SPECS = {spec["name"]: spec for spec in lt.compile_specs()}


def ptxas_log(ptx, arch, cap, printed):
    """(return code, log) of `ptxas -v` on the PTX with Triton's flags: the log Triton printed while
    it built the cubin (TRITON_DUMP_PTXAS_LOG), or, when Triton's cache had the kernel, the log kept
    under the PTX's hash at the first build, or a new run."""
    ptxas = get_ptxas(cap).path
    cache = get_cache_manager(hashlib.sha256((ptx + arch + ptxas).encode()).hexdigest())
    if "Used" in printed:
        cache.put(json.dumps([0, printed]), "ptxas.json", binary=False)
        return 0, printed
    hit = cache.get_file("ptxas.json")
    if hit:
        with open(hit) as f:
            return tuple(json.load(f))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        run = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", path,
                              "-o", path + ".o"], capture_output=True, text=True)
    if run.returncode == 0:
        cache.put(json.dumps([0, run.stdout + run.stderr]), "ptxas.json", binary=False)
    return run.returncode, run.stdout + run.stderr


def compile_one(job):
    name, arch, cap = job
    spec = SPECS[name]
    start = time.perf_counter()
    src = ASTSource(spec["fn"], spec["signature"], spec["constexprs"], spec["attrs"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=spec["options"])
    ptx = compiled.asm["ptx"]
    rc, log = ptxas_log(ptx, arch, cap, printed.getvalue())
    find = lambda pattern: [int(x) for x in re.findall(pattern, log)]
    return name + "-" + arch, dict(
        ptxas_rc=rc, ptxas_log=log[-2000:], target=re.findall(r"^\.target\s+(\S+)", ptx, re.M),
        registers=find(r"Used (\d+) registers"), spill_stores=find(r"(\d+) bytes spill stores"),
        spill_loads=find(r"(\d+) bytes spill loads"), shared=compiled.metadata.shared,
        wgmma=ptx.count("wgmma.mma_async"), mma=ptx.count("mma.sync.aligned"),
        seconds=round(time.perf_counter() - start, 2))


jobs = [(name, arch, cap) for name in SPECS for arch, cap in (("sm_90a", 90), ("sm_80", 80))]
workers = min(2, os.cpu_count() or 1)
out = {"compile": {}, "trace": {}}
if workers > 1:
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        out["compile"].update(pool.map(compile_one, jobs))
else:
    out["compile"].update(map(compile_one, jobs))

# the registered ops under fake tensors and under AOT tracing (torch.compile's view of them)
import torch
from functorch.compile import aot_function
from torch._subclasses.fake_tensor import FakeTensorMode

with FakeTensorMode():
    q = torch.empty(2, 4, 300, 64, dtype=torch.bfloat16)
    k = torch.empty(2, 2, 300, 64, dtype=torch.bfloat16)
    o = torch.ops.lora_pass.lowrank_attention_fwd_triton(q, k, k, None, None, 0.125, 2, True, False, 0)
    g = torch.ops.lora_pass.lowrank_attention_bwd_triton(o, q, k, k, o, None, None, 0.125, 2, True, False, 0)
out["trace"]["fake_shapes"] = [list(t.shape) for t in (o, *g)]
out["trace"]["fake_dtypes"] = [str(t.dtype) for t in (o, *g)]

graphs = []
class Traced(Exception):
    pass
def keep(gm, example_inputs):
    graphs.append(gm.code)
    def never(*args):
        raise Traced()
    return never
def attention(q, k, v):
    return torch.ops.lora_pass.lowrank_attention_fwd_triton(q, k, v, None, None, 0.125, 2, True, False, 0)
x = torch.zeros(1, 2, 600, 64, dtype=torch.bfloat16)
try:
    aot_function(attention, fw_compiler=keep)(x, x[:, :1].clone(), x[:, :1].clone())
except Traced:
    pass
out["trace"]["kernel_launches"] = graphs[0].count("triton_kernel_wrapper_functional(") if graphs else -1
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
'''


@pytest.fixture(scope="module")
def results():
    """Compile every config for both targets once, in a child process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "results.json")
        run = subprocess.run([sys.executable, "-c", CHILD, path], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=1500, check=False)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
        with open(path) as f:
            return json.load(f)


@pytest.mark.parametrize("arch", list(TARGETS))
@pytest.mark.parametrize("config", CONFIGS)
def test_kernel_compiles_without_spills(results, config, arch):
    r = results["compile"][f"{config}-{arch}"]
    assert r["ptxas_rc"] == 0, r["ptxas_log"]
    assert r["target"] == [arch]
    assert r["registers"] and max(r["registers"]) <= 255, r["ptxas_log"]
    assert r["spill_stores"] == [0] and r["spill_loads"] == [0], r["ptxas_log"]
    assert 0 < r["shared"] <= SHARED_LIMIT[arch], r["shared"]
    assert r["wgmma" if arch == "sm_90a" else "mma"] > 0, f"no {TENSOR_CORE_OP[arch]} in the PTX"


def test_every_config_is_compiled(results):
    assert sorted(results["compile"]) == sorted(f"{c}-{a}" for c in CONFIGS for a in TARGETS)
    assert len(CONFIGS) == len(lt.KERNEL_NAMES) * len(lt.HEAD_DIMS) * len(lt.DTYPES)


def test_ops_trace_with_fake_tensors(results):
    """The registered ops have fake implementations (shapes and dtypes without a GPU), and AOT
    tracing (what torch.compile does) sees the Triton kernels themselves: the forward of a causal
    sequence of three super-chunks launches the state kernel and the output kernel."""
    shapes = results["trace"]["fake_shapes"]
    assert shapes == [[2, 4, 300, 64], [2, 4, 300, 64], [2, 2, 300, 64], [2, 2, 300, 64]]
    assert set(results["trace"]["fake_dtypes"]) == {"torch.bfloat16"}
    assert results["trace"]["kernel_launches"] == 2
