"""fastnca.kernels: the fused Triton NCA kernels and their plain-PyTorch reference.

Import as ``fastnca.kernels``. The reference (``reference.py``) needs only PyTorch; the Triton modules are
imported lazily so that the package works where Triton is not installed.

Interpreter or compiled: ``@triton.jit`` makes an interpreted kernel (CPU tensors, one program after another) or a
compiled one (CUDA) when it decorates the function, i.e. when the kernel's module is imported, from
``TRITON_INTERPRET``. :func:`use_interpreter` is where that choice is made (the tests' conftest, the benchmarks'
CPU dry runs and the launch counter call it before they import a kernel module); :func:`interpreter_on` reads it;
:func:`env_without_interpreter` is the environment of a child process that compiles kernels for a GPU.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from .reference import UpdateWeights, double_ref, make_update_mask, nca_step_ref, update_ref

__all__ = ["UpdateWeights", "double_ref", "env_without_interpreter", "interpreter_on", "make_update_mask",
           "nca_step_ref", "update_ref", "use_interpreter"]

_FLAG = "TRITON_INTERPRET"  # read by Triton's @triton.jit when it decorates a kernel, and by the kernel modules


def interpreter_on() -> bool:
    """Whether this process's kernels run in Triton's interpreter (``TRITON_INTERPRET=1``) rather than compiled."""
    return os.environ.get(_FLAG) == "1"


def _imported_modes() -> dict[str, bool]:
    """The imported modules of this package that fixed a mode, each with whether it is the interpreter's: a module
    that read the flag at import (a bool ``INTERPRET`` or ``_INTERPRET``), else one holding Triton kernels."""
    if "triton" not in sys.modules:  # no kernel module can have been imported yet (each imports Triton)
        return {}
    from triton.runtime.jit import JITFunction

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every Triton release this project supports has the interpreter
        InterpretedFunction = ()  # isinstance(x, ()) is False
    modes = {}
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(__name__ + "."):
            continue
        read = [v for v in (getattr(module, "INTERPRET", None), getattr(module, "_INTERPRET", None))
                if isinstance(v, bool)]
        if read:
            modes[name] = read[0]
            continue
        for value in list(vars(module).values()):
            if isinstance(value, InterpretedFunction):
                modes[name] = True
                break
            if isinstance(value, JITFunction):
                modes[name] = False
                break
    return modes


def use_interpreter(on: bool | None = None) -> bool:
    """Choose whether this process's Triton kernels run in Triton's interpreter or compiled for a CUDA GPU.

    Call it before any kernel module (``nca_step``, ``rollout``, ``likelihood``, ...) is imported: ``@triton.jit``
    picks the interpreter or the compiler when it decorates a kernel, so a process holds one mode. It sets
    ``TRITON_INTERPRET=1`` in this process's environment for the interpreter (removes it for compiled kernels),
    which the kernel modules read when they are imported and child processes inherit.

    Args:
        on: True: the interpreter (the kernels then take CPU tensors); False: compiled; None: what
            ``TRITON_INTERPRET`` says where it is set, else the interpreter exactly when no CUDA device is visible
            (the tests and the benchmarks' CPU dry runs).

    Returns:
        Whether the kernels run in the interpreter.

    Raises:
        RuntimeError: a kernel module was imported before in the other mode (its kernels cannot change).
    """
    if on is None:
        if _FLAG in os.environ:
            on = interpreter_on()
        else:
            import torch

            on = not torch.cuda.is_available()
    other = sorted(name for name, interpreted in _imported_modes().items() if interpreted != on)
    if other:
        was = "interpreted" if not on else "compiled"
        raise RuntimeError(
            f"fastnca.kernels.use_interpreter({on}): {', '.join(other)} already imported with {was} kernels; "
            "call use_interpreter before importing any kernel module (@triton.jit chooses between the interpreter "
            "and the compiler when it decorates a kernel, at import, so one process holds one mode)")
    if on:
        os.environ[_FLAG] = "1"
    else:
        os.environ.pop(_FLAG, None)
    return on


def env_without_interpreter(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) without ``TRITON_INTERPRET``: for a child process that
    compiles the kernels for a GPU (the sm_90 fit's children, ``warmup``'s workers) whatever this process runs."""
    return {k: v for k, v in (os.environ if env is None else env).items() if k != _FLAG}
