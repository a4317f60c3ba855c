"""Plain-PyTorch references of the fused kernels: one NCA step (the test oracle, the benchmark baseline and the CPU
backend) and the discretized logistic mixture's log-likelihood (``likelihood.py``'s oracle, the model's CPU path).

Layout: tensors are ``(B, C, H, W)`` at the API; any memory format is accepted and the output keeps the
input's format (channels-last in, channels-last out).

The update network f (Palm et al., 2022, sec. 2 and the authors' code):

    y = Conv3x3(z)                       # zero padding, |z| -> h
    y = ELU(y)                           # only when there are no residual blocks (non-doubling MNIST net)
    y = y + Conv1x1(ELU(Conv1x1(y)))     # n_blocks times
    f = Conv1x1(y)                       # h -> |z|, zero-initialised in the model

and the step is ``z' = z + m * f(z)`` with a per-cell 0/1 mask m of shape ``(B, 1, H, W)`` (None: every cell
updates). The mask is bool, or an integer/float tensor holding only 0 and 1; any other value is refused with a
ValueError on every backend (:func:`check_step_inputs`). With ``double=True`` the state is first doubled by
nearest-neighbour x2 upsampling (each cell copied to a 2x2 block), and the mask lives at the doubled resolution.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "UpdateWeights",
    "double_ref",
    "update_ref",
    "nca_step_ref",
    "make_update_mask",
    "check_step_inputs",
    "DML_BINS",
    "DML_LOG_SCALE_MIN",
    "check_pair",
    "dml_log_prob",
    "dml_split",
]


class UpdateWeights(NamedTuple):
    """The update network's parameters in ``nn.Conv2d`` layout.

    Attributes:
        w_perceive: ``(h, C, 3, 3)`` the 3x3 perception conv.
        b_perceive: ``(h,)`` or None.
        blocks: one ``(w1, b1, w2, b2)`` per residual block; weights ``(h, h, 1, 1)``, biases ``(h,)`` or None.
        w_out: ``(C, h, 1, 1)`` the output 1x1 conv.
        b_out: ``(C,)`` or None.
    """

    w_perceive: Tensor
    b_perceive: Tensor | None
    blocks: tuple[tuple[Tensor, Tensor | None, Tensor, Tensor | None], ...]
    w_out: Tensor
    b_out: Tensor | None

    @property
    def state_channels(self) -> int:
        return self.w_perceive.shape[1]

    @property
    def hidden_channels(self) -> int:
        return self.w_perceive.shape[0]

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def perceive_elu(self) -> bool:
        """An ELU follows the perception conv only in the block-free net (Conv3x3, ELU, Conv1x1)."""
        return len(self.blocks) == 0

    def flat(self) -> list[Tensor | None]:
        """All tensors in a fixed order: perceive w, b, then w1, b1, w2, b2 per block, then out w, b."""
        out: list[Tensor | None] = [self.w_perceive, self.b_perceive]
        for blk in self.blocks:
            out.extend(blk)
        out.extend([self.w_out, self.b_out])
        return out

    @classmethod
    def from_flat(cls, tensors: list[Tensor | None] | tuple[Tensor | None, ...]) -> UpdateWeights:
        n_blocks = (len(tensors) - 4) // 4
        if len(tensors) != 4 + 4 * n_blocks:
            raise ValueError(f"from_flat: expected 4 + 4 * n_blocks tensors, got {len(tensors)}")
        blocks = tuple(tuple(tensors[2 + 4 * i : 6 + 4 * i]) for i in range(n_blocks))
        return cls(tensors[0], tensors[1], blocks, tensors[-2], tensors[-1])

    def to(self, dtype: torch.dtype) -> UpdateWeights:
        return UpdateWeights.from_flat([None if t is None else t.to(dtype) for t in self.flat()])


def check_step_inputs(state: Tensor, weights: UpdateWeights, mask: Tensor | None, double: bool) -> None:
    """Raise ValueError/TypeError with the argument's name when the step's inputs do not fit together."""
    if not isinstance(state, Tensor):
        raise TypeError(f"state: expected a torch.Tensor, got {type(state).__name__}")
    if state.dim() != 4:
        raise ValueError(f"state: expected rank 4 (B, C, H, W), got shape {tuple(state.shape)}")
    if not state.is_floating_point():
        raise TypeError(f"state: expected a floating-point dtype, got {state.dtype}")
    c = weights.state_channels
    if state.shape[1] != c:
        raise ValueError(f"state: expected {c} channels (the update network's |z|), got {state.shape[1]}")
    b, _, h, w = state.shape
    if double:
        h, w = 2 * h, 2 * w
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask: expected a torch.Tensor or None, got {type(mask).__name__}")
        if tuple(mask.shape) != (b, 1, h, w):
            raise ValueError(f"mask: expected shape {(b, 1, h, w)} (B, 1, H, W) of the updated grid, "
                             f"got {tuple(mask.shape)}")
        if mask.is_complex():
            raise TypeError(f"mask: expected bool, integer or float 0/1 values, got {mask.dtype}")
        # Contract: a cell updates fully (1) or not at all (0). Bool masks (what the model draws) hold nothing
        # else and are not read; other dtypes are checked here, one reduction and one host sync per call. While
        # torch.compile traces, the check is skipped (the fused op still checks when it runs).
        if mask.dtype != torch.bool and not torch.compiler.is_compiling():
            bad = (mask != 0) & (mask != 1)
            if bool(bad.any()):
                value = mask[bad].flatten()[0].item()
                raise ValueError(f"mask: expected values in {{0, 1}} (or a bool mask): a cell updates fully or not "
                                 f"at all; got {value!r} in {int(bad.sum())} cell(s)")


def double_ref(state: Tensor) -> Tensor:
    """Nearest-neighbour x2 upsampling: ``(B, C, H, W) -> (B, C, 2H, 2W)``, each cell copied to a 2x2 block."""
    out = state.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    if state.is_contiguous(memory_format=torch.channels_last) and not state.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def update_ref(state: Tensor, weights: UpdateWeights) -> Tensor:
    """f(z): ``(B, C, H, W) -> (B, C, H, W)``, computed in the state's dtype (weights are cast to it)."""
    wt = weights.to(state.dtype) if weights.w_perceive.dtype != state.dtype else weights
    y = F.conv2d(state, wt.w_perceive, wt.b_perceive, padding=1)  # (B, h, H, W)
    if wt.perceive_elu:
        y = F.elu(y)
    for w1, b1, w2, b2 in wt.blocks:
        y = y + F.conv2d(F.elu(F.conv2d(y, w1, b1)), w2, b2)
    return F.conv2d(y, wt.w_out, wt.b_out)  # (B, C, H, W)


def nca_step_ref(
    state: Tensor,
    weights: UpdateWeights,
    mask: Tensor | None = None,
    double: bool = False,
    *,
    upcast: bool = False,
) -> Tensor:
    """One NCA step ``z' = z + m * f(z)``, optionally doubling the state first.

    Args:
        state: ``(B, C, H, W)``; with ``double=True`` the half-resolution state.
        weights: the update network's parameters.
        mask: ``(B, 1, H', W')`` 0/1 per cell at the updated resolution, or None (every cell updates).
        double: double the state (nearest x2) before the step.
        upcast: compute in float64 and return float64 (the oracle for parity tests).

    Returns:
        ``(B, C, H', W')`` with ``H' = 2H`` when doubling, else ``H``.
    """
    check_step_inputs(state, weights, mask, double)
    if upcast:
        state = state.double()
        weights = weights.to(torch.float64)
    if double:
        state = double_ref(state)
    update = update_ref(state, weights)
    if mask is None:
        return state + update
    return state + update * mask.to(update.dtype)


def make_update_mask(
    batch: int,
    height: int,
    width: int,
    p_update: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor | None:
    """The stochastic update mask ``m = U(0, 1) < p_update``, ``(B, 1, H, W)`` bool; None when p_update >= 1.

    Drawn with ``generator`` on ``device`` so that the fused kernels, the reference and the backward pass all
    use exactly the same cells.
    """
    if not 0.0 < p_update <= 1.0:
        raise ValueError(f"p_update: expected a probability in (0, 1], got {p_update}")
    if p_update >= 1.0:
        return None
    u = torch.rand((batch, 1, height, width), generator=generator, device=device)
    return u < p_update


# ------------------------------------------------------------------------------------- DML log-likelihood
# The discretized logistic mixture (Salimans et al. 2017, PixelCNN++) over 256 levels; the fused kernel
# (likelihood.py) reads these same constants.
DML_LOG_SCALE_MIN = -7.0  # PixelCNN++ clamps log-scales here
DML_BINS = 256
DML_HALF_BIN = 1.0 / (DML_BINS - 1)  # half a bin's width on [-1, 1]
DML_LOG_HALF_BINS = math.log((DML_BINS - 1) / 2)  # the pdf midpoint times the bin width, in logs
DML_WIDE_BIN = 1e-5  # above this CDF difference a bin's mass is the difference, below it the pdf midpoint's


def check_pair(x: Tensor, params: Tensor, pname: str) -> None:
    """x and ``pname`` (the likelihood's parameters): floating-point ``(B, C, H, W)`` tensors of one batch and grid,
    with the argument's name in each message."""
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
    check_pair(x, params, "params")
    if x.shape[1] != 3:
        raise ValueError(f"x: expected 3 colour channels for the discretized logistic mixture, got {x.shape[1]}")
    logit_probs, means, log_scales, coeffs = dml_split(params, n_mix)
    xe = x.float().unsqueeze(2)  # (B, 3, 1, H, W)
    means = _coupled_means(means, coeffs, xe)
    centered = xe - means
    inv_s = torch.exp(-log_scales)
    plus_in = inv_s * (centered + DML_HALF_BIN)
    min_in = inv_s * (centered - DML_HALF_BIN)
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)  # log CDF at the top of the lowest bin (x = -1)
    log_one_minus_cdf_min = -F.softplus(min_in)  # log (1 - CDF) at the bottom of the highest bin (x = 1)
    mid_in = inv_s * centered
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)  # for bins too narrow to difference stably
    log_bin = torch.where(
        cdf_delta > DML_WIDE_BIN,
        torch.log(cdf_delta.clamp_min(1e-12)),
        log_pdf_mid - DML_LOG_HALF_BINS,
    )
    log_probs = torch.where(xe < -0.999, log_cdf_plus, torch.where(xe > 0.999, log_one_minus_cdf_min, log_bin))
    log_probs = log_probs.sum(1) + F.log_softmax(logit_probs, dim=1)  # (B, n_mix, H, W)
    return torch.logsumexp(log_probs, dim=1).flatten(1).sum(1)
