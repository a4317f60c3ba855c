"""Every shipped configuration of the fused step fits the H100: compiled for sm_90 on the CPU (no GPU needed).

Checks: no spills (cuobjdump's STACK + LOCAL is 0 and there are no STL/LDL), shared memory within 227 KiB, and
the bf16 and tf32 paths on Hopper's warpgroup tensor-core instructions (HGMMA). Each check runs under this
process's Triton (CI's) and under the GPU machines' Triton 3.6 (``fit_releases.py``; skipped unless
FASTNCA_FIT_PYTHONS names an interpreter with it). One child-process compile of all configurations per release
(a few seconds each, cached by Triton afterwards).
"""

from __future__ import annotations

import pytest

from fastnca.kernels.fit import SHIPPED, SMEM_LIMIT, fit_many, format_table, triton_version

from .fit_releases import RELEASES, release_python


@pytest.fixture(scope="module", params=RELEASES)
def fits(request):
    python = release_python(request.param)
    results = fit_many(SHIPPED, python=python)
    print(f"\ntriton {triton_version(python)}\n" + format_table(results))
    return {r.name: r for r in results}


def test_shipped_configs_cover_the_presets():
    names = {s.name for s in SHIPPED}
    assert {"z256-h256-nb4-bf16", "z256-h256-nb4-tf32", "z256-h256-nb4-fp32", "z128-h128-nb4-bf16",
            "z128-h128-nb0-nobout-bf16"} <= names


@pytest.mark.parametrize("spec", SHIPPED, ids=[s.name for s in SHIPPED])
def test_fits_h100(fits, spec):
    r = fits[spec.name]
    assert r.spills == 0 and r.spill_ops == 0, f"{spec.name}: {r.spills} B of spills, {r.spill_ops} STL/LDL"
    assert r.registers <= 255
    assert 0 < r.shared <= SMEM_LIMIT, f"{spec.name}: {r.shared} B of shared memory > {SMEM_LIMIT}"
    if spec.dtype == "bf16" or spec.input_precision == "tf32":
        assert r.hgmma > 0, f"{spec.name}: no HGMMA (HMMA: {r.hmma}); the dots miss Hopper's tensor cores"
