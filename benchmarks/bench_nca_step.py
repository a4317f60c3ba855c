"""pytest-benchmark suite: one NCA step, forward and forward+backward, for every backend.

Usage::

    pytest benchmarks/bench_nca_step.py                                # GPU: B=32, 64x64, |z|=h=256
    pytest benchmarks/bench_nca_step.py --benchmark-json runs/step.json
    python benchmarks/bench_nca_step.py --out runs/bench-step          # the runner on the step cases only

Without a GPU the sizes are tiny and the fused kernels run in the Triton interpreter: a code-path check,
no speed claim. Parity with the float64 reference is asserted before each timing.
"""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed")

from benchmarks.cases import BACKENDS  # noqa: E402
from benchmarks.conftest import DEVICE, TINY  # noqa: E402
from benchmarks.suite import run_benchmark  # noqa: E402

# Without a GPU, tf32 and compiled bf16 add no code path the interpreter / eager compile backend would check. The
# per-step backends differ from triton-* in whole rollouts only.
_BACKENDS = [b for b in BACKENDS if (not TINY or b not in ("triton-tf32", "compile-bf16")) and "-perstep" not in b]


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("case", ["step", "step-bwd"])
def test_bench_step(benchmark, case: str, backend: str) -> None:
    run_benchmark(benchmark, case, backend, DEVICE, tiny=TINY)


def main(argv: list[str] | None = None) -> None:
    """The standalone runner restricted to the step cases (other runner flags pass through)."""
    from benchmarks.runner import main as runner_main

    runner_main(["--cases", "step", "step-bwd", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
