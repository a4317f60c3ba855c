"""Fit of the fused DML likelihood's kernels (``kernels/likelihood.py``) on the H100, checked on the CPU: each
shipped (n_mix, dtype) compiles for sm_90 with no spills and fits in shared memory, under CI's Triton and the GPU
machines' Triton 3.6 (``fit_releases.py``). The table::

    python -m tools.fit --only likelihood
"""

from __future__ import annotations

import pytest

from tools.fit import (
    LIKELIHOOD_SHIPPED,
    SMEM_LIMIT,
    BwdFitResult,
    fit_likelihood,
    format_bwd_table,
    triton_version,
)

from .fit_releases import RELEASES, release_python


@pytest.fixture(scope="module", params=RELEASES)
def shipped_rows(request) -> dict[str, list[BwdFitResult]]:
    python = release_python(request.param)
    rows = fit_likelihood(LIKELIHOOD_SHIPPED, python=python)
    print(f"\ntriton {triton_version(python)}\n" + format_bwd_table(rows))
    by_config: dict[str, list[BwdFitResult]] = {}
    for row in rows:
        by_config.setdefault(row.config, []).append(row)
    return by_config


@pytest.mark.parametrize("shipped", LIKELIHOOD_SHIPPED, ids=[f"dml-n{n}-{dt}" for n, dt in LIKELIHOOD_SHIPPED])
def test_shipped_likelihood_kernels_fit_sm90(shipped: tuple[int, str],
                                             shipped_rows: dict[str, list[BwdFitResult]]) -> None:
    name = f"dml-n{shipped[0]}-{shipped[1]}"
    rows = shipped_rows.get(name, [])
    assert {r.kernel for r in rows} == {"dml-fwd", "dml-bwd"}, f"{name}: expected both kernels, got {rows}"
    for r in rows:
        where = f"{name}/{r.kernel}"
        assert r.spills == 0 and r.spill_ops == 0, (
            f"{where}: expected no spills, got {r.spills} B/thread, {r.spill_ops} STL/LDL ({r.registers} registers)")
        assert r.shared <= SMEM_LIMIT, f"{where}: expected shared memory <= {SMEM_LIMIT} B, got {r.shared}"
