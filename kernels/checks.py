"""The input checks of every fused launcher: one validator for the step's forward and backward (and the rollout,
which checks its first step's inputs), so that a bad argument gets the same message, naming it, from each."""

from __future__ import annotations

import torch
from torch import Tensor

from . import tiles
from .reference import UpdateWeights, check_step_inputs

__all__ = ["DTYPES", "MAX_CHANNELS", "PRECISIONS", "SUPPORTED_CHANNELS", "TL_DTYPE", "check_device", "check_inputs"]

DTYPES = (torch.float32, torch.bfloat16)  # the state's and the weights' (cast to the state's)
PRECISIONS = ("ieee", "tf32")  # input_precision of fp32 dots
MAX_CHANNELS = 256
SUPPORTED_CHANNELS = f"multiples of 16 from 16 to {MAX_CHANNELS} (|z| and h)"
# Triton's name of each dtype, for the sm_90 fit's kernel signatures ("*" + name for a pointer)
TL_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def check_device(name: str, t: Tensor, device: torch.device | None = None) -> None:
    """``t`` on ``device`` (another input's), or, without one, on the device the kernels run on: the CPU in
    interpreter mode, else a GPU."""
    if device is not None:
        if t.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} (the state's device), got {t.device}")
        return
    if tiles.INTERPRET and t.device.type != "cpu":
        raise ValueError(f"{name}: expected a CPU tensor in interpreter mode (TRITON_INTERPRET=1), got {t.device}")
    if not tiles.INTERPRET and t.device.type != "cuda":
        raise ValueError(f"{name}: expected a CUDA tensor (set TRITON_INTERPRET=1 to run on the CPU), got {t.device}")


def _check_channels(name: str, what: str, n: int) -> None:
    if n % 16 != 0 or not 16 <= n <= MAX_CHANNELS:
        raise ValueError(f"{name}: {what} = {n} is not supported; supported: {SUPPORTED_CHANNELS}")


def check_inputs(state: Tensor, weights: UpdateWeights, mask: Tensor | None, double: bool, input_precision: str,
                 grad_out: Tensor | None = None) -> None:
    """Every check of a fused step's inputs, with the argument's name in each message; with ``grad_out`` (the
    backward) also the upstream gradient's: the step's output shape, the state's dtype and device."""
    if not isinstance(weights, UpdateWeights):
        raise TypeError(f"weights: expected an UpdateWeights, got {type(weights).__name__}")
    if not isinstance(weights.w_perceive, Tensor) or weights.w_perceive.dim() != 4:
        raise ValueError("weights.w_perceive: expected a tensor of shape (h, |z|, 3, 3)")
    if not isinstance(double, (bool, int)):
        raise TypeError(f"double: expected a bool, got {type(double).__name__}")
    check_step_inputs(state, weights, mask, double)
    if input_precision not in PRECISIONS:
        raise ValueError(f"input_precision: expected one of {PRECISIONS}, got {input_precision!r}")
    if state.dtype not in DTYPES:
        raise TypeError(f"state: expected float32 or bfloat16, got {state.dtype}")
    check_device("state", state)
    c, h = weights.state_channels, weights.hidden_channels
    _check_channels("weights.w_perceive", "|z|", c)
    _check_channels("weights.w_perceive", "h", h)
    expected = {"w_perceive": (h, c, 3, 3), "b_perceive": (h,), "w_out": (c, h, 1, 1), "b_out": (c,)}
    named: list[tuple[str, Tensor | None, tuple[int, ...]]] = [
        (f"weights.{k}", getattr(weights, k), v) for k, v in expected.items()
    ]
    for i, blk in enumerate(weights.blocks):
        if len(blk) != 4:
            raise ValueError(f"weights.blocks[{i}]: expected (w1, b1, w2, b2), got {len(blk)} entries")
        for name, t, shape in zip(("w1", "b1", "w2", "b2"), blk, ((h, h, 1, 1), (h,), (h, h, 1, 1), (h,))):
            named.append((f"weights.blocks[{i}].{name}", t, shape))
    for name, t, shape in named:
        if t is None:
            if not name.split(".")[-1].startswith("b"):
                raise TypeError(f"{name}: expected a tensor, got None")
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name}: expected float32 or bfloat16 (cast to the state's {state.dtype}), got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        check_device(name, t, state.device)
    if mask is not None:
        check_device("mask", mask, state.device)
    if grad_out is None:
        return
    if not isinstance(grad_out, Tensor):
        raise TypeError(f"grad_out: expected a torch.Tensor, got {type(grad_out).__name__}")
    b, _, hh, ww = state.shape
    out_shape = (b, c, 2 * hh, 2 * ww) if double else (b, c, hh, ww)
    if tuple(grad_out.shape) != out_shape:
        raise ValueError(f"grad_out: expected shape {out_shape} (the step's output), got {tuple(grad_out.shape)}")
    if grad_out.dtype != state.dtype:
        raise TypeError(f"grad_out: expected the state's dtype {state.dtype}, got {grad_out.dtype}")
    check_device("grad_out", grad_out, state.device)
