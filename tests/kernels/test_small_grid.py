"""The small-grid kernel (kernels/small_grid.py): the leading steps of a rollout on grids of <= 8x8 cells per sample in
one forward launch, their backward per step from the states it stored. Parity of the output and of every gradient
against float64 (fp32 and bf16, masks and doublings, odd batches and odd seed grids, the switch to per-step launches
mid-rollout), bitwise reruns, NaN-poisoned buffers, the launch counts, and the cut-off rules."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from fastnca.kernels.reference import UpdateWeights, nca_step_ref
from fastnca.kernels.rollout import nca_rollout
from fastnca.kernels.schedule import draw_masks, plan_rollout
from fastnca.kernels.small_grid import SMALL_GRID_CELLS, samples_per_program, small_config, small_grid_steps
from tests.conftest import DEVICE
from tests.kernels.test_nca_step_fwd import make_state, make_weights
from tests.utils import rel_err
from tools.launches import interpreter_launches


def _reference(state, weights, flags, masks, dtype):
    x = state.to(dtype)
    w = UpdateWeights.from_flat([None if t is None else t.to(dtype) for t in weights.flat()])
    for double, m in zip(flags, masks):
        x = nca_step_ref(x, w, m, double)
    return x


def _fused(state, weights, flags, masks, *, small_grid=True, policy="auto"):
    plan = plan_rollout(flags, policy, doubling=True)
    return nca_rollout(state, weights, plan, masks, small_grid=small_grid)


def _masks(flags, b, h, w, p):
    plan = plan_rollout(flags, "none", doubling=True)
    return draw_masks(plan, b, h, w, p, generator=torch.Generator(device=DEVICE).manual_seed(3), device=DEVICE)


# 1x3 seed: 1x3, 2x6, 4x12 (48 cells: small), then 8x24 (192 cells: per step)
ODD_FLAGS = [False, True, False, True, False, True, False]
GRAD_FLAGS = ODD_FLAGS[:6]  # five small steps, one per-step one: the backward crosses the switch once


def test_cut_off_counts_the_leading_steps_on_grids_of_at_most_64_cells():
    mnist = [False] * 8 + ([True] + [False] * 7) * 4  # mnist-doubling from a 2x2 seed: 2x2, 4x4, 8x8 | 16x16, 32x32
    assert small_grid_steps(mnist, 2, 2) == 24
    assert small_grid_steps(ODD_FLAGS, 1, 3) == 5
    assert small_grid_steps([False] * 10, 8, 8) == 10, "expected a non-doubling 8x8 rollout to run whole"
    assert small_grid_steps([False] * 10, 9, 9) == 0
    assert small_grid_steps([False], 2, 2) == 0, "expected a single small step to stay on the per-step path"
    assert SMALL_GRID_CELLS == 64


def test_samples_per_program_gives_a_program_per_sample_up_to_the_sms():
    assert samples_per_program(32, 64, 64) == 1
    assert samples_per_program(132, 16, 64) == 1
    assert samples_per_program(1024, 16, 64) == 4, "expected ~132 programs of whole samples beyond 132 samples"
    assert samples_per_program(1024, 64, 64) == 1, "expected no more samples per program than fill one tile"


def test_shapes_without_a_fitting_tile_stay_on_the_per_step_path():
    assert small_config(256, 256, torch.float32, input_precision="tf32", interpret=False) is None
    assert small_config(256, 256, torch.bfloat16, interpret=False).block_m == 64


def test_tf32_rollout_forward_reads_k_major_weights_as_ieee_reads_its_own():
    """The small-grid and the per-step forward of a tf32 rollout (K-major weights) against the "ieee" one
    (N-major): bitwise in the interpreter, which computes tf32 dots in fp32."""
    weights = make_weights(32, 48, 2, gain=0.4)
    state = make_state(3, 32, 1, 3)
    masks = _masks(ODD_FLAGS, 3, 1, 3, 0.5)
    out = {}
    for prec in ("ieee", "tf32"):
        plan = plan_rollout(ODD_FLAGS, "auto", doubling=True)
        with torch.no_grad():
            out[prec] = nca_rollout(state, weights, plan, masks, input_precision=prec, small_grid=True)
    assert torch.equal(out["tf32"], out["ieee"]), f"differ by {(out['tf32'] - out['ieee']).abs().max():.3g}"


def test_tf32_rollout_gradients_equal_ieee_with_k_major_weights():
    """Forward and backward of a tf32 rollout (small-grid kernel, then per step; K-major weights) against "ieee":
    bitwise in the interpreter, which computes tf32 dots in fp32."""
    weights = make_weights(32, 48, 2, gain=0.4)
    state0 = make_state(3, 32, 1, 3)
    masks = _masks(GRAD_FLAGS, 3, 1, 3, 0.5)
    grads = {}
    for prec in ("ieee", "tf32"):
        w = UpdateWeights.from_flat([None if t is None else t.clone().requires_grad_(True) for t in weights.flat()])
        state = state0.clone().requires_grad_(True)
        plan = plan_rollout(GRAD_FLAGS, "auto", doubling=True)
        out = nca_rollout(state, w, plan, masks, input_precision=prec, small_grid=True)
        out.backward(torch.ones_like(out))
        grads[prec] = [out.detach(), state.grad] + [t.grad for t in w.flat() if t is not None]
    for i, (a, b) in enumerate(zip(grads["ieee"], grads["tf32"], strict=True)):
        assert torch.equal(a, b), f"output/gradient {i}: tf32 differs from ieee by {(a - b).abs().max():.3g}"


@pytest.mark.parametrize("p_update", [1.0, 0.5], ids=["nomask", "mask"])
def test_fp32_forward_matches_float64_across_the_switch_to_per_step_launches(p_update, nan_poison):
    b = 3
    weights = make_weights(16, 32, 2, gain=0.4)
    state = make_state(b, 16, 1, 3)
    masks = _masks(ODD_FLAGS, b, 1, 3, p_update)
    ref = _reference(state.double(), weights, ODD_FLAGS, masks, torch.float64)
    out = _fused(state, weights, ODD_FLAGS, masks)
    assert out.shape == (b, 16, 8, 24)
    assert torch.isfinite(out).all(), "expected every output cell written (NaN-poisoned buffers)"
    err = rel_err(ref, out)
    assert err < 1e-5 * len(ODD_FLAGS), f"expected relative error < {1e-5 * len(ODD_FLAGS):.1e}, got {err:.3g}"
    per_step = _fused(state, weights, ODD_FLAGS, masks, small_grid=False)
    assert rel_err(per_step, out) < 1e-6, "expected the small-grid kernel to compute what the per-step path does"


def test_bf16_forward_within_twice_the_reference_bf16_error(nan_poison):
    b, flags = 5, [False, False, True, False, True, False, False]  # 2x2 -> 8x8: every step in the small kernel
    weights = make_weights(16, 16, 1, gain=0.4)
    state = make_state(b, 16, 2, 2)
    masks = _masks(flags, b, 2, 2, 0.6)
    ref64 = _reference(state.double(), weights, flags, masks, torch.float64)
    ref16 = _reference(state, weights, flags, masks, torch.bfloat16)
    w16 = UpdateWeights.from_flat([None if t is None else t.bfloat16() for t in weights.flat()])
    out = _fused(state.bfloat16(), w16, flags, masks)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    err, ref_err = rel_err(ref64, out), rel_err(ref64, ref16)
    assert err <= 2 * ref_err + 1e-5, f"expected <= 2x the reference's bf16 error {ref_err:.3g}, got {err:.3g}"


def _grads(state, weights, flags, masks, upstream, *, dtype=torch.float32, small_grid=True):
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in weights.flat()]
    s = state.detach().to(dtype).requires_grad_(True)
    out = _fused(s, UpdateWeights.from_flat(leaves), flags, masks, small_grid=small_grid)
    (out.double() * upstream).sum().backward()
    return [s.grad] + [t.grad for t in leaves if t is not None]


def _ref_grads(state, weights, flags, masks, upstream, dtype):
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in weights.flat()]
    s = state.detach().to(dtype).requires_grad_(True)
    (_reference(s, UpdateWeights.from_flat(leaves), flags, masks, dtype).double() * upstream).sum().backward()
    return [s.grad] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("c, n_blocks, p_update", [(16, 1, 0.5), (32, 2, 1.0), (16, 0, 0.5)],
                         ids=["c16-nb1-mask", "c32-nb2", "c16-nb0-mask"])
def test_fp32_gradients_match_float64(c, n_blocks, p_update, nan_poison):
    """Five small steps (one forward kernel; the backward per step from its stored states), then one per step."""
    b = 3 if c == 16 else 2
    weights = make_weights(c, 32, n_blocks, gain=0.4)
    state = make_state(b, c, 1, 3)
    masks = _masks(GRAD_FLAGS, b, 1, 3, p_update)
    upstream = torch.randn(b, c, 8, 24, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(DEVICE)
    ref = _ref_grads(state, weights, GRAD_FLAGS, masks, upstream, torch.float64)
    got = _grads(state, weights, GRAD_FLAGS, masks, upstream)
    for i, (a, t) in enumerate(zip(ref, got)):
        assert torch.isfinite(t).all(), f"grad {i}: expected finite values (unwritten buffer?)"
        assert rel_err(a, t) < 1e-4, f"grad {i}: expected relative error < 1e-4, got {rel_err(a, t):.3g}"


def test_gradients_rerun_bitwise():
    weights = make_weights(16, 16, 1, gain=0.4)
    state = make_state(2, 16, 1, 3)
    masks = _masks(GRAD_FLAGS, 2, 1, 3, 0.5)
    upstream = torch.randn(2, 16, 8, 24, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(DEVICE)
    runs = [_grads(state, weights, GRAD_FLAGS, masks, upstream) for _ in range(2)]
    for i, (x, y) in enumerate(zip(*runs)):
        assert torch.equal(x, y), f"grad {i}: expected bitwise-identical gradients on a rerun"


def test_bf16_gradients_within_twice_the_reference_bf16_error(nan_poison):
    b = 3
    weights = make_weights(16, 16, 1, gain=0.4)
    state = make_state(b, 16, 1, 3)
    masks = _masks(GRAD_FLAGS, b, 1, 3, 0.6)
    upstream = torch.randn(b, 16, 8, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE)
    g64 = _ref_grads(state, weights, GRAD_FLAGS, masks, upstream, torch.float64)
    g16 = _ref_grads(state, weights, GRAD_FLAGS, masks, upstream, torch.bfloat16)
    gtri = _grads(state, weights, GRAD_FLAGS, masks, upstream, dtype=torch.bfloat16)
    for i, (a, r, t) in enumerate(zip(g64, g16, gtri)):
        assert torch.isfinite(t).all(), f"grad {i}: expected finite values (unwritten buffer?)"
        err, ref_err = rel_err(a, t), rel_err(a, r)
        assert err <= 2 * ref_err + 1e-5, f"grad {i}: expected <= 2x the reference's bf16 error {ref_err:.3g}, " \
                                          f"got {err:.3g}"


def test_one_launch_forward_replaces_the_small_steps():
    weights = make_weights(16, 16, 1)
    launches = {}
    for small in (True, False):
        state = make_state(2, 16, 1, 3).requires_grad_(True)
        counts: Counter = Counter()
        with interpreter_launches(counts, execute=False):
            _fused(state, weights, ODD_FLAGS, [None] * len(ODD_FLAGS), small_grid=small).sum().backward()
        launches[small] = dict(counts)
    assert launches[True] == {"triton::_rollout_fwd_small_kernel": 1, "triton::_nca_step_fwd_kernel": 2,
                              "triton::_nca_step_bwd_kernel": 7, "triton::_rollout_bwd_post_kernel": 7}, launches
    assert launches[False] == {"triton::_nca_step_fwd_kernel": 7, "triton::_nca_step_bwd_kernel": 7,
                               "triton::_rollout_bwd_post_kernel": 7}, launches


def test_segment_policies_keep_the_per_step_path():
    """The kernel writes every step's output to the stored states, so plans that store fewer run per step."""
    weights = make_weights(16, 16, 1)
    state = make_state(2, 16, 2, 2)
    counts: Counter = Counter()
    with interpreter_launches(counts, execute=False), torch.no_grad():
        _fused(state, weights, [False] * 4, [None] * 4, policy="segments=2")
    assert counts == {"triton::_nca_step_fwd_kernel": 4}, dict(counts)


def test_a_long_rollout_on_one_small_grid_keeps_the_per_step_backward():
    """Its per-cell buffers for every step at once would outgrow the per-step backward's (fastnca/memory.py)."""
    weights = make_weights(16, 16, 1)
    state = make_state(2, 16, 4, 4).requires_grad_(True)
    counts: Counter = Counter()
    with interpreter_launches(counts, execute=False):
        _fused(state, weights, [False] * 4, [None] * 4, policy="step").sum().backward()
    assert counts == {"triton::_rollout_fwd_small_kernel": 1, "triton::_nca_step_bwd_kernel": 4,
                      "triton::_rollout_bwd_post_kernel": 4}, dict(counts)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["ieee", "bf16"])
def test_mnist_doubling_shape_small_grid_matches_the_per_step_path_on_gpu(precision):
    """The preset's network (|z| = h = 256, 4 blocks) and schedule at B = 32 with the shipped GPU tiles: output and
    gradients of the small-grid path against the per-step path, and bitwise reruns (a missing barrier between steps
    would show as run-to-run differences)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    flags = [False] * 8 + ([True] + [False] * 7) * 4  # 2x2 -> 32x32
    weights = make_weights(256, 256, 4, gain=0.3)
    state = make_state(32, 256, 2, 2)
    upstream = torch.randn(32, 256, 32, 32, generator=torch.Generator().manual_seed(8), dtype=torch.float64).to(DEVICE)
    masks = [None] * len(flags)
    runs = [_grads(state, weights, flags, masks, upstream, dtype=dtype) for _ in range(2)]
    per_step = _grads(state, weights, flags, masks, upstream, dtype=dtype, small_grid=False)
    tol = 1e-4 if precision == "ieee" else 3e-2
    for i, (x, y, z) in enumerate(zip(runs[0], runs[1], per_step)):
        assert torch.equal(x, y), f"grad {i}: expected bitwise-identical gradients on a rerun"
        assert rel_err(z, x) < tol, f"grad {i}: expected the paths within {tol}, got {rel_err(z, x):.3g}"
