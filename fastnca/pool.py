"""Pool and damage training (Palm et al., section 3.3): the pool of (image, final NCA state) pairs that half of
each training batch continues from, and the damage that zeroes a random square of some of those states.

Used by the trainer (``fastnca/train.py``) and by the damage-and-regrowth figure (``fastnca/figures.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["Pool", "damage", "damage_masks"]


def damage_masks(
    n: int,
    height: int,
    width: int,
    size: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Per-example 0/1 masks ``(n, 1, H, W)`` that are 0 in one random ``size`` x ``size`` square, 1 elsewhere.

    The square's top-left corner is uniform over the positions that keep it inside the grid; the positions are
    drawn on ``generator`` (a CPU generator) so that they are reproducible.
    """
    size_h, size_w = min(size, height), min(size, width)
    top = torch.randint(0, height - size_h + 1, (n,), generator=generator)
    left = torch.randint(0, width - size_w + 1, (n,), generator=generator)
    rows = torch.arange(height)[None, :, None]
    cols = torch.arange(width)[None, None, :]
    inside = (
        (rows >= top[:, None, None])
        & (rows < (top + size_h)[:, None, None])
        & (cols >= left[:, None, None])
        & (cols < (left + size_w)[:, None, None])
    )
    return (~inside).to(device)[:, None]


def damage(states: Tensor, size: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Zero every channel of each state in a random ``size`` x ``size`` square: ``(n, C, H, W)`` -> same."""
    if states.shape[0] == 0 or size <= 0:
        return states
    keep = damage_masks(
        states.shape[0], states.shape[2], states.shape[3], size, generator=generator, device=states.device
    )
    return states * keep.to(states.dtype)


class Pool:
    """The pool of (image, final NCA state) pairs of pool and damage training, kept on the training device.

    ``take(n)`` removes and returns the first n entries (as the authors' code does); ``add`` appends a batch,
    shuffles the whole pool with the given generator and keeps the first ``capacity`` entries.

    Attributes:
        images: ``(N, C_img, H, W)`` data-domain images, or None while empty.
        states: ``(N, |z|, H, W)`` detached final states, or None while empty.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"pool_size: expected an integer >= 0, got {capacity}")
        self.capacity = capacity
        self.images: Tensor | None = None
        self.states: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.states is None else self.states.shape[0]

    def take(self, n: int) -> tuple[Tensor, Tensor]:
        """Remove the first ``n`` entries and return ``(images, states)``."""
        if self.images is None or self.states is None or n > len(self):
            raise ValueError(f"pool: cannot take {n} entries from a pool of {len(self)}")
        images, states = self.images[:n], self.states[:n]
        self.images, self.states = self.images[n:], self.states[n:]
        return images, states

    def add(self, images: Tensor, states: Tensor, generator: torch.Generator | None = None) -> None:
        """Append detached copies of ``images`` and ``states``, shuffle, cut to capacity."""
        images, states = images.detach(), states.detach()
        if self.images is None or self.states is None or len(self) == 0:
            all_images, all_states = images, states
        else:
            all_images = torch.cat([self.images, images])
            all_states = torch.cat([self.states, states.to(self.states.dtype)])
        order = torch.randperm(all_states.shape[0], generator=generator)[: self.capacity].to(all_states.device)
        self.images = all_images.index_select(0, order)
        self.states = all_states.index_select(0, order).contiguous(memory_format=torch.channels_last)

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "images": self.images, "states": self.states}

    def load_state_dict(self, d: dict[str, Any], device: torch.device | None = None) -> None:
        self.capacity = int(d["capacity"])
        self.images = None if d["images"] is None else d["images"].to(device)
        self.states = (
            None if d["states"] is None else d["states"].to(device).contiguous(memory_format=torch.channels_last)
        )
