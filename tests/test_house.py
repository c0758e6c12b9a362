"""The package as a guest in the process: importing it loads only what compiling needs, changes
nothing of torch, and compiling with the backend leaves every other compilation as it was."""

from __future__ import annotations

import ast
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A program with a scan and a cond in its forward and its backward, compiled with
# backend="inductor": the code paths of Inductor that the backend's lowering contexts change.
PLAIN_PROGRAM = """
import torch
from torch._higher_order_ops.scan import scan
from torch._inductor.utils import run_and_get_code

torch._dynamo.config.capture_scalar_outputs = True

def f(x, w):
    def step(carry, xi):
        nxt = carry @ w + xi.sin()
        return nxt.clone(), nxt.cos()
    h, ys = scan(step, torch.zeros_like(x[0]), x)
    out = torch.cond(h.sum() > 0, lambda a: a * 2, lambda a: a - 1, (ys,))
    return out.sum(0)

torch._dynamo.reset()
x = torch.randn(5, 3, 4, requires_grad=True)
w = torch.randn(4, 4, requires_grad=True)
_, codes = run_and_get_code(lambda: torch.compile(f, backend="inductor")(x, w).sum().backward())
"""

# torch's own functions that the backend's lowering contexts replace while they are open
OWN_FUNCTIONS = """
from torch._inductor import ir
from torch._inductor.graph import GraphLowering
from torch._higher_order_ops.cond import cond_op
from torch._higher_order_ops.scan import scan_op
def own():
    return (ir.Conditional.__dict__["create"], ir.WhileLoop.__dict__["create"],
            GraphLowering.make_subgraph, dict(cond_op.python_key_table), dict(scan_op.python_key_table))
"""


def _run(code: str, tmp_path, name: str) -> str:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / name), TORCHINDUCTOR_FX_GRAPH_CACHE="0",
               TORCHINDUCTOR_AUTOGRAD_CACHE="0", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout.replace(str(tmp_path / name), "<cache>")
    return re.sub(r"AOT ID: \['\d+_", "AOT ID: ['<n>_", out)  # the process's count of compiled graphs


def test_import_loads_no_compiler_and_no_report(tmp_path):
    out = _run("""
        import sys, time
        import torch
        t = time.perf_counter()
        import lora_pass
        heavy = [m for m in ("networkx", "tabulate", "torch._inductor.compile_fx", "lora_pass.report",
                             "lora_pass.rewrite") if m in sys.modules]
        print(heavy)
        """, tmp_path, "import")
    assert out.strip() == "[]"


def test_torch_is_its_own_after_import_and_compile_and_plain_inductor_code_unchanged(tmp_path):
    """After `import lora_pass` and a `lowrank_lora` compile of a LoRA attention block, torch's
    Inductor and control-flow functions are its own, and a program compiled with
    backend="inductor" gets the same generated code as in a process that never imported the
    package."""
    plain = _run(PLAIN_PROGRAM + "print('\\n'.join(codes))", tmp_path, "plain")
    guest = _run(OWN_FUNCTIONS + """
import torch, lora_pass
before = own()
from tests.conftest import LoraAttention, lora_block
block = lora_block(LoraAttention)
x = torch.randn(2, 8, 16)
torch.compile(block, backend="lowrank_lora", options={"mode": "lowrank"})(x).sum().backward()
assert len(lora_pass.sites()) == 1, lora_pass.records()
after = own()
assert all(a is b or a == b for a, b in zip(before, after)), (before, after)
""" + PLAIN_PROGRAM + "print('\\n'.join(codes))", tmp_path, "guest")
    assert "while" in plain and "if " in plain  # the program has its loop and its branch
    if guest != plain:
        (tmp_path / "plain.txt").write_text(plain)
        (tmp_path / "guest.txt").write_text(guest)
    assert guest == plain, f"generated code differs: diff {tmp_path}/plain.txt {tmp_path}/guest.txt"


def _imports(path: pathlib.Path, package: str) -> set:
    """The lora_pass modules `path` imports, at any level (functions' imports included)."""
    found = set()
    module = package + "." + ".".join(path.relative_to(ROOT / "lora_pass").with_suffix("").parts)
    module = module.removesuffix(".__init__")
    base = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base
                for _ in range(node.level - 1):
                    parent = parent.rpartition(".")[0]
                target = f"{parent}.{node.module}" if node.module else parent
                names = [target] if node.module else [f"{parent}.{a.name}" for a in node.names]
            else:
                names = [node.module]
            found.update(n for n in names if n and n.startswith(package))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(package))
    return found


def test_no_import_cycles_between_modules():
    """No two modules of the package import each other, directly or through others (imports
    inside functions included); the pattern families (patterns/, which import the matcher) and
    the package's lazy __init__ are outside the check."""
    nx = pytest.importorskip("networkx")
    graph = nx.DiGraph()
    for path in (ROOT / "lora_pass").rglob("*.py"):
        if path.name == "__init__.py" or "_logs" in path.parts:
            continue
        module = "lora_pass." + ".".join(path.relative_to(ROOT / "lora_pass").with_suffix("").parts)
        graph.add_node(module)
        for target in _imports(path, "lora_pass"):
            if target in ("lora_pass", "lora_pass.ops", "lora_pass.patterns") or target.startswith("lora_pass.patterns"):
                continue
            graph.add_edge(module, target)
    cycles = list(nx.simple_cycles(graph))
    assert cycles == []
