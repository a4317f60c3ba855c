"""The rollout op (kernels/rollout.py) called directly: one autograd node per rollout, bf16 gradients against the
reference's own bf16 error, unwritten workspaces caught (NaN-poisoned), and every step's masks honoured."""

from __future__ import annotations

import pytest
import torch

from fastnca.kernels.reference import UpdateWeights, nca_step_ref
from fastnca.kernels.rollout import nca_rollout
from fastnca.kernels.schedule import draw_masks, plan_rollout
from tests.conftest import DEVICE
from tests.kernels.fp32_bounds import backward_step_depth, chain_bound, step_depth
from tests.kernels.test_nca_step_fwd import make_state, make_weights
from tests.utils import rel_err

FLAGS = [False, False, True, False, False, True, False]  # 2x2 -> 8x8, doublings inside segments


def _leaves(weights: UpdateWeights, dtype: torch.dtype = torch.float32) -> list:
    return [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in weights.flat()]


def _ref_grads(state, weights, masks, upstream, dtype):
    """Gradients of the per-step reference rollout run in ``dtype``: [state, *present weights]."""
    leaves = _leaves(weights, dtype)
    s = state.detach().to(dtype).requires_grad_(True)
    x = s
    for double, m in zip(FLAGS, masks):
        x = nca_step_ref(x, UpdateWeights.from_flat(leaves), m, double)
    (x.double() * upstream).sum().backward()
    return x, [s.grad] + [t.grad for t in leaves if t is not None]


def _fused_grads(state, weights, masks, upstream, policy, small_grid=True):
    leaves = _leaves(weights)
    s = state.detach().clone().requires_grad_(True)
    plan = plan_rollout(FLAGS, policy, doubling=True)
    out = nca_rollout(s, UpdateWeights.from_flat(leaves), plan, masks, small_grid=small_grid)
    (out.double() * upstream).sum().backward()
    return out, [s.grad] + [t.grad for t in leaves if t is not None]


def _masks(b, p=0.6):
    plan = plan_rollout(FLAGS, "none", doubling=True)
    return draw_masks(plan, b, 2, 2, p, generator=torch.Generator(device=DEVICE).manual_seed(1), device=DEVICE)


def test_rollout_is_one_autograd_node_over_the_weights():
    weights = make_weights(16, 32, 2, gain=0.4)
    leaves = _leaves(weights)
    s = make_state(2, 16, 2, 2).requires_grad_(True)
    out = nca_rollout(s, UpdateWeights.from_flat(leaves), plan_rollout(FLAGS, "step", doubling=True))
    fn = out.grad_fn
    while type(fn).__name__ != "_RolloutFunctionBackward":  # the permute back to (B, C, H, W)
        fn = fn.next_functions[0][0]
    inputs = [f for f, _ in fn.next_functions if f is not None]
    n_params = sum(t is not None for t in leaves)
    assert len(inputs) == n_params + 1, f"expected the state and {n_params} weights as direct inputs, got {inputs}"


def _check_bf16_rollout(policy: str, small_grid: bool) -> None:
    """The bf16 rollout (|z| = 16, h = 32, 2 blocks, masks, 2x2 -> 8x8): output and gradients within 2x the
    reference's own bf16 error, every gradient finite."""
    b = 2
    weights = make_weights(16, 32, 2, gain=0.4)
    state = make_state(b, 16, 2, 2)
    masks = _masks(b)
    upstream = torch.randn(b, 16, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE)
    ref64, g64 = _ref_grads(state, weights, masks, upstream, torch.float64)
    ref16, g16 = _ref_grads(state, weights, masks, upstream, torch.bfloat16)
    out, gtri = _fused_grads(state.bfloat16(), UpdateWeights.from_flat(
        [None if t is None else t.bfloat16() for t in weights.flat()]), masks, upstream, policy, small_grid)
    assert out.dtype == torch.bfloat16
    assert rel_err(ref64, out) <= 2 * rel_err(ref64, ref16) + 1e-5
    for i, (a, r, t) in enumerate(zip(g64, g16, gtri)):
        assert torch.isfinite(t).all(), f"grad {i}: expected finite values (unwritten workspace?)"
        err, ref_err = rel_err(a, t), rel_err(a, r)
        assert err <= 2 * ref_err + 1e-5, f"grad {i}: expected <= 2x the reference's bf16 error {ref_err:.3g}, " \
                                          f"got {err:.3g}"


@pytest.mark.parametrize("policy,small_grid", [("none", True), ("none", False), ("segments=3", True)])
def test_bf16_rollout_gradients_within_twice_the_reference_bf16_error(policy, small_grid, nan_poison):
    _check_bf16_rollout(policy, small_grid)


@pytest.mark.parametrize("policy", ["none", "step"])
def test_bf16_unchained_forward_tiles_apply_the_activation_once(monkeypatch, policy, nan_poison):
    """bf16 forward tiles of 32 cells x 4 warps take the unchained first dot (``utils.mma_first``), which applies the
    ELU inside its branch (``ACT_IN_DOT``; the interpreter's own tiles are chained): the output, the activations the
    forward keeps under 'none' and every gradient within 2x the reference's bf16 error, as with chained tiles."""
    from fastnca.kernels import rollout

    real_cfg, real_consts = rollout.step_config, rollout.fwd_constexprs
    unchained = []
    monkeypatch.setattr(rollout, "step_config", lambda *a, **k: real_cfg(*a, **k)._replace(block_m=32, num_warps=4))
    monkeypatch.setattr(rollout, "fwd_constexprs",
                        lambda *a, **k: (c := real_consts(*a, **k), unchained.append(c["UNCHAIN"]))[0])
    _check_bf16_rollout(policy, small_grid=False)
    assert unchained and all(unchained), f"expected every forward launch unchained, got UNCHAIN = {unchained}"


def test_fp32_rollout_with_masks_matches_float64_and_reruns_bitwise(nan_poison):
    b = 3
    weights = make_weights(16, 16, 1, gain=0.4)
    state = make_state(b, 16, 2, 2)
    masks = _masks(b)
    upstream = torch.randn(b, 16, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE)
    ref, g64 = _ref_grads(state, weights, masks, upstream, torch.float64)
    runs = [_fused_grads(state, weights, masks, upstream, "segments=2") for _ in range(2)]
    assert rel_err(ref, runs[0][0]) < 1e-5
    for i, (a, t) in enumerate(zip(g64, runs[0][1])):
        assert rel_err(a, t) < 1e-4, f"grad {i}: expected relative error < 1e-4, got {rel_err(a, t):.3g}"
    for i, (x, y) in enumerate(zip(runs[0][1], runs[1][1])):
        assert torch.equal(x, y), f"grad {i}: expected bitwise-identical gradients on a rerun"


@pytest.mark.parametrize("n_blocks", [0, 2])
@pytest.mark.parametrize("small_grid", [True, False], ids=["small-grid", "per-step"])
def test_kept_activations_gradients_match_float64_without_recompute(monkeypatch, small_grid, n_blocks, nan_poison):
    """'none': the forward keeps every step's activations (per-step kernel and small-grid kernel, STORE_ACTS) and
    the backward recomputes nothing: no forward launch, every main kernel without RECOMPUTE. Gradients as float64
    autograd's, with and without blocks (elu'(pre) from the kept y_0), every kept plane written (NaN-poisoned)."""
    from fastnca.kernels import rollout

    b = 3
    weights = make_weights(16, 32, n_blocks, gain=0.4)
    state = make_state(b, 16, 2, 2)
    masks = _masks(b)
    upstream = torch.randn(b, 16, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE)
    ref, g64 = _ref_grads(state, weights, masks, upstream, torch.float64)
    launches = []
    real_fwd, real_bwd = rollout._launch_fwd, rollout._launch_bwd_step
    monkeypatch.setattr(rollout, "_launch_fwd", lambda *a, **k: launches.append(("fwd", a[-1])) or real_fwd(*a, **k))
    monkeypatch.setattr(rollout, "_launch_bwd_step",
                        lambda *a, **k: launches.append(("bwd", a[-1])) or real_bwd(*a, **k))
    out, gtri = _fused_grads(state, weights, masks, upstream, "none", small_grid)
    assert rel_err(ref, out) < 1e-5
    for i, (a, t) in enumerate(zip(g64, gtri)):
        assert rel_err(a, t) < 1e-4, f"grad {i}: expected relative error < 1e-4, got {rel_err(a, t):.3g}"
    n_fwd = 0 if small_grid else len(FLAGS)  # 2x2 .. 8x8: every step fits the small-grid kernel
    assert [k for k, _ in launches] == ["fwd"] * n_fwd + ["bwd"] * len(FLAGS), \
        f"expected {n_fwd} forward launches, then one backward per step and no recompute, got {launches}"
    assert all(acts is not None for _, acts in launches), "expected every launch to keep / read the activations"


def test_without_gradients_no_activations_are_kept(monkeypatch):
    """Under no_grad (IWAE, sampling) 'none' keeps no activations: they would only cost memory (at k = 128
    importance samples, 128x a training batch's)."""
    from fastnca.kernels import rollout

    weights = make_weights(16, 16, 1, gain=0.4)
    state = make_state(2, 16, 2, 2)
    plan = plan_rollout(FLAGS, "none", doubling=True)
    seen = []
    real = rollout._layout
    monkeypatch.setattr(rollout, "_layout", lambda p, *a: seen.append(p.keeps_activations) or real(p, *a))
    with torch.no_grad():
        out = nca_rollout(state, weights, plan, small_grid=False)
    assert seen == [False], f"expected a forward that keeps no activations under no_grad, got {seen}"
    leaves = _leaves(weights)
    ref = nca_rollout(state, UpdateWeights.from_flat(leaves), plan, small_grid=False)
    assert seen == [False, True], "expected the activations kept when the weights require gradients"
    assert torch.equal(out, ref.detach()), "expected the same output with and without kept activations"


@pytest.mark.parametrize("policy", ["step", "none"])
def test_rollout_traces_whole_under_torch_compile_fullgraph(policy):
    """Under torch.compile the rollout is the custom op fastnca::nca_rollout (and its backward op): fullgraph=True
    compiles, and output and gradients equal the eager autograd Function's (also with the activations kept: the op
    returns them in its flat buffer, laid out as the fake op says)."""
    b = 2
    weights = make_weights(16, 16, 1, gain=0.4)
    state = make_state(b, 16, 2, 2)
    masks = _masks(b)
    plan = plan_rollout(FLAGS, policy, doubling=True)
    upstream = torch.randn(b, 16, 8, 8, generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def run(s, *flat):
        return nca_rollout(s, UpdateWeights.from_flat(flat), plan, masks)

    results = []
    for fn in (run, torch.compile(run, backend="aot_eager", fullgraph=True)):
        leaves = _leaves(weights)
        s = state.detach().clone().requires_grad_(True)
        out = fn(s, *leaves)
        (out * upstream).sum().backward()
        results.append([out.detach(), s.grad] + [t.grad for t in leaves if t is not None])
    for i, (e, c) in enumerate(zip(*results)):
        assert torch.allclose(e, c, rtol=1e-5, atol=1e-6), f"output/grad {i}: expected compiled == eager"


def test_post_kernel_state_gradient_split_over_channel_programs_is_the_same(monkeypatch, nan_poison):
    """The post kernel's state-gradient programs may each take part of the state channels (``ds_block_n``, shipped
    for bf16 / tf32 on the GPU so that the kernel fits two programs per SM); the interpreter's tiles take all of them.
    Split in two here, with and without doubling: every channel written (NaN-poisoned), and the same gradients up
    to what fp32 rounding allows for sums in another order (the tile shapes' dots may sum differently): the chain
    bound of tests/kernels/fp32_bounds.py over the 7 steps forward and backward and the weight gradients' sums over
    every cell and step."""
    from fastnca.kernels import rollout, tiles

    b, c = 2, 32
    weights = make_weights(c, 32, 1, gain=0.4)
    state = make_state(b, c, 2, 2)
    masks = _masks(b)
    upstream = torch.randn(b, c, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE)
    whole = _fused_grads(state, weights, masks, upstream, "segments=3")[1]
    monkeypatch.setitem(tiles.OVERRIDES, "post", {"ds_block_n": c // 2})
    assert rollout.post_config(c, 32, torch.float32).ds_block_n == c // 2
    split = _fused_grads(state, weights, masks, upstream, "segments=3")[1]
    steps = len(FLAGS)
    depth = steps * (step_depth(c, 32, 1) + backward_step_depth(c, 32, 1)) + b * 8 * 8 + steps
    for i, (x, y) in enumerate(zip(whole, split)):
        assert torch.isfinite(y).all(), f"grad {i}: expected finite values (a channel chunk left unwritten?)"
        diff, bound = (x.double() - y.double()).abs().max().item(), chain_bound(x, depth)
        assert diff <= bound, f"grad {i}: expected the same gradients up to {bound:.3g} (D={depth}), got {diff:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
def test_kept_activations_match_the_recompute_at_the_mnist_doubling_shape_on_gpu(precision):
    """The preset's network (|z| = h = 256, 4 blocks) and schedule at B = 32 with the shipped GPU tiles, whose
    storing forward and reading main kernel differ from the recomputing ones (64-cell bf16 forward tiles, tf32's
    unpipelined output-conv loop): output and gradients under 'none' against 'step', with masks."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    ip = "tf32" if precision == "tf32" else "ieee"
    flags = [False] * 8 + ([True] + [False] * 7) * 4  # 2x2 -> 32x32
    weights = make_weights(256, 256, 4, gain=0.3)
    weights = UpdateWeights.from_flat([None if t is None else t.to(dtype) for t in weights.flat()])
    state = make_state(32, 256, 2, 2).to(dtype)
    masks = draw_masks(plan_rollout(flags, "none", doubling=True), 32, 2, 2, 0.5,
                       generator=torch.Generator(device=DEVICE).manual_seed(4), device=DEVICE)
    upstream = torch.randn(32, 256, 32, 32, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    results = {}
    for policy in ("none", "step"):
        leaves = _leaves(weights, dtype)
        s = state.detach().clone().requires_grad_(True)
        out = nca_rollout(s, UpdateWeights.from_flat(leaves), plan_rollout(flags, policy, doubling=True), masks,
                          input_precision=ip)
        (out.float() * upstream).sum().backward()
        results[policy] = [out.detach(), s.grad] + [t.grad for t in leaves if t is not None]
    tol = 1e-4 if precision == "ieee" else 3e-2
    for i, (kept, recomputed) in enumerate(zip(results["none"], results["step"])):
        assert torch.isfinite(kept).all(), f"output/grad {i}: expected finite values under 'none'"
        err = rel_err(recomputed.float(), kept.float())
        assert err < tol, f"output/grad {i}: expected 'none' within {tol} of 'step', got {err:.3g}"
