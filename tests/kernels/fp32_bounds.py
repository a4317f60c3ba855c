"""What fp32 rounding guarantees when two tilings of a kernel sum in different orders: an elementwise bound.

A dot product of n terms computed in fp32 in any order is within ``gamma(n) * sum |a_i b_i|`` of the exact value,
``gamma(n) = n u / (1 - n u)``, u = 2**-24 (Higham, Accuracy and Stability of Numerical Algorithms, sec. 3.1).
Composed along a network, to first order the computed result is within ``gamma(D) * A`` of the exact one, where D
is the number of rounded operations along the longest path from an input to the output and A is the same
computation on absolute values (|weights|, |inputs|; every ELU, which is 1-Lipschitz with |elu(y)| <= |y|,
becomes the identity on those non-negative values). Two fp32 results that differ only in summation order are
therefore within ``2 gamma(D) A`` of each other, and that, not bitwise equality, is what a test of two tilings can
assert: NumPy (the Triton interpreter) and a GPU both pick their own order for each tile shape.

Through many steps the magnitudes A of absolute values grow with every layer's |W| (no cancellation), so for a
rollout's gradients the elementwise form bounds nothing useful; there :func:`chain_bound` gives the normwise form
for a chain of near-unit-gain steps (the tests' weights are scaled so, ``make_weights``): a rounding difference
made at any of the D operations reaches the output at most at its own relative size, so the two results differ
by at most ``2 gamma(D) max|result|``.

ELU's ``exp(y) - 1`` also carries an absolute rounding error of about u for small |y|, which the relative bounds
above do not cover: :func:`magnitude_weights` adds one unit per ELU output (each next convolution's bias grows by
the row sums of its |weights|), so A covers it too.
"""

from __future__ import annotations

from torch import Tensor

from fastnca.kernels.reference import UpdateWeights, nca_step_ref

FP32_UNIT_ROUNDOFF = 2.0**-24


def gamma(n: int) -> float:
    """``n u / (1 - n u)`` for fp32: the relative error bound of n rounded operations in sequence."""
    nu = n * FP32_UNIT_ROUNDOFF
    assert nu < 1, f"gamma({n}): n u = {nu} >= 1, no bound"
    return nu / (1 - nu)


def step_depth(c: int, h: int, n_blocks: int) -> int:
    """Rounded operations along the longest path of one forward step ``z + m f(z)`` (|z| = c, hidden h).

    Each convolution is a dot of fan-in terms plus its bias (fan-in products and adds, +1 for the bias); a residual
    add and the state update add one each; an ELU two (exp and the subtraction).
    """
    perceive = 9 * c + 1 + (2 if n_blocks == 0 else 0)
    blocks = n_blocks * ((h + 1) + 2 + (h + 1) + 1)
    return perceive + blocks + (h + 1) + 1


def backward_step_depth(c: int, h: int, n_blocks: int) -> int:
    """Rounded operations along the longest path of one step's backward (the transposed dots and ELU' products)."""
    return (c + 1) + n_blocks * (2 * (h + 1) + 3) + (9 * h + 1) + 2


def magnitude_weights(weights: UpdateWeights) -> UpdateWeights:
    """|weights| in float64, each bias after an ELU grown by the row sums of its |weights| (see the module)."""
    flat = [None if t is None else t.double().abs() for t in weights.flat()]
    mag = UpdateWeights.from_flat(flat)

    def grown(w: Tensor, b: Tensor | None) -> Tensor:
        rows = w.sum(dim=(1, 2, 3))
        return rows if b is None else b + rows

    blocks = tuple((w1, b1, w2, grown(w2, b2)) for w1, b1, w2, b2 in mag.blocks)
    b_out = grown(mag.w_out, mag.b_out) if mag.perceive_elu else mag.b_out
    return UpdateWeights(mag.w_perceive, mag.b_perceive, blocks, mag.w_out, b_out)


def step_magnitude(state: Tensor, weights: UpdateWeights, mask: Tensor | None = None,
                   double: bool = False) -> Tensor:
    """A for one step: the float64 reference step on ``|state|`` with :func:`magnitude_weights`."""
    detached = UpdateWeights.from_flat([None if t is None else t.detach() for t in weights.flat()])
    return nca_step_ref(state.detach().double().abs(), magnitude_weights(detached), mask, double)


def chain_bound(result: Tensor, depth: int) -> float:
    """``2 gamma(depth) max|result|``: two orders of a near-unit-gain chain of ``depth`` rounded operations."""
    return 2 * gamma(depth) * result.detach().double().abs().max().item()
