"""Shims over the private torch._dynamo / torch._inductor / torch._functorch APIs the project
uses, in one place: each works on torch 2.11 - 2.14, version differences handled here.

Nothing here changes torch: these are lookups, registrations under the backend's own names, and
config contexts. Inductor itself is imported only when a graph is compiled."""

from __future__ import annotations


def compile_fx(*args, **kwargs):
    """Inductor's compile_fx (imported when first called)."""
    from torch._inductor.compile_fx import compile_fx as inner

    return inner(*args, **kwargs)


def list_mode_options(mode):
    """Inductor's config patches for a torch.compile `mode`."""
    from torch._inductor import list_mode_options as inner

    return inner(mode)


def is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def register_backend_once(compiler_fn, name: str) -> None:
    """Register a backend unless Dynamo already has it or will load it from its entry point.

    Loading the `torch_dynamo_backends` entry point imports this package, and Dynamo registers
    the loaded function itself right after; registering here too would be a duplicate.
    """
    from torch._dynamo.backends import registry

    if name in registry._COMPILER_FNS or registry._BACKENDS.get(name) is not None:
        return
    registry.register_backend(compiler_fn=compiler_fn, name=name)


def register_graph_buffer(gm, name: str) -> None:
    """Tell AOTAutograd where a buffer that the backend added to a Dynamo graph comes from.

    AOTAutograd maps every parameter and buffer of a Dynamo graph back to a Dynamo source;
    a buffer added after tracing has none, so it gets a constant source of its own.
    """
    from torch._dynamo.source import ConstantSource

    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        sources[name] = ConstantSource(f"__lowrank_lora_{name}")


def unregister_graph_buffer(gm, name: str) -> None:
    """Undo `register_graph_buffer` (nothing to do where it was not registered)."""
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        sources.pop(name, None)


def register_torch_logs() -> None:
    """TORCH_LOGS="lowrank_lora" (decisions) and TORCH_LOGS="lowrank_lora_graphs" (rewritten graphs)."""
    import os

    from torch._logging import _internal

    if "lowrank_lora_graphs" in _internal.log_registry.artifact_names:
        return
    _internal.register_log("lowrank_lora", ["lora_pass"])
    # parsed at torch import as the module name of the shim, which would shadow the artifact
    _internal.log_registry.log_alias_to_log_qnames.pop("lowrank_lora_graphs", None)
    _internal.register_artifact(
        "lowrank_lora_graphs", "Dynamo graphs before and after the lowrank_lora rewrite", visible=True,
        off_by_default=True,
    )
    if os.environ.get("TORCH_LOGS"):
        # TORCH_LOGS was parsed at torch import, when these names were only the importable shims
        # of the same names (lora_pass/_logs); parse it again now that they mean what they should
        _internal._parse_log_settings.cache_clear()  # it is memoised on the settings string
        _internal._init_logs()


def artifact_logger(module_name: str, artifact: str):
    from torch._logging import getArtifactLogger

    return getArtifactLogger(module_name, artifact)


def force_eager_backward_compile():
    """AOTAutograd compiles the backward graph at compile time instead of at the first backward."""
    import torch._functorch.config as functorch_config

    return functorch_config.patch(force_non_lazy_backward_lowering=True)


def fresh_aot_compile():
    """AOTAutograd traces and lowers both graphs now, bypassing its on-disk cache.

    A cache hit returns compiled code without calling the inner compiler, so a graph recorded
    there would be missing; inspection needs the graphs themselves.
    """
    import torch._functorch.config as functorch_config

    return functorch_config.patch(force_non_lazy_backward_lowering=True, enable_autograd_cache=False)


def aot_trace_graphs(gm, example_inputs):
    """The forward and backward AOTAutograd graphs of `gm`, as code, without Inductor."""
    from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

    graphs = {}

    def recorder(name):
        def compiler(graph, inputs):
            graphs[name] = graph.print_readable(print_output=False)
            return make_boxed_func(graph.forward)

        return compiler

    with force_eager_backward_compile():
        aot_module_simplified(gm, example_inputs, fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
    return graphs


def compile_fx_inner():
    from torch._inductor.compile_fx import compile_fx_inner as inner

    return inner
