"""The fast subset the README documents (``-m "not slow"``) leaves out the tests marked slow, and only those."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The slowest tests on 2 CPU cores (measured with the interpreter; see docs/TESTING.md, "Markers")
SLOW = [
    "benchmarks/test_runner.py::test_cli_writes_json_with_expected_fields",  # these three share one CLI run
    "benchmarks/test_runner.py::test_cli_writes_markdown_and_prints_parity_first",
    "benchmarks/test_runner.py::test_summarize_gpu_check_folder",
    "benchmarks/test_runner.py::test_first_backend_of_a_model_case_runs_on_its_backend",
    "benchmarks/test_runner.py::test_batched_weight_gradient_backends_run_beside_the_per_step_one",
    "tests/kernels/test_rollout_grad.py::test_rollout_gradients_match_float64_reference_under_every_policy",
    "tests/model/test_triton_backend.py::test_training_step_matches_the_reference_backend",
    "tests/model/test_triton_backend.py::test_small_preset_trains_on_the_fused_backend",
    "tests/model/test_triton_backend.py::test_headline_preset_trains_with_pool_and_damage_on_the_fused_path_at_reduced_size",
]
FILES = sorted({s.split("::")[0] for s in SLOW})


def _collect(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args,
                          *FILES], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode in (0, 5), f"expected collection to succeed, got {out.returncode}:\n{out.stdout}{out.stderr}"
    return [line.split("[")[0] for line in out.stdout.splitlines() if "::" in line]


def test_slow_tests_are_marked_and_left_out_of_the_fast_subset():
    slow = set(_collect("-m", "slow"))
    assert slow == set(SLOW), f"expected exactly these tests marked slow: {SLOW}, got {sorted(slow)}"
    fast = set(_collect("-m", "not slow"))
    assert fast and not fast & slow, f"expected -m 'not slow' to leave out {sorted(slow)}, got {sorted(fast & slow)}"


def test_readme_documents_the_fast_subset():
    text = (ROOT / "README.md").read_text()
    assert 'python -m pytest -q -m "not slow"' in text, "expected the README's Test section to give the fast subset"
