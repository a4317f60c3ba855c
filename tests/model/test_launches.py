"""The launch budget of one training iteration on the fused backend, counted on the CPU (tools/launches.py).

The count does not depend on channel widths, batch or grid size (one launch per op however large), so the presets
run shrunk: the schedules (40 doubling steps; T non-doubling steps under the sqrt(T) checkpoint policy), the
encoder, the likelihood, clipping and Adam are the presets' own. The budget tests skip the kernels' bodies
(``execute=False``); a small run checks that this changes no count.
"""

from collections import Counter

import pytest
import torch

from fastnca.config import get_preset
from fastnca.nca import nca_from_config
from tools.launches import count_training_launches, interpreter_launches

pytest.importorskip("triton")

SMALL = dict(state_channels=16, hidden_channels=16, enc_channels=4, batch_size=2)


def test_mnist_doubling_iteration_stays_within_300_launches():
    res = count_training_launches("mnist-doubling", overrides=SMALL, execute=False)  # the preset's grids: 2x2 .. 32x32
    assert res["steps"] == 40, f"expected the preset's 40 steps, got {res['steps']}"
    # forward: the 24 steps on 2x2 .. 8x8 in one small-grid launch, the 16 steps on 16x16 and 32x32 one launch each;
    # backward: two launches per step (main + state/weight-gradient post kernel)
    assert res["triton"] == (1 + 16) + 2 * 40, f"expected 97 Triton launches, got {res['triton']}: {res['by_op']}"
    assert res["total"] <= 300, f"expected <= 300 launches per iteration, got {res['total']}: {res['by_op']}"


@pytest.mark.parametrize("wgrad", ["batched", "batched-cublas"])
def test_mnist_doubling_iteration_with_batched_weight_gradients_stays_within_300_launches(wgrad):
    """The batched designs (kernels/wgrad.py): per step the main kernel and the state-gradient launch, then the whole
    rollout's weight gradients in one launch (the 40 steps are one batch); cuBLAS adds the gathers, GEMMs and bias
    sums of the 1x1 weights (torch ops)."""
    res = count_training_launches("mnist-doubling", overrides=dict(SMALL, wgrad=wgrad), execute=False)
    assert res["by_op"]["triton::_wgrad_batched_kernel"] == 1, res["by_op"]
    assert res["triton"] == (1 + 16) + 2 * 40 + 1, f"expected 98 Triton launches, got {res['triton']}: {res['by_op']}"
    assert res["total"] <= 300, f"expected <= 300 launches per iteration, got {res['total']}: {res['by_op']}"


def _celeba(t: int, **over) -> dict:
    return count_training_launches("celeba-nondoubling-256", overrides=dict(
        SMALL, image_size=8, grid_size=8, min_steps=t, max_steps=t, pool_size=4, damage_size=3, **over),
        execute=False)


@pytest.mark.parametrize("wgrad", ["per-step", "batched"])
def test_celeba_nondoubling_256_adds_at_most_4_launches_per_step(wgrad):
    short, long = _celeba(16, wgrad=wgrad), _celeba(32, wgrad=wgrad)
    assert (short["steps"], long["steps"]) == (16, 32)
    per_step = (long["total"] - short["total"]) / 16
    assert per_step <= 4, f"expected <= 4 launches per added step, got {per_step}: {short['by_op']} {long['by_op']}"
    assert long["aten"] - short["aten"] <= 2, "expected no host op per step (masks are drawn per grid, not per step)"


def test_celeba_nondoubling_256_iteration_stays_within_4_launches_per_step_plus_150():
    t = 64
    res = _celeba(t)
    assert res["steps"] == t
    assert res["total"] <= 4 * t + 150, f"expected <= {4 * t + 150} launches, got {res['total']}: {res['by_op']}"


def test_skipping_the_kernel_bodies_changes_no_count():
    kw = dict(overrides=dict(SMALL, seed_size=1, image_size=8, n_doublings=3, steps_per_stage=1))
    ran, skipped = count_training_launches("small", **kw), count_training_launches("small", execute=False, **kw)
    assert ran["steps"] == 4
    assert ran["by_op"] == skipped["by_op"], f"expected equal counts, got {ran['by_op']} vs {skipped['by_op']}"


def test_mnist_doubling_forward_rollout_takes_at_most_18_triton_launches():
    """The 24 steps on 2x2, 4x4 and 8x8 grids in one small-grid launch, the 16 on 16x16 and 32x32 one each."""
    cfg = get_preset("mnist-doubling", backend="triton", device="cpu", state_channels=16, hidden_channels=16)
    nca = nca_from_config(cfg)
    schedule = nca.schedule()
    assert len(schedule) == 40
    counts: Counter = Counter()
    with interpreter_launches(counts, execute=False), torch.no_grad():
        nca.run(nca.seed(torch.zeros(2, 16)), schedule)
    assert sum(counts.values()) <= 18, f"expected <= 18 Triton launches, got {dict(counts)}"
    assert counts == {"triton::_rollout_fwd_small_kernel": 1, "triton::_nca_step_fwd_kernel": 16}, dict(counts)
