"""pytest setup for benchmarks/: interpreter mode without a GPU (set before Triton is imported), seeding.

``benchmarks/`` is a test directory of its own (tests/conftest.py does not apply here), so it repeats the
TRITON_INTERPRET rule: ``@triton.jit`` reads the variable when it decorates a kernel.
"""

import os
from pathlib import Path

import torch

# The data directory, as tests/conftest.py sets it: CI sets FASTNCA_DATA to ../shared/data; this default serves a
# local checkout (the GPU check's dry run trains on it).
_shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "FASTNCA_DATA" not in os.environ and _shared.is_dir():
    os.environ["FASTNCA_DATA"] = str(_shared)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
TINY = DEVICE.type != "cuda"


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
