"""The NCA decoder: the update network, one step, and the doubling / non-doubling rollouts.

Tensors are ``(B, C, H, W)`` at the API. Inside a rollout the state stays channels-last
(``torch.channels_last``, physically ``(B, H, W, C)``) from the seed to the final grid, so the fused kernels
never copy it between steps.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from fastnca.kernels.reference import UpdateWeights, nca_step_ref
from fastnca.kernels.schedule import RolloutPlan, draw_masks, rollout_flags
from fastnca.rng import generator_on
from fastnca.run import RunSettings, resolve_run

__all__ = ["UpdateNet", "ResidualBlock", "NCA", "RolloutPlan", "nca_from_config"]


class ResidualBlock(nn.Module):
    """``x + Conv1x1(ELU(Conv1x1(x)))`` on ``(B, h, H, W)``."""

    def __init__(self, channels: int, *, bias: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=bias)
        self.conv2 = nn.Conv2d(channels, channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(nn.functional.elu(self.conv1(x)))


class UpdateNet(nn.Module):
    """The NCA update network f: Conv3x3 (zero padding), residual 1x1 blocks, output Conv1x1.

    Conv2d submodules in registration order: the 3x3 perception conv, the two 1x1 convs of each residual
    block, the output 1x1 conv (weight and bias zero-initialised, so the first step is the identity).
    With ``n_blocks=0`` the net is Conv3x3, ELU, Conv1x1 (the non-doubling MNIST model, whose output conv
    has no bias).

    Args:
        state_channels: |z|.
        hidden_channels: h.
        n_blocks: number of residual blocks.
        bias: bias on the perception and residual convs.
        out_bias: bias on the output conv; None means ``bias and n_blocks > 0``.
    """

    def __init__(
        self,
        state_channels: int,
        hidden_channels: int,
        n_blocks: int = 4,
        *,
        bias: bool = True,
        out_bias: bool | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("state_channels", state_channels), ("hidden_channels", hidden_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not isinstance(n_blocks, int) or n_blocks < 0:
            raise ValueError(f"n_blocks: expected an integer >= 0, got {n_blocks!r}")
        if out_bias is None:
            out_bias = bias and n_blocks > 0
        self.state_channels = state_channels
        self.hidden_channels = hidden_channels
        self.perceive = nn.Conv2d(state_channels, hidden_channels, 3, padding=1, bias=bias)
        self.blocks = nn.ModuleList(ResidualBlock(hidden_channels, bias=bias) for _ in range(n_blocks))
        self.out = nn.Conv2d(hidden_channels, state_channels, 1, bias=out_bias)
        nn.init.zeros_(self.out.weight)
        if self.out.bias is not None:
            nn.init.zeros_(self.out.bias)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def weights(self) -> UpdateWeights:
        """The parameters as an :class:`UpdateWeights` (the same tensors, so gradients flow to them)."""
        blocks = tuple((b.conv1.weight, b.conv1.bias, b.conv2.weight, b.conv2.bias) for b in self.blocks)
        return UpdateWeights(self.perceive.weight, self.perceive.bias, blocks, self.out.weight, self.out.bias)

    def forward(self, state: Tensor) -> Tensor:
        """f(z) for ``(B, |z|, H, W) -> (B, |z|, H, W)``."""
        y = self.perceive(state)
        if self.n_blocks == 0:
            y = nn.functional.elu(y)
        for block in self.blocks:
            y = block(y)
        return self.out(y)


class NCA(nn.Module):
    """The VNCA decoder: seed a grid with z and apply the update network step after step.

    Doubling schedule: a ``seed_size`` x ``seed_size`` seed, M steps, then K x [double, M steps]
    (the doubling is folded into the first step of each stage). Non-doubling schedule: the seed fills a
    ``grid_size`` x ``grid_size`` grid and T steps run, T ~ U{min_steps..max_steps} drawn once per batch.

    Args:
        state_channels, hidden_channels, n_blocks, bias, out_bias: the update network (see UpdateNet).
        doubling: which schedule.
        seed_size, n_doublings, steps_per_stage: the doubling schedule (2, K, M).
        grid_size, min_steps, max_steps: the non-doubling schedule.
        p_update: probability that a cell updates at a step (1: every cell, no mask work).
        backend: 'torch' (reference), 'triton' (fused kernels) or 'auto' (see ``fastnca.run.resolve_backend``).
        precision: 'fp32', 'tf32', 'fp32-ieee' or 'bf16': the state dtype and the NCA's dots (``fastnca/run.py``).
        checkpoint: 'none', 'step', 'segments=k' or 'auto' (see kernels/schedule.py, parse_checkpoint).
        small_grid: fused backend: run the leading steps on grids of at most 8x8 cells in one launch
            (``kernels/small_grid.py``); False: one launch per step.
        wgrad: fused backend: the backward's weight-gradient design, 'per-step' (one post kernel per step),
            'batched' or 'batched-cublas' (the weight gradients of a batch of steps as long-K GEMMs,
            ``kernels/wgrad.py``); ``wgrad_batch_mib`` caps a batch's buffers (MiB).
        settings: the run's settings already resolved (``fastnca.run.resolve_run``), e.g. by the VNCA or the
            trainer; then ``backend``, ``precision``, ``checkpoint`` and ``small_grid`` are not read.

    ``settings`` (a :class:`fastnca.run.RunSettings`) is how the module computes: resolved once for the device
    its parameters are on, and again when the module is moved (``.to``, ``.cuda``); :meth:`configure` points it
    at other settings.
    """

    def __init__(
        self,
        state_channels: int = 256,
        hidden_channels: int = 256,
        n_blocks: int = 4,
        *,
        bias: bool = True,
        out_bias: bool | None = None,
        doubling: bool = True,
        seed_size: int = 2,
        n_doublings: int = 4,
        steps_per_stage: int = 8,
        grid_size: int = 32,
        min_steps: int = 32,
        max_steps: int = 64,
        p_update: float = 1.0,
        backend: str = "auto",
        precision: str = "fp32",
        checkpoint: str = "auto",
        small_grid: bool = True,
        wgrad: str = "per-step",
        wgrad_batch_mib: int = 2048,
        settings: RunSettings | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < p_update <= 1.0:
            raise ValueError(f"p_update: expected a probability in (0, 1], got {p_update!r}")
        if not 1 <= min_steps <= max_steps:
            raise ValueError(f"min_steps: expected 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
        self.update_net = UpdateNet(state_channels, hidden_channels, n_blocks, bias=bias, out_bias=out_bias)
        if settings is None:
            request = _Request(backend, precision, checkpoint, small_grid, doubling, wgrad, wgrad_batch_mib)
            settings = resolve_run(request, self.update_net.out.weight.device)
        elif settings.doubling != doubling:
            raise ValueError(f"settings: resolved for doubling={settings.doubling}, the NCA has doubling={doubling}")
        self.settings = settings
        self.state_channels = state_channels
        self.doubling = doubling
        self.seed_size = seed_size
        self.n_doublings = n_doublings
        self.steps_per_stage = steps_per_stage
        self.grid_size = grid_size
        self.min_steps = min_steps
        self.max_steps = max_steps
        self.p_update = p_update

    # ------------------------------------------------------------------------------------------ settings
    def configure(self, settings: RunSettings | None = None, **changes: Any) -> RunSettings:
        """Point the module at ``settings``, or at its settings with some requests changed (``backend``,
        ``precision``, ``checkpoint``, ``small_grid``: ``RunSettings.replace``). Returns the new settings."""
        if settings is None:
            settings = self.settings.replace(**changes)
        elif changes:
            raise ValueError("configure: give settings or changes, not both")
        self.settings = settings
        return settings

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> NCA:
        """``nn.Module``'s device / dtype moves; the settings follow the parameters to their new device."""
        out = super()._apply(fn, recurse)
        self.settings = self.settings.moved_to(self.update_net.out.weight.device)
        return out

    @property
    def state_dtype(self) -> torch.dtype:
        return self.settings.state_dtype

    @property
    def input_precision(self) -> str:
        """The fused kernels' dot precision for fp32 states ('ieee' or 'tf32')."""
        return self.settings.input_precision

    def plan(self, schedule: list[bool] | int, checkpoint: str | None = None) -> RolloutPlan:
        """The rollout plan of ``schedule`` (flags or a number of plain steps) under the checkpoint policy
        (``checkpoint`` or the settings')."""
        return self.settings.plan(schedule, checkpoint)

    # ------------------------------------------------------------------------------------------ one step
    def step_fn(self) -> Callable[..., Tensor]:
        """The step function of the settings' backend: (state, weights, mask, double) -> state."""
        if not self.settings.fused:
            return nca_step_ref
        try:
            from fastnca.kernels.nca_step import nca_step
        except ImportError as err:  # pragma: no cover - depends on the installation
            raise RuntimeError(f"backend='triton' needs Triton and fastnca.kernels.nca_step: {err}") from err
        input_precision = self.settings.input_precision
        return lambda s, w, m, d: nca_step(s, w, m, d, input_precision=input_precision)

    def step(self, state: Tensor, mask: Tensor | None = None, double: bool = False) -> Tensor:
        """One step ``z + m * f(z)`` on ``(B, |z|, H, W)``; ``double=True`` doubles the state first.

        Args:
            state: ``(B, |z|, H, W)``.
            mask: ``(B, 1, H', W')`` 0/1 per cell of the updated grid, or None (every cell updates).
            double: nearest x2 upsampling before the step (fused into the kernel on the triton backend).
        """
        return self.step_fn()(state, self.update_net.weights(), mask, double)

    # ------------------------------------------------------------------------------------------ rollouts
    def seed(self, z: Tensor, size: int | None = None) -> Tensor:
        """Every cell of a ``size`` x ``size`` grid starts as z: ``(B, |z|) -> (B, |z|, size, size)``."""
        if z.dim() != 2 or z.shape[1] != self.state_channels:
            raise ValueError(f"z: expected shape (B, {self.state_channels}), got {tuple(z.shape)}")
        if size is None:
            size = self.seed_size if self.doubling else self.grid_size
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ValueError(f"size: expected an integer >= 1 (the side of the seed grid), got {size!r}")
        state = z.to(self.state_dtype)[:, :, None, None].expand(-1, -1, size, size)
        return state.contiguous(memory_format=torch.channels_last)

    def schedule(self, num_steps: int | None = None) -> list[bool]:
        """The rollout as a list of per-step 'double first' flags."""
        if not self.doubling and num_steps is not None and (
                isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 0):
            raise ValueError(f"num_steps: expected an integer >= 0, got {num_steps!r}")
        return rollout_flags(self.doubling, steps_per_stage=self.steps_per_stage, n_doublings=self.n_doublings,
                             num_steps=None if num_steps is None else int(num_steps))

    def sample_num_steps(self, generator: torch.Generator | None = None) -> int:
        """T ~ U{min_steps..max_steps}, drawn once per batch (on the CPU generator given)."""
        return int(torch.randint(self.min_steps, self.max_steps + 1, (1,), generator=generator).item())

    def draw_num_steps(self, n: int, generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu") -> Tensor:
        """``n`` independent T ~ U{min_steps..max_steps}, ``(n,)`` int64 on the CPU.

        Drawn as one ``torch.rand`` on ``generator`` (on ``device``; the global generator when None), so that under
        torchrun each rank gets its rows of one process's draws (``fastnca.distributed.GlobalBatchDraws``).
        """
        span = self.max_steps - self.min_steps + 1
        u = torch.rand((n,), generator=generator, device=device)
        return (self.min_steps + (u * span).long().clamp_max(span - 1)).cpu()

    def run_per_row(self, z: Tensor, num_steps: Tensor, *, generator: torch.Generator | None = None,
                    checkpoint: str | None = None) -> Tensor:
        """Non-doubling rollouts where row i of ``z`` ``(B, |z|)`` grows for ``num_steps[i]`` steps: ``(B, |z|, S, S)``.

        The rows are sorted by T and grown together: one rollout up to the smallest T, then the rows still growing
        continue to the next one, and so on (one :meth:`run` per distinct T, no step computed twice). Each row's
        result is the rollout it would have on its own, up to the update masks, which are drawn per call.
        """
        if self.doubling:
            raise ValueError("num_steps: a doubling rollout has a fixed schedule; per-row step counts are for "
                             "non-doubling models")
        steps = torch.as_tensor(num_steps).to("cpu", torch.long)
        if steps.shape != (z.shape[0],) or bool((steps < 0).any()):
            raise ValueError(f"num_steps: expected {z.shape[0]} step counts >= 0 (one per row of z), got "
                             f"{num_steps!r}")
        order = torch.argsort(steps, stable=True)
        ts = steps[order].tolist()
        live = self.seed(z[order.to(z.device)])
        out = torch.empty_like(live)
        done, t = 0, 0
        while done < len(ts):
            if ts[done] > t:
                live = self.run(live, ts[done] - t, generator=generator, checkpoint=checkpoint)
                t = ts[done]
            end = done
            while end < len(ts) and ts[end] == t:
                end += 1
            out[done:end] = live[: end - done]
            live, done = live[end - done :], end
        result = torch.empty_like(out)
        result[order.to(out.device)] = out
        return result

    def run(
        self,
        state: Tensor,
        schedule: list[bool] | int,
        *,
        generator: torch.Generator | None = None,
        return_states: bool = False,
        checkpoint: str | None = None,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Apply the steps of ``schedule`` (or ``schedule`` plain steps when an int) to ``state``.

        Args:
            state: ``(B, |z|, H, W)``, any memory format (made channels-last once).
            schedule: a list of per-step doubling flags, or a number of plain steps.
            generator: draws the update masks when p_update < 1 (on the state's device).
            return_states: also return the list of states, the input first, then after every step.
            checkpoint: overrides the module's checkpoint policy.

        Returns:
            The final state ``(B, |z|, H', W')``, and the list of states when ``return_states``.
        """
        settings = self.settings
        state, plan, masks = self._prepare(state, schedule, checkpoint, generator)
        weights = self.update_net.weights()
        if settings.fused and not return_states and plan.num_steps:
            from fastnca.kernels.rollout import nca_rollout

            return nca_rollout(state, weights, plan, masks, input_precision=settings.input_precision,
                               small_grid=settings.small_grid)
        step = self.step_fn()
        states = [state] if return_states else []
        grad_on = torch.is_grad_enabled() and (state.requires_grad or any(p.requires_grad for p in self.parameters()))
        # The per-step fused autograd saves only each step's input: that is 'step' already.
        seg = plan.segment
        use_ckpt = grad_on and seg > 1 or (grad_on and seg == 1 and not settings.fused)
        for start, end in (plan.segments() if use_ckpt else [(0, plan.num_steps)]):
            flags, ms = list(plan.flags[start:end]), masks[start:end]
            if use_ckpt:
                out = torch_checkpoint(_run_steps, step, state, weights, flags, ms, return_states,
                                       use_reentrant=False)
            else:
                out = _run_steps(step, state, weights, flags, ms, return_states)
            state, inter = out
            states.extend(inter)
        return (state, states) if return_states else state

    def iter_run(
        self, state: Tensor, schedule: list[bool] | int, *, generator: torch.Generator | None = None
    ) -> Iterator[Tensor]:
        """Yield the state after every step of ``schedule``, one step at a time, as it is computed.

        The states are those of ``run(state, schedule, generator=generator, return_states=True)`` after the
        input (the same masks, drawn up front on ``generator``, and the same step function), so a caller can show
        each one before the next is computed (``fastnca demo``). Meant for inference: no activation checkpointing.

        Args:
            state: ``(B, |z|, H, W)``, any memory format.
            schedule: a list of per-step doubling flags, or a number of plain steps.
            generator: draws the update masks when p_update < 1 (on the state's device).

        Yields:
            ``(B, |z|, H', W')`` after each step, channels-last.
        """
        state, plan, masks = self._prepare(state, schedule, None, generator)
        weights = self.update_net.weights()
        step = self.step_fn()
        for double, mask in zip(plan.flags, masks):
            state = step(state, weights, mask, double)
            yield state

    def _prepare(
        self, state: Tensor, schedule: list[bool] | int, checkpoint: str | None, generator: torch.Generator | None
    ) -> tuple[Tensor, RolloutPlan, list[Tensor | None]]:
        """A rollout's channels-last input state, its plan and every step's update mask."""
        if isinstance(schedule, bool) or (isinstance(schedule, numbers.Integral) and schedule < 0):
            raise ValueError(f"schedule: expected a number of steps >= 0 or a list of doubling flags, got {schedule!r}")
        if isinstance(schedule, numbers.Integral):
            schedule = int(schedule)
        state = state.to(self.settings.state_dtype).contiguous(memory_format=torch.channels_last)
        plan = self.settings.plan(schedule, checkpoint)
        # masks are drawn up front so that recomputation in backward sees exactly the same cells
        b, _, h, w = state.shape
        masks = draw_masks(plan, b, h, w, self.p_update, generator=generator, device=state.device)
        return state, plan, masks

    def forward(
        self,
        z: Tensor,
        *,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        return_states: bool = False,
        checkpoint: str | None = None,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Grow an image-sized grid of cell states from latents ``z`` ``(B, |z|)``.

        Non-doubling: ``num_steps`` fixes T, otherwise T ~ U{min_steps..max_steps} (drawn with the CPU
        generator ``generator`` when it is a CPU generator, else torch's global one); a ``(B,)`` tensor gives each
        row its own T (:meth:`run_per_row`).
        """
        if isinstance(num_steps, Tensor):
            if return_states:
                raise ValueError("return_states: not available with a step count per row (num_steps a tensor)")
            return self.run_per_row(z, num_steps, generator=generator_on(generator, z.device), checkpoint=checkpoint)
        if not self.doubling and num_steps is None:
            cpu_gen = generator if generator is not None and generator.device.type == "cpu" else None
            num_steps = self.sample_num_steps(cpu_gen)
        return self.run(self.seed(z), self.schedule(num_steps), generator=generator_on(generator, z.device),
                        return_states=return_states, checkpoint=checkpoint)

    def extra_repr(self) -> str:
        sched = (f"doubling seed={self.seed_size} K={self.n_doublings} M={self.steps_per_stage}" if self.doubling
                 else f"non-doubling grid={self.grid_size} T=U{{{self.min_steps}..{self.max_steps}}}")
        st = self.settings
        return f"{sched}, p_update={self.p_update}, backend={st.backend}, arithmetic={st.arithmetic}"


def _run_steps(
    step: Callable[..., Tensor],
    state: Tensor,
    weights: UpdateWeights,
    flags: list[bool],
    masks: list[Tensor | None],
    keep: bool,
) -> tuple[Tensor, list[Tensor]]:
    inter: list[Tensor] = []
    for double, mask in zip(flags, masks):
        state = step(state, weights, mask, double)
        if keep:
            inter.append(state)
    return state, inter


@dataclass(frozen=True)
class _Request:
    """The NCA's constructor arguments that ``fastnca.run.resolve_run`` reads."""

    backend: str
    precision: str
    checkpoint: str
    small_grid: bool
    doubling: bool
    wgrad: str = "per-step"
    wgrad_batch_mib: int = 2048


def nca_from_config(cfg: Any, settings: RunSettings | None = None) -> NCA:
    """Build the NCA of a :class:`fastnca.config.Config`, with its settings resolved (``settings``) or resolved
    here from the config for the CPU, where the parameters are made."""
    return NCA(
        cfg.state_channels, cfg.hidden_channels, cfg.n_blocks, bias=cfg.bias, out_bias=cfg.out_bias,
        doubling=cfg.doubling, seed_size=cfg.seed_size, n_doublings=cfg.n_doublings,
        steps_per_stage=cfg.steps_per_stage, grid_size=cfg.grid_size, min_steps=cfg.min_steps,
        max_steps=cfg.max_steps, p_update=cfg.p_update, backend=cfg.backend, precision=cfg.precision,
        checkpoint=cfg.checkpoint, small_grid=cfg.small_grid,
        wgrad=cfg.wgrad, wgrad_batch_mib=cfg.wgrad_batch_mib,
        settings=settings,
    )
