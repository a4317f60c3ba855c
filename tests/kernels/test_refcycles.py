"""The fused rollout frees its buffers by reference counting: its forward and backward form no reference cycle that
holds a tensor, so nothing the backward allocated outlives it until Python's cyclic garbage collector runs.

In Triton's interpreter every launch does leave such cycles (``triton.runtime.interpreter.GridExecutor``: its
``_init_args_hst`` / ``_restore_args_dev`` define self-recursive closures whose cells also hold a dict of the launch
arguments' storages), so on the CPU each launch's arguments stay alive until ``gc.collect()``. Compiled launches on
a GPU do not go through it. The test therefore sets aside what the interpreter's closures hold and asserts that
nothing else in the cyclic garbage holds a tensor or is one of the package's objects.
"""

from __future__ import annotations

import gc
import types

import pytest
import torch

from fastnca.kernels.reference import UpdateWeights
from fastnca.kernels.rollout import nca_rollout
from fastnca.kernels.schedule import draw_masks, plan_rollout
from tests.conftest import DEVICE
from tests.kernels.test_nca_step_fwd import make_state, make_weights

FLAGS = [False, True, False]  # 2x2 -> 4x4: a doubling step between two plain ones


def _rollout_backward(policy: str, wgrad: str) -> None:
    weights = make_weights(16, 16, 1, gain=0.4)
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in weights.flat()]
    s = make_state(2, 16, 2, 2).requires_grad_(True)
    plan = plan_rollout(FLAGS, policy, doubling=True, wgrad=wgrad)
    masks = draw_masks(plan, 2, 2, 2, 0.5, generator=torch.Generator(device=DEVICE).manual_seed(1), device=DEVICE)
    nca_rollout(s, UpdateWeights.from_flat(leaves), plan, masks).sum().backward()


def _interpreter_held(garbage: list) -> set[int]:
    """Ids of the garbage objects reachable from the interpreter's launch closures (and those closures)."""
    ids = {id(o) for o in garbage}
    todo = [o for o in garbage if isinstance(o, types.FunctionType) and o.__module__ == "triton.runtime.interpreter"]
    held = {id(o) for o in todo}
    while todo:
        for r in gc.get_referents(todo.pop()):
            if id(r) in ids and id(r) not in held:
                held.add(id(r))
                todo.append(r)
    return held


def _describe(o: object) -> str:
    if isinstance(o, torch.Tensor):
        return f"Tensor{tuple(o.shape)} {o.dtype}"
    if isinstance(o, torch.UntypedStorage):
        return f"UntypedStorage({o.nbytes()} bytes)"
    if isinstance(o, types.FunctionType):
        return f"function {o.__module__}.{o.__qualname__}"
    return f"{type(o).__module__}.{type(o).__qualname__}"


@pytest.mark.parametrize("policy,wgrad", [("step", "per-step"), ("segments=2", "per-step"), ("none", "per-step"),
                                          ("step", "batched")])
def test_rollout_forward_and_backward_leave_no_reference_cycle(policy, wgrad):
    """With the cyclic collector off, one forward and backward of the fused rollout (masks, a doubling step; the
    per-step and batched weight-gradient designs; stored inputs, a recomputed segment and kept activations): its
    cyclic garbage holds no tensor or storage and none of the package's objects, besides what the interpreter's launch
    closures hold."""
    _rollout_backward(policy, wgrad)  # first calls: lazy imports and caches, whose cycles are not the rollout's
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        _rollout_backward(policy, wgrad)
        gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector would free stays in gc.garbage to be inspected
        gc.collect()
        garbage = list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()
    held = _interpreter_held(garbage)
    own = [_describe(o) for o in garbage if id(o) not in held and (
        isinstance(o, torch.Tensor | torch.UntypedStorage)
        or (isinstance(o, types.FunctionType) and (o.__module__ or "").startswith("fastnca"))
        or type(o).__module__.startswith("fastnca"))]
    assert not own, f"expected no reference cycle of the rollout's own holding tensors; in cycles: {own[:20]}"
    del garbage
