"""The fused kernels on GPUs with less shared memory than the H100, checked on the CPU: compiled for sm_86 (the
RTX 30xx / A10 / A40 class: 99 KiB per program; sm_89 and sm_120 cards allow the same), every kernel the fused
backend launches for the 256-channel networks has a tiling among its launch site's fallbacks
(``kernels/launch.py``) that fits, and the kernels whose shipped tiles do not fit are the ones the launch sites
were given fallbacks for. The table::

    python -m tools.fit --only small-smem
"""

from __future__ import annotations

import pytest

from tools.fit import SMALL_SMEM, FallbackResult, fit_fallback, format_fallback_table, triton_version


@pytest.fixture(scope="module")
def rows() -> list[FallbackResult]:
    out = fit_fallback()
    print(f"\ntriton {triton_version()}\n" + format_fallback_table(out))
    return out


def test_every_kernel_has_a_tiling_that_fits_99_kib(rows: list[FallbackResult]) -> None:
    none = [r for r in rows if r.runs is None]
    assert not none, f"expected a tiling within {SMALL_SMEM} B of shared memory for every kernel; none fits: {none}"
    over = [r for r in rows if r.shared is not None and r.shared > SMALL_SMEM]
    assert not over, f"expected the chosen tilings within {SMALL_SMEM} B: {over}"


def test_the_shipped_256_channel_forward_and_main_kernels_need_the_fallback(rows: list[FallbackResult]) -> None:
    """What the fallback is for (if a Triton release fits them all at 99 KiB, this test says so, and the fallback's
    docs should be updated)."""
    fell_back = {(r.config, r.kernel) for r in rows if r.tried > 1}
    for kernel in ("fwd", "main", "main-stored"):
        assert ("z256-h256-nb4-bf16", kernel) in fell_back, (
            f"expected the bf16 h = 256 {kernel} kernel's shipped tiles over {SMALL_SMEM} B on sm_86; rows: "
            f"{[r for r in rows if r.config == 'z256-h256-nb4-bf16']}")
