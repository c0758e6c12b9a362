"""The rewritten region of a site as a networkx graph (`region_graph`), and as Graphviz DOT text
(`to_dot`): what `lora_pass.inspect` saves per site."""

from __future__ import annotations

import networkx as nx
import torch.fx as fx


def _expandable(node: fx.Node) -> bool:
    """Nodes whose inputs belong to a site's region: the projections and the reshapes after them."""
    from .matcher import LINEAR, SHAPE_FUNCTIONS, SHAPE_METHODS

    if node.op == "call_module":
        return True
    if node.op == "call_method":
        return node.target in SHAPE_METHODS
    name = getattr(node.target, "__name__", "")
    return node.op == "call_function" and (
        node.target in LINEAR or node.target in SHAPE_FUNCTIONS or name in {"add", "mul", "truediv", "dropout"}
    )


def region_graph(gm: fx.GraphModule, site) -> nx.DiGraph:
    """The rewritten region of one site as a networkx graph: the site call, the projections that
    feed q, k, v (LoRA included, back to their input x) and the nodes that consume its output."""
    call = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == site.submodule)
    keep, todo = {call}, [call]
    while todo:
        node = todo.pop()
        if not _expandable(node):
            continue
        for inp in node.all_input_nodes:
            if inp not in keep:
                keep.add(inp)
                todo.append(inp)
    keep.update(call.users)
    graph = nx.DiGraph(site=site.module, submodule=site.submodule)
    for node in gm.graph.nodes:
        if node not in keep:
            continue
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        kind = "lowrank_lora_site" if node is call else node.op
        graph.add_node(node.name, op=kind, target=str(target), label=f"{node.name}\n{target}")
    for node in keep:
        for inp in node.all_input_nodes:
            if inp in keep:
                graph.add_edge(inp.name, node.name)
    return graph


def to_dot(graph: nx.DiGraph) -> str:
    """Graphviz DOT text (no pydot needed)."""
    quote = lambda s: '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'  # noqa: E731
    lines = [f"digraph {quote(graph.graph.get('submodule', 'region'))} {{"]
    for name, attrs in graph.nodes(data=True):
        shape = "box" if attrs["op"] == "lowrank_lora_site" else "ellipse"
        lines.append(f"  {quote(name)} [label={quote(attrs['label'])}, shape={shape}];")
    for a, b in graph.edges:
        lines.append(f"  {quote(a)} -> {quote(b)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
