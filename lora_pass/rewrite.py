"""Replaces matched attention sites by the guarded op and records what it did."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import operator
import warnings

import torch
import torch.fx as fx

from . import compat, guard, matcher
from .masks import MaskPlan, decompose_mask
from .guard import norm_bound
from .ops.attention import AttentionConfig, guarded_attention, new_stats, record_forward, record_norms
from .ops.features import feature_rank
from .options import Options
from . import patterns

log = logging.getLogger("lora_pass")
compat.register_torch_logs()  # TORCH_LOGS="lowrank_lora" and "lowrank_lora_graphs"
graph_log = compat.artifact_logger(__name__, "lowrank_lora_graphs")


class AttentionSite(torch.nn.Module):
    """Submodule called by a rewritten graph: key weights from the mask, then the op.

    With `paths == "exact"` the site keeps plain SDPA (with the model's own mask), so Inductor
    lowers it exactly as it would without the backend; with telemetry on, the bound R and the
    counters are added. `factor_kinds` names the per-key mask factors ("bool" or "additive",
    see masks.MaskPlan) that the low-rank path turns into key weights.
    `norm_inputs` (telemetry only): x, W0, b, lora_A, lora_B of the q and k projections; W0 is
    None where it is frozen, its norm then being measured once at compile time (`frozen_norms`).
    """

    def __init__(self, config: AttentionConfig, factor_kinds: tuple, gqa: bool, device, telemetry: bool,
                 lora_scaling=(None, None), post_scale=(1.0, 1.0), frozen_norms=(None, None)):
        super().__init__()
        self.config, self.factor_kinds, self.gqa = config, tuple(factor_kinds), gqa
        self.lora_scaling, self.post_scale, self.frozen_norms = lora_scaling, post_scale, frozen_norms
        self.register_buffer("stats", new_stats(device) if telemetry else None, persistent=False)

    def forward(self, q, k, v, mask=None, factors=(), *norm_inputs):
        cfg = self.config
        key_weight = _key_weight(factors, self.factor_kinds, q, k)
        if self.stats is not None and norm_inputs:
            record_norms(self.stats, self._composed_norms(*norm_inputs))
        if cfg.paths != "exact" or not cfg.sdpa_equivalent:  # SDPA cannot compute it: the op's exact path
            return guarded_attention(q, k, v, cfg, self.stats, key_weight=key_weight)
        # the model's own mask where it has runtime parts; a constant causal mask became is_causal
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=cfg.causal and mask is None, scale=cfg.scale, enable_gqa=self.gqa
        )
        if self.stats is not None:
            bound = norm_bound(q.detach(), k.detach(), scale=cfg.scale, key_weight=key_weight)
            record_forward(self.stats, bound, torch.zeros((), dtype=torch.bool, device=q.device))
        return out

    def _composed_norms(self, xq, wq, bq, aq, bbq, xk, wk, bk, ak, bbk):
        """[input_norm, frozen_norm, lora_norm, composed_bound, lora_share] (see STATS_FIELDS)."""
        sides = []
        pairs = ((xq, wq, bq, aq, bbq), (xk, wk, bk, ak, bbk))
        for (x, w, b, a, bb), s, frozen in zip(pairs, self.lora_scaling, self.frozen_norms):
            x = x.detach().float()
            xn = torch.linalg.vector_norm(x, dim=-1).amax()
            wn = torch.linalg.matrix_norm(w.detach().float()) if w is not None else x.new_tensor(frozen)
            zero = xn * 0
            un = _lowrank_frobenius(bb.detach().float(), a.detach().float(), s) if a is not None else zero
            bn = torch.linalg.vector_norm(b.detach().float()) if b is not None else zero
            sides.append((xn, wn, un, bn))
        (xq, wq, uq, bq), (xk, wk, uk, bk) = sides
        factor = self.config.scale * abs(self.post_scale[0] * self.post_scale[1])
        composed = factor * (xq * (wq + uq) + bq) * (xk * (wk + uk) + bk)
        frozen_only = factor * (xq * wq + bq) * (xk * wk + bk)
        share = 1 - frozen_only / composed
        return torch.stack([xq * xk, wq * wk, (wq + uq) * (wk + uk) - wq * wk, composed, share])


def _lowrank_frobenius(b, a, scaling):
    """||scaling * B A||_F without the d_out x d_in product: ||BA||_F^2 = sum((B^T B) * (A A^T))."""
    return abs(scaling) * torch.sqrt(((b.T @ b) * (a @ a.T)).sum().clamp_min(0))


def _key_weight(factors, kinds, q, k):
    """Per-key mask factors [B or 1, 1, 1, L] -> one [B, L] float32 key weight (or None).

    A boolean factor keeps (1) or drops (0) a key; an additive one b_j becomes exp(b_j - max b).
    """
    weight = None
    for factor, kind in zip(factors, kinds):
        m = factor.reshape(factor.shape[0], factor.shape[-1]).expand(q.shape[0], k.shape[2])
        if kind == "bool":
            w = m.float()
        else:
            m = m.float()
            w = torch.exp(m - m.amax(-1, keepdim=True).clamp_min(-1e30))
        weight = w if weight is None else weight * w
    return weight


@dataclasses.dataclass
class GraphRecord:
    """What one call of the backend did to one graph."""

    sites: list
    skipped: list
    graph_before: str
    graph_after: str
    # filled only under lora_pass.inspect: AOT forward/backward code and networkx site regions
    aot_before: dict = dataclasses.field(default_factory=dict)
    aot_after: dict = dataclasses.field(default_factory=dict)
    regions: list = dataclasses.field(default_factory=list)


def _shape(node):
    value = matcher.meta_value(node)
    return None if value is None else tuple(value.shape)


def _dim(x):
    """A static size as an int, a symbolic one by its name ("s0")."""
    return x if isinstance(x, int) else str(x)


def _static(*dims) -> bool:
    return all(isinstance(d, int) for d in dims)


def _same_length(lq, lk) -> bool:
    """Lq == Lk, known at compile time (the same symbol, for symbolic lengths), without a guard."""
    if _static(lq, lk):
        return lq == lk
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(lq == lk)


def _plan(cand: matcher.Candidate, opts: Options, index: int):
    """-> (Site, MaskPlan) or Skipped for one candidate."""
    module = matcher.module_path(cand.output)
    skip = lambda reason: matcher.Skipped(module, cand.family, reason)  # noqa: E731
    if cand.skip_reason:
        return skip(cand.skip_reason)
    qs, ks, vs = _shape(cand.q), _shape(cand.k), _shape(cand.v)
    if qs is None or ks is None or vs is None or len(qs) != 4 or len(ks) != 4 or ks != vs:
        return skip(f"q/k/v are not [B, H, L, D] tensors of matching shapes ({qs}, {ks}, {vs})")
    b, hq, lq, d = qs
    hkv, lk = ks[1], ks[2]
    dynamic = not _static(b, hq, lq, d, hkv, lk)
    if dynamic and not _static(hq, d, hkv):
        return skip("symbolic head count or head dim")
    if ks[0] != b or ks[3] != d or hq % hkv:
        return skip(f"unsupported head layout q {list(qs)} k {list(ks)}")
    qv = matcher.meta_value(cand.q)
    if not qv.dtype.is_floating_point:
        return skip(f"dtype {qv.dtype}")
    mask = MaskPlan(causal=cand.causal)
    if cand.mask is not None:
        mv = matcher.meta_value(cand.mask)
        additive = cand.mask_kind == "additive" or (mv is not None and mv.dtype != torch.bool)
        mask = decompose_mask(cand.mask, lq, lk, additive)
        if mask.reason:
            return skip(mask.reason)
        mask.causal = mask.causal or cand.causal
    causal = mask.causal
    if causal and not _same_length(lq, lk):
        return skip(f"causal attention with Lq={lq} != Lk={lk}")
    if not dynamic and (lq == 0 or lk == 0):
        return skip("empty sequence")
    projections = {name: matcher.trace_projection(node) for name, node in zip("qkv", (cand.q, cand.k, cand.v))}
    if opts.require_lora and not any(p.adapted for p in projections.values()):
        return skip("no LoRA-adapted projection (require_lora=True)")
    if cand.symbolic_scale is not None:
        scale = matcher.SYMBOLIC  # the op computes with scale 1 on q times the factor
    else:
        scale = float(cand.scale if cand.scale is not None else d**-0.5)
    device_type = qv.device.type
    min_length = 0
    if opts.mode == "exact":
        paths, decision = "exact", 'mode="exact"'
    elif opts.mode == "lowrank":
        paths, decision = "lowrank", 'mode="lowrank"'
    else:
        crossover = opts.crossover
        if crossover is None:
            crossover = guard.crossover_length(d, opts.degree, device_type, causal)
        if not isinstance(lq, int):
            # one graph serves every length: the crossover is checked per call, with the guard
            paths, min_length = "guarded", crossover
            decision = f"symbolic L={lq}: guard and L >= crossover {crossover} decide per call"
        elif lq >= crossover:
            paths, decision = "guarded", f"L={lq} >= crossover {crossover}: guard decides per call"
        else:
            paths, decision = "exact", f"L={lq} < crossover {crossover}: exact is faster"
    site = matcher.Site(
        index=index, module=module, family=cand.family, projections=projections, causal=causal,
        mask=mask.kind,
        batch=_dim(b), heads=hq, kv_heads=hkv, seq_len=_dim(lq), head_dim=d, scale=scale,
        degree=opts.degree, feature_rank=feature_rank(d, opts.degree), r_max=opts.r_max,
        paths=paths, decision=decision, min_length=min_length,
    )
    return site, mask


def _candidates(graph: fx.Graph):
    for node in list(graph.nodes):
        cand = patterns.match(node)
        if cand is not None:
            yield _without_repeat_kv(cand)


def _without_repeat_kv(cand: matcher.Candidate) -> matcher.Candidate:
    """Read k and v before an explicit GQA head repeat: the op maps query heads to KV heads."""
    k, v = matcher.strip_repeat_kv(cand.k), matcher.strip_repeat_kv(cand.v)
    if k is None or v is None or _shape(k) != _shape(v):
        return cand
    return dataclasses.replace(cand, k=k, v=v, nodes=[*cand.nodes, cand.k, cand.v])


def rewrite_graph(gm: fx.GraphModule, opts: Options, example_inputs=()) -> GraphRecord:
    """Rewrite every qualifying site of `gm` in place; never raises for a single site.

    `example_inputs` (the backend's, in placeholder order) lets the telemetry measure frozen
    weights once at compile time.
    """
    before = gm.code
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = dict(zip(placeholders, example_inputs)) if len(example_inputs) == len(placeholders) else {}
    sites, skipped = [], []
    for cand in list(_candidates(gm.graph)):
        try:
            planned = _plan(cand, opts, len(sites))
            if isinstance(planned, matcher.Skipped):
                skipped.append(planned)
                log.info("lowrank_lora: skip %s (%s): %s", planned.module, planned.family, planned.reason)
                continue
            site, mask = planned
            _replace(gm, cand, site, mask, opts, values)
            sites.append(site)
            log.info("lowrank_lora: rewrite %s (%s) paths=%s: %s", site.module, site.family, site.paths, site.decision)
        except Exception as exc:  # a failure at one site leaves it exact; the compile goes on
            module = matcher.module_path(cand.output)
            warnings.warn(f"lowrank_lora: site {module} left unchanged after an error in the rewrite: {exc!r}")
            skipped.append(matcher.Skipped(module, cand.family, f"rewrite failed: {exc!r}"))
    if sites:
        gm.graph.lint()
        gm.recompile()
        graph_log.debug("lowrank_lora: graph before the rewrite:\n%s\nlowrank_lora: graph after the rewrite:\n%s",
                        before, gm.code)
    return GraphRecord(sites, skipped, before, gm.code if sites else before)


def _frozen_norm(proj: matcher.Projection, values):
    """Frobenius norm of a frozen weight (its slice, in a fused projection) measured now, or None
    (trainable, or no real value)."""
    value = values.get(proj.nodes["weight"])
    if not isinstance(value, torch.Tensor) or value.requires_grad or compat.is_fake(value):
        return None
    if proj.fused is not None:
        value = _out_slice(value, proj.fused, proj.nodes["layout"])
    return float(torch.linalg.matrix_norm(value.detach().float()))


def _out_slice(weight, fused, layout):
    """Rows (F.linear's [out, in]) or columns (Conv1D's [in, out]) start:stop of a weight."""
    start, stop = fused
    return weight[start:stop] if layout == "out_in" else weight[:, start:stop]


def _norm_args(graph: fx.Graph, proj: matcher.Projection, frozen):
    """x, W0 (None when frozen), bias, lora_A, lora_B nodes of one projection, sliced to its
    output in a fused projection (Frobenius norms do not depend on the weight's layout)."""
    nodes = proj.nodes
    weight = None if frozen is not None else nodes["weight"]
    bias, lora_b = nodes.get("bias"), nodes.get("lora_b")
    if proj.fused is not None:
        start, stop = proj.fused
        rows = (slice(start, stop),)
        if weight is not None:
            cols = rows if nodes["layout"] == "out_in" else (slice(None), slice(start, stop))
            weight = graph.call_function(operator.getitem, (weight, cols))
        if bias is not None:
            bias = graph.call_function(operator.getitem, (bias, rows))
        if lora_b is not None:
            lora_b = graph.call_function(operator.getitem, (lora_b, rows))
    return (nodes["x"], weight, bias, nodes.get("lora_a"), lora_b)


def _replace(gm: fx.GraphModule, cand: matcher.Candidate, site, mask: MaskPlan, opts: Options, values=None):
    qv = matcher.meta_value(cand.q)
    symbolic = site.scale == matcher.SYMBOLIC
    config = AttentionConfig(scale=1.0 if symbolic else site.scale, causal=site.causal, degree=site.degree,
                             r_max=site.r_max, paths=site.paths, min_length=site.min_length,
                             **cand.normaliser)
    pq, pk = site.projections["q"], site.projections["k"]
    # the composed norms are scaled by the logit scale: not traced where it is symbolic
    telemetry_norms = opts.telemetry and pq.nodes and pk.nodes and not symbolic
    frozen = tuple(_frozen_norm(p, values or {}) if telemetry_norms else None for p in (pq, pk))
    kinds = tuple(kind for _, kind in mask.factors)
    module = AttentionSite(config, kinds, site.heads != site.kv_heads, qv.device, opts.telemetry,
                           lora_scaling=(pq.scaling, pk.scaling), post_scale=(pq.post_scale, pk.post_scale),
                           frozen_norms=frozen)
    # The compiled-graph caches key on the graph's code, not on this module's attributes:
    # naming the submodule after its configuration (frozen norms included: they are traced in
    # as constants) keeps two configurations apart.
    digest = hashlib.sha256(repr((config, kinds, opts.telemetry, frozen)).encode()).hexdigest()[:10]
    name = f"lowrank_lora_site_{site.index}_{digest}"
    while hasattr(gm, name):
        name += "_"
    # exact sites keep the model's own mask where it has runtime parts (padding); the low-rank
    # path needs only the per-key factors, so the L x L mask is then no longer built
    keep_mask = cand.mask if site.paths == "exact" and mask.factors and config.sdpa_equivalent else None
    # Transactional: everything that can fail runs before the graph's existing nodes change, and
    # a failure removes what this site added, so the other sites' rewrites still compile.
    before = set(gm.graph.nodes)
    gm.add_submodule(name, module)
    try:
        if module.stats is not None:
            compat.register_graph_buffer(gm, f"{name}.stats")
        result = _insert_call(gm, cand, site, mask, keep_mask, name, telemetry_norms, frozen, qv)
    except Exception:
        for node in reversed([n for n in gm.graph.nodes if n not in before]):
            gm.graph.erase_node(node)
        gm.delete_submodule(name)
        compat.unregister_graph_buffer(gm, f"{name}.stats")
        raise
    site.submodule = name
    for proj in site.projections.values():  # the record keeps plain data, no graph nodes
        proj.nodes = {}
    cand.output.replace_all_uses_with(result)
    for node in cand.nodes:  # the core's nodes, output first: each is dead once its user is gone
        if not node.users:
            gm.graph.erase_node(node)
    if cand.mask is not None and keep_mask is None:
        _erase_dead(gm.graph, cand.mask)


def _insert_call(gm, cand, site, mask, keep_mask, name, telemetry_norms, frozen, qv):
    """Insert the call of the site's submodule before the attention output; -> its result node."""
    pq, pk = site.projections["q"], site.projections["k"]
    out_value = matcher.meta_value(cand.output)
    with gm.graph.inserting_before(cand.output):
        q = cand.q
        if cand.symbolic_scale is not None:  # the logits' run-time factor, applied to q
            factor, divide = cand.symbolic_scale
            q = gm.graph.call_function(operator.truediv if divide else operator.mul, (q, factor))
            q.meta = dict(cand.q.meta)
        args = (q, cand.k, cand.v, keep_mask, [node for node, _ in mask.factors])
        if telemetry_norms:
            for p, norm in zip((pq, pk), frozen):
                args += _norm_args(gm.graph, p, norm)
        new = gm.graph.call_module(name, args)
        new.meta = dict(cand.output.meta)
        result = new
        if out_value is not None and out_value.dtype != qv.dtype:
            result = gm.graph.call_method("to", (new, out_value.dtype))
            result.meta = dict(cand.output.meta)
    return result


def _erase_dead(graph: fx.Graph, node: fx.Node):
    """Erase a mask-building chain that nothing uses any more."""
    todo, erased = [node], set()
    while todo:
        n = todo.pop()
        if n in erased or n.users or n.op in ("placeholder", "output"):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        erased.add(n)
        todo.extend(inputs)
