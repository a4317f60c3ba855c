"""The package installs as a plain (non-editable) wheel with fastnca.kernels inside it."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plain_install_ships_and_imports_fastnca_kernels(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT),
                    "-w", str(wheel_dir)], check=True, cwd=tmp_path)
    wheel = next(wheel_dir.glob("fastnca-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, cwd=tmp_path)
    code = "import fastnca, fastnca.kernels.reference as r; print(fastnca.__file__); print(r.__file__)"
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONNOUSERSITE": "1"}
    out = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path[:0] = [{str(target)!r}] + "
                          f"__import__('site').getsitepackages(); {code}"],
                         check=True, cwd=tmp_path, env=env, capture_output=True, text=True).stdout.split()
    assert all(p.startswith(str(target)) for p in out), f"expected both modules from the plain install, got {out}"
