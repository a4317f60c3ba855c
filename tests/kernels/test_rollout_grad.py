"""Gradients of whole rollouts on the fused path under every checkpoint policy, against float64 autograd of the
reference, and their determinism. Runs through the interpreter on the CPU."""

from __future__ import annotations

import pytest
import torch

from fastnca.kernels.reference import UpdateWeights, nca_step_ref
from fastnca.kernels.schedule import draw_masks, plan_rollout
from fastnca.nca import NCA
from tests.conftest import DEVICE
from tests.kernels.test_nca_step_fwd import make_weights
from tests.utils import assert_close

POLICIES = ["none", "step", "segments=5", "auto"]


def _nca(c: int, h: int, n_blocks: int, *, bias: bool, doubling: bool, p_update: float) -> NCA:
    nca = NCA(c, h, n_blocks, bias=bias, doubling=doubling, seed_size=2, n_doublings=2, steps_per_stage=6,
              grid_size=7, p_update=p_update, backend="triton").to(DEVICE)
    weights = make_weights(c, h, n_blocks, bias=bias, out_bias=nca.update_net.out.bias is not None, gain=0.4)
    with torch.no_grad():
        for p, w in zip(nca.parameters(), [t for t in weights.flat() if t is not None]):
            p.copy_(w)
    return nca


def _reference_rollout(nca: NCA, state: torch.Tensor, schedule: list[bool], seed: int):
    """The same rollout in float64 with the reference step, drawing the same masks in the same order."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    leaves = [None if p is None else p.detach().double().requires_grad_(True)
              for p in nca.update_net.weights().flat()]
    weights = UpdateWeights.from_flat(leaves)
    s = state.detach().double().requires_grad_(True)
    x = s
    b, _, h, w = s.shape
    masks = draw_masks(plan_rollout(schedule, "none", doubling=nca.doubling), b, h, w,
                       nca.p_update, generator=gen, device=DEVICE)
    for double, mask in zip(schedule, masks):
        x = nca_step_ref(x, weights, mask, double)
    return x, s, leaves


def _fused_rollout(nca: NCA, state: torch.Tensor, schedule: list[bool], seed: int, policy: str):
    nca.zero_grad(set_to_none=True)
    s = state.detach().clone().requires_grad_(True)
    out = nca.run(s, schedule, generator=torch.Generator(device=DEVICE).manual_seed(seed), checkpoint=policy)
    return out, s


# (B, C, h, blocks, bias, doubling, p_update, steps): 18 steps (segments=5 leaves a short last segment, auto cuts
# 4-step segments), odd grid or 2x2 -> 8x8 doubling
CASES = [
    (1, 16, 16, 2, True, False, 0.5, 18),
    (2, 16, 32, 0, False, True, 1.0, None),
]


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("case", CASES, ids=["B1-7x7-nb2-bias-mask-T18", "B2-2to8-nb0-nobias-doubling-T18"])
def test_rollout_gradients_match_float64_reference_under_every_policy(case, policy):
    b, c, h, nb, bias, doubling, p_update, steps = case
    nca = _nca(c, h, nb, bias=bias, doubling=doubling, p_update=p_update)
    schedule = nca.schedule(steps)
    assert len(schedule) == 18
    seed_size = 2 if doubling else 7
    state = torch.randn(b, c, seed_size, seed_size, device=DEVICE)
    out, s = _fused_rollout(nca, state, schedule, 11, policy)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    (out * upstream).sum().backward()
    ref, s_ref, leaves = _reference_rollout(nca, state, schedule, 11)
    (ref * upstream.double()).sum().backward()
    assert_close("final state", ref, out, rtol=1e-5)
    assert_close("grad state", s_ref.grad, s.grad, rtol=1e-4)
    params = [p for p in nca.update_net.weights().flat() if p is not None]
    for i, (p, leaf) in enumerate(zip(params, [t for t in leaves if t is not None])):
        assert_close(f"grad weight {i}", leaf.grad, p.grad, rtol=1e-4)


@pytest.mark.parametrize("policy", ["segments=2", "none"])
def test_rollout_gradients_are_bitwise_identical_across_runs(policy):
    nca = _nca(16, 16, 1, bias=True, doubling=False, p_update=0.5)
    state = torch.randn(2, 16, 7, 7, device=DEVICE)
    schedule = nca.schedule(6)
    grads = []
    for _ in range(2):
        out, s = _fused_rollout(nca, state, schedule, 5, policy)
        out.square().sum().backward()
        grads.append([s.grad.clone()] + [p.grad.clone() for p in nca.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b), "expected bitwise-identical gradients from two identical runs"
