"""The guarded attention op used by every rewritten site.

    out = guarded_attention(q, k, v, config, stats, key_weight=None)

Forward: R = norm_bound(q, k) in the graph; pred = R <= R_max (False for NaN/Inf);
control_flow.cond(pred, low-rank forward, exact forward). Backward: cond on the same saved pred,
so the gradient is always that of the path the forward took. Both branches are traced, so
Inductor compiles them (C++ on CPU, Triton on GPU); nothing breaks the graph and nothing
depends on the data at trace time, so steps do not recompile.

The low-rank branch is the chunked scan of ops/lowrank.py on CPU (and wherever the fused kernels
do not apply), and the fused Triton kernels of ops/lowrank_triton.py on CUDA (`_fused_kernels`:
degree 1 or 2, sm80+; `AttentionConfig.kernels="scan"` keeps the scan). The exact branch calls the
kernel scaled_dot_product_attention itself would pick (ops/exact.py).

With `AttentionConfig.softmax_one`, both paths compute softmax_1 ("outlier-free") attention,
softmax_1(s)_ij = e^{s_ij} / (1 + sum_l e^{s_il}): ordinary softmax with a null key of logit 0 and
value 0 (ops/exact.py and ops/lowrank.py; the guard's bound R is unchanged, docs/guard.md).

The per-site telemetry buffer `stats` (see STATS_FIELDS) is updated in place by the
`lora_pass::record_forward` and `lora_pass::record_backward` ops, with no host synchronisation.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from . import control_flow
from ..guard import norm_bound
from ..guard import r_max as r_max_bound
from .exact import exact_attention_backward, exact_attention_forward
from .features import FeatureTensors
from .layout import heads_inner, like, row_major
from .lowrank import compute_dtype, lowrank_attention_backward, lowrank_attention_forward

STATS_FIELDS = (
    "forward_lowrank",  # forward calls that took the low-rank path
    "forward_exact",  # forward calls that took the exact path
    "backward_lowrank",
    "backward_exact",
    "last_bound",  # R of the last call (NaN where the bound is not computed)
    "max_bound",  # largest finite R seen
    # composed norms of the last call (lora_pass.telemetry docs; NaN where not traced):
    "input_norm",  # max_i ||x_q,i|| * max_j ||x_k,j||
    "frozen_norm",  # ||W0_q|| * ||W0_k|| (Frobenius)
    "lora_norm",  # ||s B_q A_q|| * ... : the LoRA updates' part of the composed weight product
    "composed_bound",  # scale * (||x_q|| ||W_q|| + ||b_q||) * (||x_k|| ||W_k|| + ||b_k||), W = W0 + sBA
    "lora_share",  # 1 - composed bound without the LoRA updates / composed bound
)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Static description of one site, fixed at compile time.

    `r_max` defaults to the guard's bound for degree 2 at the backend's default tolerance 0.05
    (`guard.r_max(2, 0.05)`), so a guarded config built with defaults can take the low-rank path;
    pass the value of your own degree and tolerance with them.
    """

    scale: float
    causal: bool
    degree: int = 2
    r_max: float = dataclasses.field(default_factory=lambda: r_max_bound(2, 0.05))
    paths: str = "guarded"  # "guarded" (cond on the guard), "lowrank" (always), "exact" (always)
    softmax_one: bool = False  # softmax_1 attention: e^{s_ij} / (1 + sum_l e^{s_il})
    # "guarded": the low-rank branch also needs L >= min_length, checked per call (a symbolic
    # length, where the cost model's crossover cannot be decided at compile time)
    min_length: int = 0
    # the low-rank path's implementation: "auto" (the fused Triton kernels of ops/lowrank_triton.py
    # on CUDA where they apply, else the chunked scan of ops/lowrank.py), "scan" (always the scan)
    kernels: str = "auto"

    @property
    def sdpa_equivalent(self) -> bool:
        """Whether the exact attention of this config is what scaled_dot_product_attention
        computes (ordinary softmax), so an exact site can stay plain SDPA."""
        return not self.softmax_one


def new_stats(device) -> torch.Tensor:
    """Counters at zero; R and the composed norms NaN until a call records them (the norms stay
    NaN at a site whose projections they are not traced for)."""
    stats = torch.zeros(len(STATS_FIELDS), dtype=torch.float64, device=device)
    stats[STATS_FIELDS.index("last_bound")] = math.nan
    stats[STATS_FIELDS.index("input_norm"):] = math.nan
    return stats


@torch.library.custom_op("lora_pass::record_forward", mutates_args={"stats"})
def record_forward(stats: torch.Tensor, bound: torch.Tensor, lowrank: torch.Tensor) -> None:
    """Count one forward call on the path `lowrank` took and remember its bound R."""
    took = lowrank.to(stats.dtype)
    stats[0] += took
    stats[1] += 1 - took
    b = bound.to(stats.dtype)
    stats[4] = b
    stats[5] = torch.where(torch.isfinite(b), torch.maximum(stats[5], b), stats[5])


@record_forward.register_fake
def _(stats, bound, lowrank):
    return None


@torch.library.custom_op("lora_pass::record_norms", mutates_args={"stats"})
def record_norms(stats: torch.Tensor, norms: torch.Tensor) -> None:
    """Store the composed norms of the last call (STATS_FIELDS[6:])."""
    stats[6:] = norms.to(stats.dtype)


@record_norms.register_fake
def _(stats, norms):
    return None


@torch.library.custom_op("lora_pass::record_backward", mutates_args={"stats"})
def record_backward(stats: torch.Tensor, lowrank: torch.Tensor, grad: torch.Tensor) -> None:
    """Count one backward call on the path the forward took.

    `grad` (the incoming gradient) is not read: depending on it keeps the partitioner from
    hoisting the counter into the forward graph when `lowrank` is known there.
    """
    took = lowrank.to(stats.dtype)
    stats[2] += took
    stats[3] += 1 - took


@record_backward.register_fake
def _(stats, lowrank, grad):
    return None


def _fused_kernels(cfg: AttentionConfig, q, k):
    """ops/lowrank_triton.py where the low-rank path runs as fused Triton kernels (CUDA, sm80+,
    degree 1 or 2, a supported head dim and dtype, `cfg.kernels == "auto"`), else None: the scan
    path. Decided from static properties, so forward and backward agree; Triton is imported only
    for CUDA tensors."""
    if cfg.kernels != "auto" or q.device.type != "cuda":
        return None
    from . import lowrank_triton

    return lowrank_triton if lowrank_triton.supported(q, k, cfg.degree) else None


def _branches(cfg: AttentionConfig, has_weight: bool):
    """Forward and backward of both paths as functions of tensors only (cond operands).

    Operands after the fixed ones: the key weights (if any), then the feature tables
    (features.FeatureTensors), which the op creates outside the branches.
    """
    kw = dict(scale=cfg.scale, causal=cfg.causal, softmax_one=cfg.softmax_one)

    def split(rest):
        weight = rest[0] if has_weight else None
        return weight, FeatureTensors(rest[1:] if has_weight else rest)

    # Both paths' outputs get the flash kernel's layouts here (ops/layout.py): the output like q,
    # the gradients heads inside, so that the cond branches agree; a no-op view where the path
    # already wrote them so.
    # the low-rank path accumulates in float32 (ops/lowrank.compute_dtype); the caller's autocast
    # would cast its products back to bfloat16 / float16, so it runs with autocast off
    def lowrank_fwd(q, k, v, *rest):
        w, tables = split(rest)
        fused = _fused_kernels(cfg, q, k)
        with torch.autocast(q.device.type, enabled=False):
            if fused is not None:
                out = fused.lowrank_attention_forward_triton(q, k, v, key_weight=w, degree=cfg.degree, **kw)
            else:
                out = lowrank_attention_forward(q, k, v, key_weight=w, degree=cfg.degree, tables=tables, **kw)
        # placeholder logsumexp, of the exact branch's dtype (float64 for float64 inputs)
        return like(out, q), q.new_zeros(q.shape[:-1], dtype=compute_dtype(q.dtype))

    def exact_fwd(q, k, v, *rest):
        out, lse = exact_attention_forward(q, k, v, key_weight=split(rest)[0], **kw)
        return like(out, q), row_major(lse)

    def lowrank_bwd(dout, q, k, v, out, lse, *rest):
        w, tables = split(rest)
        fused = _fused_kernels(cfg, q, k)
        with torch.autocast(q.device.type, enabled=False):
            if fused is not None:
                grads = fused.lowrank_attention_backward_triton(dout, q, k, v, out, key_weight=w, degree=cfg.degree,
                                                                **kw)
            else:
                grads = lowrank_attention_backward(dout, q, k, v, out, key_weight=w, degree=cfg.degree,
                                                   tables=tables, **kw)
        return tuple(heads_inner(g) for g in grads)

    def exact_bwd(dout, q, k, v, out, lse, *rest):
        grads = exact_attention_backward(dout, q, k, v, out, lse, key_weight=split(rest)[0], **kw)
        return tuple(heads_inner(g) for g in grads)

    return lowrank_fwd, exact_fwd, lowrank_bwd, exact_bwd


def _operands(*tensors):
    """The tensors as `cond` operands, copied only where they must be.

    Both paths read any layout whose last dim is dense, so the model's heads-inside q, k, v pass
    as they are (ops/layout.py). `cond` refuses operands that share memory, so a tensor whose
    storage an earlier one uses (q, k, v split from one fused projection, or the same tensor
    passed twice) is copied, as is one with a strided last dim. Dynamo cannot trace storage
    identities: when it traces the op itself (a user's compiled function calls it), every operand
    is made contiguous, which copies the views that could share memory.
    """
    if torch.compiler.is_dynamo_compiling():
        out = []
        for t in tensors:
            t = t.contiguous()
            out.append(t.clone() if any(t is u for u in out) else t)
        return out
    from torch.multiprocessing.reductions import StorageWeakRef

    out, seen = [], set()
    for t in tensors:
        ref = StorageWeakRef(t.untyped_storage())
        if ref in seen:
            t = t.clone(memory_format=torch.contiguous_format)
            ref = StorageWeakRef(t.untyped_storage())
        elif t.stride(-1) != 1:
            t = t.contiguous()
        seen.add(ref)
        out.append(t)
    return out


class GuardedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_weight, stats, cfg: AttentionConfig):
        lowrank_fwd, exact_fwd, _, _ = _branches(cfg, key_weight is not None)
        extra = () if key_weight is None else (key_weight,)
        tables = tuple(FeatureTensors.build(q.shape[-1], cfg.degree, q.device)) if cfg.paths != "exact" else ()
        q, k, v = _operands(q, k, v)
        if cfg.paths == "exact":
            pred = torch.zeros((), dtype=torch.bool, device=q.device)
            bound = torch.full((), math.nan, device=q.device)
            out, lse = exact_fwd(q, k, v, *extra)
        else:
            bound = norm_bound(q, k, scale=cfg.scale, key_weight=key_weight)
            if cfg.paths == "lowrank":
                pred = torch.ones((), dtype=torch.bool, device=q.device)
                out, lse = lowrank_fwd(q, k, v, *extra, *tables)
            else:
                pred = bound <= cfg.r_max
                if cfg.min_length:
                    pred = pred & (q.new_full((), q.shape[2], dtype=torch.int64) >= cfg.min_length)
                out, lse = control_flow.cond(pred, lowrank_fwd, exact_fwd, (q, k, v, *extra, *tables))
        if stats is not None:
            record_forward(stats, bound, pred)
        ctx.cfg, ctx.has_weight, ctx.stats = cfg, key_weight is not None, stats
        ctx.save_for_backward(q, k, v, out, lse, pred, *extra)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, pred, *extra = ctx.saved_tensors
        cfg = ctx.cfg
        _, _, lowrank_bwd, exact_bwd = _branches(cfg, ctx.has_weight)
        tables = tuple(FeatureTensors.build(q.shape[-1], cfg.degree, q.device)) if cfg.paths != "exact" else ()
        q, k, v, out, dout = _operands(q, k, v, out, dout)
        args = (dout, q, k, v, out, lse, *extra, *tables)
        if cfg.paths == "exact":
            dq, dk, dv = exact_bwd(*args)
        elif cfg.paths == "lowrank":
            dq, dk, dv = lowrank_bwd(*args)
        else:
            dq, dk, dv = control_flow.cond(pred, lowrank_bwd, exact_bwd, args)
        if ctx.stats is not None:
            record_backward(ctx.stats, pred, dout)
        return dq, dk, dv, None, None, None


def guarded_attention(q, k, v, config: AttentionConfig, stats=None, key_weight=None):
    """Softmax (or softmax_1) attention with a norm guard between a low-rank and an exact path.

    Args:
        q: [B, Hq, L, D] queries; k, v: [B, Hkv, L, D] with Hq a multiple of Hkv (GQA).
        config: scale, causality, Taylor degree, R_max, which paths are compiled in, and
            softmax_one (softmax_1 attention, a null key of logit 0 and value 0).
        stats: optional float64 telemetry buffer from `new_stats`, updated in place.
        key_weight: optional [B, L] per-key weight (0 masks a key out; exp(b) adds a bias b).

    Returns:
        [B, Hq, L, D] in the dtype of q.

    Example:
        >>> cfg = AttentionConfig(scale=0.125, causal=True, degree=2, r_max=0.2)
        >>> out = guarded_attention(q, k, v, cfg)
    """
    return GuardedAttention.apply(q, k, v, key_weight, stats, config)
