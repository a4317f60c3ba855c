"""Pictures of a trained VNCA: the paper's figures (samples, reconstructions, growth, latent interpolation,
t-SNE of test latents, damage recovery and regrowth; figs. 1, 3-11, 13) from any checkpoint.

Every function takes a model (``VNCA``), draws with an explicit generator and writes a PNG (or GIF) with PIL.
Images shown are the likelihood's means (as in the paper's figures, "sample averages for clarity") unless
``mode="sample"``. :func:`make_figures` draws every figure that applies to a run and writes a caption file
(``NAME.txt``: what was run, the checkpoint's step, the rollout, the seed) beside each.

A zeroed (damaged) cell decodes to the likelihood's mean for an all-zero state: p = 0.5 for a Bernoulli model
and mid-grey for a logistic mixture, so damage shows as flat grey; the figures say so in a footer.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.utils import make_grid

from fastnca.pool import damage
from fastnca.rng import generator_on

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
    "regrowth_frames",
    "regrowth_figure",
    "regrowth_gif",
    "interpolate_latents",
    "interpolation_figure",
    "mnist_test_labels",
    "tsne_figure",
    "image_from_file",
    "mask_from_file",
    "inpaint",
    "encode_means",
    "DAMAGE_NOTE",
    "untrained_damage_note",
    "FIGURES",
    "make_figures",
]

_SEPARATOR = (220, 60, 60)  # the column gap that marks a doubling in growth pictures
_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)
DAMAGE_NOTE = "flat grey = zeroed (damaged) cells: an all-zero state decodes to p = 0.5 / mid-grey"


def untrained_damage_note(cfg: Any) -> str | None:
    """A caption line for damage figures of a model trained without damage, else None: such a model has never
    had to regrow (the paper's regrowth comes from pool and damage training, its section 3.3)."""
    if cfg.pool_size > 0 and cfg.damage_size > 0:
        return None
    why = "pool_size=0" if cfg.pool_size <= 0 else "damage_size=0"
    return (f"This model was trained without damage ({why}), so it is not expected to regrow the damaged cells: "
            "regrowth is learnt by pool and damage training (paper sec. 3.3; e.g. the mnist-nondoubling preset).")


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


def _text_width(text: str) -> int:
    return int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text)[2])


FOOTER_H = 14  # pixels of the one-line footer under a figure that has one


def labeled_rows(
    rows: list[tuple[str, Tensor]],
    path: str | os.PathLike[str],
    *,
    scale: int = 1,
    gap: int = 2,
    footer: str | None = None,
) -> Path:
    """One labelled row per ``(label, (N, C, H, W) images in [0, 1])``; all rows share N, H and W.

    ``footer``: a one-line note under the rows (``FOOTER_H`` pixels), e.g. what grey cells mean.
    """
    label_w = max(_text_width(label) for label, _ in rows) + 8
    n = max(r.shape[0] for _, r in rows)
    h, w = rows[0][1].shape[-2] * scale, rows[0][1].shape[-1] * scale
    width = label_w + n * (w + gap)
    if footer:
        width = max(width, _text_width(footer) + 8)
    height = len(rows) * (h + gap) + gap + (FOOTER_H if footer else 0)
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if footer:
        draw.text((4, height - FOOTER_H + 1), footer, fill=_TEXT)
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
    return generator_on(generator, device)


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


def _grid_sides(model: Any, doubled: list[bool]) -> list[int]:
    """The cell grid's side at every frame of a growth sequence (seed first)."""
    nca = model.nca
    side = nca.seed_size if nca.doubling else nca.grid_size
    sides = []
    for d in doubled:
        side = side * 2 if d else side
        sides.append(side)
    return sides


HEADER_H = 24  # two text lines over a growth picture: the step number, and the grid size where it changes


def growth_figure(
    model: Any,
    path: str | os.PathLike[str],
    *,
    n: int = 8,
    generator: torch.Generator | None = None,
    num_steps: int | None = None,
    scale: int = 1,
) -> Path:
    """Rows: ``n`` samples; columns: every step from the seed on. A red gap marks each doubling.

    A header over the columns gives the step number (0 = the seed) and, over the seed and the first step of
    each stage, the cell grid's size (``2x2``, ``4x4``, ...).
    """
    frames, doubled = growth_sequence(model, n, generator=generator, num_steps=num_steps)
    sides = _grid_sides(model, doubled)
    size = frames[0].shape[-1] * scale
    gap, sep = 1, 3
    width = sum(size + (sep if d else gap) for d in doubled) + gap
    canvas = Image.new("RGB", (width, HEADER_H + n * (size + gap) + gap), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    x = gap
    for t, (frame, d) in enumerate(zip(frames, doubled)):
        if d:
            draw.rectangle([x - gap, 0, x + sep - gap - 1, canvas.height], fill=_SEPARATOR)
            x += sep - gap
        draw.text((x + 1, 1), str(t), fill=_TEXT)
        if t == 0 or d:
            draw.text((x + 1, 12), f"{sides[t]}x{sides[t]}", fill=_TEXT)
        imgs = F.interpolate(frame, scale_factor=scale, mode="nearest") if scale > 1 else frame
        for i in range(n):
            canvas.paste(_pil(imgs[i]), (x, HEADER_H + gap + i * (size + gap)))
        x += size + gap
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


GIF_HEADER_H = 14  # one text line over every GIF frame


def _gif_frame(images: Tensor, nrow: int, title: str) -> Image.Image:
    """A grid of ``(n, C, S, S)`` [0, 1] images under a one-line title."""
    grid = _pil(make_grid(images.cpu(), nrow=nrow, padding=2, pad_value=1.0))
    frame = Image.new("RGB", (max(grid.width, _text_width(title) + 8), grid.height + GIF_HEADER_H), _BACKGROUND)
    frame.paste(grid, (0, GIF_HEADER_H))
    ImageDraw.Draw(frame).text((3, 1), title, fill=_TEXT)
    return frame


def _save_gif(pics: list[Image.Image], path: str | os.PathLike[str], frame_ms: int, hold: int | None = None) -> Path:
    """Frames ``frame_ms`` apart; the last (and frame ``hold``, when given) shown 10 times as long."""
    durations = [frame_ms] * (len(pics) - 1) + [frame_ms * 10]
    if hold is not None:
        durations[hold] = frame_ms * 10
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pics[0].save(path, save_all=True, append_images=pics[1:], duration=durations, loop=0)
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
    """An animated GIF of ``n`` samples growing, one frame per step (the last frame held longer), each frame
    titled with its step number and the cell grid's size."""
    frames, doubled = growth_sequence(model, n, generator=generator, num_steps=num_steps)
    sides = _grid_sides(model, doubled)
    nrow = max(1, int(round(n**0.5)))
    pics = []
    for t, frame in enumerate(frames):
        if scale > 1:
            frame = F.interpolate(frame, scale_factor=scale, mode="nearest")
        pics.append(_gif_frame(frame, nrow, f"step {t}, grid {sides[t]}x{sides[t]}"))
    return _save_gif(pics, path, frame_ms)


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
    return labeled_rows(rows, path, scale=scale or max(1, 64 // side), footer=DAMAGE_NOTE)


# ---------------------------------------------------------------------------------------------- regrowth
def _recover_steps(model: Any, steps: int | None) -> int:
    """Regrowth steps after damage: non-doubling max_steps (figs. 9, 10); doubling M, as for damage at the
    last stage in fig. 11 (a doubling model was never trained to run longer)."""
    if steps is not None:
        return steps
    nca = model.nca
    return nca.max_steps if not nca.doubling else nca.steps_per_stage


def _grown_state(model: Any, z: Tensor, mask_gen: torch.Generator | None) -> tuple[Tensor, int]:
    """The full rollout's final state from ``z`` and its number of steps."""
    nca = model.nca
    schedule = nca.schedule(None if nca.doubling else nca.max_steps)
    return nca.run(nca.seed(z), schedule, generator=mask_gen), len(schedule)


@torch.no_grad()
def _regrow(
    model: Any, state: Tensor, keep: Tensor, steps: int, mask_gen: torch.Generator | None
) -> tuple[list[Tensor], list[str]]:
    """Frames of damage and regrowth: the grown state, the damaged one (``state * keep``), then every step."""
    size = state.shape[-1]
    damaged = state * keep.to(state.dtype)
    _, states = model.nca.run(damaged, steps, generator=mask_gen, return_states=True)
    frames = [_display(model, state, size)] + [_display(model, s, size) for s in states]
    titles = ["grown", "damaged"] + [f"+{t}" for t in range(1, steps + 1)]
    return frames, titles


def _damage_keep(state: Tensor, kind: str, size: int | None, cpu_generator: torch.Generator | None) -> Tensor:
    """A ``(n, 1, H, W)`` 0/1 mask: 0 on the cells that :func:`damage_cells` zeroes."""
    ones = torch.ones(state.shape[0], 1, *state.shape[-2:], device=state.device)
    return damage_cells(ones, kind, size=size, generator=cpu_generator)


@torch.no_grad()
def regrowth_frames(
    model: Any,
    n: int = 8,
    *,
    kind: str = "half",
    size: int | None = None,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    cpu_generator: torch.Generator | None = None,
) -> tuple[list[Tensor], list[str]]:
    """``n`` prior samples grown in full, damaged (``kind`` as in :func:`damage_cells`), then every step of
    regrowth (paper fig. 1 right, fig. 9 right, fig. 16).

    Returns:
        ``(frames, titles)``: ``(n, C, S, S)`` [0, 1] images: grown, damaged, then +1 ... +steps.
    """
    z = _grow_z(model, n, generator)
    mask_gen = _mask_gen(generator, z.device)
    grown, _ = _grown_state(model, z, mask_gen)
    keep = _damage_keep(grown, kind, size, cpu_generator)
    return _regrow(model, grown, keep, _recover_steps(model, steps), mask_gen)


def _pick_columns(n_frames: int, columns: int) -> list[int]:
    """Frame indices for a regrowth grid: grown, damaged, then ``columns - 2`` steps evenly spaced to the last."""
    rest = n_frames - 2
    k = max(1, min(columns - 2, rest))
    return [0, 1] + sorted({2 + round(i * (rest - 1) / max(1, k - 1)) for i in range(k)})


def _frame_grid(
    frames: list[Tensor], titles: list[str], path: str | os.PathLike[str], *, scale: int, footer: str | None
) -> Path:
    """Rows: the images of each frame side by side; columns: the frames, titled in a header."""
    n = frames[0].shape[0]
    size = frames[0].shape[-1] * scale
    gap = 2
    width = len(frames) * (size + gap) + gap
    if footer:
        width = max(width, _text_width(footer) + 8)
    height = HEADER_H + n * (size + gap) + gap + (FOOTER_H if footer else 0)
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for j, (frame, title) in enumerate(zip(frames, titles)):
        x = gap + j * (size + gap)
        draw.text((x + 1, 6), title, fill=_TEXT)
        imgs = F.interpolate(frame.float(), scale_factor=scale, mode="nearest") if scale > 1 else frame
        for i in range(n):
            canvas.paste(_pil(imgs[i]), (x, HEADER_H + gap + i * (size + gap)))
    if footer:
        draw.text((4, height - FOOTER_H + 1), footer, fill=_TEXT)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def regrowth_figure(
    model: Any,
    path: str | os.PathLike[str],
    *,
    n: int = 8,
    kind: str = "half",
    size: int | None = None,
    steps: int | None = None,
    columns: int = 10,
    generator: torch.Generator | None = None,
    cpu_generator: torch.Generator | None = None,
    scale: int | None = None,
) -> Path:
    """Damage and regrowth as a grid: one row per sample; columns grown, damaged, then ``columns - 2``
    regrowth steps evenly spaced up to the last (titled ``+t``); a footer says what grey cells are."""
    frames, titles = regrowth_frames(
        model, n, kind=kind, size=size, steps=steps, generator=generator, cpu_generator=cpu_generator
    )
    cols = _pick_columns(len(frames), columns)
    side = frames[0].shape[-1]
    return _frame_grid(
        [frames[c] for c in cols],
        [titles[c] for c in cols],
        path,
        scale=scale or max(1, 64 // side),
        footer=DAMAGE_NOTE,
    )


def regrowth_gif(
    model: Any,
    path: str | os.PathLike[str],
    *,
    n: int = 16,
    kind: str = "half",
    size: int | None = None,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    cpu_generator: torch.Generator | None = None,
    frame_ms: int = 120,
    scale: int = 2,
) -> Path:
    """Damage and regrowth as an animation: the grown samples, the damaged ones (held longer), every step."""
    frames, titles = regrowth_frames(
        model, n, kind=kind, size=size, steps=steps, generator=generator, cpu_generator=cpu_generator
    )
    nrow = max(1, int(round(n**0.5)))
    words = {"grown": "grown samples", "damaged": f"damaged ({kind}): grey = zeroed cells"}
    pics = []
    for frame, title in zip(frames, titles):
        frame = F.interpolate(frame.float(), scale_factor=scale, mode="nearest") if scale > 1 else frame
        pics.append(_gif_frame(frame, nrow, words.get(title, f"regrowth {title} steps")))
    return _save_gif(pics, path, frame_ms, hold=1)  # the damaged frame held long enough to be seen


# ---------------------------------------------------------------------------------------------- latent space
def interpolate_latents(a: Tensor, b: Tensor, steps: int, method: str = "linear") -> Tensor:
    """``steps`` points from ``a`` to ``b`` (both ``(d,)``), ends included: ``(steps, d)``.

    ``linear``: (1 - t) a + t b. ``slerp``: along the great circle, sin((1-t) w)/sin w a + sin(t w)/sin w b with
    w the angle between a and b (linear when they are nearly parallel).
    """
    if steps < 2:
        raise ValueError(f"steps: expected an integer >= 2, got {steps}")
    t = torch.linspace(0, 1, steps, device=a.device, dtype=a.dtype)[:, None]
    if method == "linear":
        return (1 - t) * a + t * b
    if method != "slerp":
        raise ValueError(f"method: expected 'linear' or 'slerp', got {method!r}")
    cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1, 1))
    if omega.abs() < 1e-4:
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def _decode_means(model: Any, z: Tensor, generator: torch.Generator | None) -> Tensor:
    """Display images of the likelihood means decoded from ``z`` (non-doubling: max_steps steps)."""
    final, _ = _grown_state(model, z, _mask_gen(generator, z.device))
    return model.to_display(model.mean_image(final))


@torch.no_grad()
def interpolation_figure(
    model: Any,
    images: Tensor,
    path: str | os.PathLike[str],
    *,
    steps: int = 8,
    method: str = "linear",
    generator: torch.Generator | None = None,
) -> Path:
    """Interpolations between the posterior means of pairs of test images (paper fig. 5a).

    Args:
        images: ``(2 P, C, H, W)`` uint8: pairs (0, 1), (2, 3), ... Each row: image a, ``steps`` decoded points
            from mu(a) to mu(b) (ends included), image b.
    """
    from fastnca.data import to_model

    if images.shape[0] < 2 or images.shape[0] % 2:
        raise ValueError(f"images: expected an even number >= 2 of images (pairs), got {images.shape[0]}")
    device = next(model.parameters()).device
    x = to_model(images, model.config.likelihood, device=device)
    mu, _ = model.encode(x)
    shown = model.to_display(x)
    rows = []
    for p in range(images.shape[0] // 2):
        z = interpolate_latents(mu[2 * p], mu[2 * p + 1], steps, method)
        imgs = _decode_means(model, z, generator)
        rows.append((f"{method} {p + 1}", torch.cat([shown[2 * p : 2 * p + 1], imgs, shown[2 * p + 1 : 2 * p + 2]])))
    side = x.shape[-1]
    return labeled_rows(rows, path, scale=max(1, 64 // side))


# Binarized MNIST's test split is the MNIST test set in class order (0s first), with MNIST's test class counts.
# The .npz/.amat files hold no labels; these counts give each test image's class from its position. Checked on
# this project's copy: the class means of the ten segments are the digits 0-9 and a nearest-class-mean changepoint
# search puts every boundary within 5 images of these positions (tests/model/test_figures.py repeats a check).
MNIST_TEST_CLASS_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)


def mnist_test_labels(n_images: int) -> Tensor:
    """The class of each binarized MNIST test image, inferred from its position (see MNIST_TEST_CLASS_COUNTS).

    Raises:
        ValueError: the split does not have the 10,000 images in their original order.
    """
    if n_images != sum(MNIST_TEST_CLASS_COUNTS):
        raise ValueError(
            f"labels: inferred only for the full 10,000-image binarized MNIST test split in file order, "
            f"got {n_images} images"
        )
    return torch.repeat_interleave(torch.arange(10), torch.tensor(MNIST_TEST_CLASS_COUNTS))


# tab10, the usual ten-class palette
_PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip


@torch.no_grad()
def encode_means(model: Any, images: Tensor, *, batch_size: int = 256) -> Tensor:
    """Posterior means ``(N, |z|)`` of uint8 images ``(N, C, H, W)``, in batches, on the CPU."""
    from fastnca.data import to_model

    device = next(model.parameters()).device
    out = []
    for i in range(0, images.shape[0], batch_size):
        mu, _ = model.encode(to_model(images[i : i + batch_size], model.config.likelihood, device=device))
        out.append(mu.float().cpu())
    return torch.cat(out)


def tsne_figure(
    model: Any,
    images: Tensor,
    labels: Tensor,
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    perplexity: float = 30.0,
    size: int = 640,
    title: str = "",
) -> Path:
    """t-SNE of the posterior means of ``images``, one dot per image coloured by its label (paper fig. 5b).

    Needs scikit-learn (``pip install 'fastnca[figures]'``). ``size``: the square plot's side in pixels; a
    legend column of 60 pixels is added on the right.
    """
    try:
        from sklearn.manifold import TSNE
    except ImportError as err:
        raise ImportError(
            "the t-SNE figure needs scikit-learn: pip install scikit-learn (or pip install 'fastnca[figures]')"
        ) from err
    mu = encode_means(model, images).double().numpy()
    n = mu.shape[0]
    emb = TSNE(n_components=2, perplexity=min(perplexity, (n - 1) / 3), init="pca", random_state=seed).fit_transform(mu)
    emb = torch.from_numpy(emb)
    lo, hi = emb.min(0).values, emb.max(0).values
    margin = 12
    xy = ((emb - lo) / (hi - lo).clamp_min(1e-12) * (size - 2 * margin) + margin).round().int().tolist()
    legend_w = 60
    canvas = Image.new("RGB", (size + legend_w, size), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for (px, py), lab in zip(xy, labels.tolist()):
        draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=_PALETTE[int(lab) % 10])
    for c in sorted(set(labels.tolist())):
        y = 20 + 16 * int(c)
        draw.rectangle([size + 8, y, size + 18, y + 10], fill=_PALETTE[int(c) % 10])
        draw.text((size + 24, y), str(int(c)), fill=_TEXT)
    if title:
        draw.text((4, 2), title, fill=_TEXT)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# ---------------------------------------------------------------------------------------------- user images
def image_from_file(path: str | os.PathLike[str], config: Any, *, invert: bool = False) -> Tensor:
    """A user's image as one model input, ``(1, C, S, S)`` uint8 in the model's data format.

    Read by :func:`fastnca.data.read_image` (at most ``FASTNCA_MAX_IMAGE_PIXELS`` pixels; 16-bit and float images
    scaled to 8 bits). RGBA is composited onto white and the image resized to the model's ``image_size``
    (bilinear). Bernoulli models: the grey level thresholded at 0.5, white (1) strokes on black as in MNIST;
    ``invert`` for dark strokes on a light background. RGB models: 0..255.
    """
    from fastnca.data import read_image

    s = config.image_size
    rgba = read_image(path, "--image")  # bounded in pixels; 16-bit and float images scaled to 8 bits
    rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    rgb = rgb.resize((s, s), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(rgb, dtype="uint8").copy()).permute(2, 0, 1)  # (3, S, S)
    if config.image_channels == 1:
        grey = x.float().mean(0, keepdim=True) / 255
        if invert:
            grey = 1 - grey
        x = (grey >= 0.5).to(torch.uint8)
    return x[None]


def mask_from_file(path: str | os.PathLike[str], side: int) -> Tensor:
    """A damage mask from a PNG: ``(side, side)`` bool, True (cells to zero) where the mask is light (> 50%
    grey), resized to the cell grid with nearest-neighbour sampling."""
    from fastnca.data import read_image

    grey = read_image(path, "--mask").convert("L").resize((side, side), Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(grey, dtype="uint8").copy()) > 127


@torch.no_grad()
def inpaint(
    model: Any,
    image: Tensor,
    out_dir: str | os.PathLike[str],
    *,
    mask: Tensor | None = None,
    kind: str = "half",
    size: int | None = None,
    steps: int | None = None,
    columns: int = 10,
    generator: torch.Generator | None = None,
    cpu_generator: torch.Generator | None = None,
) -> list[Path]:
    """Encode a user's image (posterior mean), grow it, zero cells (``mask`` True, else ``kind``), regrow.

    Writes ``inpaint.png`` (the image, its reconstruction, the damaged state, regrowth steps) and
    ``inpaint.gif`` (every step) to ``out_dir``.

    Args:
        image: ``(1, C, S, S)`` uint8 (see :func:`image_from_file`).
        mask: ``(S', S')`` bool over the final cell grid, True where cells are zeroed.
    """
    from fastnca.data import to_model

    device = next(model.parameters()).device
    x = to_model(image, model.config.likelihood, device=device)
    mu, _ = model.encode(x)
    mask_gen = _mask_gen(generator, device)
    grown, _ = _grown_state(model, mu, mask_gen)
    side = grown.shape[-1]
    if mask is not None:
        if mask.shape != (side, side):
            raise ValueError(f"mask: expected shape ({side}, {side}) (the cell grid), got {tuple(mask.shape)}")
        keep = (~mask.to(device))[None, None].float()
    else:
        keep = _damage_keep(grown, kind, size, cpu_generator)
    frames, titles = _regrow(model, grown, keep, _recover_steps(model, steps), mask_gen)
    shown = model.to_display(x)
    if shown.shape[-1] != side:
        shown = F.interpolate(shown, size=(side, side), mode="nearest")
    cols = _pick_columns(len(frames), columns)
    out = Path(out_dir)
    written = [
        _frame_grid(
            [shown] + [frames[c] for c in cols],
            ["image"] + ["reconstr." if c == 0 else titles[c] for c in cols],
            out / "inpaint.png",
            scale=max(1, 128 // side),
            footer=DAMAGE_NOTE,
        )
    ]
    words = {"grown": "reconstruction", "damaged": "damaged: grey = zeroed cells"}
    pics = []
    for frame, title in zip(frames, titles):
        big = F.interpolate(frame.float(), scale_factor=max(1, 128 // side), mode="nearest")
        pics.append(_gif_frame(big, 1, words.get(title, f"regrowth {title}")))
    written.append(_save_gif(pics, out / "inpaint.gif", 120, hold=1))
    return written


# ---------------------------------------------------------------------------------------------- every figure of a run
class _Skip(Exception):
    """A figure that does not apply to this run (the message says why)."""


@dataclass(frozen=True)
class Figure:
    """One figure of :func:`make_figures`: what it shows (``fastnca figures --list``) and the function that draws it
    into a run's figure folder, ``draw(ctx) -> files written`` (raising ``_Skip`` where it does not apply)."""

    name: str
    description: str
    draw: Callable[[_Run], list[Path]]


FIGURES: dict[str, Figure] = {}  # name -> Figure, in the order make_figures draws them


def _figure(name: str, description: str) -> Callable[[Callable[[_Run], list[Path]]], Callable[[_Run], list[Path]]]:
    """Register a figure's drawing function under ``name``."""
    def register(draw: Callable[[_Run], list[Path]]) -> Callable[[_Run], list[Path]]:
        FIGURES[name] = Figure(name, description, draw)
        return draw

    return register


def _rollout_text(cfg: Any) -> str:
    if cfg.doubling:
        final = cfg.seed_size * 2**cfg.n_doublings
        return (
            f"doubling rollout: {cfg.seed_size}x{cfg.seed_size} seed, K={cfg.n_doublings} doublings, "
            f"M={cfg.steps_per_stage} steps per stage ({cfg.steps_per_stage * (cfg.n_doublings + 1)} steps, "
            f"{final}x{final} cells)"
        )
    return (
        f"non-doubling rollout on {cfg.grid_size}x{cfg.grid_size} cells: T={cfg.max_steps} steps for figures "
        f"(trained with T ~ U{{{cfg.min_steps}..{cfg.max_steps}}}, p_update={cfg.p_update})"
    )


@dataclass
class _Run:
    """What every figure of one run draws from: the model, its checkpoint, the seed, the output folder."""

    model: Any
    checkpoint: str | os.PathLike[str]
    step: int
    out: Path
    seed: int
    data_dir: str | os.PathLike[str] | None
    tsne_images: int
    _test: Tensor | None = None

    @property
    def cfg(self) -> Any:
        return self.model.config

    def test_images(self) -> Tensor:
        """The test split, loaded once (DataError where the run's data cannot be found)."""
        from fastnca.data import load_for_config

        if self._test is None:
            self._test = load_for_config(self.cfg, self.data_dir).test
        return self._test

    def seed_of(self, name: str) -> int:
        """Each figure its own stream, so that ``--only`` draws the same pictures as a run of all of them."""
        return self.seed * 1000 + list(FIGURES).index(name)

    def gen(self, name: str) -> torch.Generator:
        return torch.Generator(device=next(self.model.parameters()).device).manual_seed(self.seed_of(name))

    def cpu_gen(self, name: str) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed_of(name))

    def caption(self, stem: str, what: str, extra: str = "") -> Path:
        """``OUT/stem.txt``: what the picture shows, the checkpoint, the rollout, the seed."""
        cfg = self.cfg
        text = (
            f"{what}\n"
            f"checkpoint: {self.checkpoint} (step {self.step}; dataset {cfg.dataset}, {cfg.image_size}x"
            f"{cfg.image_size}, |z|={cfg.state_channels}, h={cfg.hidden_channels})\n"
            f"{_rollout_text(cfg)}\n"
            f"seed {self.seed} (generator seed {self.seed_of(stem.split('_')[0])}); images are the "
            f'likelihood\'s means ("sample averages for clarity")\n' + (extra + "\n" if extra else "")
        )
        path = self.out / f"{stem}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    @property
    def damage_extra(self) -> str:
        return DAMAGE_NOTE + "." + (f"\n{note}" if (note := untrained_damage_note(self.cfg)) else "")


@_figure("samples", "prior samples (paper figs. 3, 6, 7, 13 right)")
def _samples(run: _Run) -> list[Path]:
    return [sample_grid(run.model, run.out / "samples.png", n=64, generator=run.gen("samples")),
            run.caption("samples", "64 prior samples z ~ N(0, I), 8x8 grid.")]


@_figure("reconstructions", "test images and their reconstructions (figs. 3, 6, 7, 13 left)")
def _reconstructions(run: _Run) -> list[Path]:
    test = run.test_images()
    shown = torch.randperm(test.shape[0], generator=run.cpu_gen("reconstructions"))[:16]
    return [reconstruction_figure(run.model, test[shown], run.out / "reconstructions.png",
                                  generator=run.gen("reconstructions")),
            run.caption("reconstructions",
                        "16 random test images (top) and their reconstructions from one posterior sample (bottom).")]


@_figure("growth", "growth of prior samples, every step, as a picture and a GIF (figs. 1 left, 4, 8, 15)")
def _growth(run: _Run) -> list[Path]:
    return [growth_figure(run.model, run.out / "growth.png", n=8, generator=run.gen("growth")),
            growth_gif(run.model, run.out / "growth.gif", n=16, generator=run.gen("growth")),
            run.caption("growth",
                        "Growth of prior samples: growth.png has 8 samples (rows), one column per NCA step "
                        "(number over each column, 0 = the seed; the cell grid's size over the seed and each "
                        "doubling; a red bar marks a doubling); growth.gif animates 16 samples, one frame per step "
                        "titled with the step and the grid size.")]


@_figure("interpolation", "linear and spherical interpolation between test-image latents (fig. 5a)")
def _interpolation(run: _Run) -> list[Path]:
    test = run.test_images()
    pick = torch.randperm(test.shape[0], generator=run.cpu_gen("interpolation"))[:8]
    files = []
    for method in ("linear", "slerp"):
        stem = f"interpolation_{method}"
        files.append(interpolation_figure(run.model, test[pick], run.out / f"{stem}.png", method=method,
                                          generator=run.gen("interpolation")))
        how = "(1-t) a + t b" if method == "linear" else "spherical (slerp) along the great circle"
        files.append(run.caption(stem, f"{method} interpolation between the posterior means of 4 pairs of random test "
                                       f"images: each row shows image a, 8 decoded points from mu(a) to mu(b), ends "
                                       f"included ({how}), image b."))
    return files


@_figure("tsne", "t-SNE of test-set latent means coloured by digit class, MNIST only (fig. 5b)")
def _tsne(run: _Run) -> list[Path]:
    if run.cfg.dataset != "mnist":
        raise _Skip(f"the t-SNE figure is MNIST's (fig. 5b); {run.cfg.dataset} has no class labels")
    test = run.test_images()
    try:
        labels = mnist_test_labels(test.shape[0])
    except ValueError as err:
        raise _Skip(str(err)) from None
    n_img = min(run.tsne_images, test.shape[0])
    pick = torch.randperm(test.shape[0], generator=run.cpu_gen("tsne"))[:n_img]
    try:
        picture = tsne_figure(run.model, test[pick], labels[pick], run.out / "tsne.png", seed=run.seed,
                              title=f"t-SNE of q(z|x) means, {n_img} MNIST test images")
    except ImportError as err:
        raise _Skip(str(err)) from None
    return [picture, run.caption(
        "tsne",
        f"t-SNE (scikit-learn, perplexity 30, PCA init, random_state {run.seed}) of the posterior means of "
        f"{n_img} random test images, one dot per image, coloured by digit class (legend right).",
        "Labels: binarized MNIST ships without labels; each test image's class is inferred from its "
        "position in the class-sorted test split using MNIST's test class counts "
        f"{MNIST_TEST_CLASS_COUNTS} (see fastnca.figures.MNIST_TEST_CLASS_COUNTS).")]


@_figure("damage", "damage recovery: right half and a random square zeroed (figs. 9, 10 left; 11 for doubling)")
def _damage(run: _Run) -> list[Path]:
    cfg, size = run.cfg, run.cfg.damage_size or None
    files = []
    for kind in ("half", "square"):
        stem = f"damage_{kind}"
        files.append(damage_figure(run.model, run.out / f"{stem}.png", n=8, kind=kind, size=size,
                                   generator=run.gen("damage"), cpu_generator=run.cpu_gen("damage")))
        where = "the right half" if kind == "half" else f"a random {size or cfg.image_size // 2}-cell square"
        if cfg.doubling:
            what = (f"Damage at each stage of growth (fig. 11): 8 prior samples (top row), then for each stage "
                    f"the state with {where} of the cells zeroed at the end of that stage and the final image "
                    f"after the rest of the rollout (M={cfg.steps_per_stage} more steps for the last stage).")
        else:
            what = (f"Damage recovery (figs. 9, 10): 8 prior samples after {cfg.max_steps} steps, the same "
                    f"with {where} of the cells zeroed, and after {cfg.max_steps} more steps.")
        files.append(run.caption(stem, what, run.damage_extra))
    return files


@_figure("regrowth", "damage and every step of regrowth, as a grid and a GIF (figs. 1 right, 9 right, 16)")
def _regrowth(run: _Run) -> list[Path]:
    size = run.cfg.damage_size or None
    steps = _recover_steps(run.model, None)
    common = dict(size=size, generator=run.gen("regrowth"), cpu_generator=run.cpu_gen("regrowth"))
    return [regrowth_figure(run.model, run.out / "regrowth.png", n=8, **common),
            regrowth_gif(run.model, run.out / "regrowth.gif", n=16, **common),
            run.caption("regrowth",
                        f"Damage and regrowth: prior samples grown in full (column 'grown'), the right half of the "
                        f"cells zeroed ('damaged'), then {steps} steps of regrowth (columns '+t': steps after the "
                        "damage, evenly spaced to the last). regrowth.png: 8 samples; regrowth.gif: 16 samples, "
                        "every step.", run.damage_extra)]


def make_figures(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    only: list[str] | tuple[str, ...] | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    device: str | None = "auto",
    tsne_images: int = 5000,
    log: Any = print,
) -> tuple[dict[str, list[Path]], dict[str, str]]:
    """Every figure of the paper that applies to the run at ``checkpoint``, with a caption file per figure.

    Args:
        only: a subset of :data:`FIGURES` (default: all).
        seed: seeds every generator (each figure its own, so a subset draws the same pictures).
        tsne_images: test images in the t-SNE (the paper: 5000 chosen at random).

    Returns:
        ``(written, skipped)``: figure name -> files written (pictures and captions); name -> why it was skipped.
    """
    from fastnca.checkpoints import load_checkpoint
    from fastnca.data import DataError

    names = list(FIGURES) if not only else list(dict.fromkeys(only))
    bad = [n for n in names if n not in FIGURES]
    if bad:
        raise ValueError(f"--only: unknown figure(s) {bad}; expected some of {list(FIGURES)}")
    model, ckpt = load_checkpoint(checkpoint, device or "auto")
    run = _Run(model, checkpoint, int(ckpt["step"]), Path(out_dir), seed, data_dir, tsne_images)
    written: dict[str, list[Path]] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            written[name] = FIGURES[name].draw(run)
        except (_Skip, DataError) as err:
            skipped[name] = str(err)
            log(f"figures: skipped {name}: {err}")
    return written, skipped
