"""Fit of the fused backward on the H100, checked on the CPU: every shipped kernel configuration compiles for sm_90
with no local-memory spills and fits in shared memory, under this process's Triton (CI's) and under the GPU
machines' Triton 3.6 (``fit_releases.py``; skipped unless FASTNCA_FIT_PYTHONS names an interpreter with it).

The compiles and the cubin reading live in ``tools/fit.py`` (in the interpreter, which tests/conftest.py chooses
without a GPU, they run once per module in a child process). For the table::

    python -m tools.fit --only bwd
"""

from __future__ import annotations

from fractions import Fraction

import pytest

from tools.fit import (
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


@pytest.mark.parametrize("fit", BWD_SHIPPED, ids=[f.name for f in BWD_SHIPPED])
def test_backward_tensor_work_is_what_the_tiles_need(fit, shipped_rows):
    """Per kernel: the HGMMAs in the SASS, run by every warpgroup, do exactly the tile's dot FLOPs (static counts:
    each loop's dots appear once in the SASS). fp32 "ieee" kernels must have no tensor-core instructions. On 64 rows x
    8 warps the main kernel's hidden-chunk loops issue their first dots unchained (``utils.mma_first``): as chained
    dots Triton laid them out [8,1] and both warpgroups computed them (4/3 of the work at h = 256 bf16, 5/4 tf32,
    before 2026-11-28)."""
    for r in shipped_rows[fit.name]:
        if r.needed_flops is None:
            assert r.hgmma == 0 and r.hmma == 0, f"{fit.name}/{r.kernel}"
            continue
        ratio = Fraction(r.tensor_flops, r.needed_flops)
        assert ratio == 1, (
            f"{fit.name}/{r.kernel}: HGMMA work {float(ratio):.3f}x what the tile needs ({r.hgmma_shapes}, "
            f"{r.warps} warps)")


def known_narrow_copies(fit: BwdFitSpec, kernel: str) -> bool:
    """Where tf32 HGMMA, which takes fp32 operands K-major only, still reads MN-major ones (4-byte copies): the
    weight-gradient GEMMs (their operands are the per-cell buffers, read as a^T). The main kernels and every state
    gradient read K-major weights (``main_weight_args``, ``transposed_conv_weights``; at h = 256 the main kernel's
    K-major weights spilled under Triton 3.6 until its chained dots were unchained, 2026-11-28). Issue 11, item 2."""
    return fit.input_precision == "tf32" and kernel.startswith("wgrad")


@pytest.mark.parametrize("fit", BWD_SHIPPED, ids=[f.name for f in BWD_SHIPPED])
def test_backward_copies_are_16_bytes(fit, shipped_rows):
    """Every cp.async (LDGSTS) of the tensor-core kernels moves 16 bytes per thread, except the known tf32 ones."""
    for r in shipped_rows[fit.name]:
        if r.needed_flops is None:  # fp32 "ieee": FFMA operands, not checked
            continue
        narrow = set(r.copy_widths) - {"16"}
        assert bool(narrow) == known_narrow_copies(fit, r.kernel), f"{fit.name}/{r.kernel}: LDGSTS {r.copy_widths}"
