"""The kernels' shared Triton helpers (kernels/utils.py): the multiply-high division of the weight-gradient gathers."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from fastnca.kernels.utils import udiv, udiv_magic
from tests.conftest import DEVICE


@triton.jit
def _udiv_probe(n_ptr, q_ptr, d, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    n = tl.load(n_ptr + offs, mask=ok, other=0).to(tl.uint32)
    m, sh = udiv_magic(d)
    tl.store(q_ptr + offs, udiv(n, m, sh).to(tl.int64), mask=ok)


# the grids' divisors (W and H * W of 1x1 ... 64x64, the non-doubling 28 and 62), odd ones and the extremes
@pytest.mark.parametrize("d", [1, 2, 3, 7, 28, 62, 64, 784, 3844, 4096, 12345, 2**20 + 1, 2**30 + 3, 2**31 - 1])
def test_udiv_equals_floor_division_below_2_31(d: int) -> None:
    """``udiv(n, *udiv_magic(d))`` is ``n // d`` for every 0 <= n < 2**31: at the edges (0, multiples of d and their
    neighbours, 2**31 - 1) and at random numerators."""
    gen = torch.Generator().manual_seed(d)
    k = torch.tensor([1, 2, 3, 1000, (2**31 - 1) // d], dtype=torch.int64)
    edges = torch.cat([k * d - 1, k * d, k * d + 1, torch.tensor([0, 1, d - 1, 2**31 - 2, 2**31 - 1])])
    n = torch.cat([edges, torch.randint(0, 2**31, (500,), generator=gen, dtype=torch.int64)])
    n = n[(n >= 0) & (n < 2**31)].to(DEVICE)
    q = torch.empty_like(n)
    _udiv_probe[(triton.cdiv(n.numel(), 128),)](n, q, d, n.numel(), BLOCK=128)
    want = n // d
    bad = (q != want).nonzero().flatten()[:5].tolist()
    assert not bad, f"udiv by {d}: expected n // d, got {[(int(n[i]), int(q[i]), int(want[i])) for i in bad]}"
