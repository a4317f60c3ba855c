"""Test setup: interpreter mode without a GPU, seeded tests, and the data directory.

Runs before ``fastnca.kernels`` is imported: ``@triton.jit`` reads TRITON_INTERPRET when it decorates a kernel.
"""

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests read the real datasets; CI sets FASTNCA_DATA to ../shared/data, this default serves a local checkout.
_shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "FASTNCA_DATA" not in os.environ and _shared.is_dir():
    os.environ["FASTNCA_DATA"] = str(_shared)

import pytest  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
