"""Fit of the fused backward on the H100, checked on the CPU: every shipped kernel configuration compiles for sm_90
with no local-memory spills and fits in shared memory, under this process's Triton (CI's) and under the GPU
machines' Triton 3.6 (``fit_releases.py``; skipped unless FASTNCA_FIT_PYTHONS names an interpreter with it).

The compiles and the cubin reading live in ``kernels/fit.py`` (with ``TRITON_INTERPRET=1``, set by
tests/conftest.py, they run once per module in a child process). For the table::

    python -m fastnca.kernels.fit --only bwd
"""

from __future__ import annotations

import pytest

from fastnca.kernels.fit import (
    BWD_SHIPPED,
    SMEM_LIMIT,
    BwdFitResult,
    BwdFitSpec,
    fit_bwd,
    format_bwd_table,
    triton_version,
)

from .fit_releases import RELEASES, release_python


@pytest.fixture(scope="module", params=RELEASES)
def shipped_rows(request) -> dict[str, list[BwdFitResult]]:
    """All shipped configurations compiled once per module and release (about a minute cold, seconds with
    Triton's cache)."""
    python = release_python(request.param)
    rows = fit_bwd(BWD_SHIPPED, python=python)
    print(f"\ntriton {triton_version(python)}\n" + format_bwd_table(rows))
    by_config: dict[str, list[BwdFitResult]] = {}
    for row in rows:
        by_config.setdefault(row.config, []).append(row)
    return by_config


@pytest.mark.parametrize("fit", BWD_SHIPPED, ids=[f.name for f in BWD_SHIPPED])
def test_shipped_backward_fits_sm90(fit: BwdFitSpec, shipped_rows: dict[str, list[BwdFitResult]]) -> None:
    rows = shipped_rows.get(fit.name)
    assert rows, f"{fit.name}: expected compiled kernels, got none"
    kernels = {r.kernel for r in rows}
    expected = {"main", "dstate", "wgrad-perceive", "wgrad-out"} | ({"wgrad-w1", "wgrad-w2"} if fit.n_blocks else set())
    assert kernels == expected, f"{fit.name}: expected kernels {sorted(expected)}, got {sorted(kernels)}"
    for r in rows:
        where = f"{fit.name}/{r.kernel}"
        assert r.spills == 0 and r.spill_ops == 0, (
            f"{where}: expected no local-memory spills, got {r.spills} B/thread, {r.spill_ops} STL/LDL "
            f"({r.registers} registers)"
        )
        assert r.shared <= SMEM_LIMIT, f"{where}: expected shared memory <= {SMEM_LIMIT} B, got {r.shared}"
        if fit.dtype == "bf16" or fit.input_precision == "tf32":
            assert r.hgmma > 0, f"{where}: expected Hopper warpgroup MMAs (HGMMA), got {r.hgmma}"
