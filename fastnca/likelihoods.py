"""Observation models p(x | final NCA state): Bernoulli and the discretized logistic mixture.

Both read their parameters from the first channels of the final state ``(B, |z|, H, W)``:
Bernoulli from channel 0 (logits), the discretized logistic mixture (DML, Salimans et al. 2017, PixelCNN++)
from the first ``10 * n_mix`` channels. Log-probabilities are in nats, summed per example: shape ``(B,)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastnca.kernels.reference import DML_BINS, DML_LOG_SCALE_MIN, check_pair, dml_log_prob, dml_split

__all__ = [
    "bernoulli_log_prob",
    "bernoulli_sample",
    "bernoulli_mean",
    "dml_log_prob",
    "dml_sample",
    "dml_mean",
    "dml_split",
    "DML_BINS",
    "DML_LOG_SCALE_MIN",
]

# The DML's reference (the fused kernel's oracle) stands beside its kernel, in fastnca/kernels/reference.py, with
# the constants both share; the sampler and the mean below use them.


# ------------------------------------------------------------------------------------------------ Bernoulli
def bernoulli_log_prob(x: Tensor, logits: Tensor) -> Tensor:
    """log Bernoulli(x | sigmoid(logits)) summed per example.

    Args:
        x: ``(B, C, H, W)`` with values in {0, 1} (float).
        logits: ``(B, C, H, W)``, or a state ``(B, |z|, H, W)`` whose first C channels are the logits.

    Returns:
        ``(B,)`` nats.
    """
    check_pair(x, logits, "logits")
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
