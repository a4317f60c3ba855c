"""pytest-benchmark suite: full rollouts, training iterations and IWAE evaluation of the presets.

Usage::

    pytest benchmarks/bench_model.py                                   # GPU: the presets at full size
    pytest benchmarks/bench_model.py -k "train and triton" --benchmark-json runs/model.json
    python benchmarks/bench_model.py --out runs/bench-model            # the runner on these cases

Without a GPU only a few pairs run, at tiny sizes (C = h = 16, 16 px, B = 2), so CI exercises every kind of
case on both implementations in seconds; these are code-path checks, no speed claim.
"""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed")

from benchmarks.cases import CASES  # noqa: E402
from benchmarks.conftest import DEVICE, TINY  # noqa: E402
from benchmarks.runner import default_plan  # noqa: E402
from benchmarks.suite import run_benchmark  # noqa: E402

# CPU: a rollout on the reference and a fused backend, a training iteration, an IWAE evaluation.
_CPU_PAIRS = [
    ("rollout-celeba-nondoubling-256-T64", "torch-fp32"), ("rollout-celeba-nondoubling-256-T64", "triton-bf16"),
    ("train-celeba-doubling", "torch-bf16-cl"), ("iwae-mnist-doubling", "torch-fp32"),
]  # the fused training iteration is covered on the CPU by test_runner.py
_PAIRS = _CPU_PAIRS if TINY else [(c, b) for c, bs in default_plan() if not c.startswith("step") for b in bs]


@pytest.mark.parametrize(("case", "backend"), _PAIRS, ids=[f"{c}-{b}" for c, b in _PAIRS])
def test_bench_model(benchmark, case: str, backend: str) -> None:
    assert case in CASES
    run_benchmark(benchmark, case, backend, DEVICE, tiny=TINY)


def main(argv: list[str] | None = None) -> None:
    """The standalone runner restricted to the model-level cases (other runner flags pass through)."""
    from benchmarks.runner import main as runner_main

    cases = [c for c in CASES if not c.startswith("step")]
    runner_main(["--cases", *cases, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
