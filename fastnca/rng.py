"""Every random number generator's state as plain tensors, lists and numbers, for checkpoints (so they load with
``weights_only=True``) and for giving each DDP rank its own state back (``fastnca/distributed.py``); and which
generator draws on which device."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["rng_state", "set_rng_state", "generator_on"]


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every RNG state as tensors, lists and numbers (so the checkpoint loads with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    for k, g in generators.items():
        if k in state["generators"]:
            g.set_state(state["generators"][k])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def generator_on(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """``generator`` when it can draw tensors on ``device``, else None (the device's global generator draws).

    The device *type* decides, as in PyTorch's own check: ``torch.Generator("cuda").device`` has no index
    (``cuda``), while a CUDA tensor's is ``cuda:0``, and the two do not compare equal; an equality test here sent
    the update masks of ``model.iwae(x, k, generator=torch.Generator("cuda"))`` to the global generator, so seeded
    GPU evaluations did not repeat themselves.
    """
    if generator is None or generator.device.type != torch.device(device).type:
        return None
    return generator
