"""Shared test helpers."""

from __future__ import annotations

import torch
from torch import Tensor

from fastnca.data import Splits, load_mnist


def rel_err(ref: Tensor, out: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    ref64, out64 = ref.detach().double(), out.detach().double()
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300)).item()


def assert_close(name: str, ref: Tensor, out: Tensor, *, rtol: float) -> float:
    """Fail unless ``out`` is finite, has ``ref``'s shape, and its relative error to ``ref`` is below rtol.

    The message gives the max-abs and relative error so that a failure says how far off it was.
    """
    assert tuple(out.shape) == tuple(ref.shape), f"{name}: expected shape {tuple(ref.shape)}, got {tuple(out.shape)}"
    nan = (~torch.isfinite(out)).sum().item()
    assert nan == 0, f"{name}: expected all finite, got {nan} non-finite elements (unwritten output?)"
    err = rel_err(ref, out)
    max_abs = (out.detach().double() - ref.detach().double()).abs().max().item()
    assert err < rtol, f"{name}: expected relative error < {rtol:g}, got {err:.3g} (max abs {max_abs:.3g})"
    return err


def mnist_slices(n_train: int, n_test: int, sizes: tuple[int, ...] = (28, 32)) -> dict[int, Splits]:
    """The first ``n_train`` training and ``n_test`` test images of the real binarized MNIST, per image size."""
    out = {}
    for size in sizes:
        m = load_mnist(image_size=size)
        out[size] = Splits("mnist", m.train[:n_train].clone(), m.test[:n_test].clone(), m.source)
    return out
