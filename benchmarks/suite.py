"""Glue between the benchmark cases and pytest-benchmark: parity first, then ``benchmark.pedantic``.

Used by ``benchmarks/bench_*.py``. A backend that cannot run here (no fused kernel yet, no GPU and no
interpreter, a pair that does not apply) is skipped with the reason; a parity failure fails the test.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from benchmarks.cases import CASES, CaseContext, parse_backend, tolerance
from benchmarks.utils import rel_err, sync

__all__ = ["context", "run_benchmark"]

_CONTEXTS: dict[tuple[str, str, bool], CaseContext] = {}


def context(case: str, device: torch.device, tiny: bool) -> CaseContext:
    """One CaseContext per (case, device, size) for the whole session (inputs and models are built once)."""
    key = (case, str(device), tiny)
    if key not in _CONTEXTS:
        _CONTEXTS.clear()  # one case's model at a time keeps GPU memory free
        _CONTEXTS[key] = CaseContext(CASES[case], device, tiny=tiny)
    return _CONTEXTS[key]


def run_benchmark(benchmark: Any, case: str, backend: str, device: torch.device, *, tiny: bool) -> None:
    """Check parity of ``backend`` on ``case``, then time one call per round with pytest-benchmark.

    ``benchmark.extra_info`` receives the FLOP model's numbers, so ``--benchmark-json`` output carries
    achieved TFLOP/s next to the times (compute them as ``flops_model / stats.median``).
    """
    ctx = context(case, device, tiny)
    b = parse_backend(backend)
    ref = ctx.reference()  # before prepare: the model cases share one model between backends
    try:
        prep = ctx.prepare(b)
    except (NotImplementedError, ImportError) as err:
        pytest.skip(f"unavailable: {type(err).__name__}: {err}")
    outs = prep.parity()
    errs = [rel_err(r, o) for r, o in zip(ref, outs)]
    tol = tolerance(b, CASES[case].kind)
    assert max(errs) <= tol, f"{case} {backend}: expected parity rel err <= {tol:g}, got {errs}"

    def call() -> None:
        prep.fn()
        sync(device)

    rounds, warmup = (1, 0) if tiny else (10 if CASES[case].kind.startswith("step") else 3, 2)
    benchmark.extra_info.update(case=case, backend=b.label, checkpoint=prep.checkpoint, parity_rel_err=max(errs),
                                speed_claim=not tiny, **prep.cost.as_dict())
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup, iterations=1)
