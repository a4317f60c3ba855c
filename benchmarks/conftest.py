"""pytest setup for benchmarks/: interpreter mode without a GPU (chosen before a kernel module is imported), seeding.

``benchmarks/`` is a test directory of its own (tests/conftest.py does not apply here), so it chooses the kernels'
mode too, with the same call (``fastnca.kernels.use_interpreter``: ``@triton.jit`` decides when it decorates).
"""

import os
from pathlib import Path

import torch

from fastnca.kernels import interpreter_on, use_interpreter  # the package only: no kernel module is imported yet

# The data directory, as tests/conftest.py sets it: CI sets FASTNCA_DATA to ../shared/data; this default serves a
# local checkout (the GPU check's dry run trains on it).
_shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "FASTNCA_DATA" not in os.environ and _shared.is_dir():
    os.environ["FASTNCA_DATA"] = str(_shared)

use_interpreter()

import pytest  # noqa: E402

INTERPRET = interpreter_on()
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
TINY = DEVICE.type != "cuda"


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
