"""The kernels' mode, chosen once per process (kernels/__init__.py): ``use_interpreter`` before any kernel module is
imported, a clear error after one was imported in the other mode, ``env_without_interpreter`` for compiling children.

Each case runs in a fresh interpreter: this process's mode was chosen by tests/conftest.py and cannot change.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastnca.kernels import env_without_interpreter

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter with TRITON_INTERPRET unset (plus ``env``); it prints one JSON object."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          env={**env_without_interpreter(), "CUDA_VISIBLE_DEVICES": "", **env}, timeout=300)
    assert proc.returncode == 0, f"expected the child to succeed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


_SWITCH_AFTER_IMPORT = """
    import json, os
    from fastnca.kernels import interpreter_on, use_interpreter
    first = use_interpreter({first})
    from fastnca.kernels import nca_step
    kind = type(nca_step._nca_step_fwd_kernel).__name__
    try:
        use_interpreter({second})
        error = None
    except RuntimeError as err:
        error = str(err)
    print(json.dumps(dict(first=first, kind=kind, error=error, again=use_interpreter({first}),
                          flag=os.environ.get("TRITON_INTERPRET"), interpreter_on=interpreter_on())))
"""


@pytest.mark.parametrize("first", [True, False])
def test_the_mode_is_chosen_before_import_and_cannot_change_after(first):
    res = _run(_SWITCH_AFTER_IMPORT.format(first=first, second=not first))
    assert res["first"] is first and res["again"] is first, res
    assert res["kind"] == ("InterpretedFunction" if first else "JITFunction"), \
        f"expected the kernels decorated in the chosen mode, got {res['kind']}"
    assert res["error"] and "fastnca.kernels.nca_step" in res["error"] and "before importing" in res["error"], \
        f"expected an error naming the module imported in the other mode, got {res['error']!r}"
    assert res["flag"] == ("1" if first else None) and res["interpreter_on"] is first, res


_DEFAULT = """
    import json, os
    from fastnca.kernels import use_interpreter
    print(json.dumps(dict(on=use_interpreter(), flag=os.environ.get("TRITON_INTERPRET"))))
"""


def test_the_default_is_the_interpreter_without_a_gpu_unless_the_variable_says_otherwise():
    assert _run(_DEFAULT) == {"on": True, "flag": "1"}, "no CUDA device visible, no variable: the interpreter"
    assert _run(_DEFAULT, TRITON_INTERPRET="1") == {"on": True, "flag": "1"}
    assert _run(_DEFAULT, TRITON_INTERPRET="0") == {"on": False, "flag": None}, "an explicit 0: compiled kernels"


def test_env_without_interpreter_drops_only_the_flag():
    env = {"TRITON_INTERPRET": "1", "PATH": "/bin", "FASTNCA_FIT_JOBS": "2"}
    assert env_without_interpreter(env) == {"PATH": "/bin", "FASTNCA_FIT_JOBS": "2"}
    assert "TRITON_INTERPRET" not in env_without_interpreter() and env_without_interpreter().get("PATH") == \
        os.environ.get("PATH")
