"""Parity of the fused forward NCA step (kernels/nca_step.py) with the float64 reference, on the CPU interpreter.

Tolerances (relative error ||out - ref|| / ||ref||, ref = ``nca_step_ref(..., upcast=True)`` in float64):
fp32 "ieee" below 1e-5 per step; bf16 at most twice the error of the reference run in bf16 on the same input,
plus an absolute floor of 1e-5 (the two errors are both dominated by the final rounding of z' to bf16, so the
floor only matters where both are tiny, e.g. when the mask leaves most cells unchanged).
"""

from __future__ import annotations

import pytest
import torch

from fastnca.kernels import nca_step as ns
from fastnca.kernels import tiles
from fastnca.kernels.nca_step import nca_step, nca_step_fwd
from fastnca.kernels.reference import UpdateWeights, nca_step_ref
from tests.conftest import DEVICE
from tests.utils import assert_close, rel_err

pytestmark = pytest.mark.usefixtures("nan_poison")

FP32_TOL = 1e-5
BF16_RATIO, BF16_FLOOR = 2.0, 1e-5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_weights(c: int, h: int, n_blocks: int, *, bias: bool = True, out_bias: bool | None = None,
                 gain: float = 1.0, seed: int = 0) -> UpdateWeights:
    """Random fp32 weights, scaled so that a 64-step rollout neither explodes nor vanishes.

    Each conv is ~unit-gain for unit-variance input (fan-in scaling); the residual branches and the update f are
    damped (0.5 and 0.1 x ``gain``), so one step changes the state by roughly a tenth of its size; rollouts use
    ``gain=0.4`` (measured: 64 steps then stay within a factor of ~3 of the start).
    """
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, s: (torch.randn(*shape, generator=g) * s).to(DEVICE)  # noqa: E731
    out_bias = bias if out_bias is None else out_bias
    blocks = tuple(
        (rnd(h, h, 1, 1, s=h**-0.5), rnd(h, s=0.1) if bias else None,
         rnd(h, h, 1, 1, s=0.5 * h**-0.5), rnd(h, s=0.05) if bias else None)
        for _ in range(n_blocks)
    )
    return UpdateWeights(
        rnd(h, c, 3, 3, s=(9 * c) ** -0.5), rnd(h, s=0.1) if bias else None, blocks,
        rnd(c, h, 1, 1, s=0.1 * gain * (h * (1 + n_blocks)) ** -0.5), rnd(c, s=0.02) if out_bias else None,
    )


def make_state(b: int, c: int, h: int, w: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(b, c, h, w, device=DEVICE).to(dtype).contiguous(memory_format=torch.channels_last)


def make_mask(b: int, h: int, w: int, kind: str) -> torch.Tensor | None:
    if kind == "none":
        return None
    m = torch.rand(b, 1, h, w, device=DEVICE) < 0.5
    return {"bool": m, "u8": m.to(torch.uint8), "float": m.float()}[kind]


def check_step(name: str, tri: torch.Tensor, state, weights, mask, double, dtype) -> float:
    """One step's parity: fp32 against 1e-5, bf16 with the ratio rule. Returns the kernel's error."""
    ref64 = nca_step_ref(state, weights, mask, double, upcast=True)
    if dtype == torch.float32:
        return assert_close(name, ref64, tri, rtol=FP32_TOL)
    ref_low = nca_step_ref(state, weights, mask, double)
    bound = BF16_RATIO * rel_err(ref64, ref_low) + BF16_FLOOR
    return assert_close(name, ref64, tri, rtol=bound)


# ------------------------------------------------------------------------------------------- single step
# (B, H, W, C, h, n_blocks, bias, mask, double, dtype)
STEP_CASES = [
    (2, 7, 9, 16, 32, 2, "all", "none", False, "fp32"),
    (1, 1, 1, 16, 32, 4, "all", "none", False, "fp32"),
    (1, 2, 3, 32, 16, 1, "all", "bool", False, "fp32"),
    (3, 5, 5, 16, 32, 0, "noout", "u8", False, "fp32"),
    (2, 4, 3, 48, 48, 1, "all", "float", False, "fp32"),  # non-power-of-two |z| and h (h padded to 64)
    (2, 3, 4, 16, 64, 3, "none", "bool", True, "fp32"),
    (1, 1, 1, 32, 32, 2, "all", "bool", True, "fp32"),
    (2, 7, 9, 16, 32, 2, "all", "none", False, "bf16"),
    (1, 5, 5, 32, 32, 0, "noout", "bool", False, "bf16"),
    (2, 3, 4, 16, 32, 2, "all", "u8", True, "bf16"),
    (1, 16, 16, 64, 64, 1, "all", "none", False, "bf16"),
] + [(1, 5, 6, 16, 32, nb, "all", "none", False, "fp32") for nb in (1, 3, 5, 6, 7, 8)]


def _step_id(case) -> str:
    b, h, w, c, hid, nb, bias, mask, double, dt = case
    return f"B{b}-H{h}-W{w}-C{c}-h{hid}-nb{nb}-bias_{bias}-mask_{mask}{'-double' if double else ''}-{dt}"


def _weights(c, hid, nb, bias, seed=0, gain=1.0):
    return make_weights(c, hid, nb, bias=bias != "none", out_bias=bias == "all", seed=seed, gain=gain)


@pytest.mark.parametrize("case", STEP_CASES, ids=[_step_id(c) for c in STEP_CASES])
def test_step_parity(case):
    b, h, w, c, hid, nb, bias, mask_kind, double, dt = case
    weights = _weights(c, hid, nb, bias)
    state = make_state(b, c, h, w, DTYPES[dt])
    mask = make_mask(b, 2 * h if double else h, 2 * w if double else w, mask_kind)
    tri = nca_step_fwd(state, weights, mask, double)
    assert tri.dtype == state.dtype
    assert tri.is_contiguous(memory_format=torch.channels_last)
    check_step(_step_id(case), tri, state, weights, mask, double, DTYPES[dt])


def test_step_mixed_biases_and_bf16_weights():
    """Blocks with and without biases in one net; bf16 weights under an fp32 state (cast to fp32, exact)."""
    w = make_weights(16, 32, 3)
    blocks = list(w.blocks)
    blocks[0] = (blocks[0][0], None, blocks[0][2], blocks[0][3])
    blocks[2] = (blocks[2][0], blocks[2][1], blocks[2][2], None)
    w = UpdateWeights(w.w_perceive, None, tuple(blocks), w.w_out, w.b_out).to(torch.bfloat16)
    state = make_state(2, 16, 5, 7)
    check_step("mixed-biases", nca_step_fwd(state, w, None, False), state, w, None, False, torch.float32)


def test_step_tf32_and_layouts():
    """tf32 dots stay within tf32's error; a contiguous (NCHW) input gives the same result, channels-last."""
    weights = make_weights(32, 32, 2)
    state = make_state(2, 32, 6, 5)
    ref64 = nca_step_ref(state, weights, None, False, upcast=True)
    assert_close("tf32", ref64, nca_step_fwd(state, weights, input_precision="tf32"), rtol=1e-3)
    tri_nchw = nca_step_fwd(state.contiguous(), weights)
    assert tri_nchw.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(tri_nchw, nca_step_fwd(state, weights), rtol=0, atol=0)


@pytest.mark.parametrize(("c", "h", "n_blocks", "double"), [(32, 32, 2, False), (16, 48, 1, True), (32, 16, 0, False),
                                                      (48, 32, 3, True)])
def test_tf32_forward_reads_its_k_major_weights_as_the_ieee_path_reads_its_own(c, h, n_blocks, double):
    """tf32 packs its weights K-major (``fwd_k_major``; every other index expression of the kernel): the
    interpreter computes tf32 dots in fp32, so both paths must agree bitwise: any misplaced weight element differs.
    h = 48 pads the hidden channels, |z| != h tells the output conv's K-major tile from its N-major one."""
    weights = make_weights(c, h, n_blocks)
    state = make_state(2, c, 5, 7)
    mask = make_mask(2, 10 if double else 5, 14 if double else 7, "bool")
    ieee = nca_step_fwd(state, weights, mask, double, input_precision="ieee")
    tf32 = nca_step_fwd(state, weights, mask, double, input_precision="tf32")
    assert torch.equal(tf32, ieee), f"tf32 (K-major weights) differs from ieee by {(tf32 - ieee).abs().max():.3g}"
    p = ns.pack_weights(weights, torch.float32, k_major=True)
    assert p["w3k"].shape == (9, 64 if h == 48 else h, c) and p["woutk"].is_contiguous()
    assert torch.equal(p["w3k"], p["w3"].transpose(1, 2)) and torch.equal(p["woutk"], p["wout"].t())
    assert "w3k" not in ns.pack_weights(weights, torch.float32), "the K-major copies only where asked for"


def test_pack_cache(monkeypatch):
    """Packed weights are reused for the same unmodified tensors, and repacked after an in-place update."""
    calls = []
    real_pack = ns.pack_weights
    monkeypatch.setattr(ns, "pack_weights", lambda *a, **k: calls.append(1) or real_pack(*a, **k))
    weights = make_weights(16, 32, 1)
    state = make_state(1, 16, 3, 3)
    for _ in range(3):
        nca_step_fwd(state, weights)
    assert len(calls) == 1
    with torch.no_grad():
        weights.blocks[0][0].mul_(-1.5)  # bumps its version counter
    check_step("after in-place update", nca_step_fwd(state, weights), state, weights, None, False, torch.float32)
    other = make_weights(16, 32, 1, seed=3)  # new tensors: never served from the cache
    check_step("new weights", nca_step_fwd(state, other), state, other, None, False, torch.float32)
    assert len(calls) == 3


def test_empty_batch():
    weights = make_weights(16, 32, 1)
    out = nca_step_fwd(make_state(0, 16, 3, 3), weights, None, True)
    assert out.shape == (0, 16, 6, 6)


# ------------------------------------------------------------------------------------------- 64-step rollouts
# (B, H, W, C, h, n_blocks, bias, masked, double_at, dtype): double_at lists the steps that double the state
ROLLOUT_CASES = [
    (1, 7, 9, 16, 32, 2, "all", False, (), "fp32"),
    (2, 5, 5, 16, 32, 0, "noout", True, (), "fp32"),
    (1, 2, 3, 16, 32, 4, "none", True, (16, 40), "fp32"),
    (1, 1, 1, 16, 32, 8, "all", True, (), "fp32"),
    (2, 7, 9, 16, 32, 2, "all", True, (), "bf16"),
    (1, 2, 3, 16, 32, 1, "all", False, (16, 40), "bf16"),
    (1, 1, 1, 16, 32, 3, "none", False, (), "fp32"),
    (1, 1, 1, 16, 32, 5, "all", True, (), "bf16"),
    (1, 1, 2, 16, 32, 6, "all", False, (32,), "fp32"),
    (1, 1, 1, 16, 32, 7, "noout", True, (), "fp32"),
]
# Every block count, both dtypes: ~20 s per 64-step rollout in the interpreter, so on the GPU only.
ROLLOUT_CASES_GPU = [(2, 7, 9, 32, 64, nb, "all" if nb else "noout", True, (8, 24), dt)
                     for nb in range(9) for dt in ("fp32", "bf16")]

NUM_STEPS = 64


def _rollout_id(case) -> str:
    b, h, w, c, hid, nb, bias, masked, double_at, dt = case
    dbl = f"-double{'_'.join(map(str, double_at))}" if double_at else ""
    return f"B{b}-H{h}-W{w}-C{c}-h{hid}-nb{nb}-bias_{bias}{'-mask' if masked else ''}{dbl}-{dt}"


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=_rollout_id(c)) for c in ROLLOUT_CASES]
    + [pytest.param(c, id=_rollout_id(c), marks=pytest.mark.gpu) for c in ROLLOUT_CASES_GPU],
)
def test_rollout_parity(case):
    """64 steps: every step's error from the kernel's own state (fp32 < 1e-5, bf16 ratio rule), and the whole
    trajectory against a float64 rollout (bf16: ratio rule against the reference's bf16 rollout)."""
    b, h, w, c, hid, nb, bias, masked, double_at, dt = case
    dtype = DTYPES[dt]
    weights = _weights(c, hid, nb, bias, seed=1, gain=0.4)
    tri = make_state(b, c, h, w, dtype)
    ref64, ref_low = tri.double(), tri.clone()
    start_norm = ref64.norm() / ref64.numel() ** 0.5
    for step in range(NUM_STEPS):
        double = step in double_at
        hh, ww = tri.shape[2] * (1 + double), tri.shape[3] * (1 + double)
        mask = make_mask(b, hh, ww, "bool") if masked else None
        new = nca_step_fwd(tri, weights, mask, double)
        check_step(f"{_rollout_id(case)} step {step}", new, tri, weights, mask, double, dtype)
        tri = new
        ref64 = nca_step_ref(ref64, weights, mask, double, upcast=True)
        if dtype != torch.float32:
            ref_low = nca_step_ref(ref_low, weights, mask, double)
    # the weights make a non-trivial rollout: the state moved, but stayed within a factor of 10 of its size
    end_norm = ref64.norm() / ref64.numel() ** 0.5
    assert 0.1 < end_norm / start_norm < 10, f"rollout scale drifted: {start_norm:.3g} -> {end_norm:.3g}"
    if dtype == torch.float32:
        assert_close(f"{_rollout_id(case)} trajectory", ref64, tri, rtol=1e-4)
    else:
        bound = BF16_RATIO * rel_err(ref64, ref_low) + BF16_FLOOR
        assert_close(f"{_rollout_id(case)} trajectory", ref64, tri, rtol=bound)


# ------------------------------------------------------------------------------------------- gradients
GRAD_CASES = [
    (2, 5, 6, 16, 32, 2, "all", "none", False),
    (1, 3, 3, 16, 32, 0, "noout", "bool", False),
    (2, 2, 3, 16, 32, 1, "none", "u8", True),
]


def _leaves(state, weights, dtype):
    s = state.detach().to(dtype).requires_grad_(True)
    flat = [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in weights.flat()]
    return s, flat


@pytest.mark.parametrize("case", GRAD_CASES, ids=[_step_id((*c, "fp32")) for c in GRAD_CASES])
def test_grad_parity(case):
    """Gradients of the state and of every weight and bias against float64 autograd of the reference."""
    b, h, w, c, hid, nb, bias, mask_kind, double = case
    weights = _weights(c, hid, nb, bias)
    state = make_state(b, c, h, w)
    mask = make_mask(b, 2 * h if double else h, 2 * w if double else w, mask_kind)
    s_tri, w_tri = _leaves(state, weights, torch.float32)
    s_ref, w_ref = _leaves(state, weights, torch.float64)
    out = nca_step(s_tri, UpdateWeights.from_flat(w_tri), mask, double)
    ref = nca_step_ref(s_ref, UpdateWeights.from_flat(w_ref), mask, double)
    grad_out = torch.randn_like(ref)
    out.backward(grad_out.float())
    ref.backward(grad_out)
    assert_close("out", ref, out, rtol=FP32_TOL)
    assert_close("grad state", s_ref.grad, s_tri.grad, rtol=1e-4)
    for i, (t_tri, t_ref) in enumerate(zip(w_tri, w_ref)):
        if t_ref is None:
            assert t_tri is None
            continue
        assert t_tri.grad is not None, f"weights.flat()[{i}]: no gradient"
        assert_close(f"grad weights.flat()[{i}]", t_ref.grad, t_tri.grad, rtol=1e-4)


def test_grad_bf16_state_fp32_weights():
    """The model's bf16 mode: bf16 state, fp32 parameters; gradients come back in each input's dtype."""
    weights = make_weights(16, 32, 1)
    state = make_state(2, 16, 4, 5, torch.bfloat16)
    s_tri, w_tri = _leaves(state, weights, torch.float32)
    s_tri = s_tri.detach().bfloat16().requires_grad_(True)
    out = nca_step(s_tri, UpdateWeights.from_flat(w_tri))
    out.float().square().sum().backward()
    s_ref, w_ref = _leaves(state, weights, torch.float64)
    (nca_step_ref(s_ref, UpdateWeights.from_flat(w_ref)).square().sum()).backward()
    s_low, w_low = _leaves(state, weights, torch.float32)
    s_low = s_low.detach().bfloat16().requires_grad_(True)
    nca_step_ref(s_low, UpdateWeights.from_flat(w_low)).float().square().sum().backward()
    assert s_tri.grad.dtype == torch.bfloat16 and w_tri[0].grad.dtype == torch.float32
    for name, r, lo, t in [("state", s_ref, s_low, s_tri)] + [
        (f"flat[{i}]", r, lo, t) for i, (r, lo, t) in enumerate(zip(w_ref, w_low, w_tri)) if r is not None
    ]:
        assert_close(f"grad {name}", r.grad, t.grad, rtol=BF16_RATIO * rel_err(r.grad, lo.grad) + 1e-3)


def test_torch_compile_traces_custom_op():
    """torch.compile traces through fastnca::nca_step (fake tensor + registered autograd), forward and backward.

    The aot_eager backend exercises the tracing on the CPU in seconds; inductor is tested on the GPU.
    """
    weights = make_weights(16, 32, 1)
    state = make_state(1, 16, 3, 4)
    s_tri, w_tri = _leaves(state, weights, torch.float32)
    fn = torch.compile(lambda s, ws: nca_step(s, UpdateWeights.from_flat(ws), None, True), backend="aot_eager",
                       fullgraph=True)
    out = fn(s_tri, w_tri)
    out.square().sum().backward()
    s_ref, w_ref = _leaves(state, weights, torch.float64)
    ref = nca_step_ref(s_ref, UpdateWeights.from_flat(w_ref), None, True)
    ref.square().sum().backward()
    assert out.shape == (1, 16, 6, 8) and out.is_contiguous(memory_format=torch.channels_last)
    assert_close("compiled out", ref, out, rtol=FP32_TOL)
    assert_close("compiled grad state", s_ref.grad, s_tri.grad, rtol=1e-4)
    assert_close("compiled grad w_out", w_ref[-2].grad, w_tri[-2].grad, rtol=1e-4)


@pytest.mark.gpu
def test_torch_compile_inductor_gpu():
    weights = make_weights(64, 64, 2)
    state = make_state(2, 64, 16, 16, torch.bfloat16)
    s_tri, w_tri = _leaves(state, weights, torch.float32)
    s_tri = s_tri.detach().bfloat16().requires_grad_(True)
    fn = torch.compile(lambda s, ws: nca_step(s, UpdateWeights.from_flat(ws)).float().square().sum())
    fn(s_tri, w_tri).backward()
    assert torch.isfinite(s_tri.grad).all()


# ------------------------------------------------------------------------------------------- big sweep (GPU)
@pytest.mark.gpu
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("c,hid,nb", [(256, 256, 4), (128, 128, 4), (128, 128, 0), (256, 128, 4), (64, 256, 8)])
@pytest.mark.parametrize("double", [False, True])
def test_step_parity_gpu(c, hid, nb, dt, double):
    weights = _weights(c, hid, nb, "all" if nb else "noout")
    b, h, w = (4, 31, 33) if not double else (3, 16, 17)
    state = make_state(b, c, h, w, DTYPES[dt])
    mask = make_mask(b, h * (1 + double), w * (1 + double), "bool")
    tri = nca_step_fwd(state, weights, mask, double)
    check_step(f"C{c}-h{hid}-nb{nb}-{dt}", tri, state, weights, mask, double, DTYPES[dt])


# ------------------------------------------------------------------------------------------- bad input
def _bad(**over):
    weights = make_weights(16, 32, 1)
    args = {"state": make_state(1, 16, 3, 3), "weights": weights, "mask": None, "double": False}
    args.update(over)
    return args


BAD = {
    "float16-state": (lambda: _bad(state=make_state(1, 16, 3, 3, torch.float16)), TypeError, "state"),
    "float64-state": (lambda: _bad(state=make_state(1, 16, 3, 3, torch.float64)), TypeError, "state"),
    "int-state": (lambda: _bad(state=torch.ones(1, 16, 3, 3, dtype=torch.int32, device=DEVICE)), TypeError,
                  "state"),
    "rank3-state": (lambda: _bad(state=torch.randn(16, 3, 3, device=DEVICE)), ValueError, "state"),
    "channels": (lambda: _bad(state=make_state(1, 32, 3, 3)), ValueError, "state: expected 16 channels"),
    "mask-shape": (lambda: _bad(mask=torch.ones(1, 1, 3, 3, dtype=torch.bool, device=DEVICE), double=True),
                   ValueError, "mask"),
    "float64-weights": (lambda: _bad(weights=make_weights(16, 32, 1).to(torch.float64)), TypeError,
                        "weights.w_perceive"),
    "unsupported-z": (lambda: _bad(state=make_state(1, 20, 3, 3), weights=make_weights(20, 32, 1)), ValueError,
                      "multiples of 16"),
    "unsupported-h": (lambda: _bad(weights=make_weights(16, 512, 0)), ValueError, "h = 512"),
    "block-shape": (lambda: _bad(weights=make_weights(16, 32, 1)._replace(
        blocks=((torch.zeros(32, 16, 1, 1), None, torch.zeros(32, 32, 1, 1), None),))), ValueError,
        r"weights.blocks\[0\].w1"),
    "non-cpu-in-interpreter": (lambda: _bad(state=torch.empty(1, 16, 3, 3, device="meta")), ValueError,
                               "state: expected a CPU tensor"),
}


@pytest.mark.skipif(not tiles.INTERPRET, reason="interpreter-mode messages")
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(name):
    make, err, match = BAD[name]
    args = make()
    with pytest.raises(err, match=match):
        nca_step_fwd(**args)
    with pytest.raises(err, match=match):
        nca_step(**args)


def test_bad_input_precision():
    with pytest.raises(ValueError, match="input_precision"):
        nca_step_fwd(**_bad(), input_precision="fp16")


@pytest.mark.skipif(not tiles.INTERPRET, reason="checks the message a CPU tensor gets outside the interpreter")
def test_cpu_tensor_outside_interpreter(monkeypatch):
    monkeypatch.setattr(tiles, "INTERPRET", False)
    with pytest.raises(ValueError, match="state: expected a CUDA tensor"):
        nca_step_fwd(**_bad())
