"""Pictures of a trained VNCA: prior samples, growth sequences, damage recovery (paper figs. 2-4, 9-11).

Every function takes a model (``VNCA``), draws with an explicit generator and writes a PNG (or GIF) with PIL.
Images shown are the likelihood's means (as in the paper's figures, "sample averages for clarity") unless
``mode="sample"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.utils import make_grid

__all__ = [
    "save_grid",
    "labeled_rows",
    "sample_grid",
    "growth_sequence",
    "growth_figure",
    "growth_gif",
    "reconstruction_figure",
    "damage_cells",
    "damage_rollouts",
    "damage_figure",
]

_SEPARATOR = (220, 60, 60)  # the column gap that marks a doubling in growth pictures
_BACKGROUND = (255, 255, 255)


def _to_uint8_hwc(x: Tensor) -> Tensor:
    """``(C, H, W)`` in [0, 1] -> ``(H, W, 3)`` uint8 on the CPU."""
    x = x.detach().float().cpu().clamp(0, 1)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return (x * 255 + 0.5).to(torch.uint8).permute(1, 2, 0)


def _pil(x: Tensor) -> Image.Image:
    return Image.fromarray(_to_uint8_hwc(x).numpy())


def save_grid(images: Tensor, path: str | os.PathLike[str], *, nrow: int = 8, scale: int = 1) -> Path:
    """Save ``(N, C, H, W)`` images in [0, 1] as one grid PNG (2 px white padding)."""
    if scale > 1:
        images = F.interpolate(images.float(), scale_factor=scale, mode="nearest")
    grid = make_grid(images.detach().float().cpu().clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _pil(grid).save(path)
    return path


def _display(model: Any, state: Tensor, size: int) -> Tensor:
    """The mean image of a state of any grid size, nearest-upsampled to ``size`` and mapped to [0, 1]."""
    img = model.to_display(model.mean_image(state))
    if img.shape[-1] != size:
        img = F.interpolate(img.float(), size=(size, size), mode="nearest")
    return img


def labeled_rows(rows: list[tuple[str, Tensor]], path: str | os.PathLike[str], *, scale: int = 1, gap: int = 2) -> Path:
    """One labelled row per ``(label, (N, C, H, W) images in [0, 1])``; all rows share N, H and W."""
    draw_font = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox
    label_w = max(draw_font((0, 0), label)[2] for label, _ in rows) + 8
    n = max(r.shape[0] for _, r in rows)
    h, w = rows[0][1].shape[-2] * scale, rows[0][1].shape[-1] * scale
    canvas = Image.new("RGB", (label_w + n * (w + gap), len(rows) * (h + gap) + gap), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, (label, imgs) in enumerate(rows):
        y = gap + i * (h + gap)
        draw.text((4, y + h // 2 - 5), label, fill=(0, 0, 0))
        if scale > 1:
            imgs = F.interpolate(imgs.float(), scale_factor=scale, mode="nearest")
        for j in range(imgs.shape[0]):
            canvas.paste(_pil(imgs[j]), (label_w + j * (w + gap), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


@torch.no_grad()
def sample_grid(
    model: Any,
    path: str | os.PathLike[str],
    *,
    n: int = 64,
    generator: torch.Generator | None = None,
    mode: str = "mean",
    nrow: int | None = None,
) -> Path:
    """``n`` prior samples as a grid."""
    images = model.sample(n, generator=generator, mode=mode)
    return save_grid(model.to_display(images), path, nrow=nrow or max(1, int(round(n**0.5))))


@torch.no_grad()
def reconstruction_figure(
    model: Any, images: Tensor, path: str | os.PathLike[str], *, generator: torch.Generator | None = None
) -> Path:
    """Test images (top row) and their reconstructions from one posterior sample (likelihood means, below).

    Args:
        images: ``(n, C, H, W)`` uint8 test images.
    """
    from fastnca.data import to_model

    device = next(model.parameters()).device
    x = to_model(images, model.config.likelihood, device=device)
    mu, log_sigma = model.encode(x)
    z = model.sample_posterior(mu, log_sigma, generator)
    state = model.decode(z, generator=generator)
    side = x.shape[-1]
    rows = [("data", model.to_display(x)), ("reconstruction", model.to_display(model.mean_image(state)))]
    return labeled_rows(rows, path, scale=max(1, 64 // side))


def _grow_z(model: Any, n: int, generator: torch.Generator | None) -> Tensor:
    device = next(model.parameters()).device
    return torch.randn((n, model.latent_size), generator=generator, device=device)


def _mask_gen(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    return generator if generator is not None and generator.device == device else None


@torch.no_grad()
def growth_sequence(
    model: Any, n: int = 8, *, generator: torch.Generator | None = None, num_steps: int | None = None
) -> tuple[list[Tensor], list[bool]]:
    """Every state of ``n`` prior rollouts as display images at the final size.

    Returns:
        ``(frames, doubled)``: one ``(n, C, S, S)`` [0, 1] tensor per state (the seed first), and for each frame
        whether the step that produced it began with a doubling.
    """
    nca = model.nca
    z = _grow_z(model, n, generator)
    if not nca.doubling and num_steps is None:
        num_steps = nca.max_steps
    schedule = nca.schedule(num_steps)
    final, states = nca.run(nca.seed(z), schedule, generator=_mask_gen(generator, z.device), return_states=True)
    size = final.shape[-1]
    frames = [_display(model, s, size) for s in states]
    return frames, [False] + list(schedule)


def growth_figure(
    model: Any,
    path: str | os.PathLike[str],
    *,
    n: int = 8,
    generator: torch.Generator | None = None,
    num_steps: int | None = None,
    scale: int = 1,
) -> Path:
    """Rows: ``n`` samples; columns: every step from the seed on. A red gap marks each doubling."""
    frames, doubled = growth_sequence(model, n, generator=generator, num_steps=num_steps)
    size = frames[0].shape[-1] * scale
    gap, sep = 1, 3
    width = sum(size + (sep if d else gap) for d in doubled) + gap
    canvas = Image.new("RGB", (width, n * (size + gap) + gap), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    x = gap
    for frame, d in zip(frames, doubled):
        if d:
            draw.rectangle([x - gap, 0, x + sep - gap - 1, canvas.height], fill=_SEPARATOR)
            x += sep - gap
        imgs = F.interpolate(frame, scale_factor=scale, mode="nearest") if scale > 1 else frame
        for i in range(n):
            canvas.paste(_pil(imgs[i]), (x, gap + i * (size + gap)))
        x += size + gap
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def growth_gif(
    model: Any,
    path: str | os.PathLike[str],
    *,
    n: int = 16,
    generator: torch.Generator | None = None,
    num_steps: int | None = None,
    frame_ms: int = 120,
    scale: int = 2,
) -> Path:
    """An animated GIF of ``n`` samples growing, one frame per step (the last frame held longer)."""
    frames, _ = growth_sequence(model, n, generator=generator, num_steps=num_steps)
    nrow = max(1, int(round(n**0.5)))
    pics = []
    for frame in frames:
        if scale > 1:
            frame = F.interpolate(frame, scale_factor=scale, mode="nearest")
        pics.append(_pil(make_grid(frame.cpu(), nrow=nrow, padding=2, pad_value=1.0)))
    durations = [frame_ms] * (len(pics) - 1) + [frame_ms * 10]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pics[0].save(path, save_all=True, append_images=pics[1:], duration=durations, loop=0)
    return path


def damage_cells(
    state: Tensor, kind: str = "half", *, size: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Zero every channel of the right half of the grid (``kind='half'``) or of a random square per example.

    Args:
        state: ``(n, |z|, H, W)``.
        kind: 'half' or 'square'.
        size: the square's side (default: half the grid).
        generator: a CPU generator for the squares' positions.
    """
    if kind == "half":
        out = state.clone()
        out[..., state.shape[-1] // 2 :] = 0
        return out
    if kind == "square":
        from fastnca.train import damage

        return damage(state, size or max(1, state.shape[-1] // 2), generator=generator)
    raise ValueError(f"kind: expected 'half' or 'square', got {kind!r}")


@torch.no_grad()
def damage_rollouts(
    model: Any,
    n: int = 8,
    *,
    kind: str = "half",
    size: int | None = None,
    generator: torch.Generator | None = None,
    cpu_generator: torch.Generator | None = None,
) -> list[tuple[str, Tensor]]:
    """The rows of a damage-recovery figure: ``(label, (n, C, S, S) [0, 1] images)``.

    Non-doubling (paper figs. 9, 10): samples after max_steps steps, the same damaged, recovered after
    max_steps more steps. Doubling (fig. 11): the undamaged samples, then for each stage of growth the state
    damaged at the end of that stage (upsampled) and the final image after the rest of the rollout (M more
    steps for damage at the last stage).
    """
    nca = model.nca
    z = _grow_z(model, n, generator)
    mask_gen = _mask_gen(generator, z.device)
    if not nca.doubling:
        t = nca.max_steps
        grown = nca.run(nca.seed(z), t, generator=mask_gen)
        size_px = grown.shape[-1]
        damaged = damage_cells(grown, kind, size=size, generator=cpu_generator)
        recovered = nca.run(damaged, t, generator=mask_gen)
        return [
            (f"samples ({t} steps)", _display(model, grown, size_px)),
            (f"damaged ({kind})", _display(model, damaged, size_px)),
            (f"recovered (+{t} steps)", _display(model, recovered, size_px)),
        ]
    schedule = nca.schedule()
    m = nca.steps_per_stage
    final = nca.run(nca.seed(z), schedule, generator=mask_gen)
    size_px = final.shape[-1]
    rows = [("samples", _display(model, final, size_px))]
    state = nca.seed(z)
    for stage in range(nca.n_doublings + 1):
        state = nca.run(state, schedule[stage * m : (stage + 1) * m], generator=mask_gen)
        side = state.shape[-1]
        damaged = damage_cells(
            state, kind, size=None if size is None else max(1, size * side // size_px), generator=cpu_generator
        )
        rest = schedule[(stage + 1) * m :] or [False] * m
        recovered = nca.run(damaged, rest, generator=mask_gen)
        rows.append((f"damaged at {side}x{side}", _display(model, damaged, size_px)))
        rows.append((f"recovered (+{len(rest)} steps)", _display(model, recovered, size_px)))
    return rows


def damage_figure(
    model: Any,
    path: str | os.PathLike[str],
    *,
    n: int = 8,
    kind: str = "half",
    size: int | None = None,
    generator: torch.Generator | None = None,
    cpu_generator: torch.Generator | None = None,
    scale: int | None = None,
) -> Path:
    """Write a labelled damage-recovery figure (see :func:`damage_rollouts`)."""
    rows = damage_rollouts(model, n, kind=kind, size=size, generator=generator, cpu_generator=cpu_generator)
    side = rows[0][1].shape[-1]
    return labeled_rows(rows, path, scale=scale or max(1, 64 // side))
