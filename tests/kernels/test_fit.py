"""Every shipped configuration of the fused step fits the H100: compiled for sm_90 on the CPU (no GPU needed).

Checks: no spills (cuobjdump's STACK + LOCAL is 0 and there are no STL/LDL), shared memory within 227 KiB, and
the bf16 and tf32 paths on Hopper's warpgroup tensor-core instructions (HGMMA). Each check runs under this
process's Triton (CI's) and under the GPU machines' Triton 3.6 (``fit_releases.py``; skipped unless
FASTNCA_FIT_PYTHONS names an interpreter with it). One child-process compile of all configurations per release
(a few seconds each, cached by Triton afterwards).
"""

from __future__ import annotations

from fractions import Fraction

import pytest

from tools.fit import SHIPPED, SMEM_LIMIT, _copy_width, fit_many, format_table, tensor_flops, triton_version

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


# None: tf32 HGMMA reads fp32 operands K-major only, so the tf32 forward packs its weights K-major
# (nca_step.fwd_k_major); N-major, they were copied 4 bytes at a time (LDGSTS.E), before 2026-11-28.
KNOWN_NARROW_COPIES: set[str] = set()


def test_fit_reads_copy_widths_and_tensor_work():
    assert [_copy_width(op) for op in ("LDGSTS.E.BYPASS.128", "LDGSTS.E.BYPASS.LTC128B.128", "LDGSTS.E.64",
                                       "LDGSTS.E.LTC128B", "LDGSTS.E")] == ["16", "16", "8", "4", "4"]
    # one warpgroup's m64n256k16 x 2 on 8 warps: both warpgroups run them
    assert tensor_flops({"64x256x16": 2}, 8) == 2 * (2 * 64 * 256 * 16) * 2


@pytest.mark.parametrize("spec", SHIPPED, ids=[s.name for s in SHIPPED])
def test_tensor_work_is_what_the_tile_needs(fits, spec):
    """The HGMMAs in the SASS, run by every warpgroup, do exactly the tile's dot FLOPs: no warpgroup duplicates
    another's products. Static counts: each loop's dots appear once in the SASS (nothing unrolled or peeled; a
    pipeliner that peels an iteration also fails this, which is then to be read in the SASS). On 64 rows x 8 warps
    this needs the blocks' first dot unchained (``utils.mma_first``): as a chained dot Triton lays it out [8,1] and
    both warpgroups compute it (1.2x the work of the tf32 z256 tile before 2026-11-28)."""
    r = fits[spec.name]
    if r.needed_flops is None:  # fp32 "ieee": FFMA, no tensor cores
        assert r.hgmma == 0 and r.hmma == 0
        return
    ratio = Fraction(r.tensor_flops, r.needed_flops)
    assert ratio == 1, (
        f"{spec.name}: HGMMA work {float(ratio):.3f}x what the tile needs ({r.hgmma_shapes}, {r.num_warps} warps)")


@pytest.mark.parametrize("spec", SHIPPED, ids=[s.name for s in SHIPPED])
def test_copies_are_16_bytes(fits, spec):
    """Every cp.async (LDGSTS) global -> shared copy of the tensor-core paths moves 16 bytes per thread (the FFMA
    path, fp32 "ieee", is not checked: its dot operands are not HGMMA operands)."""
    r = fits[spec.name]
    if r.needed_flops is None:
        return
    assert r.copy_widths.get("16", 0) > 0, f"{spec.name}: no 16-byte LDGSTS ({r.copy_widths})"
    narrow = set(r.copy_widths) - {"16"}
    assert bool(narrow) == (spec.name in KNOWN_NARROW_COPIES), f"{spec.name}: LDGSTS widths {r.copy_widths}"


def test_parallel_fit_keeps_the_order_of_the_jobs(monkeypatch):
    """FASTNCA_FIT_JOBS children compile interleaved shares of the job list at once; each result goes back to its
    job's place (checked with a stand-in child that returns its jobs' names; the real compiles: every fit test)."""
    import tools.fit as fit

    seen = []

    def child(python, todo):
        seen.append(todo)
        return [fit.KernelFit(int(j), 0, 0, 0, 0, 0, 0.0) for j in todo]

    monkeypatch.setattr(fit, "_run_child", child)
    todo = [str(i) for i in range(11)]
    got = fit._run_children("python", todo, 4)
    assert [r.registers for r in got] == list(range(11))
    assert sorted(len(s) for s in seen) == [2, 3, 3, 3] and sorted(sum(seen, []), key=int) == todo
    monkeypatch.setenv(fit.FIT_JOBS_ENV, "3")
    assert fit.fit_jobs() == 3
    monkeypatch.delenv(fit.FIT_JOBS_ENV)
    assert 1 <= fit.fit_jobs() <= 8
