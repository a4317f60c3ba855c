"""The update network, one step, doubling, masks and the rollout schedules (reference backend)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastnca.kernels.reference import double_ref, make_update_mask, nca_step_ref
from fastnca.kernels.schedule import parse_checkpoint
from fastnca.nca import NCA, UpdateNet


def _randomise(module: nn.Module, std: float = 0.1) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)


def test_update_net_registers_convs_in_the_documented_order():
    net = UpdateNet(16, 24, 3)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    shapes = [tuple(c.weight.shape) for c in convs]
    assert shapes == [(24, 16, 3, 3)] + [(24, 24, 1, 1)] * 6 + [(16, 24, 1, 1)]
    assert convs[-1] is net.out and torch.count_nonzero(net.out.weight) == 0 and torch.count_nonzero(net.out.bias) == 0


def test_block_free_net_is_conv3x3_elu_conv1x1_without_output_bias():
    net = UpdateNet(8, 8, 0)
    assert net.out.bias is None and net.perceive.bias is not None
    _randomise(net)
    x = torch.randn(2, 8, 5, 5)
    ref = F.conv2d(F.elu(F.conv2d(x, net.perceive.weight, net.perceive.bias, padding=1)), net.out.weight)
    assert torch.allclose(net(x), ref, atol=1e-6)


def test_bias_off_removes_every_bias():
    net = UpdateNet(8, 8, 2, bias=False)
    assert all(m.bias is None for m in net.modules() if isinstance(m, nn.Conv2d))


def test_reference_step_matches_the_module():
    nca = NCA(8, 16, 2, backend="torch")
    _randomise(nca)
    x = torch.randn(2, 8, 6, 7)
    assert torch.allclose(nca.step(x), x + nca.update_net(x), atol=1e-6)


def test_doubling_equals_nearest_neighbour_upsampling():
    x = torch.randn(2, 5, 3, 4)
    up = F.interpolate(x, scale_factor=2, mode="nearest")
    assert torch.equal(double_ref(x), up)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(double_ref(cl), up) and double_ref(cl).is_contiguous(memory_format=torch.channels_last)
    nca = NCA(5, 8, 1, backend="torch")  # zero output conv: the step after doubling is the doubling alone
    assert torch.equal(nca.step(x, double=True), up)


def test_zero_initialised_output_makes_the_first_step_the_identity():
    nca = NCA(8, 16, 4, backend="torch")
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(nca.step(x), x)
    _randomise(nca.update_net.out)
    assert not torch.allclose(nca.step(x), x), "expected random output weights to change the state"


def test_masked_out_cells_stay_unchanged():
    nca = NCA(8, 16, 1, backend="torch")
    _randomise(nca)
    x = torch.randn(3, 8, 6, 6)
    mask = make_update_mask(3, 6, 6, 0.5, generator=torch.Generator().manual_seed(0))
    out = nca.step(x, mask=mask)
    keep = ~mask.expand_as(x)
    assert torch.equal(out[keep], x[keep])
    assert (out[~keep] != x[~keep]).float().mean() > 0.99
    full = nca.step(x)
    assert torch.allclose(out[~keep], full[~keep])


def test_update_mask_is_seeded_and_has_the_requested_rate():
    m1 = make_update_mask(4, 32, 32, 0.3, generator=torch.Generator().manual_seed(5))
    m2 = make_update_mask(4, 32, 32, 0.3, generator=torch.Generator().manual_seed(5))
    assert m1.shape == (4, 1, 32, 32) and m1.dtype == torch.bool and torch.equal(m1, m2)
    assert abs(m1.float().mean().item() - 0.3) < 0.03
    assert make_update_mask(4, 8, 8, 1.0) is None
    with pytest.raises(ValueError, match="p_update"):
        make_update_mask(1, 2, 2, 0.0)


def test_doubling_rollout_shapes_and_step_count():
    nca = NCA(8, 8, 1, seed_size=2, n_doublings=3, steps_per_stage=4, backend="torch")
    _randomise(nca)
    final, states = nca(torch.randn(2, 8), return_states=True)
    assert final.shape == (2, 8, 16, 16) and final.is_contiguous(memory_format=torch.channels_last)
    assert len(states) == 1 + 4 * (3 + 1), "expected the seed plus M (K + 1) states"
    sizes = [s.shape[-1] for s in states]
    assert sizes == [2] * 5 + [4] * 4 + [8] * 4 + [16] * 4
    assert nca.schedule() == [False] * 4 + ([True] + [False] * 3) * 3
    assert torch.equal(states[-1], final)



@pytest.mark.parametrize("doubling", [True, False], ids=["doubling", "nondoubling"])
def test_iter_run_yields_runs_states_one_step_at_a_time(doubling):
    # the same step function on the same masks in the same order: bitwise equal to run(return_states=True)
    nca = NCA(8, 8, 1, doubling=doubling, seed_size=2, n_doublings=2, steps_per_stage=3, grid_size=6,
              p_update=0.5, backend="torch")
    _randomise(nca)
    z = torch.randn(2, 8)
    schedule = nca.schedule(None if doubling else 7)
    with torch.no_grad():
        final, states = nca.run(nca.seed(z), schedule, generator=torch.Generator().manual_seed(3), return_states=True)
        calls = []
        step_fn = nca.step_fn
        nca.step_fn = lambda: (lambda *a: calls.append(1) or step_fn()(*a))
        it = nca.iter_run(nca.seed(z), schedule, generator=torch.Generator().manual_seed(3))
        first = next(it)
        assert len(calls) == 1, f"expected the first state after one step, got it after {len(calls)} steps"
        yielded = [first, *it]
    assert len(yielded) == len(schedule) == len(states) - 1
    for t, (got, want) in enumerate(zip(yielded, states[1:]), 1):
        assert torch.equal(got, want), f"step {t}: expected run's state, got a different one"
    assert torch.equal(yielded[-1], final)

def test_seed_fills_every_cell_with_z():
    nca = NCA(4, 4, 0, doubling=False, grid_size=5, backend="torch")
    z = torch.randn(3, 4)
    s = nca.seed(z)
    assert s.shape == (3, 4, 5, 5) and torch.equal(s[:, :, 2, 3], z)


def test_nondoubling_rollout_draws_T_per_batch_in_range():
    nca = NCA(4, 8, 0, doubling=False, grid_size=7, min_steps=3, max_steps=6, backend="torch")
    seen = set()
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        final, states = nca(torch.randn(2, 4), generator=gen, return_states=True)
        assert final.shape == (2, 4, 7, 7)
        seen.add(len(states) - 1)
    assert seen == {3, 4, 5, 6}, f"expected T in 3..6, drew {sorted(seen)}"
    _, states = nca(torch.randn(1, 4), num_steps=9, return_states=True)
    assert len(states) == 10


@pytest.mark.parametrize("policy", ["step", "segments=3", "auto"])
def test_checkpoint_policies_give_the_same_gradients_as_keeping_everything(policy):
    nca = NCA(6, 8, 1, doubling=False, grid_size=5, p_update=0.5, backend="torch")
    _randomise(nca)
    z = torch.randn(2, 6)

    def grads(p):
        nca.zero_grad()
        out = nca(z, num_steps=7, generator=torch.Generator().manual_seed(3), checkpoint=p)
        (out**2).mean().backward()
        return [q.grad.clone() for q in nca.parameters()]

    for a, b in zip(grads("none"), grads(policy)):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_parse_checkpoint():
    assert parse_checkpoint("none", 100, False) == 0
    assert parse_checkpoint("step", 100, True) == 1
    assert parse_checkpoint("segments=8", 100, False) == 8
    assert parse_checkpoint("auto", 100, False) == 10
    assert parse_checkpoint("auto", 40, True) == 0, "doubling: keep the activations on both backends"
    assert parse_checkpoint("auto", 40, True) == 0
    with pytest.raises(ValueError, match="checkpoint"):
        parse_checkpoint("segments=0", 10, False)


def test_step_bad_input_names_the_argument():
    nca = NCA(8, 8, 1, backend="torch")
    w = nca.update_net.weights()
    with pytest.raises(ValueError, match="state: expected rank 4"):
        nca_step_ref(torch.zeros(8, 4, 4), w)
    with pytest.raises(ValueError, match="state: expected 8 channels"):
        nca_step_ref(torch.zeros(1, 7, 4, 4), w)
    with pytest.raises(TypeError, match="state: expected a floating-point"):
        nca_step_ref(torch.zeros(1, 8, 4, 4, dtype=torch.int32), w)
    with pytest.raises(ValueError, match="mask: expected shape"):
        nca_step_ref(torch.zeros(1, 8, 4, 4), w, mask=torch.ones(1, 1, 4, 5))
    with pytest.raises(ValueError, match="mask: expected shape"):  # doubling: the mask lives on the doubled grid
        nca_step_ref(torch.zeros(1, 8, 4, 4), w, mask=torch.ones(1, 1, 4, 4), double=True)
    with pytest.raises(ValueError, match="z: expected shape"):
        nca.seed(torch.zeros(2, 9))
    with pytest.raises(ValueError, match="backend"):
        NCA(8, 8, 1, backend="cuda")
    with pytest.raises(ValueError, match="hidden_channels"):
        UpdateNet(8, 0, 1)


def test_negative_step_counts_and_seed_sizes_are_refused():
    nca = NCA(8, 8, 1, doubling=False, grid_size=4)
    z = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"schedule: expected a number of steps >= 0.*-1"):
        nca.run(nca.seed(z), -1)
    with pytest.raises(ValueError, match=r"size: expected an integer >= 1.*-1"):
        nca.seed(z, -1)
    with pytest.raises(ValueError, match=r"num_steps: expected an integer >= 0.*-3"):
        nca(z, num_steps=-3)


def test_per_row_step_counts_grow_each_row_as_its_own_rollout():
    """Rows sorted by T grow together and stop at their own T: each row as if it ran alone (fp32 reordering
    only: the batch size of a convolution may change its summation order)."""
    nca = NCA(8, 8, 1, doubling=False, grid_size=4)
    nn.init.normal_(nca.update_net.out.weight, std=0.2)
    z = torch.randn(5, 8)
    steps = torch.tensor([3, 0, 4, 1, 3])
    out = nca(z, num_steps=steps)
    for i, t in enumerate(steps.tolist()):
        alone = nca(z[i : i + 1], num_steps=t)
        torch.testing.assert_close(out[i : i + 1], alone, rtol=1e-5, atol=1e-6, msg=f"row {i} with T={t}")
    with pytest.raises(ValueError, match="per-row step counts are for non-doubling models"):
        NCA(8, 8, 1).run_per_row(z, steps)
