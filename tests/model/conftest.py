"""Fixtures shared by the model tests: one intra-op thread."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Bitwise comparisons and speed on 2 shared cores: one intra-op thread for the test, restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
