"""Fused discretized logistic mixture (DML) log-likelihood: one Triton launch forward, one backward.

The model's observation model for colour images (Salimans et al. 2017, PixelCNN++; reference and oracle:
``reference.dml_log_prob``, which is ``fastnca.likelihoods.dml_log_prob``, with the constants both share). Per
example it is ~65 small elementwise ATen ops forward and as many backward (slices, selects, where, logsumexp, their
gradients); here each pass is one kernel over the pixels.

Layouts: ``x`` is ``(B, 3, H, W)`` in [-1, 1]; ``params`` is the final NCA state ``(B, |z|, H, W)``, any strides
(the NCA's is channels-last, physically ``(B, H, W, |z|)``), of which only the first ``10 n_mix`` channels are read:
``n_mix`` mixture logits, then per colour (r, g, b) ``n_mix`` means, ``n_mix`` log-scales (clamped at
``DML_LOG_SCALE_MIN``) and ``n_mix`` pre-tanh coupling coefficients.

Dtype policy: x and params are loaded in their dtypes (params fp32, bf16 or fp16) and everything is computed in
fp32; the log-probability is fp32 ``(B,)``; the gradient is rounded once to the params' dtype on store.

Deterministic, no atomics: the forward sums an example's pixels in one program (fixed order); the backward's
programs write disjoint pixels of the gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .checks import TL_DTYPE, check_device
from .launch import on_input_device
from .reference import DML_HALF_BIN, DML_LOG_HALF_BINS, DML_LOG_SCALE_MIN, DML_WIDE_BIN
from .spec import KernelSpec
from .tiles import DMLPlan, dml_plan, interpreting
from .utils import cast_rne

__all__ = [
    "DMLLogProbFunction",
    "DMLPlan",
    "dml_log_prob_bwd",
    "dml_log_prob_fused",
    "dml_log_prob_fwd",
    "dml_plan",
    "likelihood_kernel_specs",
]

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# --------------------------------------------------------------------------------------------------- helpers
@triton.jit
def _softplus(x):
    """log(1 + e^x), stable for both signs."""
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    """1 / (1 + e^-x) through e^{-|x|}: no overflow, full relative precision in both tails."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def _tanh(x):
    """tanh through e^{-2|x|} (no overflow; absolute error ~1e-7)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _dml_bin(x, mu, log_scale, HALF_BIN: tl.constexpr, LOG_HALF_BINS: tl.constexpr, WIDE_BIN: tl.constexpr):
    """log P(the bin of x) under one logistic (mu, e^log_scale), and its derivatives d/d(x - mu), d/d log_scale.

    The bins of the 256-level grid: the lowest (x < -0.999) takes the mass below its top, log sigmoid(plus_in);
    the highest (x > 0.999) the mass above its bottom, -softplus(min_in); the others the CDF difference
    sigmoid(plus_in) - sigmoid(min_in) when it exceeds WIDE_BIN, else the pdf at the midpoint times the bin width
    (``plus_in, min_in = (x - mu +- HALF_BIN) / s``). The difference is taken on the side of the sigmoid's tail
    (sigmoid(-min_in) - sigmoid(-plus_in) when both inputs are positive), where fp32 does not cancel.
    The derivatives are those of the selected case only, as autograd of ``torch.where`` gives them.
    """
    u = x - mu
    inv_s = tl.exp(-log_scale)
    plus_in = inv_s * (u + HALF_BIN)
    min_in = inv_s * (u - HALF_BIN)
    mid_in = inv_s * u
    sig_plus = _sigmoid(plus_in)
    sig_min = _sigmoid(min_in)
    nsig_plus = _sigmoid(-plus_in)  # 1 - sigmoid(plus_in), without cancellation
    nsig_min = _sigmoid(-min_in)
    cdf_delta = tl.where(min_in > 0, nsig_min - nsig_plus, sig_plus - sig_min)
    low = x < -0.999
    high = x > 0.999
    inner = (x >= -0.999) & (x <= 0.999)
    wide = inner & (cdf_delta > WIDE_BIN)
    narrow = inner & (cdf_delta <= WIDE_BIN)
    lp_low = plus_in - _softplus(plus_in)
    lp_high = -_softplus(min_in)
    lp_diff = tl.log(tl.maximum(cdf_delta, 1e-12))
    lp_pdf = mid_in - log_scale - 2.0 * _softplus(mid_in) - LOG_HALF_BINS
    lp = tl.where(low, lp_low, tl.where(high, lp_high, tl.where(wide, lp_diff, lp_pdf)))
    # d lp / d(plus_in, min_in, mid_in) of the selected case; each input t has dt/du = inv_s, dt/dlog_scale = -t
    safe_delta = tl.where(wide, cdf_delta, 1.0)
    g_plus = tl.where(low, nsig_plus, tl.where(wide, sig_plus * nsig_plus / safe_delta, 0.0))
    g_min = tl.where(high, -sig_min, tl.where(wide, -sig_min * nsig_min / safe_delta, 0.0))
    g_mid = tl.where(narrow, 1.0 - 2.0 * _sigmoid(mid_in), 0.0)
    dlp_du = inv_s * (g_plus + g_min + g_mid)
    dlp_dls = -(g_plus * plus_in + g_min * min_in + g_mid * mid_in) - tl.where(narrow, 1.0, 0.0)
    return lp, dlp_du, dlp_dls


@triton.jit
def _load_component(p_pix, stride_p_c, mask_p, k: tl.constexpr, N_MIX: tl.constexpr):
    """Component k's logit and, per colour, raw mean, raw log-scale and pre-tanh coefficient, as fp32."""
    logit = tl.load(p_pix + k * stride_p_c, mask=mask_p, other=0.0).to(tl.float32)
    m0 = tl.load(p_pix + (N_MIX + k) * stride_p_c, mask=mask_p, other=0.0).to(tl.float32)
    s0 = tl.load(p_pix + (2 * N_MIX + k) * stride_p_c, mask=mask_p, other=0.0).to(tl.float32)
    t0 = tl.load(p_pix + (3 * N_MIX + k) * stride_p_c, mask=mask_p, other=0.0).to(tl.float32)
    m1 = tl.load(p_pix + (4 * N_MIX + k) * stride_p_c, mask=mask_p, other=0.0).to(tl.float32)
    s1 = tl.load(p_pix + (5 * N_MIX + k) * stride_p_c, mask=mask_p, other=0.0).to(tl.float32)
    t1 = tl.load(p_pix + (6 * N_MIX + k) * stride_p_c, mask=mask_p, other=0.0).to(tl.float32)
    m2 = tl.load(p_pix + (7 * N_MIX + k) * stride_p_c, mask=mask_p, other=0.0).to(tl.float32)
    s2 = tl.load(p_pix + (8 * N_MIX + k) * stride_p_c, mask=mask_p, other=0.0).to(tl.float32)
    t2 = tl.load(p_pix + (9 * N_MIX + k) * stride_p_c, mask=mask_p, other=0.0).to(tl.float32)
    return logit, m0, s0, t0, m1, s1, t1, m2, s2, t2


@triton.jit
def _component_log_prob(xr, xg, xb, m0, s0, t0, m1, s1, t1, m2, s2, t2, LOG_SCALE_MIN: tl.constexpr,
                        HALF_BIN: tl.constexpr, LOG_HALF_BINS: tl.constexpr, WIDE_BIN: tl.constexpr):
    """Sum over colours of log P(bin) of one component (green coupled to red, blue to red and green)."""
    c0 = _tanh(t0)
    c1 = _tanh(t1)
    c2 = _tanh(t2)
    lp0, _, _ = _dml_bin(xr, m0, tl.maximum(s0, LOG_SCALE_MIN), HALF_BIN, LOG_HALF_BINS, WIDE_BIN)
    lp1, _, _ = _dml_bin(xg, m1 + c0 * xr, tl.maximum(s1, LOG_SCALE_MIN), HALF_BIN, LOG_HALF_BINS, WIDE_BIN)
    lp2, _, _ = _dml_bin(xb, m2 + c1 * xr + c2 * xg, tl.maximum(s2, LOG_SCALE_MIN), HALF_BIN, LOG_HALF_BINS,
                         WIDE_BIN)
    return lp0 + lp1 + lp2


@triton.jit
def _pixel_lse(x_pix, stride_x_c, p_pix, stride_p_c, mask_p, N_MIX: tl.constexpr, LOG_SCALE_MIN: tl.constexpr,
               HALF_BIN: tl.constexpr, LOG_HALF_BINS: tl.constexpr, WIDE_BIN: tl.constexpr):
    """Per pixel: x's colours, logsumexp_k (log P_k(x) + logit_k) and logsumexp_k logit_k (online, fp32)."""
    xr = tl.load(x_pix, mask=mask_p, other=0.0).to(tl.float32)
    xg = tl.load(x_pix + stride_x_c, mask=mask_p, other=0.0).to(tl.float32)
    xb = tl.load(x_pix + 2 * stride_x_c, mask=mask_p, other=0.0).to(tl.float32)
    run_max = tl.full(xr.shape, float("-inf"), tl.float32)
    run_sum = tl.zeros(xr.shape, tl.float32)
    logit_max = tl.full(xr.shape, float("-inf"), tl.float32)
    logit_sum = tl.zeros(xr.shape, tl.float32)
    for k in tl.static_range(N_MIX):
        logit, m0, s0, t0, m1, s1, t1, m2, s2, t2 = _load_component(p_pix, stride_p_c, mask_p, k, N_MIX)
        comp = logit + _component_log_prob(xr, xg, xb, m0, s0, t0, m1, s1, t1, m2, s2, t2, LOG_SCALE_MIN,
                                           HALF_BIN, LOG_HALF_BINS, WIDE_BIN)
        new_max = tl.maximum(run_max, comp)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(comp - new_max)
        run_max = new_max
        new_max = tl.maximum(logit_max, logit)
        logit_sum = logit_sum * tl.exp(logit_max - new_max) + tl.exp(logit - new_max)
        logit_max = new_max
    return xr, xg, xb, run_max + tl.log(run_sum), logit_max + tl.log(logit_sum)


# --------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _dml_fwd_kernel(
    x_ptr,  # (B, 3, H, W) image in [-1, 1], any float dtype, strided
    p_ptr,  # (B, C, H, W) params (the NCA state), fp32/bf16/fp16, strided (channels-last: (B, H, W, C))
    out_ptr,  # (B,) fp32 log p(x) per example
    HW,  # H * W pixels per example
    W,  # grid width
    stride_x_b,  # x's strides, elements
    stride_x_c,
    stride_x_h,
    stride_x_w,
    stride_p_b,  # params' strides, elements
    stride_p_c,
    stride_p_h,
    stride_p_w,
    N_MIX: tl.constexpr,  # mixture components
    BLOCK_P: tl.constexpr,  # pixels per loop iteration
    LOG_SCALE_MIN: tl.constexpr,
    HALF_BIN: tl.constexpr,
    LOG_HALF_BINS: tl.constexpr,
    WIDE_BIN: tl.constexpr,
):
    """Grid ``(B,)``: program b sums log p(x_b) over its H W pixels, BLOCK_P at a time, in fp32, in a fixed order.

    Per pixel: ``logsumexp_k [log_softmax(logits)_k + sum_c log P(bin of x_c | mu_kc, s_kc)]`` with
    ``mu_r = m_r``, ``mu_g = m_g + tanh(t_r) x_r``, ``mu_b = m_b + tanh(t_g) x_r + tanh(t_b) x_g`` and
    ``log s = max(raw, LOG_SCALE_MIN)`` (the bins: :func:`_dml_bin`).
    """
    pid_b = tl.program_id(0).to(tl.int64)
    x_b = x_ptr + pid_b * stride_x_b
    p_b = p_ptr + pid_b * stride_p_b
    acc = tl.zeros([BLOCK_P], tl.float32)
    for p0 in range(0, HW, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < HW
        row = offs_p // W
        col = offs_p % W
        _, _, _, lse, logit_lse = _pixel_lse(x_b + row * stride_x_h + col * stride_x_w, stride_x_c,
                                             p_b + row * stride_p_h + col * stride_p_w, stride_p_c, mask_p, N_MIX,
                                             LOG_SCALE_MIN, HALF_BIN, LOG_HALF_BINS, WIDE_BIN)
        acc += tl.where(mask_p, lse - logit_lse, 0.0)
    tl.store(out_ptr + pid_b, tl.sum(acc, axis=0))


@triton.jit
def _dml_bwd_kernel(
    x_ptr,  # (B, 3, H, W) image in [-1, 1], any float dtype, strided
    p_ptr,  # (B, C, H, W) params, strided
    g_ptr,  # (B,) upstream gradient of log p(x), any float dtype, strided (a mean's gradient has stride 0)
    dp_ptr,  # (B, C, H, W) gradient of params, params' dtype, strided (every channel written)
    C,  # params' channels (>= 10 N_MIX)
    HW,  # H * W
    W,  # grid width
    stride_x_b,  # x's strides, elements
    stride_x_c,
    stride_x_h,
    stride_x_w,
    stride_p_b,  # params' strides, elements
    stride_p_c,
    stride_p_h,
    stride_p_w,
    stride_g,  # grad's stride
    stride_dp_b,  # the gradient's strides, elements
    stride_dp_c,
    stride_dp_h,
    stride_dp_w,
    N_MIX: tl.constexpr,
    BLOCK_P: tl.constexpr,  # pixels per program
    BLOCK_C: tl.constexpr,  # channels per store of the zero gradient of the unread channels
    LOG_SCALE_MIN: tl.constexpr,
    HALF_BIN: tl.constexpr,
    LOG_HALF_BINS: tl.constexpr,
    WIDE_BIN: tl.constexpr,
    EMULATE_RNE: tl.constexpr,  # interpreter + bf16 gradient: round to nearest even by hand (utils.rne)
):
    """Grid ``(B, cdiv(H W, BLOCK_P))``: program (b, j) recomputes the forward for pixels ``[j BLOCK_P, ...)`` of
    example b and writes the gradient of all C channels there (zeros past the first 10 N_MIX).

    With ``w_k = g_b softmax_k(comp)`` (comp as in the forward) and ``pi = softmax(logits)``:
    ``d logit_k = w_k - g_b pi_k``; per colour ``d m = -w_k dlp/du``, ``d log s = w_k dlp/dlog s`` where the raw
    log-scale is > LOG_SCALE_MIN (else 0, as torch.clamp); ``d t_r = -w_k dlp_g/du x_r (1 - tanh^2 t_r)``,
    ``d t_g = -w_k dlp_b/du x_r (1 - tanh^2 t_g)``, ``d t_b = -w_k dlp_b/du x_g (1 - tanh^2 t_b)``.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    row = offs_p // W
    col = offs_p % W
    p_pix = p_ptr + pid_b * stride_p_b + row * stride_p_h + col * stride_p_w
    dp_pix = dp_ptr + pid_b * stride_dp_b + row * stride_dp_h + col * stride_dp_w
    g = tl.load(g_ptr + pid_b * stride_g).to(tl.float32)
    xr, xg, xb, lse, logit_lse = _pixel_lse(x_ptr + pid_b * stride_x_b + row * stride_x_h + col * stride_x_w,
                                            stride_x_c, p_pix, stride_p_c, mask_p, N_MIX, LOG_SCALE_MIN, HALF_BIN,
                                            LOG_HALF_BINS, WIDE_BIN)
    dtype = dp_ptr.dtype.element_ty
    for k in tl.static_range(N_MIX):
        logit, m0, s0, t0, m1, s1, t1, m2, s2, t2 = _load_component(p_pix, stride_p_c, mask_p, k, N_MIX)
        c0 = _tanh(t0)
        c1 = _tanh(t1)
        c2 = _tanh(t2)
        lp0, du0, dls0 = _dml_bin(xr, m0, tl.maximum(s0, LOG_SCALE_MIN), HALF_BIN, LOG_HALF_BINS, WIDE_BIN)
        lp1, du1, dls1 = _dml_bin(xg, m1 + c0 * xr, tl.maximum(s1, LOG_SCALE_MIN), HALF_BIN, LOG_HALF_BINS,
                                  WIDE_BIN)
        lp2, du2, dls2 = _dml_bin(xb, m2 + c1 * xr + c2 * xg, tl.maximum(s2, LOG_SCALE_MIN), HALF_BIN,
                                  LOG_HALF_BINS, WIDE_BIN)
        # g times the component's posterior weight; comp summed in the forward's order, so that with one
        # component comp - lse is exactly 0 (a |comp| ~ 1e3 rounded differently would be off by ~1e-4 relative)
        w = g * tl.exp((logit + (lp0 + lp1 + lp2)) - lse)
        d_logit = w - g * tl.exp(logit - logit_lse)
        d_m0 = -w * du0
        d_m1 = -w * du1
        d_m2 = -w * du2
        d_s0 = tl.where(s0 > LOG_SCALE_MIN, w * dls0, 0.0)  # as torch.clamp: no gradient at the bound itself
        d_s1 = tl.where(s1 > LOG_SCALE_MIN, w * dls1, 0.0)
        d_s2 = tl.where(s2 > LOG_SCALE_MIN, w * dls2, 0.0)
        d_t0 = d_m1 * xr * (1.0 - c0 * c0)
        d_t1 = d_m2 * xr * (1.0 - c1 * c1)
        d_t2 = d_m2 * xg * (1.0 - c2 * c2)
        tl.store(dp_pix + k * stride_dp_c, cast_rne(d_logit, dtype, EMULATE_RNE), mask=mask_p)
        tl.store(dp_pix + (N_MIX + k) * stride_dp_c, cast_rne(d_m0, dtype, EMULATE_RNE), mask=mask_p)
        tl.store(dp_pix + (2 * N_MIX + k) * stride_dp_c, cast_rne(d_s0, dtype, EMULATE_RNE), mask=mask_p)
        tl.store(dp_pix + (3 * N_MIX + k) * stride_dp_c, cast_rne(d_t0, dtype, EMULATE_RNE), mask=mask_p)
        tl.store(dp_pix + (4 * N_MIX + k) * stride_dp_c, cast_rne(d_m1, dtype, EMULATE_RNE), mask=mask_p)
        tl.store(dp_pix + (5 * N_MIX + k) * stride_dp_c, cast_rne(d_s1, dtype, EMULATE_RNE), mask=mask_p)
        tl.store(dp_pix + (6 * N_MIX + k) * stride_dp_c, cast_rne(d_t1, dtype, EMULATE_RNE), mask=mask_p)
        tl.store(dp_pix + (7 * N_MIX + k) * stride_dp_c, cast_rne(d_m2, dtype, EMULATE_RNE), mask=mask_p)
        tl.store(dp_pix + (8 * N_MIX + k) * stride_dp_c, cast_rne(d_s2, dtype, EMULATE_RNE), mask=mask_p)
        tl.store(dp_pix + (9 * N_MIX + k) * stride_dp_c, cast_rne(d_t2, dtype, EMULATE_RNE), mask=mask_p)
    # the channels the likelihood does not read (the rest of the NCA state) get zeros from this launch too
    zeros = tl.zeros([BLOCK_P, BLOCK_C], tl.float32).to(dtype)
    for c_start in range(10 * N_MIX, C, BLOCK_C):
        offs_c = c_start + tl.arange(0, BLOCK_C)
        tl.store(dp_pix[:, None] + offs_c[None, :] * stride_dp_c, zeros, mask=mask_p[:, None] & (offs_c[None, :] < C))


# ----------------------------------------------------------------------------------------------- the plan
def _constexprs(n_mix: int) -> dict:
    """The constants the kernels share with the reference (``reference.py``), as constexprs."""
    return dict(N_MIX=n_mix, LOG_SCALE_MIN=DML_LOG_SCALE_MIN, HALF_BIN=DML_HALF_BIN, LOG_HALF_BINS=DML_LOG_HALF_BINS,
                WIDE_BIN=DML_WIDE_BIN)


def likelihood_kernel_specs(n_mix: int, dtype: torch.dtype) -> list[KernelSpec]:
    """Both kernels as the launchers compile them on the GPU, for params of ``dtype`` and an fp32 image (the fit)."""
    cfg = dml_plan(interpret=False)
    t = f"*{TL_DTYPE[dtype]}"
    strides = ("b", "c", "h", "w")
    fwd_sig = {"x_ptr": "*fp32", "p_ptr": t, "out_ptr": "*fp32", "HW": "i32", "W": "i32",
               **{f"stride_x_{s}": "i32" for s in strides}, **{f"stride_p_{s}": "i32" for s in strides}}
    fwd_const = dict(_constexprs(n_mix), BLOCK_P=cfg.fwd_block_p)
    bwd_sig = {"x_ptr": "*fp32", "p_ptr": t, "g_ptr": "*fp32", "dp_ptr": t, "C": "i32", "HW": "i32", "W": "i32",
               **{f"stride_x_{s}": "i32" for s in strides}, **{f"stride_p_{s}": "i32" for s in strides},
               "stride_g": "i32", **{f"stride_dp_{s}": "i32" for s in strides}}
    bwd_const = dict(_constexprs(n_mix), BLOCK_P=cfg.bwd_block_p, BLOCK_C=cfg.bwd_block_c, EMULATE_RNE=False)
    return [
        KernelSpec("dml-fwd", _dml_fwd_kernel, {**fwd_sig, **{k: "constexpr" for k in fwd_const}}, fwd_const,
                   cfg.num_warps, 1),
        KernelSpec("dml-bwd", _dml_bwd_kernel, {**bwd_sig, **{k: "constexpr" for k in bwd_const}}, bwd_const,
                   cfg.num_warps, 1),
    ]


# ----------------------------------------------------------------------------------------------- launchers
def _check_inputs(x: Tensor, params: Tensor, n_mix: int) -> None:
    """Every check of the fused likelihood, with the argument's name in each message."""
    if isinstance(n_mix, bool) or not isinstance(n_mix, int) or n_mix < 1:
        raise ValueError(f"n_mix: expected an integer >= 1, got {n_mix!r}")
    for name, t, dtypes in (("x", x, _X_DTYPES), ("params", params, _PARAM_DTYPES)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected rank 4 (B, C, H, W), got shape {tuple(t.shape)}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name}: expected one of {[str(d).removeprefix('torch.') for d in dtypes]}, got {t.dtype}")
    if x.shape[1] != 3:
        raise ValueError(f"x: expected 3 colour channels for the discretized logistic mixture, got {x.shape[1]}")
    if x.shape[0] != params.shape[0] or x.shape[2:] != params.shape[2:]:
        raise ValueError(f"x and params: expected the same batch and spatial size, got {tuple(x.shape)} "
                         f"and {tuple(params.shape)}")
    if params.shape[1] < 10 * n_mix:
        raise ValueError(f"n_mix: {n_mix} mixture components need 10 * n_mix = {10 * n_mix} channels, "
                         f"but params has {params.shape[1]}")
    if x.device != params.device:
        raise ValueError(f"x: expected a tensor on {params.device} (the params' device), got {x.device}")
    check_device("params", params)


@on_input_device
def dml_log_prob_fwd(x: Tensor, params: Tensor, n_mix: int) -> Tensor:
    """Check, allocate and launch the forward (no autograd): log p(x) per example, fp32 ``(B,)``."""
    _check_inputs(x, params, n_mix)
    b, _, h, w = params.shape
    out = torch.empty((b,), dtype=torch.float32, device=params.device)
    if b == 0:
        return out
    cfg = dml_plan()
    _dml_fwd_kernel[(b,)](
        x_ptr=x, p_ptr=params, out_ptr=out, HW=h * w, W=w,
        stride_x_b=x.stride(0), stride_x_c=x.stride(1), stride_x_h=x.stride(2), stride_x_w=x.stride(3),
        stride_p_b=params.stride(0), stride_p_c=params.stride(1), stride_p_h=params.stride(2),
        stride_p_w=params.stride(3),
        BLOCK_P=cfg.fwd_block_p, **_constexprs(n_mix), num_warps=cfg.num_warps,
    )
    return out


@on_input_device
def dml_log_prob_bwd(x: Tensor, params: Tensor, n_mix: int, grad: Tensor) -> Tensor:
    """Check, allocate and launch the backward: ``grad[b] * d log p(x_b) / d params``, in the params' dtype and
    layout (``empty_like``: a channels-last state gets a channels-last gradient), every channel written."""
    _check_inputs(x, params, n_mix)
    b, c, h, w = params.shape
    if not isinstance(grad, Tensor) or tuple(grad.shape) != (b,) or not grad.is_floating_point():
        raise ValueError(f"grad: expected a floating-point tensor of shape ({b},), got "
                         f"{tuple(grad.shape) if isinstance(grad, Tensor) else type(grad).__name__}")
    dparams = torch.empty_like(params)  # preserve_format: the params' strides when they are dense
    if dparams.numel() == 0:
        return dparams
    cfg = dml_plan()
    grid = (b, triton.cdiv(h * w, cfg.bwd_block_p))
    _dml_bwd_kernel[grid](
        x_ptr=x, p_ptr=params, g_ptr=grad, dp_ptr=dparams, C=c, HW=h * w, W=w,
        stride_x_b=x.stride(0), stride_x_c=x.stride(1), stride_x_h=x.stride(2), stride_x_w=x.stride(3),
        stride_p_b=params.stride(0), stride_p_c=params.stride(1), stride_p_h=params.stride(2),
        stride_p_w=params.stride(3), stride_g=grad.stride(0),
        stride_dp_b=dparams.stride(0), stride_dp_c=dparams.stride(1), stride_dp_h=dparams.stride(2),
        stride_dp_w=dparams.stride(3),
        BLOCK_P=cfg.bwd_block_p, BLOCK_C=cfg.bwd_block_c, **_constexprs(n_mix),
        EMULATE_RNE=interpreting() and params.dtype == torch.bfloat16, num_warps=cfg.num_warps,
    )
    return dparams


# ------------------------------------------------------------------------------------------------- autograd
class DMLLogProbFunction(torch.autograd.Function):
    """One launch forward; backward recomputes from the saved inputs (x, params) in one launch. No gradient for x
    (the data). ``apply(x, params, n_mix)``."""

    @staticmethod
    def forward(ctx, x: Tensor, params: Tensor, n_mix: int) -> Tensor:
        out = dml_log_prob_fwd(x, params, n_mix)
        ctx.save_for_backward(x, params)
        ctx.n_mix = n_mix
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, params = ctx.saved_tensors
        dparams = dml_log_prob_bwd(x, params, ctx.n_mix, grad) if ctx.needs_input_grad[1] else None
        return None, dparams, None


# ------------------------------------------------------------------------------------------- custom op
@torch.library.custom_op("fastnca::dml_log_prob", mutates_args=())
def _dml_log_prob_op(x: Tensor, params: Tensor, n_mix: int) -> Tensor:
    """``fastnca::dml_log_prob``: the fused forward as an opaque op for torch.compile."""
    return dml_log_prob_fwd(x, params, n_mix)


@_dml_log_prob_op.register_fake
def _dml_log_prob_fake(x, params, n_mix):
    return params.new_empty((params.shape[0],), dtype=torch.float32)


@torch.library.custom_op("fastnca::dml_log_prob_backward", mutates_args=())
def _dml_log_prob_bwd_op(x: Tensor, params: Tensor, n_mix: int, grad: Tensor) -> Tensor:
    """``fastnca::dml_log_prob_backward``: the gradient of the params, as an opaque op."""
    return dml_log_prob_bwd(x, params, n_mix, grad)


@_dml_log_prob_bwd_op.register_fake
def _dml_log_prob_bwd_fake(x, params, n_mix, grad):
    return torch.empty_like(params)


def _dml_setup_context(ctx, inputs, output) -> None:
    x, params, n_mix = inputs
    ctx.save_for_backward(x, params)
    ctx.n_mix = n_mix


def _dml_backward(ctx, grad):
    x, params = ctx.saved_tensors
    dparams = _dml_log_prob_bwd_op(x, params, ctx.n_mix, grad) if ctx.needs_input_grad[1] else None
    return None, dparams, None


_dml_log_prob_op.register_autograd(_dml_backward, setup_context=_dml_setup_context)


def dml_log_prob_fused(x: Tensor, params: Tensor, n_mix: int) -> Tensor:
    """log p(x) under the discretized logistic mixture, summed per example: the fused Triton kernels.

    The same function as ``fastnca.likelihoods.dml_log_prob`` (its oracle): PixelCNN++'s mixture with log-scales
    clamped at -7, tanh coupling coefficients (green on red, blue on red and green), the edge bins x = -1 and
    x = 1 taking the tails, and the pdf midpoint where a bin's CDF difference is below 1e-5. One launch forward;
    backward recomputes (saving only x and params) in one launch that writes the gradient of every channel of
    ``params`` (zeros past the first ``10 n_mix``), in its dtype and layout. Runs on CUDA tensors, and on CPU
    tensors in interpreter mode (``TRITON_INTERPRET=1``). Goes through the op ``torch.ops.fastnca.dml_log_prob``.

    Args:
        x: ``(B, 3, H, W)`` in [-1, 1] on the 256-level grid (fp32, bf16, fp16 or fp64; not differentiated).
        params: ``(B, >= 10 n_mix, H, W)`` fp32, bf16 or fp16, any strides (the NCA's final state, channels-last,
            physically ``(B, H, W, |z|)``); only the first ``10 n_mix`` channels are read.
        n_mix: number of mixture components.

    Returns:
        ``(B,)`` fp32 nats.
    """
    _check_inputs(x, params, n_mix)
    return _dml_log_prob_op(x, params, n_mix)
