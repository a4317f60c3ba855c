"""Observation models p(x | final NCA state): Bernoulli and the discretized logistic mixture.

Both read their parameters from the first channels of the final state ``(B, |z|, H, W)``:
Bernoulli from channel 0 (logits), the discretized logistic mixture (DML, Salimans et al. 2017, PixelCNN++)
from the first ``10 * n_mix`` channels. Log-probabilities are in nats, summed per example: shape ``(B,)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "bernoulli_log_prob",
    "bernoulli_sample",
    "bernoulli_mean",
    "dml_log_prob",
    "dml_sample",
    "dml_mean",
    "dml_split",
    "DML_LOG_SCALE_MIN",
]

DML_LOG_SCALE_MIN = -7.0  # PixelCNN++ clamps log-scales here
DML_BINS = 256


def _check_pair(x: Tensor, params: Tensor, pname: str) -> None:
    for name, t in (("x", x), (pname, params)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point dtype, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected rank 4 (B, C, H, W), got shape {tuple(t.shape)}")
    if x.shape[0] != params.shape[0] or x.shape[2:] != params.shape[2:]:
        raise ValueError(f"x and {pname}: expected the same batch and spatial size, got {tuple(x.shape)} "
                         f"and {tuple(params.shape)}")


# ------------------------------------------------------------------------------------------------ Bernoulli
def bernoulli_log_prob(x: Tensor, logits: Tensor) -> Tensor:
    """log Bernoulli(x | sigmoid(logits)) summed per example.

    Args:
        x: ``(B, C, H, W)`` with values in {0, 1} (float).
        logits: ``(B, C, H, W)``, or a state ``(B, |z|, H, W)`` whose first C channels are the logits.

    Returns:
        ``(B,)`` nats.
    """
    _check_pair(x, logits, "logits")
    c = x.shape[1]
    if logits.shape[1] < c:
        raise ValueError(f"logits: expected at least {c} channels (one per image channel), got {logits.shape[1]}")
    logits = logits[:, :c].float()
    return -F.binary_cross_entropy_with_logits(logits, x.float(), reduction="none").flatten(1).sum(1)


def bernoulli_sample(logits: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """A {0, 1} sample of the same shape as ``logits``."""
    p = torch.sigmoid(logits.float())
    return (torch.rand(p.shape, generator=generator, device=p.device) < p).float()


def bernoulli_mean(logits: Tensor) -> Tensor:
    return torch.sigmoid(logits.float())


# ------------------------------------------------------------------------------------------------ DML
def dml_split(params: Tensor, n_mix: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split the PixelCNN++ parameter layout of the first ``10 * n_mix`` channels.

    Layout: ``n_mix`` mixture logits, then for each colour (r, g, b) ``n_mix`` means, ``n_mix`` log-scales
    (clamped at -7) and ``n_mix`` pre-tanh coupling coefficients.

    Returns:
        logit_probs ``(B, n_mix, H, W)``; means, log_scales, coeffs each ``(B, 3, n_mix, H, W)``.
    """
    if not isinstance(n_mix, int) or n_mix < 1:
        raise ValueError(f"n_mix: expected an integer >= 1, got {n_mix!r}")
    if params.dim() != 4:
        raise ValueError(f"params: expected rank 4 (B, C, H, W), got shape {tuple(params.shape)}")
    if params.shape[1] < 10 * n_mix:
        raise ValueError(f"n_mix: {n_mix} mixture components need 10 * n_mix = {10 * n_mix} channels, "
                         f"but params has {params.shape[1]}")
    b, _, h, w = params.shape
    params = params[:, : 10 * n_mix].float()
    logit_probs = params[:, :n_mix]
    rest = params[:, n_mix:].reshape(b, 3, 3 * n_mix, h, w)  # per colour: means, log-scales, coeffs
    means = rest[:, :, :n_mix]
    log_scales = rest[:, :, n_mix : 2 * n_mix].clamp(min=DML_LOG_SCALE_MIN)
    coeffs = torch.tanh(rest[:, :, 2 * n_mix :])
    return logit_probs, means, log_scales, coeffs


def _coupled_means(means: Tensor, coeffs: Tensor, x: Tensor) -> Tensor:
    """Condition green on red and blue on red and green: x is ``(B, 3, 1, H, W)`` (observed or sampled)."""
    r, g, b = means[:, 0], means[:, 1], means[:, 2]
    g = g + coeffs[:, 0] * x[:, 0]
    b = b + coeffs[:, 1] * x[:, 0] + coeffs[:, 2] * x[:, 1]
    return torch.stack([r, g, b], dim=1)


def dml_log_prob(x: Tensor, params: Tensor, n_mix: int) -> Tensor:
    """log p(x) under the discretized logistic mixture, summed per example.

    Args:
        x: ``(B, 3, H, W)`` in [-1, 1], on the 256-level grid ``2 k / 255 - 1``.
        params: ``(B, >= 10 n_mix, H, W)``: the final NCA state (only the first 10 n_mix channels are read).
        n_mix: number of mixture components.

    Returns:
        ``(B,)`` nats.
    """
    _check_pair(x, params, "params")
    if x.shape[1] != 3:
        raise ValueError(f"x: expected 3 colour channels for the discretized logistic mixture, got {x.shape[1]}")
    logit_probs, means, log_scales, coeffs = dml_split(params, n_mix)
    xe = x.float().unsqueeze(2)  # (B, 3, 1, H, W)
    means = _coupled_means(means, coeffs, xe)
    centered = xe - means
    inv_s = torch.exp(-log_scales)
    half_bin = 1.0 / (DML_BINS - 1)
    plus_in = inv_s * (centered + half_bin)
    min_in = inv_s * (centered - half_bin)
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)  # log CDF at the top of the lowest bin (x = -1)
    log_one_minus_cdf_min = -F.softplus(min_in)  # log (1 - CDF) at the bottom of the highest bin (x = 1)
    mid_in = inv_s * centered
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)  # for bins too narrow to difference stably
    log_bin = torch.where(
        cdf_delta > 1e-5,
        torch.log(cdf_delta.clamp_min(1e-12)),
        log_pdf_mid - math.log((DML_BINS - 1) / 2),
    )
    log_probs = torch.where(xe < -0.999, log_cdf_plus, torch.where(xe > 0.999, log_one_minus_cdf_min, log_bin))
    log_probs = log_probs.sum(1) + F.log_softmax(logit_probs, dim=1)  # (B, n_mix, H, W)
    return torch.logsumexp(log_probs, dim=1).flatten(1).sum(1)


def dml_sample(params: Tensor, n_mix: int, *, generator: torch.Generator | None = None) -> Tensor:
    """A sample ``(B, 3, H, W)`` in [-1, 1], quantised to the 256 bins."""
    logit_probs, means, log_scales, coeffs = dml_split(params, n_mix)
    dev = params.device
    u_mix = torch.rand(logit_probs.shape, generator=generator, device=dev).clamp(1e-7, 1 - 1e-7)
    gumbel = -torch.log(-torch.log(u_mix))
    k = (logit_probs + gumbel).argmax(dim=1)  # (B, H, W)
    onehot = F.one_hot(k, n_mix).permute(0, 3, 1, 2).unsqueeze(1).float()  # (B, 1, n_mix, H, W)
    mu = (means * onehot).sum(2)  # (B, 3, H, W)
    ls = (log_scales * onehot).sum(2)
    cf = (coeffs * onehot).sum(2)
    u = torch.rand(mu.shape, generator=generator, device=dev).clamp(1e-5, 1 - 1e-5)
    noise = torch.exp(ls) * (torch.log(u) - torch.log1p(-u))
    xr = (mu[:, 0] + noise[:, 0]).clamp(-1, 1)
    xg = (mu[:, 1] + cf[:, 0] * xr + noise[:, 1]).clamp(-1, 1)
    xb = (mu[:, 2] + cf[:, 1] * xr + cf[:, 2] * xg + noise[:, 2]).clamp(-1, 1)
    x = torch.stack([xr, xg, xb], dim=1)
    return torch.round((x + 1) * (DML_BINS - 1) / 2) / ((DML_BINS - 1) / 2) - 1


def dml_mean(params: Tensor, n_mix: int) -> Tensor:
    """The mixture's mean image ``(B, 3, H, W)`` in [-1, 1] (coupling applied to the component means)."""
    logit_probs, means, _, coeffs = dml_split(params, n_mix)
    r = means[:, 0]
    g = means[:, 1] + coeffs[:, 0] * r
    b = means[:, 2] + coeffs[:, 1] * r + coeffs[:, 2] * g
    pi = torch.softmax(logit_probs, dim=1)  # (B, n_mix, H, W)
    x = torch.stack([(r * pi).sum(1), (g * pi).sum(1), (b * pi).sum(1)], dim=1)
    return x.clamp(-1, 1)
