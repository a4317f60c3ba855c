"""The FLOP model against the numbers docs/PAPER.md and docs/KERNELS.md give, and RESULTS.md against the model."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.flops import (
    LONG_K,
    encoder_flops,
    floor_table,
    iwae_cost,
    rollout_cost,
    schedule_grids,
    step_cost,
    step_flops_per_cell,
    train_cost,
    update_params,
    wgrad_gemm_k,
    wgrad_k_table,
    wgrad_ks,
)
from fastnca.config import get_preset


def test_step_flops_per_cell_matches_paper() -> None:
    # 18 matrix products of 256x256 per cell: 2.36 MFLOP (docs/PAPER.md, docs/KERNELS.md)
    assert step_flops_per_cell(256, 256, 4) == 2 * 18 * 256 * 256 == 2_359_296
    assert step_flops_per_cell(128, 128, 0) == 2 * (9 * 128 * 128 + 128 * 128)


def test_update_params_matches_original_model() -> None:
    assert update_params(256, 256, 4) == 1_182_208  # MNIST doubling NCA (docs/PAPER.md)


@pytest.mark.parametrize(("preset", "gflop"), [("mnist-doubling", 26), ("celeba-doubling", 103)])
def test_rollout_flops_per_image(preset: str, gflop: float) -> None:
    cost = rollout_cost(get_preset(preset), 1)
    assert cost.flops_fwd / 1e9 == pytest.approx(gflop, rel=0.02)
    assert cost.steps == 40 if preset.startswith("mnist") else 48


def test_schedule_and_costs_are_consistent() -> None:
    assert schedule_grids(doubling=True, seed_size=2, n_doublings=1, steps_per_stage=2) == [2, 2, 4, 4]
    assert schedule_grids(doubling=False, grid_size=5, num_steps=3) == [5, 5, 5]
    with pytest.raises(ValueError, match="num_steps"):
        schedule_grids(doubling=False, grid_size=5)
    fwd = step_cost(2, 8, 16, 16, 1)
    bwd = step_cost(2, 8, 16, 16, 1, backward=True, recompute=True)
    assert fwd.cells == 128 and fwd.flops_model == fwd.flops_fwd == fwd.flops_executed
    assert bwd.flops_model == 3 * fwd.flops_fwd and bwd.flops_executed == 4 * fwd.flops_fwd
    assert bwd.bytes_floor > fwd.bytes_floor
    # one read + one write of a bf16 state is 1 KiB per cell at |z| = 256, plus the weights once
    one = step_cost(1, 1, 256, 256, 4, itemsize=2)
    assert one.bytes_floor == 2 * 256 * 2 + update_params(256, 256, 4) * 2
    cfg = get_preset("mnist-doubling")
    tr = train_cost(cfg, 4)
    assert tr.flops_model == 3 * rollout_cost(cfg, 4).flops_fwd + 3 * 4 * encoder_flops(1, 32)
    assert iwae_cost(cfg, 2, 3).cells == rollout_cost(cfg, 6).cells
    assert encoder_flops(1, 32) < 0.01 * rollout_cost(cfg, 1).flops_fwd
    assert step_cost(1, 1, 1, 1, 0).floor_s(1e12, 1e12) > 0


def test_results_md_floor_table_is_the_models() -> None:
    """benchmarks/RESULTS.md quotes floor_table() verbatim: regenerate it when the model changes."""
    text = (Path(__file__).parent / "RESULTS.md").read_text()
    assert floor_table() in text, "RESULTS.md's floor table is stale: paste `python -m benchmarks.flops` output"


def test_batched_design_puts_every_mnist_weight_gradient_flop_in_a_long_k_gemm() -> None:
    """Issue 30's goal, counted: mnist-doubling (B = 32, bf16, 'auto' = 'none') runs its weight gradients per step
    with K = 128 ... 32,768 cells (none at K >= 64k) and, batched, as one GEMM per weight over all 349,184 cells;
    both designs do the same FLOPs (one forward's per cell: 0.82 TFLOP)."""
    cfg = get_preset("mnist-doubling")
    per_step = wgrad_gemm_k(cfg, 32, wgrad="per-step")
    batched = wgrad_gemm_k(cfg, 32, wgrad="batched")
    assert sorted(per_step) == [128, 512, 2048, 8192, 32768]
    assert list(batched) == [349_184] and max(per_step) < LONG_K <= min(batched)
    assert sum(per_step.values()) == sum(batched.values()) == rollout_cost(cfg, 32).flops_fwd
    assert sum(batched.values()) / 1e12 == pytest.approx(0.82, abs=0.01)
    # celeba-nondoubling-256 (T = 128): one step a batch (123,008 cells each) under the 2 GiB cap, K >= 64k already
    celeba = wgrad_ks(get_preset("celeba-nondoubling-256"), 32, 128, wgrad="batched")
    assert celeba == [32 * 62 * 62] * 128


def test_results_md_quotes_the_weight_gradient_k_table() -> None:
    text = (Path(__file__).parent / "RESULTS.md").read_text()
    assert wgrad_k_table() in text, "RESULTS.md's GEMM K table is stale: paste `python -m benchmarks.flops --wgrad-k`"
