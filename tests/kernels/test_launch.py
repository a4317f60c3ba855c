"""Smaller tiles where a GPU has less shared memory than the H100 (kernels/launch.py): the candidate lists, the
fallback and its memory, and every launch site wired to it (interpreter: a stand-in kernel raises Triton's
``OutOfResources`` for the tiles a small-memory GPU could not run, as Triton does before launching)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from triton.runtime import OutOfResources

from fastnca.kernels import launch as launch_mod
from fastnca.kernels import nca_step as fwd_mod
from fastnca.kernels import nca_step_bwd as bwd_mod
from fastnca.kernels import rollout as ro
from fastnca.kernels import small_grid as sg
from fastnca.kernels import tiles
from fastnca.kernels.launch import launch_fitting, smaller_tiles
from fastnca.kernels.nca_step import StepConfig, fwd_candidates, nca_step
from fastnca.kernels.nca_step_bwd import BwdConfig, main_candidates
from fastnca.kernels.reference import UpdateWeights
from fastnca.kernels.rollout import nca_rollout
from fastnca.kernels.schedule import draw_masks, plan_rollout
from tests.conftest import DEVICE
from tests.kernels.fp32_bounds import gamma, step_depth, step_magnitude
from tests.kernels.test_nca_step_fwd import make_state, make_weights

pytestmark = pytest.mark.usefixtures("nan_poison")


@pytest.fixture(autouse=True)
def _fresh_memory(monkeypatch):
    """Each test starts with no remembered fallback (``launch._FITTING``)."""
    monkeypatch.setattr(launch_mod, "_FITTING", {})


def test_smaller_tiles_lower_the_stages_then_halve_each_chunk_in_turn():
    got = fwd_candidates(StepConfig(128, 16, 64, 8, 3))
    assert got == [StepConfig(128, 16, 64, 8, 3), StepConfig(128, 16, 64, 8, 2), StepConfig(128, 16, 64, 8, 1),
                   StepConfig(128, 16, 32, 8, 1), StepConfig(128, 16, 16, 8, 1), StepConfig(64, 16, 16, 8, 1),
                   StepConfig(32, 16, 16, 8, 1), StepConfig(16, 16, 16, 8, 1)], got
    small = fwd_candidates(StepConfig(64, 32, 64, 8, 2), keep_cells=True)
    assert [c.block_m for c in small] == [64] * 4, f"the small-grid kernel's programs own whole samples: {small}"


def test_main_candidates_cap_the_per_loop_stages_with_the_kernel_stages():
    cfg = BwdConfig(64, 32, 32, 8, 3, 64, 64, 8, 2, 64, 128, 8, 2, blk_stages=3, out_stages=2)
    got = [(c.stages, c.blk_stages, c.out_stages, c.block_c, c.block_m) for c in main_candidates(cfg)]
    assert got == [(3, 3, 2, 32, 64), (2, 2, 2, 32, 64), (1, 1, 1, 32, 64), (1, 1, 1, 16, 64), (1, 1, 1, 16, 32),
                   (1, 1, 1, 16, 16)], got
    assert smaller_tiles(dataclasses.replace(cfg, blk_stages=None), "stages")[-1].blk_stages is None


def test_launch_fitting_runs_the_first_tiling_that_fits_and_starts_there_next_time():
    tried = []

    def launch(cfg: StepConfig) -> None:
        tried.append(cfg)
        if cfg.num_stages > 1:  # as Triton: raised before anything is launched
            raise OutOfResources(147456, 101376, "shared memory")

    cfg = StepConfig(128, 16, 64, 8, 3)
    assert launch_fitting(("site",), cfg, fwd_candidates, launch) == StepConfig(128, 16, 64, 8, 1)
    assert len(tried) == 3, f"expected the 3- and 2-stage tiles refused, then the 1-stage one run; tried {tried}"
    tried.clear()
    assert launch_fitting(("site",), cfg, fwd_candidates, launch) == StepConfig(128, 16, 64, 8, 1)
    assert len(tried) == 1, f"expected the remembered tile to run first; tried {tried}"
    tried.clear()
    assert launch_fitting(("other site",), StepConfig(128, 16, 64, 8, 1), fwd_candidates, launch).num_stages == 1
    assert len(tried) == 1, f"expected a tile that fits to run at once; tried {tried}"


def test_launch_fitting_says_what_to_use_when_no_tiling_fits():
    def launch(cfg: StepConfig) -> None:
        raise OutOfResources(65536, 49152, "shared memory")

    with pytest.raises(RuntimeError, match="backend='torch'"):
        launch_fitting(("site",), StepConfig(32, 16, 32, 4, 2), fwd_candidates, launch)


class _SmallSharedMemory:
    """Stands in for a Triton kernel on a GPU with little shared memory: a launch whose tiles ``refuse`` (a
    predicate on the launch's keyword arguments) raises ``OutOfResources`` without running, the others run the
    real (interpreted) kernel."""

    def __init__(self, kernel, refuse) -> None:
        self.kernel, self.refuse = kernel, refuse
        self.refused = self.ran = 0

    def __getitem__(self, grid):
        def run(**kwargs):
            if self.refuse(kwargs):
                self.refused += 1
                raise OutOfResources(232448, 101376, "shared memory")
            self.ran += 1
            return self.kernel[grid](**kwargs)

        return run


def _two_stages(monkeypatch) -> None:
    """The interpreter's tiles with 2 pipeline stages everywhere (the interpreter ignores stages, so the results
    stay bitwise those of its 1-stage tiles): every launch site then has a smaller candidate to fall back to."""
    for kind in ("step", "small"):
        monkeypatch.setitem(tiles.OVERRIDES, kind, {"num_stages": 2})
    monkeypatch.setitem(tiles.OVERRIDES, "bwd", {"stages": 2, "ds_stages": 2, "wg_stages": 2})
    monkeypatch.setitem(tiles.OVERRIDES, "post", {"wg_stages": 2})


def _stand_ins(monkeypatch, sites, refuse) -> list[_SmallSharedMemory]:
    out = []
    for mod, name in sites:
        fake = _SmallSharedMemory(getattr(mod, name), refuse)
        monkeypatch.setattr(mod, name, fake)
        out.append(fake)
    return out


def _check_each_fell_back(fakes: list[_SmallSharedMemory], sites) -> None:
    for fake, (mod, name) in zip(fakes, sites):
        assert fake.refused and fake.ran, (
            f"{mod.__name__}.{name}: expected refused launches, then launches with smaller tiles; refused "
            f"{fake.refused}, ran {fake.ran}")


def _step_grads(weights: UpdateWeights, state, mask, upstream):
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in weights.flat()]
    s = state.detach().clone().requires_grad_(True)
    out = nca_step(s, UpdateWeights.from_flat(leaves), mask, True)
    (out * upstream).sum().backward()
    return [out.detach(), s.grad] + [t.grad for t in leaves if t is not None]


def test_step_forward_and_backward_fall_back_to_tiles_the_gpu_can_run(monkeypatch):
    weights = make_weights(32, 32, 1)
    state = make_state(2, 32, 4, 4)
    mask = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)) < 0.7).to(DEVICE)
    upstream = torch.randn(2, 32, 8, 8, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    want = _step_grads(weights, state, mask, upstream)

    _two_stages(monkeypatch)
    sites = [(fwd_mod, "_nca_step_fwd_kernel"), (bwd_mod, "_nca_step_bwd_kernel"),
             (bwd_mod, "_nca_step_bwd_dstate_kernel"), (bwd_mod, "_nca_step_bwd_wgrad_kernel")]
    fakes = _stand_ins(monkeypatch, sites, lambda kw: kw["num_stages"] > 1)
    got = _step_grads(weights, state, mask, upstream)
    _check_each_fell_back(fakes, sites)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"output / gradient {i}: the 1-stage fallback must compute the same bits"


def test_forward_falls_back_to_fewer_cells_per_program(monkeypatch):
    """The grid follows the candidate that runs: refusing more than 32 cells per program still covers every cell
    (an output cell left unwritten is NaN here). Another tile shape may sum in another order, so the two results
    agree to the bound fp32 rounding guarantees (tests/kernels/fp32_bounds.py), not bitwise."""
    weights = make_weights(32, 32, 1)
    state = make_state(2, 32, 8, 8)
    want = fwd_mod.nca_step_fwd(state, weights)
    sites = [(fwd_mod, "_nca_step_fwd_kernel")]
    (fake,) = _stand_ins(monkeypatch, sites, lambda kw: kw["BLOCK_M"] > 32)
    got = fwd_mod.nca_step_fwd(state, weights)
    _check_each_fell_back([fake], sites)
    assert torch.isfinite(got).all(), "expected every output cell written (a NaN is a cell left unwritten)"
    bound = 2 * gamma(step_depth(32, 32, 1)) * step_magnitude(state, weights)
    excess = ((got.double() - want.double()).abs() - bound).max().item()
    assert excess <= 0, f"fewer cells per program: expected |difference| <= 2 gamma(D) A, over by {excess:.3g}"


FLAGS = [False, True, True, True]  # 2x2 -> 16x16: three small-grid steps, then a per-step one


def _rollout_grads(weights, state, masks, upstream, policy):
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in weights.flat()]
    s = state.detach().clone().requires_grad_(True)
    out = nca_rollout(s, UpdateWeights.from_flat(leaves), plan_rollout(FLAGS, policy, doubling=True), masks)
    (out * upstream).sum().backward()
    return [out.detach(), s.grad] + [t.grad for t in leaves if t is not None]


def test_rollout_falls_back_to_tiles_the_gpu_can_run(monkeypatch):
    weights = make_weights(32, 32, 1, gain=0.4)
    state = make_state(2, 32, 2, 2)
    plan = plan_rollout(FLAGS, "none", doubling=True)
    masks = draw_masks(plan, 2, 2, 2, 0.7, generator=torch.Generator(device=DEVICE).manual_seed(1), device=DEVICE)
    upstream = torch.randn(2, 32, 16, 16, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    want = _rollout_grads(weights, state, masks, upstream, "none")

    _two_stages(monkeypatch)
    sites = [(ro, "fwd_kernel"), (sg, "_rollout_fwd_small_kernel"), (ro, "main_kernel"),
             (ro, "_rollout_bwd_post_kernel")]
    fakes = _stand_ins(monkeypatch, sites, lambda kw: kw["num_stages"] > 1)
    got = _rollout_grads(weights, state, masks, upstream, "none")
    _check_each_fell_back(fakes, sites)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"output / gradient {i}: the 1-stage fallback must compute the same bits"


def test_launching_functions_switch_to_their_inputs_device(monkeypatch):
    """Triton launches on the current CUDA device: the entry points make their first CUDA input's device current."""
    from unittest import mock

    from fastnca.kernels.launch import on_input_device

    entered = []

    class _Device:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "device", _Device)
    on_cuda1 = mock.MagicMock(spec=torch.Tensor, is_cuda=True, device=torch.device("cuda", 1))
    ran = on_input_device(lambda *args, **kwargs: entered.append("ran"))
    ran(torch.zeros(1), on_cuda1, weights=None)
    assert entered == [torch.device("cuda", 1), "ran", "exit"], entered
    entered.clear()
    ran(torch.zeros(1), mask=None)
    assert entered == ["ran"], f"CPU inputs (the interpreter) need no device switch: {entered}"
    from fastnca.kernels import likelihood as lk

    for fn in (fwd_mod.nca_step_fwd, bwd_mod.nca_step_bwd, ro._rollout_forward, ro._rollout_backward,
               lk.dml_log_prob_fwd, lk.dml_log_prob_bwd):
        assert getattr(fn, "__wrapped__", None) is not None, f"{fn.__name__}: expected @on_input_device"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_step_on_the_second_gpu_matches_the_first():
    weights = make_weights(32, 32, 1)
    state = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.cuda.device(0):
        want = fwd_mod.nca_step_fwd(state.cuda(0), UpdateWeights.from_flat(
            [None if t is None else t.cuda(0) for t in weights.flat()]))
        got = fwd_mod.nca_step_fwd(state.cuda(1), UpdateWeights.from_flat(
            [None if t is None else t.cuda(1) for t in weights.flat()]))
    assert got.device == torch.device("cuda", 1)
    assert torch.equal(got.cpu(), want.cpu()), "the step on cuda:1 (current device cuda:0) must match cuda:0's"
