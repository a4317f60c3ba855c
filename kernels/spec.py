"""What one kernel launch compiles to: shared by the kernel modules (which say what they launch) and the sm_90
fit tool (``tools/fit.py``, which compiles it), so that shipped kernels never import the developer tool."""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["KernelSpec"]


class KernelSpec(NamedTuple):
    """One kernel launch as compiled: the jit function, its signature types and constexpr values, launch options."""

    name: str
    fn: Any  # a @triton.jit function (a JITFunction, or an InterpretedFunction under TRITON_INTERPRET=1)
    signature: dict[str, str]  # every argument: "*bf16", "i32", ... or "constexpr"
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
