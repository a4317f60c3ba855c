"""The package installs from a plain (non-editable) wheel with fastnca.kernels and the embedded MNIST inside it,
and a fresh virtual environment holding only that wheel trains the small preset with no data directory. The
developer tools (tools/) and the benchmarks stay out of the wheel, and the library never imports them.

Both tests work whatever the running interpreter is (a venv with or without system site-packages, a system
Python): the wheel's copy of fastnca is put ahead of any other, and the fresh venv reaches torch and the other
dependencies through a .pth file naming the running interpreter's site-packages folders, so nothing is downloaded.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT),
                    "-w", str(out)], check=True, cwd=out, timeout=300)
    return next(out.glob("fastnca-*.whl"))


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment minus everything that could point at this checkout or at a data directory."""
    drop = ("PYTHONPATH", "PYTHONHOME", "FASTNCA_DATA", "VIRTUAL_ENV")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONNOUSERSITE": "1", **extra}


def test_wheel_ships_the_kernels_and_the_embedded_mnist(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("fastnca/kernels/reference.py", "fastnca/datasets/binarized_mnist.npz", "fastnca/datasets/README.md"):
        assert name in names, f"expected {name} in {wheel.name}"


def test_wheel_ships_only_the_library(wheel):
    """tools/ (the sm_90 fit, the launch counter, the import shim), benchmarks/ and tests/ are run from a checkout:
    the wheel holds the fastnca package (fastnca.kernels included) and its metadata, nothing else."""
    names = zipfile.ZipFile(wheel).namelist()
    outside = [n for n in names if not n.startswith(("fastnca/", "fastnca-"))]
    assert not outside, f"expected only fastnca/ and its metadata in {wheel.name}, got {outside}"
    tools = [n for n in names if n.rsplit("/", 1)[-1] in ("fit.py", "launches.py", "sitecustomize.py")]
    assert not tools, f"expected no developer tool in {wheel.name}, got {tools}"


# what the library must not import: the folders of the checkout that are not installed
_NOT_INSTALLED = ("tools", "benchmarks", "tests")
_MODULE_NAME = re.compile(rf"(?:{'|'.join(_NOT_INSTALLED)})(?:\.\w+)*")


def _reaches_outside(path: Path) -> list[str]:
    """The lines of ``path`` that import tools/benchmarks/tests, name one of them as a module (importlib), or
    name the import shim (a path into tools/)."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    bad = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        if any(n.split(".")[0] in _NOT_INSTALLED for n in names):
            bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {', '.join(names)}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if _MODULE_NAME.fullmatch(node.value) or "_import_shim" in node.value:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: names {node.value!r}")
    return bad


def test_the_library_imports_neither_tools_nor_benchmarks():
    """Imports go one way: tools/ and benchmarks/ import fastnca, never the reverse (the wheel lacks them)."""
    files = sorted(p for d in ("fastnca", "kernels") for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 20, f"expected the library's modules under fastnca/ and kernels/, found {len(files)}"
    bad = [line for p in files for line in _reaches_outside(p)]
    assert not bad, "expected fastnca/ and kernels/ to import nothing outside the package:\n" + "\n".join(bad)


def test_the_import_check_sees_an_import_of_tools(tmp_path, monkeypatch):
    """The check above finds each way in: a plain import, a from-import, an importlib name, the shim's path."""
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    src = tmp_path / "m.py"
    src.write_text('"""tools.fit is not imported by this docstring."""\nimport tools.fit\n'
                   'from benchmarks.cases import CASES\nimport importlib\nimportlib.import_module("tools.launches")\n'
                   'SHIM = "tools/_import_shim"\n')
    found = _reaches_outside(src)
    assert sorted(line.split(": ", 1)[0] for line in found) == ["m.py:2", "m.py:3", "m.py:5", "m.py:6"], found


def test_plain_install_ships_and_imports_fastnca_kernels(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, cwd=tmp_path, timeout=300)
    # PYTHONPATH puts the plain install ahead of site-packages (where an editable install of this checkout may
    # live); the working directory is not the checkout, so the checkout itself is not on sys.path either.
    code = "import fastnca, fastnca.kernels.reference as r; print(fastnca.__file__); print(r.__file__)"
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=_clean_env(PYTHONPATH=str(target)),
                         capture_output=True, text=True, timeout=300).stdout.split()
    assert len(out) == 2 and all(p.startswith(str(target)) for p in out), \
        f"expected both modules from the plain install in {target}, got {out}"


@pytest.mark.slow
def test_fresh_venv_from_the_wheel_trains_small_with_no_data_directory(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, cwd=tmp_path, timeout=300)
    # torch, numpy, ... from the running interpreter's site-packages folders, listed after the venv's own
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True, timeout=60).stdout.strip()
    deps = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    Path(site, "_fastnca_test_deps.pth").write_text("\n".join(deps) + "\n")

    work = tmp_path / "work"  # no ./data here, no FASTNCA_DATA: only the embedded MNIST can serve the preset
    work.mkdir()
    env = _clean_env(FASTNCA_CACHE=str(tmp_path / "cache"))
    where = subprocess.run([str(py), "-c", "import fastnca; print(fastnca.__file__)"], check=True, cwd=work, env=env,
                           capture_output=True, text=True, timeout=300).stdout.strip()
    assert where.startswith(str(venv)), f"expected fastnca from the fresh venv {venv}, got {where}"

    run = subprocess.run([str(venv / "bin" / "fastnca"), "train", "--preset", "small", "--set", "iterations=5",
                          "--out", "run", "--threads", "1", "--no-progress"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"expected exit status 0, got {run.returncode}:\n{run.stderr[-3000:]}"
    embedded = [line for line in run.stderr.splitlines() if "embedded in the package" in line]
    assert len(embedded) == 1 and str(venv) in embedded[0], \
        f"expected one start-up line naming the venv's embedded MNIST, got stderr:\n{run.stderr[-3000:]}"
    steps = [json.loads(line)["step"] for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 5, f"expected a run of 5 steps, metrics.jsonl has steps {steps}"
    for name in ("checkpoint.pt", "samples.png", "growth.png"):
        assert (work / "run" / name).is_file(), f"expected {name} in the run folder"
