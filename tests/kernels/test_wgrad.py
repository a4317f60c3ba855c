"""The rollout's batched weight-gradient designs (kernels/wgrad.py, ``RolloutPlan.wgrad``): gradients against float64
autograd of the reference under every checkpoint policy, doubling and not, with masks and an odd batch, cut into
several batches of steps; bf16 within twice the reference's own bf16 error; bitwise reruns; the launches each
design makes; and the batching rule of the plan. Runs through the interpreter on the CPU."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from fastnca.kernels.reference import UpdateWeights, nca_step_ref
from fastnca.kernels.rollout import nca_rollout
from fastnca.kernels.schedule import WGRAD_MAX_STEPS, draw_masks, plan_rollout
from tests.conftest import DEVICE
from tests.kernels.test_nca_step_fwd import make_state, make_weights
from tests.utils import rel_err

FLAGS = [False, True, False, False, True, False]  # 2x2 -> 8x8, doublings inside the batches and segments


def _leaves(weights: UpdateWeights, dtype: torch.dtype = torch.float32) -> list:
    return [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in weights.flat()]


def _grads(state, weights, flags, masks, upstream, *, dtype=torch.float32, plan=None):
    """Output and gradients [state, *present weights] with the state and weights in ``dtype``: the fused rollout
    under ``plan``, or (None) the reference's per-step rollout."""
    leaves = _leaves(weights, dtype)
    s = state.detach().to(dtype).clone().requires_grad_(True)
    if plan is None:
        x = s
        for double, m in zip(flags, masks):
            x = nca_step_ref(x, UpdateWeights.from_flat(leaves), m, double)
    else:
        x = nca_rollout(s, UpdateWeights.from_flat(leaves), plan, masks)
    (x.double() * upstream).sum().backward()
    return x, [s.grad] + [t.grad for t in leaves if t is not None]


def _case(b: int, c: int, h: int, nb: int, flags: list[bool], side: int, p: float, *, bias: bool = True):
    weights = make_weights(c, h, nb, bias=bias, gain=0.4)
    state = make_state(b, c, side, side)
    plan = plan_rollout(flags, "none", doubling=any(flags))
    masks = draw_masks(plan, b, side, side, p, generator=torch.Generator(device=DEVICE).manual_seed(1), device=DEVICE)
    out_side = side * 2 ** sum(flags)
    upstream = torch.randn(b, c, out_side, out_side, generator=torch.Generator().manual_seed(2),
                           dtype=torch.float64).to(DEVICE)
    return weights, state, masks, upstream


def _step_bytes(plan, b: int, c: int, h: int, nb: int, side: int, itemsize: int = 4) -> list[int]:
    from fastnca.kernels.schedule import batch_cell_elems

    elems = batch_cell_elems(c, h, nb, recompute=not plan.keeps_activations)
    return [b * hh * ww * elems * itemsize for hh, ww in plan.grids(side, side)]


# (policy, wgrad, cap): the cap in bytes; 1 cuts every step into its own batch, 20 kB cuts the 8x8 steps apart
CASES = [("none", "batched", None), ("step", "batched-cublas", None), ("segments=4", "batched", 20_000),
         ("none", "batched-cublas", 1), ("auto", "batched", 20_000)]


@pytest.mark.parametrize("policy,wgrad,cap", CASES, ids=[f"{p}-{w}-cap{c}" for p, w, c in CASES])
def test_batched_gradients_match_float64_doubling_masks_odd_batch(policy, wgrad, cap, nan_poison):
    b, c, h, nb = 3, 16, 32, 2
    weights, state, masks, upstream = _case(b, c, h, nb, FLAGS, 2, 0.6)
    kw = {} if cap is None else {"wgrad_batch_bytes": cap}
    plan = plan_rollout(FLAGS, policy, doubling=True, wgrad=wgrad, **kw)
    batches = plan.wgrad_batches(_step_bytes(plan, b, c, h, nb, 2))
    assert len(batches) > 1 or cap is None, f"expected several batches under the cap, got {batches}"
    ref, g64 = _grads(state, weights, FLAGS, masks, upstream, dtype=torch.float64)
    out, gtri = _grads(state, weights, FLAGS, masks, upstream, plan=plan)
    assert rel_err(ref, out) < 1e-5
    for i, (a, t) in enumerate(zip(g64, gtri)):
        assert torch.isfinite(t).all(), f"grad {i}: expected finite values (a batch buffer left unwritten?)"
        assert rel_err(a, t) < 1e-4, f"grad {i}: expected relative error < 1e-4, got {rel_err(a, t):.3g}"


@pytest.mark.parametrize("wgrad", ["batched", "batched-cublas"])
def test_batched_gradients_match_float64_without_doubling_blocks_or_bias(wgrad, nan_poison):
    """A non-doubling rollout on an odd 5x5 grid, no residual blocks (ELU after the perception), no biases, B = 1,
    under 'segments=2' with a batch per segment."""
    b, c, h, nb, flags = 1, 16, 16, 0, [False] * 5
    weights, state, masks, upstream = _case(b, c, h, nb, flags, 5, 0.5, bias=False)
    plan = plan_rollout(flags, "segments=2", doubling=False, wgrad=wgrad)
    ref, g64 = _grads(state, weights, flags, masks, upstream, dtype=torch.float64)
    out, gtri = _grads(state, weights, flags, masks, upstream, plan=plan)
    assert rel_err(ref, out) < 1e-5
    for i, (a, t) in enumerate(zip(g64, gtri)):
        assert rel_err(a, t) < 1e-4, f"grad {i}: expected relative error < 1e-4, got {rel_err(a, t):.3g}"


@pytest.mark.parametrize("policy", ["none", "segments=3"])
def test_batched_bf16_gradients_within_twice_the_reference_bf16_error(policy, nan_poison):
    b, c, h, nb = 2, 16, 32, 2
    weights, state, masks, upstream = _case(b, c, h, nb, FLAGS, 2, 0.6)
    ref64, g64 = _grads(state, weights, FLAGS, masks, upstream, dtype=torch.float64)
    ref16, g16 = _grads(state, weights, FLAGS, masks, upstream, dtype=torch.bfloat16)
    plan = plan_rollout(FLAGS, policy, doubling=True, wgrad="batched", wgrad_batch_bytes=20_000)
    out, gtri = _grads(state, weights, FLAGS, masks, upstream, dtype=torch.bfloat16, plan=plan)
    assert out.dtype == torch.bfloat16
    assert rel_err(ref64, out) <= 2 * rel_err(ref64, ref16) + 1e-5
    for i, (a, r, t) in enumerate(zip(g64, g16, gtri)):
        assert torch.isfinite(t).all(), f"grad {i}: expected finite values"
        err, ref_err = rel_err(a, t), rel_err(a, r)
        assert err <= 2 * ref_err + 1e-5, f"grad {i}: expected <= 2x the reference's bf16 error {ref_err:.3g}, " \
                                          f"got {err:.3g}"


def test_batched_gradients_rerun_bitwise_and_launch_per_step_and_per_batch(monkeypatch):
    """Two identical runs give bitwise-identical gradients (fixed split order, one writer per accumulator slot, no
    atomics); the backward launches per step the main kernel and the post kernel's state-gradient programs only,
    and one weight-gradient launch per batch (here the cap cuts the 4 steps into 3 batches), and allocates no
    per-step per-cell workspace beside its batch buffers (the memory model counts none)."""
    from triton.runtime.interpreter import InterpretedFunction

    b, c, h, nb, flags = 2, 16, 16, 1, [False, True, False, True]
    weights, state, masks, upstream = _case(b, c, h, nb, flags, 2, 0.5)
    plan = plan_rollout(flags, "none", doubling=True, wgrad="batched", wgrad_batch_bytes=17_000)
    batches = plan.wgrad_batches(_step_bytes(plan, b, c, h, nb, 2))
    assert batches == [(3, 4), (1, 3), (0, 1)], batches
    runs, counts = [], Counter()
    real_run = InterpretedFunction.run
    grids: list[tuple[int, int]] = []

    def run(self, *args, **kwargs):
        counts[self.fn.__name__] += 1
        if self.fn.__name__ == "_rollout_bwd_post_kernel":
            grids.append((kwargs["n_wp"], kwargs["n_wo"] + kwargs["n_w1"]))
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    from fastnca.kernels import rollout

    per_cell_rows: list[int] = []  # the per-step workspace's rows: none (the batch buffers replace it)
    real_ws = rollout._Workspace
    monkeypatch.setattr(rollout, "_Workspace", lambda sp, m_max, *a, **k: per_cell_rows.append(m_max) or
                        real_ws(sp, m_max, *a, **k))
    for _ in range(2):
        counts.clear()
        runs.append(_grads(state, weights, flags, masks, upstream, plan=plan)[1])
    for i, (x, y) in enumerate(zip(*runs)):
        assert torch.equal(x, y), f"grad {i}: expected bitwise-identical gradients on a rerun"
    assert counts["_nca_step_bwd_kernel"] == 4 and counts["_rollout_bwd_post_kernel"] == 4, dict(counts)
    assert counts["_wgrad_batched_kernel"] == 3, dict(counts)
    assert set(grids) == {(0, 0)}, f"expected state-gradient-only post launches, got {grids}"
    assert per_cell_rows == [0, 0], f"expected no per-step per-cell workspace beside the batch buffers: {per_cell_rows}"


def test_tf32_batched_gradients_equal_ieee_in_the_interpreter():
    """tf32 reads the same batch buffers as "ieee"; the interpreter computes tf32 dots in fp32: bitwise equal."""
    b, c, h, nb, flags = 2, 16, 16, 1, [False, True, False]
    weights, state, masks, upstream = _case(b, c, h, nb, flags, 2, 1.0)
    grads = {}
    for prec in ("ieee", "tf32"):
        leaves = _leaves(weights)
        s = state.detach().clone().requires_grad_(True)
        out = nca_rollout(s, UpdateWeights.from_flat(leaves), plan_rollout(flags, "none", doubling=True,
                                                                           wgrad="batched"), masks,
                          input_precision=prec)
        (out.double() * upstream).sum().backward()
        grads[prec] = [s.grad] + [t.grad for t in leaves if t is not None]
    for i, (x, y) in enumerate(zip(grads["ieee"], grads["tf32"])):
        assert torch.equal(x, y), f"grad {i}: tf32 differs from ieee by {(x - y).abs().max():.3g}"


# ------------------------------------------------------------------------------------------------ the plan
def test_batches_are_the_longest_runs_under_the_cap_walking_back_from_the_last_step():
    plan = plan_rollout(6, "none", doubling=False, wgrad="batched", wgrad_batch_bytes=10)
    assert plan.wgrad_batches([4, 4, 4, 4, 4, 4]) == [(4, 6), (2, 4), (0, 2)]
    assert plan.wgrad_batches([1, 1, 1, 20, 3, 3]) == [(4, 6), (3, 4), (0, 3)], "a step over the cap is a batch"
    whole = plan_rollout(6, "step", doubling=False, wgrad="batched")
    assert whole.wgrad_batches([2**20] * 6) == [(0, 6)], "expected one batch under the default 2 GiB cap"


def test_batches_stay_inside_recomputed_segments_and_below_the_step_limit():
    seg = plan_rollout(7, "segments=3", doubling=False, wgrad="batched")
    assert seg.wgrad_batches([1] * 7) == [(6, 7), (3, 6), (0, 3)]
    long = plan_rollout(WGRAD_MAX_STEPS + 5, "none", doubling=False, wgrad="batched")
    assert long.wgrad_batches([1] * (WGRAD_MAX_STEPS + 5)) == [(5, WGRAD_MAX_STEPS + 5), (0, 5)]
    with pytest.raises(ValueError, match="step_bytes"):
        seg.wgrad_batches([1] * 6)


def test_plan_rejects_an_unknown_design_or_cap():
    with pytest.raises(ValueError, match="wgrad"):
        plan_rollout(3, "none", doubling=False, wgrad="fused")
    with pytest.raises(ValueError, match="wgrad_batch_bytes"):
        plan_rollout(3, "none", doubling=False, wgrad="batched", wgrad_batch_bytes=0)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
@pytest.mark.parametrize("wgrad", ["batched", "batched-cublas"])
def test_batched_matches_per_step_at_the_mnist_doubling_shape_on_gpu(precision, wgrad):
    """The preset's network (|z| = h = 256, 4 blocks) and schedule at B = 32 with the shipped GPU tiles: output and
    gradients of the batched design against the per-step one, with masks, under 'none' (one batch of all 40 steps)
    and 'step' (recomputed activations in the batch buffers)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    ip = "tf32" if precision == "tf32" else "ieee"
    flags = [False] * 8 + ([True] + [False] * 7) * 4  # 2x2 -> 32x32
    weights = make_weights(256, 256, 4, gain=0.3)
    weights = UpdateWeights.from_flat([None if t is None else t.to(dtype) for t in weights.flat()])
    state = make_state(32, 256, 2, 2).to(dtype)
    masks = draw_masks(plan_rollout(flags, "none", doubling=True), 32, 2, 2, 0.5,
                       generator=torch.Generator(device=DEVICE).manual_seed(4), device=DEVICE)
    upstream = torch.randn(32, 256, 32, 32, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    tol = 1e-4 if precision == "ieee" else 3e-2
    for policy in ("none", "step"):
        results = {}
        for design in ("per-step", wgrad):
            leaves = _leaves(weights, dtype)
            s = state.detach().clone().requires_grad_(True)
            plan = plan_rollout(flags, policy, doubling=True, wgrad=design)
            out = nca_rollout(s, UpdateWeights.from_flat(leaves), plan, masks, input_precision=ip)
            (out.float() * upstream).sum().backward()
            results[design] = [out.detach(), s.grad] + [t.grad for t in leaves if t is not None]
        for i, (new, old) in enumerate(zip(results[wgrad], results["per-step"])):
            assert torch.isfinite(new).all(), f"{policy}: output/grad {i}: expected finite values"
            err = rel_err(old.float(), new.float())
            assert err < tol, f"{policy}: output/grad {i}: expected {wgrad} within {tol} of per-step, got {err:.3g}"
