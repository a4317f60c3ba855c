"""pytest setup for benchmarks/: interpreter mode without a GPU (set before Triton is imported), seeding.

``benchmarks/`` is a test directory of its own (tests/conftest.py does not apply here), so it repeats the
TRITON_INTERPRET rule: ``@triton.jit`` reads the variable when it decorates a kernel.
"""

import os

import torch

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
