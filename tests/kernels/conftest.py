"""Fixtures for the kernel tests: NaN-poisoned allocations, so an output element a kernel never writes fails."""

from __future__ import annotations

import sys

import pytest
import torch


@pytest.fixture
def nan_poison(monkeypatch):
    """Fill ``torch.empty`` / ``torch.empty_like`` results with NaN when called from ``fastnca.kernels.*``.

    Other callers (the reference, the tests, torch itself) get the real functions untouched.
    """
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def from_kernels() -> bool:
        return sys._getframe(2).f_globals.get("__name__", "").startswith("fastnca.kernels")

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if from_kernels() and out.is_floating_point():
            out.fill_(float("nan"))
        return out

    def empty_like(*args, **kwargs):
        out = real_empty_like(*args, **kwargs)
        if from_kernels() and out.is_floating_point():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    yield
