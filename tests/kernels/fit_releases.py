"""The Triton releases the sm_90 fit tests compile under: this process's (CI's) and the GPU machines' (3.6).

The GPU machines run an older Triton that allocates registers differently (a tile with no spills under 3.8 can
spill under 3.6), so each fit test runs once per release. The 3.6 compile needs an interpreter with
``triton==3.6.0`` beside this torch, named in ``FASTNCA_FIT_PYTHONS`` (``.ci/run`` makes one); without it that
case is skipped with a message saying how to enable it.
"""

from __future__ import annotations

import pytest

from fastnca.kernels.fit import FIT_PYTHONS_ENV, GPU_TRITON, fit_pythons, triton_version

RELEASES = ("ci", f"gpu-triton-{GPU_TRITON}")

_HOW = (
    f"the sm_90 fit under the GPU machines' Triton {GPU_TRITON} needs an interpreter with it: "
    f"python -m venv --system-site-packages .ci/.venv-triton36 && "
    f".ci/.venv-triton36/bin/pip install triton=={GPU_TRITON}.0, then "
    f"{FIT_PYTHONS_ENV}=.ci/.venv-triton36/bin/python (as .ci/run does)"
)


def release_python(release: str) -> str | None:
    """The interpreter that compiles for ``release`` (None: this process); skips or fails when it is missing."""
    if release == "ci":
        return None
    pythons = fit_pythons()
    if not pythons:
        pytest.skip(f"{FIT_PYTHONS_ENV} is not set; {_HOW}")
    versions = {p: triton_version(p) for p in pythons}
    found = [p for p, v in versions.items() if v.split(".")[:2] == GPU_TRITON.split(".")]
    assert found, f"{FIT_PYTHONS_ENV} names no interpreter with Triton {GPU_TRITON}: {versions}"
    return found[0]
