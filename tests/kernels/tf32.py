"""The reference with tf32 operands, emulated on any device: the error bound of the tf32 kernels' tests.

Triton hands fp32 operands to the tensor cores without rounding them to tf32 first, and the tensor cores then drop
the 13 low mantissa bits (truncation: twice the error of rounding, and biased; triton-lang/triton#4574 measured
Triton's tf32 dot less accurate than PyTorch's, which rounds). The reference is run with every convolution's
operands truncated the same way, in the forward and in both backward products, fp32 accumulation. A tf32 kernel may
be at most twice that error away from float64, as a bf16 kernel is held to twice the reference's own bf16 error.
(Measured on the CPU, 2026-11-28, on the tests' small backward cases: the rounding reference is 8.5e-4 off float64,
the truncating one 3.3e-3; the fixed bound of 2e-3 this replaces failed on an H100.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastnca.kernels import reference


def to_tf32(t: Tensor) -> Tensor:
    """fp32 values with the 13 low mantissa bits cleared, as the tensor cores read them."""
    return (t.float().contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)


class _Tf32Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, padding: int) -> Tensor:
        xt, wt = to_tf32(x), to_tf32(w)
        ctx.save_for_backward(xt, wt)
        ctx.padding, ctx.has_bias = padding, b is not None
        return F.conv2d(xt, wt, b, padding=padding)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, Tensor | None, None]:
        xt, wt = ctx.saved_tensors
        gt = to_tf32(g)
        gx = torch.nn.grad.conv2d_input(xt.shape, wt, gt, padding=ctx.padding)
        gw = torch.nn.grad.conv2d_weight(xt, wt.shape, gt, padding=ctx.padding)
        return gx, gw, g.sum((0, 2, 3)) if ctx.has_bias else None, None


class _Tf32Functional:
    """``torch.nn.functional`` with ``conv2d`` on tf32 operands."""

    def __getattr__(self, name: str) -> Any:
        if name == "conv2d":
            return lambda x, w, b=None, padding=0: _Tf32Conv2d.apply(x, w, b, padding)
        return getattr(F, name)


@contextmanager
def tf32_reference() -> Iterator[None]:
    """Inside: ``reference.nca_step_ref`` in fp32 computes its convolutions on truncated tf32 operands."""
    real = reference.F
    reference.F = _Tf32Functional()
    try:
        yield
    finally:
        reference.F = real
