"""Which kernel is compiled: the interpreter switch, read once.

``INTERPRET`` is whether ``TRITON_INTERPRET=1`` was set when this package was imported (``@triton.jit`` reads it
when it decorates a kernel, so it cannot change later). The interpreter needs choices of its own that change what
is compiled: small tiles (fewer, larger numpy programs run faster) and the bf16 emulation constexprs (``UPCAST_DOT``
/ ``INTERP_BF16`` / ``EMULATE_RNE``, see ``utils.py``). Every such choice asks :func:`interpreting` at call time,
and :func:`as_compiled` turns them all to the GPU's, so that a CPU run can record exactly the launches, constexprs
and options a GPU run compiles (``warmup.record_launches``) without a GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["INTERPRET", "as_compiled", "interpreting"]

# Set before triton is imported (tests/conftest.py does it without a GPU); read once, as @triton.jit does.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_as_compiled = 0  # depth of nested as_compiled() blocks


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter and their launches take the interpreter's choices: tiles
    sized for numpy and the bf16 emulation constexprs. False on the GPU, and inside :func:`as_compiled`."""
    return INTERPRET and not _as_compiled


@contextlib.contextmanager
def as_compiled() -> Iterator[None]:
    """Within the block every tile picker and every interpreter-only constexpr takes the value it takes on the GPU
    (:func:`interpreting` is False), so launches are those a GPU run compiles. Meant for recording launches
    (``warmup.record_launches``): in the interpreter the GPU's tiles run, but slowly, and the bf16 kernels compute
    wrongly there without their emulation (docs/KERNELS.md), so nothing should be executed inside. Nests; not
    thread-local (the pickers are read from the thread that launches)."""
    global _as_compiled
    _as_compiled += 1
    try:
        yield
    finally:
        _as_compiled -= 1
