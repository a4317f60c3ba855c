"""The Triton releases the sm_90 fit tests compile under: this process's (CI's) and the GPU machines' (3.6).

The GPU machines run an older Triton that allocates registers differently (a tile with no spills under 3.8 can
spill under 3.6), so each fit test runs once per release. The 3.6 compile needs an interpreter with
``triton==3.6.0`` beside this torch. ``FASTNCA_FIT_PYTHONS`` names one when set; otherwise the tests use, and
the first time make, a small venv in the checkout (``.ci/.venv-triton36``, git-ignored) that sees this
interpreter's packages after its own, so only the triton wheel is downloaded (about 190 MB, from the package
index pip is configured for). Where it cannot be made (no network, no pip), those cases skip and say why.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tools.fit import FIT_PYTHONS_ENV, GPU_TRITON, fit_pythons, triton_version

RELEASES = ("ci", f"gpu-triton-{GPU_TRITON}")

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV = ROOT / ".ci" / ".venv-triton36"
GPU_TRITON_PIN = f"triton=={GPU_TRITON}.0"

_HOW = (
    f"set {FIT_PYTHONS_ENV} to an interpreter with {GPU_TRITON_PIN} beside this torch, or let the tests make "
    f"{DEFAULT_VENV.relative_to(ROOT)} (python -m venv --system-site-packages {DEFAULT_VENV.relative_to(ROOT)} && "
    f"{DEFAULT_VENV.relative_to(ROOT)}/bin/pip install --no-deps {GPU_TRITON_PIN}) where the package index is reachable"
)


def _holds_gpu_triton(python: Path) -> bool:
    if not python.is_file():
        return False
    proc = subprocess.run([str(python), "-c", "import triton; print(triton.__version__)"], capture_output=True,
                          text=True, timeout=300)
    version = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else ""
    return version.split(".")[:2] == GPU_TRITON.split(".")


def _see_this_environment(python: Path) -> None:
    """Let the venv import this interpreter's packages (torch, this checkout's fastnca) after its own triton.

    A ``.pth`` file in the venv's site-packages adds this interpreter's site-packages; rewritten every session, so
    the venv follows whichever environment runs the tests (also when that one is a venv itself).
    """
    purelib = sysconfig.get_paths()["purelib"]
    proc = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=120)
    target = Path(proc.stdout.strip()) / "_outer_env.pth"
    text = f"import site; site.addsitedir({purelib!r})\n"
    if not target.is_file() or target.read_text() != text:
        target.write_text(text)


@functools.cache
def default_fit_python() -> tuple[str | None, str]:
    """``(python, why)``: the checkout's Triton-3.6 interpreter, made on first use; None and the reason when it
    cannot be made."""
    python = DEFAULT_VENV / "bin" / "python"
    if not _holds_gpu_triton(python):
        steps = [
            [sys.executable, "-m", "venv", "--clear", "--system-site-packages", str(DEFAULT_VENV)],
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
             GPU_TRITON_PIN],
        ]
        for cmd in steps:
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            except (OSError, subprocess.TimeoutExpired) as err:
                return None, f"making {DEFAULT_VENV} failed ({err})"
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                return None, f"`{' '.join(cmd[:4])} ...` failed: {tail[0]}"
        if not _holds_gpu_triton(python):
            return None, f"{python} does not import Triton {GPU_TRITON} after installing {GPU_TRITON_PIN}"
    _see_this_environment(python)
    return str(python), ""


def release_python(release: str) -> str | None:
    """The interpreter that compiles for ``release`` (None: this process); skips or fails when it is missing."""
    if release == "ci":
        return None
    pythons = fit_pythons()
    if not pythons:
        python, why = default_fit_python()
        if python is None:
            pytest.skip(f"no interpreter with Triton {GPU_TRITON} for the GPU machines' sm_90 fit: {why}; {_HOW}")
        pythons = [python]
    versions = {p: triton_version(p) for p in pythons}
    found = [p for p, v in versions.items() if v.split(".")[:2] == GPU_TRITON.split(".")]
    assert found, f"{FIT_PYTHONS_ENV} names no interpreter with Triton {GPU_TRITON}: {versions}"
    return found[0]

