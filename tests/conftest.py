"""Test setup: interpreter mode without a GPU, seeded tests, and the data directory.

Chooses the kernels' mode first (``fastnca.kernels.use_interpreter``: Triton's interpreter without a GPU, unless
TRITON_INTERPRET says otherwise), before any test imports a kernel module: ``@triton.jit`` decides when it
decorates a kernel.

Tests that read data say which datasets with ``@pytest.mark.data("mnist", ...)``. The data directory is
``FASTNCA_DATA`` when set, else the ``shared/data`` folder beside the checkout when there is one (CI's real
datasets), else a small one the tests make themselves (``tests/fixture_data.py``: the MNIST shipped in the
package, synthetic emoji and CelebA pictures; in ``tests/.fixture-data``, git-ignored), so that no test skips
for want of data on a fresh clone. ``tests.fixture_data.is_fixture`` tells a test which one it has.
"""

import os
from pathlib import Path

import torch

from fastnca.kernels import interpreter_on, use_interpreter  # the package only: no kernel module is imported yet

use_interpreter()

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_DATA = ROOT / "tests" / ".fixture-data"
_shared = ROOT.parent / "shared" / "data"
if "FASTNCA_DATA" not in os.environ:
    if _shared.is_dir():
        os.environ["FASTNCA_DATA"] = str(_shared)
    else:
        from tests.fixture_data import ensure_fixture_data

        os.environ["FASTNCA_DATA"] = str(ensure_fixture_data(FIXTURE_DATA))

import pytest  # noqa: E402

INTERPRET = interpreter_on()
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


def _missing_data_reason(names: tuple[str, ...]) -> str | None:
    """Why a test needing the datasets ``names`` cannot run here, or None when it can."""
    from fastnca.data import DATASETS, EMBEDDED_MNIST

    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise ValueError(f"@pytest.mark.data: unknown datasets {unknown}; expected names from {DATASETS}")
    env = os.environ.get("FASTNCA_DATA")
    if env:
        return None if Path(env).is_dir() else f"FASTNCA_DATA={env!r} is not a directory"
    need_dir = [n for n in names if n != "mnist" or not EMBEDDED_MNIST.is_file()]
    if need_dir:
        return f"needs a data directory holding {', '.join(need_dir)}: set FASTNCA_DATA (see docs/TRAINING.md)"
    return None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        names = tuple(n for mark in item.iter_markers("data") for n in mark.args)
        reason = _missing_data_reason(names) if names else None
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
