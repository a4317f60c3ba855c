"""Import shim for a checkout that is not pip-installed (used by benchmarks/gpu_check.sh as a fallback).

pyproject.toml maps the package ``fastnca.kernels`` to the folder ``kernels/`` (setuptools package-dir), so with
only ``PYTHONPATH=<checkout>`` the import ``fastnca.kernels`` fails. With this folder first on PYTHONPATH,
Python runs this file at start-up and the finder below serves ``fastnca.kernels`` from ``<checkout>/kernels``;
its submodules are then found through the package's ``__path__`` as usual.
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_KERNELS = Path(__file__).resolve().parents[2] / "kernels"


class _FastncaKernelsFinder(importlib.abc.MetaPathFinder):
    """Finds exactly ``fastnca.kernels`` (the package); everything else is left to the other finders."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201
        if name != "fastnca.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, _KERNELS / "__init__.py", submodule_search_locations=[str(_KERNELS)]
        )


if _KERNELS.is_dir() and not any(isinstance(f, _FastncaKernelsFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _FastncaKernelsFinder())
