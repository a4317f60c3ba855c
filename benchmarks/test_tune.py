"""benchmarks/tune.py on the CPU: a variant's patch reaches the launch configuration and is undone, and the combined
row takes each group's best ok variant that beats the shipped configuration (the GPU timing itself is the tool's
job, not a test's)."""

import dataclasses

import torch

from benchmarks.tune import VARIANTS, _combined, _patched
from fastnca.kernels import rollout
from fastnca.nca import UpdateNet


def _plan() -> rollout.StepPlan:
    return rollout.StepPlan(UpdateNet(16, 32, 1).weights(), torch.float32, "ieee")


def test_a_variant_patches_the_configs_and_restores_them():
    from fastnca.kernels import tiles, wgrad

    sp = _plan()
    post, main, split = sp.post_config, sp.main_config(False), tiles.split_cells()
    with _patched({"post.wg_warps": 2, "main.stages": 5, "main.block_k": 64, "min_cells_per_split": 7}):
        assert sp.post_config == dataclasses.replace(post, wg_warps=2), "expected the post kernel's warps patched"
        assert sp.main_config(True).stages == sp.main_config(False).stages == 5, \
            "expected the main kernel's stages patched, recomputing or on kept activations"
        assert sp.main_config(True).block_k == 32, "expected a hidden chunk cut to the padded h = 32 it must divide"
        assert tiles.split_cells() == split._replace(post=7)
    assert (sp.post_config, sp.main_config(False), tiles.split_cells()) == (post, main, split), \
        "expected the shipped configuration back after the variant"
    shipped = wgrad.wgrad_config(torch.bfloat16)
    with _patched({"wgrad.warps": 4, "wgrad_min_cells": 9}):
        assert wgrad.wgrad_config(torch.bfloat16) == dataclasses.replace(shipped, warps=4)
        assert tiles.split_cells().batched == 9
    assert (wgrad.wgrad_config(torch.bfloat16), tiles.split_cells()) == (shipped, split)
    assert tiles.OVERRIDES == {}, f"expected no override left, got {tiles.OVERRIDES}"


def test_combined_takes_each_groups_best_ok_variant_that_beats_the_shipped_one():
    rows = [
        {"group": "post", "changes": {"a": 1}, "status": "ok", "median_ms": 9.0},
        {"group": "post", "changes": {"a": 2}, "status": "ok", "median_ms": 8.0},
        {"group": "post", "changes": {"a": 3}, "status": "MISMATCH vs shipped", "median_ms": 1.0},
        {"group": "main", "changes": {"b": 1}, "status": "ok", "median_ms": 11.0},
        {"group": "small", "changes": {"c": 1}, "status": "failed: OutOfResources"},
    ]
    assert _combined(rows, base_ms=10.0) == {"a": 2}


def test_every_variant_names_known_changes():
    from fastnca.kernels.schedule import WGRADS
    from fastnca.kernels.wgrad import WgradConfig

    fields = {f.name for f in dataclasses.fields(rollout.BwdConfig)}
    wg_fields = {f.name for f in dataclasses.fields(WgradConfig)}
    for group, name, changes in VARIANTS:
        assert changes.get("wgrad", "per-step") in WGRADS, f"{group} / {name}: unknown design"
        for key in changes:
            kind, _, field = key.partition(".")
            ok = (kind in ("post", "main") and field in fields) or (kind == "wgrad" and field in wg_fields) or key in (
                "min_cells_per_split", "small_grid", "checkpoint", "wgrad", "wgrad_min_cells")
            assert ok, f"{group} / {name}: unknown change {key!r}"
