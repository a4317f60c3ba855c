"""``fastnca demo``: a local web page where a person drives a trained VNCA.

The page grows a sample from a seeded prior latent step by step (each state shown as it is computed, the
doublings marked, a step counter), lets the user paint damage on the grown image with the mouse and watch the rest
of the rollout regrow it (as ``fastnca damage`` does), moves a slider along the interpolation between two latents,
and encodes an image dropped on the page (read as ``fastnca damage --image`` reads it) and grows its reconstruction.
A header says what the model is: the closest preset and its overrides, training steps, the last test log-likelihood
in the run's ``metrics.jsonl``, and, where the model was not trained with damage, that regrowth is not expected.

Server: the standard library's ``http.server`` (``ThreadingHTTPServer``, one thread per connection) and a small page of
our own (``fastnca/demo_static/``). The model runs in the server process in PyTorch on the chosen device (the fused
kernels where ``backend='auto'`` picks them); a rollout streams its frames as newline-delimited JSON over a chunked
HTTP response, one line per NCA step as soon as the step is computed, so the page animates the growth while it
runs and other requests (another tab, the interpolation) are answered meanwhile. Nothing beyond the core install
is needed: no web framework, no JavaScript build.

Endpoints (all JSON; the streamed ones ``application/x-ndjson``):
    ``GET /api/info``: what the model is (:meth:`Demo.info`).
    ``GET /api/grow?seed=N``: the frames of a prior sample's growth (:meth:`Demo.grow`).
    ``POST /api/damage`` ``{"rollout": id, "cells": "0110..."}``: damage and regrowth (:meth:`Demo.regrow`).
    ``POST /api/encode?name=F&invert=0|1&seed=N`` with the image file as the body (:meth:`Demo.encode`).
    ``POST /api/interpolate`` ``{"a": {"seed": N} | {"image": id}, "b": ..., "method": "linear" | "slerp"}``.
A bad request is answered 400 with ``{"error": message}``; the page shows the message.
"""

from __future__ import annotations

import base64
import errno
import io
import itertools
import json
import os
import socket
import sys
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import torch
from PIL import Image
from torch import Tensor

__all__ = [
    "Demo",
    "DemoError",
    "DemoServer",
    "bind",
    "closest_preset",
    "last_test_result",
    "DEFAULT_PORT",
    "INTERPOLATION_POINTS",
]

DEFAULT_PORT = 8000
STATIC_DIR = Path(__file__).with_name("demo_static")
STATIC_FILES = {"/": "index.html", "/index.html": "index.html", "/demo.js": "demo.js", "/demo.css": "demo.css"}
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css"}
INTERPOLATION_POINTS = 9  # slider positions from latent a to latent b, ends included (t = 0, 1/8, ..., 1)
KEPT_ROLLOUTS = 64  # grown states kept for damage requests, oldest dropped first (a state is |z| x S x S floats)
KEPT_IMAGES = 64  # posterior means of uploaded images kept as interpolation end points
MAX_UPLOAD_BYTES = 20 * 2**20
MAX_JSON_BYTES = 2**20
MAX_SEED = 2**63 - 1


class DemoError(ValueError):
    """A request the demo cannot serve (a bad seed, an unreadable image, a sample that is gone): shown in the page."""


# ---------------------------------------------------------------------------------------------- what the model is
def closest_preset(config: Any) -> tuple[str, dict[str, Any]]:
    """The preset a config differs least from, and the fields where it differs (``name -> the config's value``).

    A checkpoint stores its whole config but not the preset it started from; the closest preset and its overrides
    describe it the way ``fastnca train --preset NAME --set key=value`` would have made it.
    """
    from fastnca.config import PRESETS, get_preset

    have = config.to_dict()
    best: tuple[str, dict[str, Any]] | None = None
    for name in PRESETS:
        ref = get_preset(name).to_dict()
        diff = {k: v for k, v in have.items() if k != "notes" and ref.get(k) != v}
        if best is None or len(diff) < len(best[1]):
            best = (name, diff)
    assert best is not None  # PRESETS is not empty
    return best


def last_test_result(checkpoint: str | os.PathLike[str], step: int) -> dict[str, Any] | None:
    """The last test-split row (``split == 'test'``) at or before ``step`` in the run's ``metrics.jsonl``, or None.

    ``checkpoint`` is the checkpoint file; its run directory is the folder holding it. Unreadable lines (a run
    stopped mid-write) are skipped.
    """
    from fastnca.checkpoints import METRICS_NAME

    path = Path(checkpoint).parent / METRICS_NAME
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("split") == "test" and "iwae" in row and row.get("step", 0) <= step:
            best = row
    return best


def _describe_overrides(diff: dict[str, Any], shown: int = 6) -> str:
    items = [f"{k}={v}" for k, v in diff.items()]
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


# ---------------------------------------------------------------------------------------------- the model side
@dataclass
class _Rollout:
    """A grown state the page may damage: ``state`` ``(1, |z|, S, S)`` and the generator that draws its masks."""

    state: Tensor
    generator: torch.Generator


def _png(image: Tensor) -> str:
    """``(C, H, W)`` [0, 1] -> a PNG data URL at the cell grid's resolution (the page scales it up, nearest)."""
    a = (image.detach().float().cpu().clamp(0, 1) * 255 + 0.5).to(torch.uint8)
    arr = a[0].numpy() if a.shape[0] == 1 else a.permute(1, 2, 0).contiguous().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _seed(value: Any, what: str = "seed") -> int:
    """A seed from a request: an integer in 0 .. 2**63 - 1 (what ``torch.Generator.manual_seed`` takes)."""
    try:
        seed = int(str(value).strip())
    except (TypeError, ValueError):
        seed = -1
    if not 0 <= seed <= MAX_SEED:
        raise DemoError(f"{what}: expected a whole number from 0 to {MAX_SEED}, got {str(value)!r}")
    return seed


class Demo:
    """What the page asks of the model, free of HTTP: growth, damage and regrowth, encoding, interpolation.

    The rollouts are the figures' (``fastnca.figures``): a sample of seed s grows from ``z ~ N(0, I)`` drawn on a
    generator seeded s on the model's device, whose next draws are the update masks, over the full schedule
    (non-doubling models: ``max_steps`` steps); damage zeroes every channel of the painted cells and regrowth runs
    ``max_steps`` more steps (non-doubling) or M (doubling: damage at the last stage, fig. 11), as
    ``fastnca damage`` does. Frames are the likelihood's mean image of every state, at the cell grid's size.

    Thread-safe: the HTTP server calls it from one thread per connection, several at once.

    Args:
        model: a VNCA (from :func:`fastnca.checkpoints.load_checkpoint`); its parameters are frozen here.
        checkpoint: ``(path, dict)``: the checkpoint file and what it held (``step``; its run's metrics.jsonl
            gives the test result).
        frame_ms: the shortest time the page shows a frame (the animation's pace when steps are faster).
    """

    def __init__(
        self, model: Any, checkpoint: tuple[str | os.PathLike[str], dict[str, Any]], *, frame_ms: int = 80
    ) -> None:
        from fastnca.figures import _recover_steps

        self.model = model.eval().requires_grad_(False)  # no autograd graph in any request, whatever the grad mode
        self.config = model.config
        self.device = next(model.parameters()).device
        self.checkpoint_path, ckpt = Path(checkpoint[0]), checkpoint[1]
        self.step = int(ckpt.get("step", 0))
        self.frame_ms = int(frame_ms)
        nca = model.nca
        self.schedule = nca.schedule(None if nca.doubling else nca.max_steps)
        self.regrow_steps = _recover_steps(model, None)
        self.side = self.config.output_size
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._rollouts: OrderedDict[str, _Rollout] = OrderedDict()
        self._images: OrderedDict[str, Tensor] = OrderedDict()

    # ------------------------------------------------------------------------------------------ description
    def info(self) -> dict[str, Any]:
        """What the model is and how the page should drive it (the page's header and its controls)."""
        from fastnca.figures import DAMAGE_NOTE, _rollout_text

        cfg = self.config
        preset, diff = closest_preset(cfg)
        test = last_test_result(self.checkpoint_path, self.step)
        damage_trained = cfg.pool_size > 0 and cfg.damage_size > 0
        if damage_trained:
            damage_note = (
                f"trained with pool and damage training (pool {cfg.pool_size}, {cfg.damage_size}x{cfg.damage_size} "
                "squares zeroed): it should regrow damaged cells"
            )
        else:
            damage_note = (
                "this model was not trained with damage (no pool and damage training): regrowth is not expected; "
                "painted cells may stay grey or grow into something else"
            )
        if test is not None:
            test_text = (
                f"test log p(x) >= {test['iwae']:.2f} nats ({test['bpd']:.4f} bits/dim; IWAE k={test['k']}, "
                f"{test['n_images']} test images, step {test['step']})"
            )
        else:
            test_text = "no test evaluation in the run's metrics.jsonl"
        settings = self.model.settings  # how the model computes on its device (fastnca.run.RunSettings)
        return {
            "checkpoint": str(self.checkpoint_path),
            "preset": preset,
            "overrides": dict(diff),
            "preset_text": preset + (f" with {_describe_overrides(diff)}" if diff else ""),
            "step": self.step,
            "iterations": cfg.iterations,
            "test": test,
            "test_text": test_text,
            "dataset": cfg.dataset,
            "image_size": cfg.image_size,
            "likelihood": cfg.likelihood,
            "rollout_text": _rollout_text(cfg),
            "model_text": f"{cfg.dataset} {cfg.image_size}x{cfg.image_size}, |z|={cfg.state_channels}, "
            f"h={cfg.hidden_channels}, {cfg.n_blocks} residual blocks",
            "device": str(self.device),
            "backend": ("fused Triton kernels" if settings.fused else "PyTorch reference ops")
            + f" ({settings.arithmetic} dots)",
            "doubling": bool(cfg.doubling),
            "schedule": [bool(d) for d in self.schedule],
            "side": self.side,
            "seed_side": cfg.seed_size if cfg.doubling else cfg.grid_size,
            "regrow_steps": self.regrow_steps,
            "damage_trained": damage_trained,
            "damage_note": damage_note,
            "grey_note": DAMAGE_NOTE,
            "binary": cfg.likelihood == "bernoulli",
            "interpolation_points": INTERPOLATION_POINTS,
            "frame_ms": self.frame_ms,
        }

    # ------------------------------------------------------------------------------------------ rollouts
    def grow(self, seed: Any) -> Iterator[dict[str, Any]]:
        """The growth of the prior sample of ``seed``: a frame per state (the seed first), then ``done``.

        Frames: ``{"kind": "frame", "phase": "grow", "rollout", "step", "total", "side", "doubled", "image"}``;
        the last item ``{"kind": "done", "rollout", ...}`` says the state is kept for :meth:`regrow`.

        Raises:
            DemoError: a seed that is not a whole number in 0 .. 2**63 - 1 (raised here, before any frame).
        """
        seed = _seed(seed)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        z = self._prior_latent(gen)
        return self._grow(z, gen, f"seed {seed}")

    def _prior_latent(self, gen: torch.Generator) -> Tensor:
        """``(1, |z|)`` drawn on ``gen``, as the figures draw their prior samples."""
        return torch.randn((1, self.model.latent_size), generator=gen, device=self.device)

    def _grow(self, z: Tensor, gen: torch.Generator, source: str) -> Iterator[dict[str, Any]]:
        from fastnca.rng import generator_on

        nca = self.model.nca
        rid = self._new_id("r")
        total = len(self.schedule)
        state = nca.seed(z)
        yield self._frame(rid, "grow", 0, total, state, False, source=source)
        steps = nca.iter_run(state, self.schedule, generator=generator_on(gen, self.device))
        for t, (state, doubled) in enumerate(zip(steps, self.schedule), 1):
            yield self._frame(rid, "grow", t, total, state, doubled)
        self._keep(self._rollouts, rid, _Rollout(state, gen), KEPT_ROLLOUTS)
        yield {"kind": "done", "rollout": rid, "phase": "grow", "side": state.shape[-1], "source": source}

    def regrow(self, rollout: Any, cells: Any) -> Iterator[dict[str, Any]]:
        """Zero every channel of the painted ``cells`` of a grown rollout, then regrow: the damaged frame, one
        frame per regrowth step, then ``done``. The regrown state replaces the rollout's, so damage accumulates.

        Args:
            rollout: the id of a finished :meth:`grow`, :meth:`encode` or :meth:`regrow`.
            cells: ``S * S`` characters '0'/'1', row-major over the final cell grid; '1' zeroes the cell.

        Raises:
            DemoError: an unknown (or expired) rollout, a malformed mask or one with no cell painted.
        """
        with self._lock:
            kept = self._rollouts.get(str(rollout))
        if kept is None:
            raise DemoError(
                f"rollout {rollout!r}: no such grown sample here (it expired or the server restarted); "
                "grow a sample, then paint on it"
            )
        side = kept.state.shape[-1]
        if not isinstance(cells, str) or len(cells) != side * side or set(cells) - {"0", "1"}:
            got = f"{len(cells)} characters" if isinstance(cells, str) else type(cells).__name__
            raise DemoError(
                f"cells: expected {side * side} characters '0' or '1' (the {side}x{side} cell grid, "
                f"row-major), got {got}"
            )
        if "1" not in cells:
            raise DemoError("cells: no cell painted; paint on the grown image to zero cells")
        painted = torch.tensor([c == "1" for c in cells], dtype=torch.bool).view(side, side)
        keep = (~painted).to(self.device, kept.state.dtype)[None, None]  # (1, 1, S, S)
        return self._regrow(str(rollout), kept, keep, int(painted.sum()))

    def _regrow(self, rid: str, kept: _Rollout, keep: Tensor, n_cells: int) -> Iterator[dict[str, Any]]:
        from fastnca.rng import generator_on

        total = self.regrow_steps
        damaged = kept.state * keep  # as figures._regrow and fastnca damage --mask
        yield self._frame(rid, "damaged", 0, total, damaged, False, cells=n_cells)
        state = damaged
        steps = self.model.nca.iter_run(damaged, total, generator=generator_on(kept.generator, self.device))
        for t, state in enumerate(steps, 1):
            yield self._frame(rid, "regrow", t, total, state, False)
        with self._lock:
            kept.state = state
        yield {"kind": "done", "rollout": rid, "phase": "regrow", "side": state.shape[-1]}

    def encode(
        self, data: bytes, name: str = "image", *, invert: bool = False, seed: Any = 0
    ) -> Iterator[dict[str, Any]]:
        """Encode an uploaded image (read as ``fastnca damage --image`` reads a file) and grow its reconstruction
        from the posterior mean: ``{"kind": "input", "image_id", "image"}`` (the image as the model sees it), then
        the growth's frames and ``done`` as in :meth:`grow`; the mean is kept as an interpolation end point.

        Args:
            data: the file's bytes (PNG, JPEG, GIF, BMP, WebP: whatever PIL reads).
            name: the file's name, for messages.
            invert: Bernoulli (MNIST) models: dark strokes on a light background.
            seed: seeds the update masks of the rollout (models with p_update < 1).

        Raises:
            DemoError: an empty or unreadable file, a bad seed.
        """
        from fastnca.data import to_model
        from fastnca.figures import image_from_file

        seed = _seed(seed)
        if not data:
            raise DemoError(f"{name!r}: the file is empty; drop an image file (PNG, JPEG, ...) on the page")
        try:
            image = image_from_file(io.BytesIO(data), self.config, invert=invert)
        except ValueError:
            raise DemoError(
                f"{name!r} is not a readable image file: drop a PNG, JPEG, GIF, BMP or WebP image"
            ) from None
        x = to_model(image, self.config.likelihood, device=self.device)
        mu, _ = self.model.encode(x)
        iid = self._new_id("i")
        self._keep(self._images, iid, mu, KEPT_IMAGES)
        shown = _png(self.model.to_display(x)[0])
        gen = torch.Generator(device=self.device).manual_seed(seed)

        def items() -> Iterator[dict[str, Any]]:
            yield {"kind": "input", "image_id": iid, "image": shown, "name": name}
            yield from self._grow(mu, gen, f"image {name}")

        return items()

    def interpolate(self, a: Any, b: Any, method: Any = "linear") -> dict[str, Any]:
        """The decoded images at :data:`INTERPOLATION_POINTS` points from latent ``a`` to latent ``b``.

        Args:
            a, b: ``{"seed": N}`` (the prior latent :meth:`grow` draws for seed N) or ``{"image": id}`` (the
                posterior mean of an uploaded image).
            method: 'linear' or 'slerp' (:func:`fastnca.figures.interpolate_latents`).

        Returns:
            ``{"images": [PNG data URLs], "t": [0, ..., 1], "method"}``.
        """
        from fastnca.figures import interpolate_latents
        from fastnca.rng import generator_on

        if method not in ("linear", "slerp"):
            raise DemoError(f"method: expected 'linear' or 'slerp', got {method!r}")
        za, zb = self._latent(a, "a"), self._latent(b, "b")
        z = interpolate_latents(za[0], zb[0], INTERPOLATION_POINTS, method)  # (P, |z|)
        gen = generator_on(torch.Generator(device=self.device).manual_seed(0), self.device)
        nca = self.model.nca
        final = nca.run(nca.seed(z), self.schedule, generator=gen)
        images = self.model.to_display(self.model.mean_image(final))
        t = torch.linspace(0, 1, INTERPOLATION_POINTS).tolist()
        return {"images": [_png(img) for img in images], "t": t, "method": method}

    def _latent(self, end: Any, what: str) -> Tensor:
        """``(1, |z|)`` for an interpolation end point."""
        if isinstance(end, dict) and "seed" in end:
            seed = _seed(end["seed"], f"{what}: seed")
            return self._prior_latent(torch.Generator(device=self.device).manual_seed(seed))
        if isinstance(end, dict) and "image" in end:
            with self._lock:
                mu = self._images.get(str(end["image"]))
            if mu is None:
                raise DemoError(
                    f"{what}: no uploaded image {end['image']!r} here (it expired or the server "
                    "restarted); drop the image again"
                )
            return mu
        raise DemoError(f'{what}: expected {{"seed": N}} or {{"image": id}}, got {end!r}')

    # ------------------------------------------------------------------------------------------ helpers
    def _frame(
        self, rid: str, phase: str, step: int, total: int, state: Tensor, doubled: bool, **extra: Any
    ) -> dict[str, Any]:
        image = self.model.to_display(self.model.mean_image(state))[0]  # (C, s, s) at the state's grid size
        return {
            "kind": "frame",
            "rollout": rid,
            "phase": phase,
            "step": step,
            "total": total,
            "side": int(state.shape[-1]),
            "doubled": bool(doubled),
            "image": _png(image),
            **extra,
        }

    def _new_id(self, prefix: str) -> str:
        with self._lock:
            return f"{prefix}{next(self._ids)}"

    def _keep(self, store: OrderedDict, key: str, value: Any, limit: int) -> None:
        with self._lock:
            store[key] = value
            while len(store) > limit:
                store.popitem(last=False)


# ---------------------------------------------------------------------------------------------- HTTP
class DemoServer(ThreadingHTTPServer):
    """The HTTP server: one daemon thread per connection; ``demo`` (a :class:`Demo`) is set once the model is loaded."""

    daemon_threads = True
    demo: Demo | None = None


class _IPv6Server(DemoServer):
    address_family = socket.AF_INET6


def bind(host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> DemoServer:
    """A :class:`DemoServer` listening on ``host:port`` (port 0: a free one; ``server.server_address`` has it).

    Raises:
        OSError: the port is in use, not allowed, or the address is not this machine's (errno tells which).
    """
    cls = _IPv6Server if ":" in host else DemoServer
    return cls((host, port), _Handler)


def bind_message(err: OSError, host: str, port: int) -> str:
    """One line saying why ``bind(host, port)`` failed and what to do."""
    if err.errno == errno.EADDRINUSE:
        return (
            f"--port {port}: the port is in use on {host} (another program, or another fastnca demo, listens "
            "there); pass another --port, or --port 0 for any free one"
        )
    if err.errno == errno.EACCES:
        return f"--port {port}: not allowed to listen there (ports below 1024 need privileges); pass --port 8000"
    if err.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or isinstance(err, socket.gaierror):
        return f"--host {host!r}: not an address of this machine ({err.strerror or err}); the default is 127.0.0.1"
    return f"cannot listen on {host}:{port}: {err.strerror or err}"


def url_of(server: DemoServer) -> str:
    """The page's address (a wildcard host is shown as the loopback address, where this machine reaches it)."""
    host, port = server.server_address[:2]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class _Handler(BaseHTTPRequestHandler):
    server: DemoServer
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked streams of frames

    # -------------------------------------------------------------------------------------- routing
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        url = urlsplit(self.path)
        if url.path in STATIC_FILES:
            return self._static(STATIC_FILES[url.path])
        query = parse_qs(url.query)
        routes: dict[str, Callable[[], None]] = {
            "/api/info": lambda: self._json(self._demo().info()),
            "/api/grow": lambda: self._stream(self._demo().grow(_one(query, "seed", "0"))),
        }
        self._route(routes, url.path, "GET")

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        url = urlsplit(self.path)
        query = parse_qs(url.query)

        def damage() -> None:
            body = self._json_body()
            self._stream(self._demo().regrow(body.get("rollout"), body.get("cells")))

        def encode() -> None:
            data = self._body(MAX_UPLOAD_BYTES, "the image")
            name = _one(query, "name", "image")
            invert = _one(query, "invert", "0") in ("1", "true", "on")
            self._stream(self._demo().encode(data, name, invert=invert, seed=_one(query, "seed", "0")))

        def interpolate() -> None:
            body = self._json_body()
            self._json(self._demo().interpolate(body.get("a"), body.get("b"), body.get("method", "linear")))

        self._route({"/api/damage": damage, "/api/encode": encode, "/api/interpolate": interpolate}, url.path, "POST")

    def _route(self, routes: dict[str, Callable[[], None]], path: str, method: str) -> None:
        if path not in routes:
            other = "POST" if method == "GET" else "GET"
            known = path in STATIC_FILES or path in (
                "/api/info",
                "/api/grow",
                "/api/damage",
                "/api/encode",
                "/api/interpolate",
            )
            if known:
                return self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{path}: use {other}")
            return self._error(HTTPStatus.NOT_FOUND, f"{path}: no such page; the demo is at /")
        demo = self.server.demo
        if demo is not None and demo.device.type == "cuda":
            # the current CUDA device is per thread and a new thread's is cuda:0: Triton launches on the current one
            torch.cuda.set_device(demo.device)
        try:
            routes[path]()
        except DemoError as err:
            self._error(HTTPStatus.BAD_REQUEST, str(err))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page went away (a new request replaced this one)
        except Exception as err:  # a bug: the page says so, the terminal gets the traceback
            traceback.print_exc(file=sys.stderr)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, _internal(err))

    def _demo(self) -> Demo:
        if self.server.demo is None:
            raise DemoError("the model is still loading; reload the page in a moment")
        return self.server.demo

    # -------------------------------------------------------------------------------------- requests
    def _body(self, limit: int, what: str) -> bytes:
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            n = -1
        if n < 0:
            raise DemoError("the request has no valid Content-Length")
        if n > limit:
            raise DemoError(f"{what} is {n / 2**20:.1f} MiB; at most {limit / 2**20:.0f} MiB are accepted")
        return self.rfile.read(n)

    def _json_body(self) -> dict[str, Any]:
        try:
            body = json.loads(self._body(MAX_JSON_BYTES, "the request") or b"{}")
        except ValueError:
            raise DemoError("the request is not valid JSON") from None
        if not isinstance(body, dict):
            raise DemoError("the request: expected a JSON object")
        return body

    # -------------------------------------------------------------------------------------- responses
    def _send(self, status: int, content_type: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def _json(self, obj: Any, status: int = HTTPStatus.OK) -> None:
        self._send(status, "application/json", json.dumps(obj).encode())

    def _error(self, status: int, message: str) -> None:
        self.close_connection = True  # a refused request's body may be unread: the next one starts on a new connection
        self._json({"error": message}, status)

    def _static(self, name: str) -> None:
        path = STATIC_DIR / name
        self._send(HTTPStatus.OK, CONTENT_TYPES[path.suffix], path.read_bytes())

    def _stream(self, items: Iterator[dict[str, Any]]) -> None:
        """Send ``items`` as newline-delimited JSON, one HTTP chunk per item, each as soon as it is made."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for item in items:
                self._chunk((json.dumps(item) + "\n").encode())
        except DemoError as err:
            self._chunk((json.dumps({"kind": "error", "error": str(err)}) + "\n").encode())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            raise  # the page dropped the stream (a newer request replaced it): stop computing
        except Exception as err:  # a bug, after the headers went out: the page's message and the terminal
            traceback.print_exc(file=sys.stderr)
            self._chunk((json.dumps({"kind": "error", "error": _internal(err)}) + "\n").encode())
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
        self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        """Quiet: no line per request (errors reach the page and, for bugs, the terminal)."""


def _internal(err: Exception) -> str:
    return f"internal error ({type(err).__name__}: {err}); the terminal running fastnca demo shows the traceback"


def _one(query: dict[str, list[str]], key: str, default: str) -> str:
    values = query.get(key)
    return values[-1] if values else default
