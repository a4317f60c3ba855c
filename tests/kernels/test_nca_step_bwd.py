"""Gradient parity of the fused backward ``nca_step_bwd`` against float64 autograd of ``nca_step_ref``.

Every test compares the state gradient and every weight and bias gradient, with the same inputs and upstream
gradient. Output buffers are NaN-poisoned (``torch.empty`` called from ``fastnca.kernels`` returns NaN), so an
element a kernel fails to write fails the test. Shapes stay small (C, h 16..48, grids up to 12x12) because the
CPU runs the kernels in Triton's interpreter.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import pytest
import torch
from torch import Tensor

from fastnca.kernels import nca_step_bwd as bwd_mod
from fastnca.kernels import tiles
from fastnca.kernels.nca_step_bwd import nca_step_bwd
from fastnca.kernels.reference import UpdateWeights, nca_step_ref
from tests.conftest import DEVICE
from tests.kernels.tf32 import tf32_reference
from tests.utils import assert_close, rel_err

FP32_STATE_RTOL = 1e-5
FP32_WEIGHT_RTOL = 1e-4  # gradients summed over cells
TF32_RATIO = 2.0  # a tf32 kernel may be at most twice as far from float64 as the reference on tf32 operands
TF32_FLOOR = 1e-5  # where a gradient does not go through a tf32 product (the output bias): fp32-level error
BF16_RATIO = 2.0  # the kernel's error may be at most twice that of the reference autograd run in bf16


@pytest.fixture(autouse=True)
def _nan_poison(nan_poison: None) -> None:
    """Every test here runs with NaN-filled ``torch.empty`` in the kernel module (tests/kernels/conftest.py)."""


class Case(NamedTuple):
    batch: int
    height: int  # the updated (output) grid; the input is half of it when doubling
    width: int
    channels: int
    hidden: int
    n_blocks: int
    bias: str  # "bias", "nobias" or "mixbias" (blocks alternate with and without biases)
    mask: bool
    double: bool

    @property
    def id(self) -> str:
        flags = [self.bias, "mask" if self.mask else "nomask"] + (["double"] if self.double else [])
        return (
            f"B{self.batch}-H{self.height}-W{self.width}-C{self.channels}-h{self.hidden}-nb{self.n_blocks}-"
            + "-".join(flags)
        )


FP32_CASES = [
    Case(1, 1, 1, 16, 16, 0, "nobias", False, False),
    Case(1, 7, 9, 16, 32, 2, "bias", True, False),
    Case(2, 7, 9, 16, 32, 1, "nobias", False, False),
    Case(2, 5, 7, 32, 32, 0, "bias", True, False),
    Case(1, 12, 12, 16, 32, 8, "bias", False, False),
    Case(2, 3, 11, 48, 48, 2, "mixbias", True, False),
    Case(1, 31, 3, 16, 16, 1, "bias", False, False),
    Case(2, 6, 10, 16, 32, 2, "bias", True, True),
    Case(1, 2, 2, 16, 32, 1, "nobias", False, True),
    Case(2, 8, 6, 32, 16, 0, "bias", True, True),
    Case(1, 62, 2, 16, 16, 1, "nobias", True, True),
    Case(1, 10, 12, 16, 32, 8, "mixbias", True, True),
]

BF16_CASES = [
    Case(2, 7, 9, 16, 32, 2, "bias", True, False),
    Case(1, 8, 8, 32, 32, 0, "bias", True, False),
    Case(2, 6, 10, 16, 32, 1, "nobias", True, True),
    Case(1, 12, 12, 16, 16, 8, "bias", False, False),
]


def make_weights(c: int, h: int, n_blocks: int, bias: str, dtype: torch.dtype) -> UpdateWeights:
    """Random non-zero weights with fan-in scaling (never the zero-initialised output conv)."""

    def rnd(*shape: int, scale: float) -> Tensor:
        return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)

    def b(n: int, i: int = 0) -> Tensor | None:
        if bias == "nobias" or (bias == "mixbias" and i % 2 == 0):
            return None
        return rnd(n, scale=0.3)

    blocks = tuple(
        (rnd(h, h, 1, 1, scale=h**-0.5), b(h, i), rnd(h, h, 1, 1, scale=h**-0.5), b(h, i + 1)) for i in range(n_blocks)
    )
    return UpdateWeights(
        rnd(h, c, 3, 3, scale=(9 * c) ** -0.5), b(h, 1), blocks, rnd(c, h, 1, 1, scale=h**-0.5), b(c, 1)
    )


def make_inputs(case: Case, dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor]:
    """(state, mask, grad_out): the state channels-last at the input resolution."""
    hi, wi = (case.height // 2, case.width // 2) if case.double else (case.height, case.width)
    state = torch.randn(case.batch, case.channels, hi, wi, device=DEVICE).to(dtype)
    state = state.contiguous(memory_format=torch.channels_last)
    mask = torch.rand(case.batch, 1, case.height, case.width, device=DEVICE) < 0.6 if case.mask else None
    grad_out = torch.randn(case.batch, case.channels, case.height, case.width, device=DEVICE).to(dtype)
    return state, mask, grad_out.contiguous(memory_format=torch.channels_last)


def autograd_grads(
    state: Tensor, weights: UpdateWeights, mask: Tensor | None, double: bool, grad_out: Tensor, dtype: torch.dtype
) -> list[Tensor | None]:
    """[d state] + weight grads in ``flat()`` order from autograd of the reference run in ``dtype``."""
    s = state.detach().to(dtype).requires_grad_()
    flat = [None if t is None else t.detach().to(dtype).requires_grad_() for t in weights.flat()]
    out = nca_step_ref(s, UpdateWeights.from_flat(flat), mask, double)
    leaves = [s] + [t for t in flat if t is not None]
    grads = iter(torch.autograd.grad(out, leaves, grad_out.to(dtype)))
    return [next(grads)] + [None if t is None else next(grads) for t in flat]


def grad_names(weights: UpdateWeights) -> list[str]:
    names = ["w_perceive", "b_perceive"]
    for i in range(weights.n_blocks):
        names += [f"blocks[{i}].w1", f"blocks[{i}].b1", f"blocks[{i}].w2", f"blocks[{i}].b2"]
    return ["state"] + names + ["w_out", "b_out"]


def check_none_pattern(weights: UpdateWeights, grads: list[Tensor | None]) -> None:
    assert len(grads) == len(weights.flat()), f"expected {len(weights.flat())} weight grads, got {len(grads)}"
    for name, t, g in zip(grad_names(weights)[1:], weights.flat(), grads, strict=True):
        if t is None:
            assert g is None, f"{name}: expected None for an absent bias, got a tensor"
        else:
            assert g is not None and g.dtype == t.dtype, f"{name}: expected a {t.dtype} gradient, got {g}"


# --------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("case", FP32_CASES, ids=[c.id + "-fp32" for c in FP32_CASES])
def test_bwd_fp32_matches_float64_autograd(case: Case) -> None:
    weights = make_weights(case.channels, case.hidden, case.n_blocks, case.bias, torch.float32)
    state, mask, grad_out = make_inputs(case, torch.float32)
    ref = autograd_grads(state, weights, mask, case.double, grad_out, torch.float64)

    tri_state, tri_grads = nca_step_bwd(state, weights, mask, case.double, grad_out)

    assert tri_state.shape == state.shape and tri_state.dtype == state.dtype
    check_none_pattern(weights, tri_grads)
    assert_close("state", ref[0], tri_state, rtol=FP32_STATE_RTOL)
    for name, r, t in zip(grad_names(weights)[1:], ref[1:], tri_grads, strict=True):
        if r is not None:
            assert_close(name, r, t, rtol=FP32_WEIGHT_RTOL)


def tf32_bounds(state: Tensor, weights: UpdateWeights, mask: Tensor | None, double: bool, grad_out: Tensor,
                ref64: list[Tensor | None]) -> list[float | None]:
    """Per gradient: twice the error of the reference run on tf32 operands (tests/kernels/tf32.py)."""
    with tf32_reference():
        ref32 = autograd_grads(state, weights, mask, double, grad_out, torch.float32)
    return [None if r is None else TF32_RATIO * rel_err(r, t) for r, t in zip(ref64, ref32, strict=True)]


@pytest.mark.parametrize("case", FP32_CASES[1:2] + FP32_CASES[7:8], ids=lambda c: c.id + "-tf32")
def test_bwd_tf32_within_twice_the_tf32_reference_error(case: Case) -> None:
    weights = make_weights(case.channels, case.hidden, case.n_blocks, case.bias, torch.float32)
    state, mask, grad_out = make_inputs(case, torch.float32)
    ref = autograd_grads(state, weights, mask, case.double, grad_out, torch.float64)
    bounds = tf32_bounds(state, weights, mask, case.double, grad_out, ref)
    assert all(b is None or b > 1e-4 for b in bounds[:-1]), f"expected tf32-sized bounds, got {bounds}"

    tri_state, tri_grads = nca_step_bwd(state, weights, mask, case.double, grad_out, input_precision="tf32")

    for name, r, t, bound in zip(grad_names(weights), ref, [tri_state] + tri_grads, bounds, strict=True):
        if r is not None:
            assert_close(name, r, t, rtol=max(bound, TF32_FLOOR))


# h = 48 (padded to 64), |z| != h, no blocks / 1 / 2 blocks, mixed biases, masks, doubling
K_MAJOR_CASES = [FP32_CASES[5], FP32_CASES[7], FP32_CASES[9], Case(1, 5, 7, 32, 48, 1, "bias", True, False)]


@pytest.mark.parametrize("case", K_MAJOR_CASES, ids=lambda c: c.id)
def test_bwd_tf32_reads_its_k_major_weights_as_ieee_reads_its_own(case: Case) -> None:
    """Under tf32 every dot of the main kernel reads the K-major layout of its weight (``main_weight_args``): the
    interpreter computes tf32 dots in fp32, so the gradients must equal the "ieee" ones bitwise."""
    weights = make_weights(case.channels, case.hidden, case.n_blocks, case.bias, torch.float32)
    state, mask, grad_out = make_inputs(case, torch.float32)
    ieee = nca_step_bwd(state, weights, mask, case.double, grad_out, input_precision="ieee")
    tf32 = nca_step_bwd(state, weights, mask, case.double, grad_out, input_precision="tf32")
    for name, a, b in zip(grad_names(weights), [ieee[0]] + ieee[1], [tf32[0]] + tf32[1], strict=True):
        assert (a is None) == (b is None), name
        assert a is None or torch.equal(a, b), f"{name}: tf32 differs from ieee by {(a - b).abs().max():.3g}"


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32], ids=["bf16-weights", "fp32-weights"])
@pytest.mark.parametrize("case", BF16_CASES, ids=[c.id + "-bf16" for c in BF16_CASES])
def test_bwd_bf16_within_twice_reference_error(case: Case, weight_dtype: torch.dtype) -> None:
    weights = make_weights(case.channels, case.hidden, case.n_blocks, case.bias, weight_dtype)
    state, mask, grad_out = make_inputs(case, torch.bfloat16)
    ref64 = autograd_grads(state, weights, mask, case.double, grad_out, torch.float64)
    # the reference in bf16: bf16 state and the weights cast to bf16, as nca_step_ref does for a bf16 state
    ref16 = autograd_grads(state, weights.to(torch.bfloat16), mask, case.double, grad_out, torch.bfloat16)

    tri_state, tri_grads = nca_step_bwd(state, weights, mask, case.double, grad_out)

    assert tri_state.dtype == torch.bfloat16 and tri_state.shape == state.shape
    check_none_pattern(weights, tri_grads)
    for name, r64, r16, t in zip(grad_names(weights), ref64, ref16, [tri_state] + tri_grads, strict=True):
        if r64 is None:
            continue
        bound = BF16_RATIO * rel_err(r64, r16)
        assert_close(name, r64, t, rtol=bound)


# ------------------------------------------------------------------------------------------ splits, determinism
def test_bwd_multi_split_matches_and_is_deterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several splits per weight-gradient GEMM (forced small) still match, and two runs agree bitwise."""
    monkeypatch.setitem(tiles.OVERRIDES, "splits", {"step": 32})
    case = Case(2, 9, 11, 16, 32, 2, "bias", True, False)
    weights = make_weights(case.channels, case.hidden, case.n_blocks, case.bias, torch.float32)
    state, mask, grad_out = make_inputs(case, torch.float32)
    m = case.batch * case.height * case.width
    per, splits = tiles.splits(m, tiles.bwd_config(case.channels, case.hidden, torch.float32).wg_block_cells,
                               tiles.split_cells().step)
    assert splits > 1, f"expected several splits for {m} cells, got {splits} of {per}"
    ref = autograd_grads(state, weights, mask, case.double, grad_out, torch.float64)

    first = nca_step_bwd(state, weights, mask, case.double, grad_out)
    second = nca_step_bwd(state, weights, mask, case.double, grad_out)

    outs1 = [first[0]] + first[1]
    outs2 = [second[0]] + second[1]
    for name, r, a, b in zip(grad_names(weights), ref, outs1, outs2, strict=True):
        if r is None:
            continue
        assert_close(name, r, a, rtol=FP32_WEIGHT_RTOL)
        assert torch.equal(a, b), f"{name}: expected bitwise-identical gradients on two runs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bwd_deterministic(dtype: torch.dtype) -> None:
    case = Case(2, 6, 10, 16, 32, 1, "bias", True, True)
    weights = make_weights(case.channels, case.hidden, case.n_blocks, case.bias, dtype)
    state, mask, grad_out = make_inputs(case, dtype)
    first = nca_step_bwd(state, weights, mask, case.double, grad_out)
    second = nca_step_bwd(state, weights, mask, case.double, grad_out)
    for name, a, b in zip(grad_names(weights), [first[0]] + first[1], [second[0]] + second[1], strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), f"{name}: expected bitwise-identical gradients on two runs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bwd_main_kernel_variants_are_bitwise_the_default(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The main kernel's register-saving variants (the residual streams' dot operand read back from its buffer,
    int32 offsets, per-loop pipeline stages; kernels/BACKWARD.md) compute the same bits as the default path, on a
    doubling step with a mask and a partial last tile, with and without biases."""
    case = Case(2, 6, 10, 16, 32, 2, "mixbias", True, True)
    weights = make_weights(case.channels, case.hidden, case.n_blocks, case.bias, dtype)
    state, mask, grad_out = make_inputs(case, dtype)
    default = nca_step_bwd(state, weights, mask, case.double, grad_out)
    real = bwd_mod.bwd_config

    def variant(*args: Any, **kwargs: Any) -> bwd_mod.BwdConfig:
        return dataclasses.replace(real(*args, **kwargs), reload_operand=True, int32_index=True, blk_stages=2,
                                   out_stages=1)

    monkeypatch.setattr(bwd_mod, "bwd_config", variant)
    assert bwd_mod.main_constexprs(16, 32, 2, double=True, has_mask=True, has_b3=True, has_b1=True, has_b2=True,
                                    input_precision="ieee", interp_bf16=False, dtype=dtype,
                                    cfg=variant(16, 32, dtype),
                                    m=120)["IDX64"] is False, "expected int32 offsets for a small grid"
    other = nca_step_bwd(state, weights, mask, case.double, grad_out)
    for name, a, b in zip(grad_names(weights), [default[0]] + default[1], [other[0]] + other[1], strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), f"{name}: expected the variant's gradient bitwise equal to the default's"


def test_main_kernel_offsets_widen_where_int32_overflows() -> None:
    """int32 offsets only where every offset fits: the largest buffer is (n_blocks + 1, m, max(h, |z|))."""
    cfg = dataclasses.replace(bwd_mod.bwd_config(256, 256, torch.bfloat16, n_blocks=4), int32_index=True)
    m_max = (2**31 - 1) // (5 * 256)
    flags = [{k: bwd_mod.main_constexprs(256, 256, 4, double=False, has_mask=False, has_b3=True, has_b1=True,
                                          has_b2=True, input_precision="ieee", interp_bf16=False,
                                          dtype=torch.bfloat16, cfg=c,
                                          m=m)[k] for k in ("IDX64", "WIDE")}
             for c, m in ((cfg, m_max), (cfg, m_max + 1), (dataclasses.replace(cfg, int32_index=False), 1000))]
    assert flags == [{"IDX64": False, "WIDE": False}, {"IDX64": True, "WIDE": True},
                     {"IDX64": True, "WIDE": False}], f"expected int32 up to {m_max} cells, got {flags}"


def test_bwd_accepts_contiguous_nchw() -> None:
    """Any memory format is accepted: a plain NCHW state and upstream gradient give the same gradients."""
    case = Case(1, 5, 6, 16, 16, 1, "bias", False, False)
    weights = make_weights(case.channels, case.hidden, case.n_blocks, case.bias, torch.float32)
    state, mask, grad_out = make_inputs(case, torch.float32)
    a = nca_step_bwd(state, weights, mask, False, grad_out)
    b = nca_step_bwd(state.contiguous(), weights, mask, False, grad_out.contiguous())
    assert torch.equal(a[0], b[0])
    for ga, gb in zip(a[1], b[1], strict=True):
        assert torch.equal(ga, gb)


# --------------------------------------------------------------------------------------------------- bad input
def _good() -> tuple[Tensor, UpdateWeights, Tensor]:
    weights = make_weights(16, 16, 1, "bias", torch.float32)
    state = torch.randn(1, 16, 4, 4, device=DEVICE)
    return state, weights, torch.randn(1, 16, 4, 4, device=DEVICE)


@pytest.mark.parametrize(
    "change, exc, words",
    [
        (lambda s, w, g: (s, w, g[:, :, :3]), ValueError, "grad_out"),
        (lambda s, w, g: (s, w, g.double()), TypeError, "grad_out"),
        (lambda s, w, g: (s.half(), w, g.half()), TypeError, "state"),
        (lambda s, w, g: (s[:, :8], w, g), ValueError, "state"),
        (lambda s, w, g: (s, w._replace(w_out=w.w_out[:, :8]), g), ValueError, "w_out"),
        (lambda s, w, g: (s, w._replace(w_perceive=w.w_perceive[..., :2]), g), ValueError, "w_perceive"),
        (lambda s, w, g: (s, "weights", g), TypeError, "weights"),
    ],
    ids=["grad-shape", "grad-dtype", "state-fp16", "state-channels", "w-out-shape", "w-perceive-shape", "not-weights"],
)
def test_bwd_rejects_bad_input(change: Any, exc: type[Exception], words: str) -> None:
    state, weights, grad_out = change(*_good())
    with pytest.raises(exc, match=words):
        nca_step_bwd(state, weights, None, False, grad_out)


def test_bwd_rejects_bad_precision_and_channels() -> None:
    state, weights, grad_out = _good()
    with pytest.raises(ValueError, match="input_precision"):
        nca_step_bwd(state, weights, None, False, grad_out, input_precision="fp16")
    w24 = make_weights(24, 16, 0, "bias", torch.float32)
    s24 = torch.randn(1, 24, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="multiples of 16"):
        nca_step_bwd(s24, w24, None, False, torch.randn(1, 24, 3, 3, device=DEVICE))
    with pytest.raises(ValueError, match="mask"):
        nca_step_bwd(state, weights, torch.ones(1, 1, 3, 4, dtype=torch.bool), False, grad_out)


# --------------------------------------------------------------------------------------------------- GPU sweep
GPU_CASES = [
    Case(2, 32, 32, 256, 256, 4, "bias", False, False),
    Case(3, 30, 26, 256, 256, 4, "bias", True, True),
    Case(2, 31, 33, 128, 128, 4, "nobias", True, False),
    Case(4, 28, 28, 128, 128, 0, "bias", True, False),
    Case(1, 62, 62, 256, 128, 4, "bias", False, False),
    Case(2, 18, 20, 48, 80, 2, "mixbias", True, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=[c.id for c in GPU_CASES])
def test_bwd_gpu_sweep(case: Case, precision: str) -> None:
    """Large shapes with the shipped GPU tiles, several splits per weight-gradient GEMM and bitwise reruns."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    weights = make_weights(case.channels, case.hidden, case.n_blocks, case.bias, dtype)
    state, mask, grad_out = make_inputs(case, dtype)
    ref64 = autograd_grads(state, weights, mask, case.double, grad_out, torch.float64)
    ref16 = autograd_grads(state, weights, mask, case.double, grad_out, dtype) if dtype == torch.bfloat16 else None
    tf32 = tf32_bounds(state, weights, mask, case.double, grad_out, ref64) if precision == "tf32" else None
    ip = "tf32" if precision == "tf32" else "ieee"

    tri_state, tri_grads = nca_step_bwd(state, weights, mask, case.double, grad_out, input_precision=ip)
    again_state, again_grads = nca_step_bwd(state, weights, mask, case.double, grad_out, input_precision=ip)

    check_none_pattern(weights, tri_grads)
    outs, again = [tri_state] + tri_grads, [again_state] + again_grads
    for i, (name, r64, t) in enumerate(zip(grad_names(weights), ref64, outs, strict=True)):
        if r64 is None:
            continue
        if precision == "bf16":
            rtol = BF16_RATIO * rel_err(r64, ref16[i])
        elif precision == "tf32":
            rtol = max(tf32[i], TF32_FLOOR)
        else:
            rtol = FP32_STATE_RTOL if i == 0 else FP32_WEIGHT_RTOL
        assert_close(name, r64, t, rtol=rtol)
        assert torch.equal(t, again[i]), f"{name}: expected bitwise-identical gradients on two runs"
