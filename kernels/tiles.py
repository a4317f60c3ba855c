"""Which kernel is compiled: every tile table as data, the override hook, and the interpreter switch, read once.

**Tiles.** One picker per kernel family returns the shipped tiling for a network shape, dtype and precision:
:func:`step_config` (the fused forward, ``nca_step.py``), :func:`small_config` (the small-grid forward,
``small_grid.py``), :func:`bwd_config` (the step's backward, ``nca_step_bwd.py``, and the rollout's backward main
kernel), :func:`post_config` (the rollout's post kernel, ``rollout.py``), :func:`wgrad_config` (the batched
weight-gradient kernel, ``wgrad.py``), :func:`dml_plan` (the likelihood, ``likelihood.py``) and
:func:`split_cells` (the weight-gradient reductions' least cells per split). Each tile was chosen with the sm_90
fit (``python -m tools.fit``: no spills, shared memory <= 227 KiB, under both Triton releases that
matter, CI's 3.8 and the GPU machines' 3.6) and, where said, timed on an H100; the measurements are in
kernels/README.md, kernels/BACKWARD.md, benchmarks/RESULTS.md and benchmarks/ARCHIVE.md.

**Overrides.** :func:`override` (or the dict :data:`OVERRIDES` it writes) replaces fields of one picker's result
for a while: ``with tiles.override("post", wg_warps=4): ...``. A sweep (``benchmarks/tune.py``) or a test changes
tiles this way instead of patching functions. Each kind changes its own picker only: ``small`` starts from the
shipped ``step`` tile and ``post`` from the shipped ``bwd`` tiles, not from their overrides.

**The interpreter.** ``INTERPRET`` is whether this process's kernels run in the interpreter
(``fastnca.kernels.use_interpreter``), read when this module was imported (``@triton.jit`` reads it when it
decorates a kernel, so it cannot change later). The interpreter needs choices of its own that change what is
compiled: small tiles (fewer, larger numpy programs run faster) and the bf16 emulation constexprs (``UPCAST_DOT`` /
``INTERP_BF16`` / ``EMULATE_RNE``, see ``utils.py``). Every such choice asks :func:`interpreting` at call time, and
:func:`as_compiled` turns them all to the GPU's, so that a CPU run can record exactly the launches, constexprs and
options a GPU run compiles (``warmup.record_launches``) without a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch
import triton

from . import interpreter_on

__all__ = ["INTERPRET", "KINDS", "MAX_SPLITS", "OVERRIDES", "BwdConfig", "DMLPlan", "SplitCells", "StepConfig",
           "WgradConfig", "as_compiled", "bwd_config", "chunk", "dml_plan", "interpreting", "override",
           "padded_hidden", "post_config", "small_config", "split_cells", "splits", "step_config", "wgrad_config"]

T = TypeVar("T")

# The process's mode (fastnca.kernels.use_interpreter chooses it before a kernel module is imported), read once at
# import, as @triton.jit reads it when it decorates the kernels.
INTERPRET = interpreter_on()
_as_compiled = 0  # depth of nested as_compiled() blocks


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter and their launches take the interpreter's choices: tiles
    sized for numpy and the bf16 emulation constexprs. False on the GPU, and inside :func:`as_compiled`."""
    return INTERPRET and not _as_compiled


@contextlib.contextmanager
def as_compiled() -> Iterator[None]:
    """Within the block every tile picker and every interpreter-only constexpr takes the value it takes on the GPU
    (:func:`interpreting` is False), so launches are those a GPU run compiles. Meant for recording launches
    (``warmup.record_launches``): in the interpreter the GPU's tiles run, but slowly, and the bf16 kernels compute
    wrongly there without their emulation (docs/KERNELS.md), so nothing should be executed inside. Nests; not
    thread-local (the pickers are read from the thread that launches)."""
    global _as_compiled
    _as_compiled += 1
    try:
        yield
    finally:
        _as_compiled -= 1


def _interpret(interpret: bool | None) -> bool:
    """A picker's ``interpret`` argument: None asks :func:`interpreting` now (not when the picker was defined)."""
    return interpreting() if interpret is None else interpret


# ------------------------------------------------------------------------------------------------ overrides
KINDS = ("step", "small", "bwd", "post", "wgrad", "dml", "splits")
# kind -> fields replaced in that picker's result (override() writes it; a test may set it with monkeypatch.setitem)
OVERRIDES: dict[str, dict[str, Any]] = {}


@contextlib.contextmanager
def override(kind: str, **fields: Any) -> Iterator[None]:
    """Within the block the picker of ``kind`` (one of :data:`KINDS`) returns its tiles with ``fields`` replaced,
    on top of any override already in force; restored on exit. For ``bwd``, the chunk widths ``block_k``,
    ``ds_block_k`` (over h) and ``block_c`` (over |z|) are caps: the largest power-of-two divisor up to them."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    saved = OVERRIDES.get(kind)
    OVERRIDES[kind] = {**(saved or {}), **fields}
    try:
        yield
    finally:
        if saved is None:
            OVERRIDES.pop(kind, None)
        else:
            OVERRIDES[kind] = saved


def _apply(kind: str, cfg: T, **caps: int) -> T:
    """``cfg`` with the overrides of ``kind``; ``caps``: field -> the channels it divides (see :func:`override`)."""
    fields = OVERRIDES.get(kind)
    if not fields or cfg is None:
        return cfg
    fields = {k: chunk(caps[k], v) if k in caps and v is not None else v for k, v in fields.items()}
    return dataclasses.replace(cfg, **fields) if dataclasses.is_dataclass(cfg) else cfg._replace(**fields)


# -------------------------------------------------------------------------------------------------- helpers
def padded_hidden(hidden: int) -> int:
    """h rounded up to a power of two (``tl.arange`` needs one); the padded channels carry exact zeros."""
    return triton.next_power_of_2(hidden)


def chunk(n: int, cap: int) -> int:
    """The largest of cap, cap/2, ..., 16 that divides n (n is a multiple of 16)."""
    b = cap
    while n % b:
        b //= 2
    return b


def _largest_divisor(n: int, options: tuple[int, ...]) -> int:
    return next(o for o in options if n % o == 0)


# ------------------------------------------------------------------------------------------------- forward
class StepConfig(NamedTuple):
    """Tiling of one forward launch: cells per program, K/hidden chunk, output-channel chunk, warps, stages."""

    block_m: int
    block_k: int
    block_n: int
    num_warps: int
    num_stages: int


def step_config(
    state_channels: int,
    hidden_channels: int,
    dtype: torch.dtype,
    *,
    input_precision: str = "ieee",
    num_cells: int | None = None,
    store_acts: bool = False,
    interpret: bool | None = None,
) -> StepConfig:
    """The fused forward's tiling for a network shape and dtype (``interpret``: None asks :func:`interpreting`).

    On the GPU the largest tile that fits without spills: bf16 at h = 256 takes 128 cells x 8 warps (half the
    weight bytes per FLOP of 64 cells) with 16-wide hidden chunks; fp32 narrower chunks. ``store_acts`` (the
    rollout's forward that also writes the activations) takes tiles with room for the stores' addresses. The
    interpreter takes one tile sized to the problem (fewer, larger programs run faster in numpy). Fit numbers:
    kernels/README.md; superseded measurements: benchmarks/ARCHIVE.md.
    """
    return _apply("step", _step_tiles(state_channels, hidden_channels, dtype, input_precision, num_cells, store_acts,
                                      _interpret(interpret)))


def _step_tiles(state_channels: int, hidden_channels: int, dtype: torch.dtype, input_precision: str,
                num_cells: int | None, store_acts: bool, interpret: bool) -> StepConfig:
    hid = padded_hidden(hidden_channels)
    base_k = min(_largest_divisor(state_channels, (64, 32, 16)), hid)
    block_n = _largest_divisor(state_channels, (64, 32, 16))
    if interpret:
        block_m = 64 if num_cells is None else max(16, min(128, triton.next_power_of_2(num_cells)))
        return StepConfig(block_m, base_k, block_n, 4, 1)
    if dtype == torch.bfloat16:
        if hid >= 256:
            if store_acts:
                return StepConfig(64, min(32, base_k), block_n, 8, 3)
            return StepConfig(128, min(16, base_k), block_n, 8, 3)
        if hid >= 128:
            return StepConfig(128, base_k, min(32, block_n) if store_acts else block_n, 8, 2)
        return StepConfig(64, base_k, block_n, 4, 2)
    if hid >= 256:
        if store_acts and input_precision != "tf32":
            return StepConfig(32, min(16, base_k), min(32, block_n), 8, 2)
        return StepConfig(64, min(32 if input_precision == "tf32" else 16, base_k), block_n, 8, 2)
    if input_precision == "tf32":
        return StepConfig(64, min(32, base_k), min(32, block_n), 8 if store_acts else 4, 2)
    return StepConfig(32, min(32, base_k), min(16 if store_acts else 32, block_n), 8, 2)


def small_config(state_channels: int, hidden_channels: int, dtype: torch.dtype, *, input_precision: str = "ieee",
                 num_cells: int | None = None, store_acts: bool = False,
                 interpret: bool | None = None) -> StepConfig | None:
    """The small-grid forward's tiles, or None where no tile is known to fit (those steps then run one launch each).

    :func:`step_config`'s tile wherever it fits here too (the step body is the same; the loops around it hold a
    few more values); else narrower tiles: bf16 at h = 256 64 cells x 8 warps with 32-wide hidden chunks, tf32 8
    warps, and tf32 at h = 256 none (it spills at every 64-row tile). ``num_cells`` (interpreter only) sizes the
    tile to one program's cells at its largest step. Fit numbers: kernels/README.md.
    """
    interpret = _interpret(interpret)
    hid = padded_hidden(hidden_channels)
    cfg = _step_tiles(state_channels, hidden_channels, dtype, input_precision, num_cells, store_acts, interpret)
    if interpret:  # the interpreter's tile, as step_config's
        return _apply("small", cfg)
    if dtype == torch.bfloat16 and hid >= 256:
        cfg = StepConfig(64, 32 if state_channels % 32 == 0 else 16, cfg.block_n, 8, 3)
    elif store_acts and dtype == torch.bfloat16 and cfg.block_m > 64:
        cfg = StepConfig(64, min(32, cfg.block_k), cfg.block_n, 8, 2)
    elif dtype == torch.float32 and input_precision == "tf32":
        if hid >= 256:
            return None
        cfg = cfg._replace(num_warps=8, block_n=min(16, cfg.block_n) if store_acts else cfg.block_n)
    return _apply("small", cfg)


# ------------------------------------------------------------------------------------------------ backward
@dataclass(frozen=True)
class BwdConfig:
    """Tile sizes and launch options of the three backward kernels for one (|z|, h, dtype)."""

    block_m: int  # cells per program of the main kernel
    block_k: int  # hidden chunk of the main kernel
    block_c: int  # state-channel chunk of the main kernel
    warps: int
    stages: int
    ds_block_m: int  # input cells per program of the state-gradient kernel
    ds_block_k: int
    ds_warps: int
    ds_stages: int
    wg_block: int  # max tile edge of the weight-gradient kernel
    wg_block_cells: int
    wg_warps: int
    wg_stages: int
    blk_stages: int | None = None  # pipeline stages of the main kernel's hidden-chunk loops (None: ``stages``)
    out_stages: int | None = None  # of its output-conv loop (None: ``stages``)
    reload_operand: bool = False  # the main kernel's residual-stream dot operand from its buffer (stages.main_cells)
    int32_index: bool = False  # int32 cell and element offsets in the main kernel where they fit (main_needs_int64)
    k_major: bool | None = None  # the main kernel's weights K-major (None: utils.k_major, i.e. for tf32)
    unchain: bool | None = None  # its hidden-chunk loops' first dots unchained (None: utils.unchain's rule)
    ds_block_n: int | None = None  # state channels per state-gradient program of the rollout's post kernel (None: all)


def bwd_config(
    state_channels: int,
    hidden_channels: int,
    dtype: torch.dtype,
    input_precision: str = "ieee",
    *,
    n_blocks: int | None = None,
    recompute: bool = True,
    interpret: bool | None = None,
) -> BwdConfig:
    """The backward's tiles (``interpret``: None asks :func:`interpreting`; the interpreter takes small tiles, so
    that tests run many programs and partial tiles quickly).

    The main kernel keeps two fp32 ``(BLOCK_M, h)`` tensors live, so wide networks take small hidden chunks; fp32
    "ieee" dots run on FMA units and take 32-cell tiles. ``n_blocks`` (None: taken as 0) picks the main kernel's
    rows: with residual blocks and h <= 128 the tensor-core paths take 128 cells x 8 warps (each warpgroup its own
    64 rows); elsewhere 128 rows spill, so 64, whose hidden-chunk loops' first dots are unchained
    (``utils.mma_first``). ``recompute=False`` (the rollout's main kernel on kept activations): the same tiles, but
    tf32 at h = 256 runs its output-conv loop unpipelined (pipelined, it spills). Fit numbers:
    kernels/BACKWARD.md; timings: benchmarks/RESULTS.md and benchmarks/ARCHIVE.md.
    """
    c, h = state_channels, hidden_channels
    return _apply("bwd", _bwd_tiles(c, h, dtype, input_precision, n_blocks, recompute, _interpret(interpret)),
                  block_k=h, ds_block_k=h, block_c=c)


def _bwd_tiles(c: int, h: int, dtype: torch.dtype, input_precision: str, n_blocks: int | None, recompute: bool,
               interpret: bool) -> BwdConfig:
    if interpret:
        return BwdConfig(16, chunk(h, 32), chunk(c, 32), 4, 1, 16, chunk(h, 32), 4, 1, 32, 16, 4, 1)
    wide = max(c, h) > 128
    ieee = dtype == torch.float32 and input_precision == "ieee"
    # (BLOCK_M, BLOCK_K, BLOCK_C, warps, stages) of the main kernel, (BLOCK_M, BLOCK_K, warps) of the state kernel
    own_rows = bool(n_blocks) and h <= 128  # 128 cells x 8 warps: each warpgroup computes its own 64 rows
    if dtype == torch.bfloat16:
        # wide: 3 stages, timed faster than 2 over the mnist-doubling rollout's backward (benchmarks/RESULTS.md)
        main, dstate = ((64, 32, 32, 8, 3), (64, 64, 8)) if wide else ((64, 64, 64, 8, 2), (64, 64, 4))
        main = (128, 32, 32, 8, 2) if own_rows else main
    elif input_precision == "tf32":
        main, dstate = ((64, 16, 32, 8, 2), (64, 32, 8)) if wide else ((64, 32, 32, 8, 2), (64, 32, 4))
        main = (128, 16, 32, 8, 2) if own_rows else main
    else:
        main, dstate = ((16, 16, 16, 8, 2), (16, 16, 4)) if wide else ((32, 32, 16, 4, 2), (32, 32, 4))
    out_stages = 1 if not recompute and input_precision == "tf32" and dtype == torch.float32 and wide else None
    return BwdConfig(
        out_stages=out_stages,
        block_m=main[0],
        block_k=chunk(h, main[1]),
        block_c=chunk(c, main[2]),
        warps=main[3],
        stages=main[4],
        ds_block_m=dstate[0],
        ds_block_k=chunk(h, dstate[1]),
        ds_warps=dstate[2],
        ds_stages=2,
        wg_block=64 if ieee else 128,
        wg_block_cells=64 if dtype == torch.bfloat16 else 32,
        wg_warps=8,
        wg_stages=3,
    )


def post_config(state_channels: int, hidden_channels: int, dtype: torch.dtype, input_precision: str = "ieee", *,
                n_blocks: int | None = None, interpret: bool | None = None) -> BwdConfig:
    """The rollout's post kernel's tiles: :func:`bwd_config`'s state-gradient and weight-gradient tiles, with
    weight-gradient tiles of at most 64 x 64 and 2 stages, and state-gradient programs of at most 128 state channels
    (bf16) or 64 (tf32).

    One kernel holds every branch, so it needs the registers of the largest: the per-step kernels' 128 x 128 tiles
    spill there, and with the state gradient's channels split over programs every bf16 and tf32 post kernel fits
    in <= 128 registers at 8 warps (two programs per SM). bf16 reduces 128 cells per step (timed faster than 64,
    benchmarks/RESULTS.md). Fit numbers: kernels/README.md.
    """
    interpret = _interpret(interpret)
    cfg = _bwd_tiles(state_channels, hidden_channels, dtype, input_precision, n_blocks, True, interpret)
    if not interpret:
        cells = 128 if dtype == torch.bfloat16 else cfg.wg_block_cells
        ds_n = 128 if dtype == torch.bfloat16 else 64 if input_precision == "tf32" else None
        cfg = dataclasses.replace(cfg, wg_block=min(cfg.wg_block, 64), wg_block_cells=cells, wg_stages=2,
                                  ds_block_n=ds_n)
    return _apply("post", cfg)


@dataclass(frozen=True)
class WgradConfig:
    """Tiles of the batched weight-gradient kernel: its output tile edges and cells per reduction step."""

    block: int  # max tile edge
    block_cells: int
    warps: int
    stages: int


def wgrad_config(dtype: torch.dtype, input_precision: str = "ieee", *, interpret: bool | None = None) -> WgradConfig:
    """The batched weight-gradient kernel's tiles (``wgrad.py``): 64 x 64 tiles, 8 warps, 2 stages (one kernel holds
    the perception's gather and the 1x1 branch, so it takes the registers of the larger: 128 x 128 spilled); bf16
    64 cells per reduction step, fp32 32. The interpreter takes small tiles, so tests run partial tiles. Fit
    numbers: kernels/BACKWARD.md."""
    if _interpret(interpret):
        cfg = WgradConfig(16, 16, 4, 1)
    elif dtype == torch.bfloat16:
        cfg = WgradConfig(64, 64, 8, 2)
    else:
        cfg = WgradConfig(64, 32, 8, 2)
    return _apply("wgrad", cfg)


# ------------------------------------------------------------------------------------------------ splits
# Weight-gradient GEMMs cut the cells into at most MAX_SPLITS splits (the rollout's fp32 accumulator has one slot
# per split; fastnca/memory.py models it). The split count depends only on the number of cells, never on the
# device, so results are reproducible.
MAX_SPLITS = 32


class SplitCells(NamedTuple):
    """Cells per split of the weight-gradient reductions, at least: longer reductions per program, fewer fp32
    partials to add."""

    step: int = 1024  # the per-step backward's GEMMs (nca_step_bwd.py)
    post: int = 4096  # the rollout's post kernel (rollout.py)
    batched: int = 4096  # the batched weight-gradient kernel (wgrad.py)


def split_cells() -> SplitCells:
    """The shipped :class:`SplitCells`, with the overrides of kind ``splits``."""
    return _apply("splits", SplitCells())


def splits(m: int, block_cells: int, min_cells: int) -> tuple[int, int]:
    """(cells per split, number of splits) for m cells: splits of at least ``min_cells`` cells (a multiple of
    ``block_cells``), at most :data:`MAX_SPLITS` of them; a function of m only, so results are reproducible."""
    per = max(min_cells, triton.cdiv(m, MAX_SPLITS))
    per = triton.cdiv(per, block_cells) * block_cells
    return per, triton.cdiv(m, per)


# ------------------------------------------------------------------------------------------------ likelihood
class DMLPlan(NamedTuple):
    """Launch settings of the likelihood kernels, read by both launchers and the sm_90 fit."""

    fwd_block_p: int  # pixels per loop iteration of the forward's program (one program per example)
    bwd_block_p: int  # pixels per backward program
    bwd_block_c: int  # channels per zero-store of the unread channels
    num_warps: int


def dml_plan(interpret: bool | None = None) -> DMLPlan:
    """Interpreter: wide blocks (each program is one numpy pass; fewer programs run faster). GPU: one pixel per
    thread (128 pixels x 4 warps) and 16-channel zero stores, the widest that fit without spills (fit numbers:
    kernels/README.md)."""
    if _interpret(interpret):
        plan = DMLPlan(fwd_block_p=1024, bwd_block_p=1024, bwd_block_c=64, num_warps=4)
    else:
        plan = DMLPlan(fwd_block_p=128, bwd_block_p=128, bwd_block_c=16, num_warps=4)
    return _apply("dml", plan)
