"""Memory layouts of the attention op's outputs, shared by both paths.

Hugging Face attention builds q, k, v as `x.view(B, L, H, D).transpose(1, 2)`: [B, H, L, D]
tensors stored as [B, L, H, D] ("heads inside", each position's heads side by side). The CPU
flash kernel keeps that layout: its output is laid out like q and its gradients are always heads
inside, so that the model's `transpose(1, 2).reshape(B, L, H * D)` after attention is free. The
op follows the same rules on both paths (`torch.cond` branches agree on their outputs' strides)
and copies nothing the plain kernel would not: the output like q, the gradients heads inside.

Strides are also fixed on size-1 dims (`row_major`): AOTAutograd copies the incoming gradient of
an output into that output's exact strides before the backward, so an output whose size-1 dims
carry other strides than the gradient costs an L-sized copy.
"""

from __future__ import annotations

import torch


def row_major_strides(shape) -> tuple:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def row_major(t: torch.Tensor) -> torch.Tensor:
    """t (copied only when not dense row-major) with plain row-major strides, size-1 dims included."""
    t = t.contiguous()
    return t.as_strided(t.shape, row_major_strides(t.shape))


def heads_inner(t: torch.Tensor) -> torch.Tensor:
    """A [B, H, L, D] tensor stored as [B, L, H, D] (copied only when it is not already)."""
    return row_major(t.transpose(1, 2)).transpose(1, 2)


def is_heads_inner(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.transpose(1, 2).is_contiguous()


def like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """t heads inside when `ref` is, else row-major: the layout the flash kernel gives its output."""
    return heads_inner(t) if is_heads_inner(ref) else row_major(t)


_REVERSE_BLOCK = 8  # slices swapped per step of `reverse_leading_`: the size of its two buffers


@torch.library.custom_op("lora_pass::reverse_leading_", mutates_args={"t"})
def reverse_leading_(t: torch.Tensor) -> None:
    """Reverse the order of t's slices along dim 0 in place (t.copy_(t.flip(0)) without a copy of t).

    The causal backward's reverse scan stacks its outputs last chunk first; this puts them in
    order. Inductor keeps the mutation in place when nothing else reads the tensor (its reinplace
    pass), so only two blocks of _REVERSE_BLOCK slices are ever copied aside.
    """
    n = t.shape[0]
    for i in range(0, n // 2, _REVERSE_BLOCK):
        b = min(_REVERSE_BLOCK, n // 2 - i)
        head, tail = t[i:i + b], t[n - i - b:n - i]
        front = head.flip(0)
        head.copy_(tail.flip(0))
        tail.copy_(front)


@reverse_leading_.register_fake
def _(t):
    return None
