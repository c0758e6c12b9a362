"""Backend registration and options."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import lora_pass
from lora_pass import compat
from lora_pass.options import Options


def test_entry_point_registers_backend_without_import():
    code = (
        "import sys, torch\n"
        "f = torch.compile(lambda x: torch.sin(x) * 2, backend='lowrank_lora')\n"
        "x = torch.arange(4.0)\n"
        "assert torch.allclose(f(x), torch.sin(x) * 2)\n"
        "assert 'lora_pass.backend' in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_backend_is_listed_after_import():
    assert "lowrank_lora" in torch._dynamo.list_backends(exclude_tags=())


@pytest.mark.parametrize(
    "options,name",
    [
        ({"tolerance": 0}, "tolerance"),
        ({"tolerance": 1.5}, "tolerance"),
        ({"tolerance": "small"}, "tolerance"),
        ({"degree": 0}, "degree"),
        ({"degree": 2.5}, "degree"),
        ({"mode": "fast"}, "mode"),
        ({"require_lora": "yes"}, "require_lora"),
        ({"telemetry": 1}, "telemetry"),
        ({"crossover": -1}, "crossover"),
        ({"inductor": ["max_autotune"]}, "inductor"),
        ({"tolerence": 0.1}, "tolerence"),
    ],
)
def test_bad_options_raise_value_error_naming_the_option(options, name):
    with pytest.raises(ValueError, match=name):
        Options.parse(options)


def test_bad_option_fails_the_compile_with_the_value_error():
    f = torch.compile(lambda x: x + 1, backend="lowrank_lora", options={"mode": "fast"})
    with pytest.raises(Exception) as info:
        f(torch.ones(2))
    chain, exc = [], info.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or getattr(exc, "inner_exception", None)
        if exc in chain:
            break
    assert any(isinstance(e, ValueError) and "'mode'" in str(e) for e in chain)


def test_defaults_and_r_max():
    opts = Options.parse(None)
    assert (opts.tolerance, opts.degree, opts.mode, opts.require_lora) == (0.05, 2, "auto", True)
    assert 0.1 < opts.r_max < 0.3
    assert Options.parse({"tolerance": 0.1}).r_max > opts.r_max


def test_compile_mode_and_inductor_patches_reach_inductor(monkeypatch):
    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        seen["patches"] = config_patches
        return gm.forward

    monkeypatch.setattr(compat, "compile_fx", fake_compile_fx)
    # torch.compile takes either mode= or options=, never both
    torch._dynamo.reset()
    torch.compile(lambda x: x * 3, backend="lowrank_lora", mode="max-autotune-no-cudagraphs")(torch.ones(3))
    assert seen["patches"]["max_autotune"] is True
    torch._dynamo.reset()
    torch.compile(lambda x: x * 4, backend="lowrank_lora", options={"inductor": {"epilogue_fusion": False}})(torch.ones(3))
    assert seen["patches"] == {"epilogue_fusion": False}


def _patches_for(monkeypatch, options, fail_with=None, calls=None):
    """Inductor patches each compile_fx call of the backend received, for a LoRA attention block
    compiled with `options` (compile_fx replaced: nothing is compiled), and the graph records.
    `fail_with`: a patch name whose presence makes the fake compile_fx raise; `calls`: the list
    to record into."""
    from tests.conftest import LoraAttention, lora_block

    calls = [] if calls is None else calls

    def fake_compile_fx(gm, example_inputs, config_patches=None, **kwargs):
        calls.append(dict(config_patches or {}))
        if fail_with and fail_with in (config_patches or {}):
            raise RuntimeError(f"{fail_with} unsupported here")
        return gm.forward

    monkeypatch.setattr(compat, "compile_fx", fake_compile_fx)
    torch._dynamo.reset()
    lora_pass.reset()
    torch.compile(lora_block(LoraAttention), backend="lowrank_lora", options=options)(torch.randn(2, 8, 16))
    return calls, lora_pass.records()


def test_cpp_wrapper_is_the_default_where_a_lowrank_path_compiles_on_cpu(monkeypatch):
    from lora_pass.lowering import LOWRANK_CPU_INDUCTOR

    for options in ({"mode": "lowrank"}, {"crossover": 0}):  # paths "lowrank" and "guarded"
        calls, records = _patches_for(monkeypatch, options)
        assert len(calls) == 1 and calls[0]["cpp_wrapper"] is True
        assert LOWRANK_CPU_INDUCTOR.items() <= calls[0].items()
    # an exact-only graph is compiled with the user's settings alone
    for options in ({"mode": "exact"}, None):  # None: L = 8 is below the crossover, exact
        calls, records = _patches_for(monkeypatch, options)
        assert len(records) == 1 and len(records[0].sites) == 1 and records[0].sites[0].paths == "exact"
        assert "cpp_wrapper" not in calls[0]
    # the user's settings override the backend's
    calls, _ = _patches_for(monkeypatch, {"mode": "lowrank", "inductor": {"cpp_wrapper": False}})
    assert calls[0]["cpp_wrapper"] is False


def test_failing_default_inductor_settings_are_dropped_not_the_rewrite(monkeypatch):
    with pytest.warns(UserWarning, match="compiling without them"):
        calls, records = _patches_for(monkeypatch, {"mode": "lowrank"}, fail_with="cpp_wrapper")
    assert [("cpp_wrapper" in c) for c in calls] == [True, False]
    (record,) = records
    assert len(record.sites) == 1 and record.sites[0].paths == "lowrank" and not record.skipped
    # a setting the user asked for is never dropped: the unchanged graph is tried with it, and
    # the user sees the error
    calls = []
    with pytest.warns(UserWarning, match="compiled unchanged"), pytest.raises(Exception, match="unsupported here"):
        _patches_for(monkeypatch, {"mode": "lowrank", "inductor": {"cpp_wrapper": True}}, fail_with="cpp_wrapper",
                     calls=calls)
    assert [c.get("cpp_wrapper") for c in calls] == [True, True]


def test_public_api():
    for name in lora_pass.__all__:
        assert getattr(lora_pass, name).__doc__
