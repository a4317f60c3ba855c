"""Fit of the kernels the rollout op adds, on the H100, checked on the CPU: the backward's post kernel (state
gradient + every weight-gradient GEMM of a step in one launch, ``kernels/rollout.py``), with and without doubling,
the forward that keeps every step's activations and the backward main kernel that reads them instead of
recomputing (the 'none' policy), the batched designs' weight-gradient kernel (``kernels/wgrad.py``), and the
small-grid forward, both ways (``kernels/small_grid.py``, where tiles are shipped for the shape). Every
shipped configuration compiles for sm_90 with no spills and fits in shared memory, under CI's Triton and the GPU
machines' Triton 3.6 (``fit_releases.py``); every tensor-core kernel does the tensor work its tiles need (no
warpgroup repeats another's products) and copies 16 bytes at a time, except the known narrow copies below. The
table::

    python -m tools.fit --only rollout
"""

from __future__ import annotations

import pytest

from fastnca.kernels.small_grid import small_config
from tools.fit import (
    BWD_SHIPPED,
    SMEM_LIMIT,
    BwdFitResult,
    BwdFitSpec,
    _torch_dtype,
    fit_rollout,
    format_bwd_table,
    triton_version,
)

from .fit_releases import RELEASES, release_python


@pytest.fixture(scope="module", params=RELEASES)
def shipped_rows(request) -> dict[str, list[BwdFitResult]]:
    python = release_python(request.param)
    rows = fit_rollout(BWD_SHIPPED, python=python)
    print(f"\ntriton {triton_version(python)}\n" + format_bwd_table(rows))
    by_config: dict[str, list[BwdFitResult]] = {}
    for row in rows:
        by_config.setdefault(row.config, []).append(row)
    return by_config


@pytest.mark.parametrize("fit", BWD_SHIPPED, ids=[f.name for f in BWD_SHIPPED])
def test_shipped_rollout_post_kernel_fits_sm90(fit: BwdFitSpec, shipped_rows: dict[str, list[BwdFitResult]]) -> None:
    rows = shipped_rows.get(fit.name, [])
    dtype = _torch_dtype(fit.dtype)
    small = small_config(fit.state_channels, fit.hidden_channels, dtype, input_precision=fit.input_precision,
                         interpret=False) is not None
    expected = ({"post", "post-double", "fwd-store", "main-stored", "wgrad-batched"}
                | ({"small-fwd", "small-fwd-store"} if small else set()))
    assert {r.kernel for r in rows} == expected, f"{fit.name}: expected kernels {sorted(expected)}, got {rows}"
    for r in rows:
        where = f"{fit.name}/{r.kernel}"
        assert r.spills == 0 and r.spill_ops == 0, (
            f"{where}: expected no spills, got {r.spills} B/thread, {r.spill_ops} STL/LDL ({r.registers} registers)")
        assert r.shared <= SMEM_LIMIT, f"{where}: expected shared memory <= {SMEM_LIMIT} B, got {r.shared}"
        if fit.dtype == "bf16" or fit.input_precision == "tf32":
            assert r.hgmma > 0, f"{where}: expected Hopper warpgroup MMAs (HGMMA), got {r.hgmma}"


def known_narrow_copies(fit: BwdFitSpec, kernel: str) -> bool:
    """The rollout kernels' cp.async copies narrower than 16 bytes: tf32's weight-gradient GEMMs (the post kernels,
    the batched kernel: their operands are the per-cell buffers, read as a^T, as in
    ``test_fit_bwd.known_narrow_copies``)."""
    return fit.input_precision == "tf32" and kernel in ("post", "post-double", "wgrad-batched")


@pytest.mark.parametrize("fit", BWD_SHIPPED, ids=[f.name for f in BWD_SHIPPED])
def test_rollout_tensor_work_and_copy_widths(fit: BwdFitSpec, shipped_rows: dict[str, list[BwdFitResult]]) -> None:
    """Per kernel: the HGMMAs do exactly the tiles' dot FLOPs (``fit.needed_flops``, which also models the post and
    small-grid kernels' sites; on 64 rows x 8 warps the blocks' first dots are unchained, ``utils.mma_first``: the
    small-grid forward did 1.2x / 1.25x before 2026-11-28), and the copies are 16 bytes wide but the known ones."""
    for r in shipped_rows[fit.name]:
        where = f"{fit.name}/{r.kernel}"
        if r.needed_flops is None:  # fp32 "ieee": FFMA, no tensor cores
            assert r.hgmma == 0 and r.hmma == 0, where
            continue
        work = r.tensor_flops / r.needed_flops
        assert work == 1, f"{where}: expected tensor work 1, got {work:.3g} ({r.hgmma_shapes}, {r.warps} warps)"
        narrow = set(r.copy_widths) - {"16"}
        assert bool(narrow) == known_narrow_copies(fit, r.kernel), f"{where}: LDGSTS widths {r.copy_widths}"


@pytest.mark.parametrize("fit", BWD_SHIPPED, ids=[f.name for f in BWD_SHIPPED])
def test_tensor_core_post_kernels_fit_two_programs_per_sm(fit: BwdFitSpec,
                                                          shipped_rows: dict[str, list[BwdFitResult]]) -> None:
    """The post kernel is latency-bound at one program (8 warps) per SM: its bf16 and tf32 tiles (state-gradient
    programs over part of the channels, ``rollout.post_config``) keep it at <= 128 registers, so the register file
    (64 K per SM) holds two."""
    if fit.dtype != "bf16" and fit.input_precision != "tf32":
        pytest.skip("fp32 'ieee' post kernels: no tensor cores, tiles chosen for FMA")
    for r in shipped_rows[fit.name]:
        if r.kernel.startswith("post"):
            per_program = r.registers * 32 * r.warps
            assert 2 * per_program <= 65536, (
                f"{fit.name}/{r.kernel}: expected <= 128 registers at 8 warps (two programs per SM), got "
                f"{r.registers} x {r.warps} warps")
