"""Fit of the kernels the rollout op adds, on the H100, checked on the CPU: the backward's post kernel (state
gradient + every weight-gradient GEMM of a step in one launch, ``kernels/rollout.py``), with and without doubling,
and the small-grid forward and backward (``kernels/small_grid.py``, where tiles are shipped for the shape). Every
shipped configuration compiles for sm_90 with no spills and fits in shared memory, under CI's Triton and the GPU
machines' Triton 3.6 (``fit_releases.py``); the small-grid forward's tensor work is as measured and its copies are
16 bytes wide (bf16, and tf32 with its K-major weights). The table::

    python -m fastnca.kernels.fit --only rollout
"""

from __future__ import annotations

import pytest

from fastnca.kernels.fit import (
    BWD_SHIPPED,
    SMEM_LIMIT,
    BwdFitResult,
    BwdFitSpec,
    _torch_dtype,
    fit_rollout,
    format_bwd_table,
    triton_version,
)
from fastnca.kernels.rollout import small_bwd_config
from fastnca.kernels.small_grid import small_config

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
    small_bwd = small_bwd_config(fit.state_channels, fit.hidden_channels, dtype, fit.input_precision,
                                 n_blocks=fit.n_blocks, interpret=False) is not None
    expected = ({"post", "post-double"} | ({"small-fwd"} if small else set())
                | ({"small-bwd", "small-wgrad"} if small_bwd else set()))
    assert {r.kernel for r in rows} == expected, f"{fit.name}: expected kernels {sorted(expected)}, got {rows}"
    for r in rows:
        where = f"{fit.name}/{r.kernel}"
        assert r.spills == 0 and r.spill_ops == 0, (
            f"{where}: expected no spills, got {r.spills} B/thread, {r.spill_ops} STL/LDL ({r.registers} registers)")
        assert r.shared <= SMEM_LIMIT, f"{where}: expected shared memory <= {SMEM_LIMIT} B, got {r.shared}"
        if fit.dtype == "bf16" or fit.input_precision == "tf32":
            assert r.hgmma > 0, f"{where}: expected Hopper warpgroup MMAs (HGMMA), got {r.hgmma}"
        if r.kernel == "small-fwd" and r.needed_flops:
            # no warpgroup repeats another's products: on 64 rows x 8 warps (bf16 at h = 256, tf32 at h = 128) the
            # blocks' first dot is unchained (utils.mma_first; 1.2x and 1.25x the work before 2026-11-28)
            work = r.tensor_flops / r.needed_flops
            assert work == 1, f"{where}: expected tensor work 1, got {work:.3g}"
            # bf16, and tf32 with its K-major weights (nca_step.fwd_k_major)
            assert set(r.copy_widths) == {"16"}, f"{where}: expected 16-byte copies, got {r.copy_widths}"
