"""Fit of the rollout backward's post kernel (state gradient + every weight-gradient GEMM of a step in one launch,
``kernels/rollout.py``) on the H100, checked on the CPU: every shipped configuration, with and without doubling,
compiles for sm_90 with no spills and fits in shared memory, under CI's Triton and the GPU machines' Triton 3.6
(``fit_releases.py``). The table::

    python -m fastnca.kernels.fit --only rollout
"""

from __future__ import annotations

import pytest

from fastnca.kernels.fit import (
    BWD_SHIPPED,
    SMEM_LIMIT,
    BwdFitResult,
    BwdFitSpec,
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
    assert {r.kernel for r in rows} == {"post", "post-double"}, f"{fit.name}: expected both post kernels, got {rows}"
    for r in rows:
        where = f"{fit.name}/{r.kernel}"
        assert r.spills == 0 and r.spill_ops == 0, (
            f"{where}: expected no spills, got {r.spills} B/thread, {r.spill_ops} STL/LDL ({r.registers} registers)")
        assert r.shared <= SMEM_LIMIT, f"{where}: expected shared memory <= {SMEM_LIMIT} B, got {r.shared}"
        if fit.dtype == "bf16" or fit.input_precision == "tf32":
            assert r.hgmma > 0, f"{where}: expected Hopper warpgroup MMAs (HGMMA), got {r.hgmma}"
