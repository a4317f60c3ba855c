"""The fused DML log-likelihood (kernels/likelihood.py) against float64 autograd of the reference
``fastnca.likelihoods.dml_log_prob``: log-probabilities and the gradient of every channel of the params, at odd
shapes, 1 and 3 components, both edge bins (x = -1, x = 1), the narrow-bin pdf branch and clamped log-scales,
fp32 and bf16 params, channels-last and contiguous. Runs through the interpreter on the CPU."""

from __future__ import annotations

import re

import pytest
import torch

from fastnca.kernels.likelihood import DMLLogProbFunction, dml_log_prob_fused
from fastnca.likelihoods import DML_LOG_SCALE_MIN, dml_log_prob, dml_split
from tests.conftest import DEVICE
from tests.utils import assert_close

CASES = [  # (B, C, H, W, n_mix, dtype, channels_last)
    (1, 10, 1, 1, 1, torch.float32, False),
    (2, 35, 3, 5, 3, torch.float32, True),
    (3, 32, 8, 8, 1, torch.float32, True),
    (2, 64, 3, 5, 3, torch.float32, False),
    (2, 30, 8, 8, 3, torch.bfloat16, True),
    (1, 16, 3, 5, 1, torch.bfloat16, False),
    (3, 48, 8, 8, 1, torch.bfloat16, True),
]


def _case_id(case) -> str:
    b, c, h, w, n_mix, dtype, cl = case
    return f"B{b}-C{c}-H{h}-W{w}-n{n_mix}-{'bf16' if dtype == torch.bfloat16 else 'fp32'}-{'cl' if cl else 'contig'}"


def make_inputs(b: int, c: int, h: int, w: int, n_mix: int, dtype: torch.dtype, channels_last: bool):
    """x on the 256-level grid with pixel (0, 0) at -1 and the last pixel at 1 (the edge bins); params whose
    log-scales span clamped (< -7, and one exactly -7), tiny (narrow bins -> the pdf branch) and wide values.

    Drawn by the CPU generator and then moved to the test device, so that a GPU run checks the very inputs the CPU
    run does (a CUDA generator draws other values, which need not reach every case of the likelihood)."""
    x = torch.randint(0, 256, (b, 3, h, w)).float() * 2 / 255 - 1
    x[:, :, 0, 0] = -1.0
    x[:, :, -1, -1] = 1.0
    params = torch.randn(b, c, h, w)
    rest = params[:, n_mix : 10 * n_mix].view(b, 3, 3, n_mix, h, w)  # per colour: means, log-scales, coeffs
    rest[:, :, 0] *= 0.5
    rest[:, :, 1] = torch.empty_like(rest[:, :, 1]).uniform_(-8.0, 0.0)
    rest[:, 0, 1, 0, 0, -1] = DML_LOG_SCALE_MIN  # exactly at the clamp: torch.clamp passes no gradient there
    x, params = x.to(DEVICE), params.to(DEVICE, dtype)
    if channels_last:
        params = params.contiguous(memory_format=torch.channels_last)
    return x, params


def _bins_hit(x: torch.Tensor, params: torch.Tensor, n_mix: int) -> dict[str, bool]:
    """Which of the reference's cases the inputs reach (the test needs all of them)."""
    _, means, log_scales, coeffs = dml_split(params.double(), n_mix)
    xe = x.double().unsqueeze(2)
    centered = xe - means
    inv_s = torch.exp(-log_scales)
    delta = torch.sigmoid(inv_s * (centered + 1 / 255)) - torch.sigmoid(inv_s * (centered - 1 / 255))
    inner = (xe > -0.999) & (xe < 0.999)
    raw = params[:, n_mix : 10 * n_mix].double().reshape(log_scales.shape[0], 3, 3 * n_mix, *log_scales.shape[3:])
    return {"x=-1": bool((x < -0.999).any()), "x=1": bool((x > 0.999).any()),
            "pdf": bool((inner & (delta <= 1e-5)).any()), "difference": bool((inner & (delta > 1e-5)).any()),
            "clamped": bool((raw[:, :, n_mix : 2 * n_mix] < DML_LOG_SCALE_MIN).any())}


def _reference(x, params, n_mix, grad, dtype=torch.float64):
    """Log-prob and d(params) of the reference, with params in ``dtype`` (float64: the oracle)."""
    leaf = params.detach().to(dtype).requires_grad_(True)
    out = dml_log_prob(x.to(torch.float64 if dtype == torch.float64 else torch.float32), leaf, n_mix)
    out.backward(grad.to(out.dtype))
    return out.detach(), leaf.grad


def _fused(x, params, n_mix, grad):
    leaf = params.detach().clone().requires_grad_(True)
    out = dml_log_prob_fused(x, leaf, n_mix)
    out.backward(grad)
    return out.detach(), leaf.grad


def _grad(b: int) -> torch.Tensor:
    return torch.linspace(0.5, 1.5, b, device=DEVICE)  # a distinct upstream gradient per example


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_log_prob_and_params_gradient_match_float64_reference(case, nan_poison):
    b, c, h, w, n_mix, dtype, cl = case
    x, params = make_inputs(b, c, h, w, n_mix, dtype, cl)
    if h * w >= 15:
        hit = _bins_hit(x, params, n_mix)
        assert all(hit.values()), f"expected inputs that reach every case of the likelihood, got {hit}"
    grad = _grad(b)
    ref_lp, ref_dp = _reference(x, params, n_mix, grad)
    tri_lp, tri_dp = _fused(x, params, n_mix, grad)
    assert tri_lp.dtype == torch.float32, f"expected fp32 log-probabilities, got {tri_lp.dtype}"
    assert tri_dp.dtype == params.dtype, f"expected the gradient in the params' {params.dtype}, got {tri_dp.dtype}"
    assert tri_dp.stride() == params.stride(), (
        f"expected the gradient in the params' layout {params.stride()}, got {tri_dp.stride()}")
    rel = ((tri_lp.double() - ref_lp).abs() / ref_lp.abs()).max().item()
    assert rel < 1e-5, f"expected log-prob within 1e-5 relative of the float64 reference per example, got {rel:.3g}"
    extra = tri_dp[:, 10 * n_mix :]
    assert torch.equal(extra, torch.zeros_like(extra)), "expected exactly zero gradient in the channels not read"
    if dtype == torch.float32:
        assert_close("d params", ref_dp, tri_dp, rtol=1e-4)
    else:
        # bf16: the reference computes in fp32 from the same bf16 values and rounds its gradient to bf16 once, as
        # the kernel does; the kernel may be at most 2x the reference's own error against float64 (+ a floor of
        # one fp32-level error, so two exact results do not fail on a 0 vs 1e-9 ratio)
        _, lo_dp = _reference(x, params, n_mix, grad, dtype=params.dtype)
        ref_err = assert_close("d params (reference in bf16)", ref_dp, lo_dp, rtol=1e-2)
        assert_close("d params", ref_dp, tri_dp, rtol=2 * ref_err + 1e-5)


def test_upstream_gradient_of_a_mean_with_zero_stride():
    x, params = make_inputs(2, 20, 3, 5, 2, torch.float32, True)
    ref_leaf = params.detach().double().requires_grad_(True)
    dml_log_prob(x.double(), ref_leaf, 2).mean().backward()
    leaf = params.detach().clone().requires_grad_(True)
    dml_log_prob_fused(x, leaf, 2).mean().backward()  # the mean's backward hands an expanded (stride-0) gradient
    assert_close("d params", ref_leaf.grad, leaf.grad, rtol=1e-4)


def test_strided_views_of_x_and_params_are_read_in_place():
    x_big, big = make_inputs(2, 48, 6, 10, 2, torch.float32, True)
    x, params = x_big[:, :, ::2, 1::2], big[:, 4:44, ::2, 1::2]  # non-dense views: (2, 3, 3, 5), (2, 40, 3, 5)
    grad = _grad(2)
    ref_lp, ref_dp = _reference(x, params, 2, grad)
    tri_lp, tri_dp = _fused(x, params, 2, grad)
    assert_close("log-prob", ref_lp, tri_lp, rtol=1e-5)
    assert_close("d params", ref_dp, tri_dp, rtol=1e-4)


def test_autograd_function_matches_the_custom_op_bitwise():
    x, params = make_inputs(2, 30, 3, 5, 3, torch.float32, True)
    grad = _grad(2)
    op_lp, op_dp = _fused(x, params, 3, grad)
    leaf = params.detach().clone().requires_grad_(True)
    fn_lp = DMLLogProbFunction.apply(x, leaf, 3)
    fn_lp.backward(grad)
    assert torch.equal(op_lp, fn_lp.detach()) and torch.equal(op_dp, leaf.grad), "expected identical results"


def test_torch_compile_traces_the_op_with_fullgraph():
    x, params = make_inputs(2, 20, 3, 5, 2, torch.float32, True)
    grad = _grad(2)
    eager_lp, eager_dp = _fused(x, params, 2, grad)
    compiled = torch.compile(lambda a, b: dml_log_prob_fused(a, b, 2), backend="aot_eager", fullgraph=True)
    leaf = params.detach().clone().requires_grad_(True)
    lp = compiled(x, leaf)
    lp.backward(grad)
    assert torch.equal(lp.detach(), eager_lp) and torch.equal(leaf.grad, eager_dp), "expected the eager results"


def test_results_are_deterministic():
    x, params = make_inputs(3, 16, 8, 8, 1, torch.bfloat16, True)
    grad = _grad(3)
    first, again = _fused(x, params, 1, grad), _fused(x, params, 1, grad)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1]), "expected bitwise-equal reruns"


def test_no_gradient_for_x_and_none_needed_for_params():
    x, params = make_inputs(1, 10, 3, 5, 1, torch.float32, False)
    with torch.no_grad():
        lp = dml_log_prob_fused(x, params, 1)
    assert lp.shape == (1,) and not lp.requires_grad
    xg = x.clone().requires_grad_(True)
    leaf = params.clone().requires_grad_(True)
    dml_log_prob_fused(xg, leaf, 1).sum().backward()
    assert xg.grad is None and leaf.grad is not None, "expected a gradient for params only (x is data)"


BAD = [
    ("n_mix-zero", lambda x, p: (x, p, 0), ValueError, "n_mix"),
    ("n_mix-float", lambda x, p: (x, p, 1.0), ValueError, "n_mix"),
    ("too-few-channels", lambda x, p: (x, p[:, :9], 1), ValueError, "10 * n_mix"),
    ("x-two-colours", lambda x, p: (x[:, :2], p, 1), ValueError, "3 colour channels"),
    ("x-rank-3", lambda x, p: (x[0], p, 1), ValueError, "rank 4"),
    ("spatial-mismatch", lambda x, p: (x[:, :, :2], p, 1), ValueError, "same batch and spatial size"),
    ("batch-mismatch", lambda x, p: (x[:1], p, 1), ValueError, "same batch and spatial size"),
    ("params-float64", lambda x, p: (x, p.double(), 1), TypeError, "params"),
    ("x-integer", lambda x, p: (x.long(), p, 1), TypeError, "x"),
    ("params-not-a-tensor", lambda x, p: (x, p.tolist(), 1), TypeError, "params"),
]


@pytest.mark.parametrize("make,error,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_and_names_the_argument(make, error, words):
    x, params = make_inputs(2, 12, 3, 5, 1, torch.float32, False)
    with pytest.raises(error, match=re.escape(words)):
        dml_log_prob_fused(*make(x, params))
