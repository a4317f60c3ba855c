"""kernels/tiles.py: the pickers ask the interpreter switch at call time, ``as_compiled()`` gives the GPU's tiles
and constexprs (recorded, never run: the GPU's tiles are slow in the interpreter), and ``override`` changes one
picker's result for a block only."""

from __future__ import annotations

import pytest
import torch

from fastnca.kernels import tiles, warmup
from fastnca.kernels.likelihood import dml_log_prob_bwd, likelihood_kernel_specs
from fastnca.kernels.nca_step import fwd_kernel_spec, nca_step_fwd
from fastnca.kernels.nca_step_bwd import bwd_kernel_specs, nca_step_bwd
from fastnca.kernels.reference import UpdateWeights
from fastnca.kernels.rollout import nca_rollout, post_kernel_spec
from fastnca.kernels.schedule import plan_rollout
from fastnca.kernels.small_grid import small_fwd_kernel_spec
from tests.conftest import DEVICE
from tests.kernels.test_nca_step_fwd import make_state, make_weights

needs_interpreter = pytest.mark.skipif(not tiles.INTERPRET, reason="as_compiled changes nothing on a GPU")

DTYPES = [(torch.bfloat16, "ieee"), (torch.float32, "ieee"), (torch.float32, "tf32")]
SHAPES = [(16, 32, 1), (256, 256, 4), (128, 128, 0)]


def _pickers(c: int, h: int, nb: int, dtype: torch.dtype, prec: str):
    """Every picker at one shape, each as a function of its ``interpret`` argument."""
    return {
        "step": lambda i: tiles.step_config(c, h, dtype, input_precision=prec, num_cells=100, interpret=i),
        "step-store": lambda i: tiles.step_config(c, h, dtype, input_precision=prec, store_acts=True, interpret=i),
        "small": lambda i: tiles.small_config(c, h, dtype, input_precision=prec, num_cells=64, interpret=i),
        "bwd": lambda i: tiles.bwd_config(c, h, dtype, prec, n_blocks=nb, interpret=i),
        "bwd-stored": lambda i: tiles.bwd_config(c, h, dtype, prec, n_blocks=nb, recompute=False, interpret=i),
        "post": lambda i: tiles.post_config(c, h, dtype, prec, n_blocks=nb, interpret=i),
        "wgrad": lambda i: tiles.wgrad_config(dtype, prec, interpret=i),
        "dml": lambda i: tiles.dml_plan(interpret=i),
    }


@needs_interpreter
@pytest.mark.parametrize("c, h, nb", SHAPES)
@pytest.mark.parametrize("dtype, prec", DTYPES, ids=["bf16", "fp32", "tf32"])
def test_pickers_take_the_gpu_tiles_under_as_compiled_and_the_interpreters_outside(c, h, nb, dtype, prec):
    assert tiles.interpreting()
    for name, pick in _pickers(c, h, nb, dtype, prec).items():
        assert pick(None) == pick(True), f"{name}: outside as_compiled, expected the interpreter's tiles"
        with tiles.as_compiled():
            assert not tiles.interpreting()
            assert pick(None) == pick(False), f"{name}: under as_compiled, expected the GPU's tiles"
    assert tiles.interpreting(), "expected the interpreter's choices back after the block"


@needs_interpreter
def test_as_compiled_nests():
    with tiles.as_compiled():
        with tiles.as_compiled():
            assert not tiles.interpreting()
        assert not tiles.interpreting(), "expected the outer block still in force"
    assert tiles.interpreting()


def _recorded(job) -> list[warmup.Launch]:
    with tiles.as_compiled(), warmup.record_launches() as launches:
        job()
    return launches


def _consts(launch: warmup.Launch) -> dict:
    return {k: v for k, v in launch.kwargs if k in launch.constexprs}


def _options(launch: warmup.Launch) -> tuple:
    kw = dict(launch.kwargs)
    return kw["num_warps"], kw["num_stages"]


@needs_interpreter
def test_a_recorded_bf16_step_under_as_compiled_has_the_compiled_constexprs():
    """The step's forward and backward, bf16 (whose interpreter launches upcast and emulate rounding), recorded under
    as_compiled: each launch's constexprs and options are the sm_90 fit's (``*_kernel_spec``), i.e. what a GPU
    compiles; outside the block the same launches carry the interpreter's."""
    weights = make_weights(32, 64, 1).to(torch.bfloat16)
    state = make_state(2, 32, 4, 4, torch.bfloat16)
    mask = torch.ones(2, 1, 8, 8, dtype=torch.bool, device=DEVICE)
    grad = torch.ones(2, 32, 8, 8, dtype=torch.bfloat16, device=DEVICE)

    def job():
        nca_step_fwd(state, weights, mask, True)
        nca_step_bwd(state, weights, mask, True, grad)

    launches = _recorded(job)
    specs = [fwd_kernel_spec(32, 64, 1, torch.bfloat16, double=True, mask=True)]
    specs += bwd_kernel_specs(32, 64, 1, torch.bfloat16, double=True, mask=True)
    assert len(launches) == len(specs), f"expected one launch per spec {[s.name for s in specs]}, got {launches}"
    for launch, spec in zip(launches, specs, strict=True):
        assert launch.kernel.endswith(":" + spec.fn.fn.__name__), (launch.kernel, spec.name)
        assert _consts(launch) == spec.constexprs, f"{spec.name}: expected the compiled constexprs"
        assert _options(launch) == (spec.num_warps, spec.num_stages), f"{spec.name}: expected the compiled options"
    with warmup.record_launches() as interpreted:
        job()
    assert _consts(interpreted[0])["UPCAST_DOT"] and not _consts(launches[0])["UPCAST_DOT"], \
        "expected the bf16 emulation in the interpreter's launch only"


@needs_interpreter
def test_a_recorded_rollout_under_as_compiled_has_the_compiled_constexprs():
    """A bf16 rollout (small-grid forward, then per step; the post kernel in its backward) and the likelihood's
    backward, recorded under as_compiled: the small-grid forward's, the post kernel's and the likelihood's launches
    carry their fit specs' constexprs."""
    weights = make_weights(32, 32, 1).to(torch.bfloat16)
    weights = UpdateWeights.from_flat([None if t is None else t.requires_grad_(True) for t in weights.flat()])
    flags = [False, True, False, True, True]  # 2x2, 4x4, 4x4, 8x8: the small-grid kernel; 16x16: per step
    state = make_state(2, 32, 2, 2, torch.bfloat16).requires_grad_(True)
    x = torch.zeros(2, 3, 4, 4, device=DEVICE)
    params = torch.zeros(2, 32, 4, 4, dtype=torch.bfloat16, device=DEVICE)

    def job():
        out = nca_rollout(state, weights, plan_rollout(flags, "step", doubling=True))
        out.float().sum().backward()
        dml_log_prob_bwd(x, params, 3, torch.ones(2, device=DEVICE))

    launches = _recorded(job)
    by_kernel: dict[str, list[dict]] = {}
    for launch in launches:
        by_kernel.setdefault(launch.kernel.split(":")[1], []).append(_consts(launch))
    small = small_fwd_kernel_spec(32, 32, 1, torch.bfloat16)
    assert by_kernel["_rollout_fwd_small_kernel"] == [small.constexprs]
    posts = [post_kernel_spec(32, 32, 1, torch.bfloat16, double=d).constexprs for d in (False, True)]
    assert by_kernel["_rollout_bwd_post_kernel"] and all(p in posts for p in by_kernel["_rollout_bwd_post_kernel"])
    dml = next(s for s in likelihood_kernel_specs(3, torch.bfloat16) if s.name == "dml-bwd")
    assert by_kernel["_dml_bwd_kernel"] == [dml.constexprs]


def test_override_changes_one_picker_for_the_block_only():
    shipped = tiles.post_config(16, 32, torch.float32, n_blocks=1)
    bwd = tiles.bwd_config(16, 32, torch.float32, n_blocks=1)
    with tiles.override("post", wg_warps=2):
        with tiles.override("post", wg_stages=3):
            assert tiles.post_config(16, 32, torch.float32, n_blocks=1) == \
                tiles.BwdConfig(**{**shipped.__dict__, "wg_warps": 2, "wg_stages": 3}), "expected both, nested"
        assert tiles.post_config(16, 32, torch.float32, n_blocks=1).wg_stages == shipped.wg_stages
        assert tiles.bwd_config(16, 32, torch.float32, n_blocks=1) == bwd, "expected the other pickers unchanged"
    assert tiles.post_config(16, 32, torch.float32, n_blocks=1) == shipped and tiles.OVERRIDES == {}
    with tiles.override("bwd", block_k=64, block_c=64):
        cfg = tiles.bwd_config(16, 32, torch.float32, n_blocks=1)
        assert (cfg.block_k, cfg.block_c) == (32, 16), "expected chunk widths capped to divide h = 32 and |z| = 16"
    with pytest.raises(ValueError, match="kind"):
        with tiles.override("tile", block_m=1):
            pass
