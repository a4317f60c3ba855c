"""``backend="auto"`` on a CUDA GPU, decided by measurement: the run's own job timed on each backend, the faster kept.

The fused kernels are not faster than PyTorch's own convolutions for every preset, precision, batch and GPU, so the
trainer does not assume it: on a CUDA device, ``backend="auto"`` times a few real iterations of the run's job (a
training iteration at the run's shapes, precision and CUDA-graph setting; for ``fastnca eval``, the IWAE of one
batch) on each eligible backend, takes the faster, prints one line with both numbers::

    backend auto: triton 21.40 ms/it, torch 42.93 ms/it -> triton (measured on NVIDIA H100 80GB HBM3)

and caches the decision, keyed by the GPU's name, the driver, the torch, triton and fastnca versions, the model's
shape, the precision, the batch and the CUDA-graph setting, so the next run with the same key starts at once. The
cache is one JSON file under ``$FASTNCA_CACHE_DIR`` or the platform's cache folder (``~/.cache/fastnca`` on Linux);
a damaged file is ignored with a warning and rewritten.

Cost: the first iteration of each backend (kernel loading, CUDA-graph capture) is not counted, and the rest of the
measurement stops at ``min(30 s, 1 % of the planned run)``; a run too short for that keeps the capability rule of
:func:`fastnca.run.resolve_backend` and says so. ``--backend triton|torch`` (``--set backend=...``) skips all of it,
and a resumed run keeps the backend its checkpoint recorded, so its numerics do not change.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastnca.utils import release_cuda_memory

__all__ = [
    "CACHE_ENV",
    "Decision",
    "DecisionCache",
    "MAX_FRACTION",
    "MAX_SECONDS",
    "cache_path",
    "choose_backend",
    "job_key",
    "machine_key",
    "timed",
    "decide_eval_backend",
]

CACHE_ENV = "FASTNCA_CACHE_DIR"
CACHE_NAME = "backend-choices.json"
MAX_SECONDS = 30.0  # the measurement's cost is at most this ...
MAX_FRACTION = 0.01  # ... and at most this fraction of the planned run
TIMED_ITERATIONS = 5  # per backend, after its warm-up (the median is compared)
CACHE_VERSION = 1

# Config fields that fix the job's shapes and arithmetic: a decision holds for another run only when they agree
SHAPE_FIELDS = (
    "image_size", "image_channels", "likelihood", "n_mix", "enc_channels", "enc_first_padding", "state_channels",
    "hidden_channels", "n_blocks", "bias", "out_bias", "doubling", "seed_size", "n_doublings", "steps_per_stage",
    "grid_size", "min_steps", "max_steps", "p_update", "pool_size", "damage_size", "checkpoint", "small_grid", "wgrad",
    "precision", "batch_size", "cuda_graphs",
)


def cache_path() -> Path:
    """The decisions' file: ``$FASTNCA_CACHE_DIR/backend-choices.json``, else in the platform's cache folder."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root) / CACHE_NAME
    system = platform.system()
    if system == "Darwin":
        base = Path.home() / "Library" / "Caches"
    elif system == "Windows":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fastnca" / CACHE_NAME


def machine_key(device: Any) -> dict[str, str]:
    """What a decision depends on besides the job: the GPU, its driver and the software versions."""
    import torch

    import fastnca

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "gpu": torch.cuda.get_device_name(device),
        "driver": _driver_version(),
        "torch": str(torch.__version__),
        "triton": triton_version,
        "fastnca": fastnca.__version__,
    }


def _driver_version() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # no NVML (a container without it, another vendor): the CUDA runtime's version instead
        import torch

        return f"cuda-runtime {torch.version.cuda}"


def job_key(config: Any, job: str, *, world_size: int = 1, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job part of a decision's key: what is timed (``job``: 'train', 'iwae') at which shapes and settings."""
    key: dict[str, Any] = {"job": job, "world_size": world_size}
    key.update({name: getattr(config, name) for name in SHAPE_FIELDS})
    key.update(extra or {})
    return key


def _key_text(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True)


class DecisionCache:
    """The decisions file: ``{"version": 1, "decisions": {key text: {"backend": ..., "ms": {...}}}}``.

    Args:
        path: the file (default :func:`cache_path`).
        warn: where a warning about a damaged file goes.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, warn: Callable[[str], None] | None = None):
        self.path = Path(path) if path is not None else cache_path()
        self.warn = warn or (lambda msg: print(msg, file=sys.stderr))

    def _read(self) -> dict[str, Any]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as err:
            self.warn(f"warning: backend cache {self.path} could not be read ({err}); measuring again")
            return {}
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict) or doc.get("version") != CACHE_VERSION or not isinstance(
                    doc.get("decisions"), dict):
                raise ValueError("not a fastnca backend cache of this version")
        except ValueError as err:
            self.warn(f"warning: backend cache {self.path} is damaged ({str(err).splitlines()[0]}); it is ignored and "
                      "will be rewritten")
            return {}
        return doc["decisions"]

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        entry = self._read().get(_key_text(key))
        ok = isinstance(entry, dict) and entry.get("backend") in ("torch", "triton") and isinstance(
            entry.get("ms"), dict)
        return entry if ok else None

    def put(self, key: dict[str, Any], entry: dict[str, Any]) -> None:
        """Add a decision (atomically: a crash leaves the previous file); a cache that cannot be written is a
        warning, not an error (the run goes on, the next one measures again)."""
        from fastnca.utils import atomic_write

        decisions = self._read()
        decisions[_key_text(key)] = entry
        text = json.dumps({"version": CACHE_VERSION, "decisions": decisions}, indent=1) + "\n"
        try:
            atomic_write(self.path, lambda f: f.write(text), binary=False)
        except OSError as err:
            self.warn(f"warning: backend cache {self.path} could not be written ({err}); the next run measures again")


@dataclass
class Decision:
    """The backend ``auto`` took, and why.

    Attributes:
        backend: 'triton' or 'torch'.
        source: 'measured' (timed now), 'cached' (an earlier measurement with the same key) or 'rule' (not
            measured: the capability rule of ``fastnca.run.resolve_backend``; ``reason`` says why).
        ms: milliseconds per iteration of each timed backend (the median of its timed iterations).
        reason: a few words for 'rule' decisions.
        gpu: the GPU's name.
    """

    backend: str
    source: str
    ms: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    gpu: str = ""

    def line(self) -> str:
        """The one line the trainer prints."""
        times = ", ".join(f"{b} {v:.2f} ms/it" for b, v in self.ms.items())
        if self.source == "rule":
            return f"backend auto: {self.backend} ({self.reason})"
        how = "measured" if self.source == "measured" else "cached measurement"
        on = f" on {self.gpu}" if self.gpu else ""
        return f"backend auto: {times} -> {self.backend} ({how}{on})"

    @property
    def settings_source(self) -> str:
        """``RunSettings.backend_source`` for this decision."""
        return "capability" if self.source == "rule" else "measured"


Measure = Callable[[str, Callable[[], bool]], Sequence[float]]


class _Budget:
    """The measurement's time, shared equally by the backends and counted from each backend's first timed
    iteration (its warm-up is not counted); every backend gets at least one timed iteration."""

    def __init__(self, seconds: float, backends: int, clock: Callable[[], float]) -> None:
        self.seconds, self.backends, self.clock = seconds, backends, clock
        self._start: float | None = None

    def begin(self) -> None:
        self._start = None

    def out_of_time(self) -> bool:
        """Asked before each timed iteration: the first call starts this backend's clock (and is always False)."""
        now = self.clock()
        if self._start is None:
            self._start = now
            return False
        return now - self._start >= self.seconds / self.backends


def choose_backend(
    key: dict[str, Any],
    candidates: Sequence[str],
    measure: Measure,
    *,
    planned_iterations: int | None = None,
    planned_seconds: float | None = None,
    cache: DecisionCache | None = None,
    clock: Callable[[], float] = time.perf_counter,
    gpu: str = "",
    progress: Callable[[str], None] | None = None,
) -> Decision:
    """Pick the faster of ``candidates`` for the job ``key``, from the cache or by ``measure``.

    Args:
        key: the decision's key (:func:`machine_key` and :func:`job_key` merged).
        candidates: the eligible backends, the capability rule's choice first (the one kept when nothing else is
            decided).
        measure: ``measure(backend, out_of_time) -> seconds of each timed iteration``: runs the job's warm-up
            (not counted), then up to :data:`TIMED_ITERATIONS` timed iterations, asking ``out_of_time()`` before
            each (the first answer is always False: every backend is timed at least once).
        planned_iterations: the run's iterations (the budget is 1 % of them at the measured speed).
        planned_seconds: the run's time limit, when it has one.
        cache: where decisions are kept (None: no cache).
        clock: seconds (tests pass a stand-in).
        gpu: the GPU's name for the printed line.
        progress: called with a short status before each backend is timed.

    Returns:
        The :class:`Decision`. The measured decision is written to ``cache``.
    """
    candidates = list(dict.fromkeys(candidates))
    if len(candidates) == 1:
        return Decision(candidates[0], "rule", reason="the only backend that runs here", gpu=gpu)
    if cache is not None and (entry := cache.get(key)) is not None and entry["backend"] in candidates:
        return Decision(entry["backend"], "cached", ms=dict(entry["ms"]), gpu=gpu)
    # a measurement costs about (warm-up + TIMED_ITERATIONS) iterations per backend: skip it where that alone is
    # more than MAX_FRACTION of the run
    if planned_iterations is not None and planned_seconds is None:
        needed = len(candidates) * (TIMED_ITERATIONS + 1)
        if planned_iterations * MAX_FRACTION < needed:
            return Decision(candidates[0], "rule", gpu=gpu, reason=(
                f"not measured: {planned_iterations} iterations are too few to time {len(candidates)} backends "
                f"within {MAX_FRACTION:.0%} of the run"))
    budget = _Budget(MAX_SECONDS if planned_seconds is None else min(MAX_SECONDS, MAX_FRACTION * planned_seconds),
                     len(candidates), clock)
    ms: dict[str, float] = {}
    for backend in candidates:
        if progress is not None:
            progress(f"timing the {backend} backend ({len(ms) + 1}/{len(candidates)})")
        budget.begin()
        times = list(measure(backend, budget.out_of_time))
        if not times:
            raise RuntimeError(f"measure({backend!r}) timed no iteration (it must run one when out_of_time() says "
                               "False)")
        ms[backend] = 1e3 * statistics.median(times)
        if planned_iterations is not None and planned_seconds is None and len(ms) == 1:
            budget.seconds = min(MAX_SECONDS, MAX_FRACTION * planned_iterations * ms[backend] / 1e3)
    best = min(candidates, key=lambda b: (ms[b], candidates.index(b)))
    decision = Decision(best, "measured", ms={b: round(ms[b], 3) for b in candidates}, gpu=gpu)
    if cache is not None:
        cache.put(key, {"backend": best, "ms": decision.ms, "when": time.strftime("%Y-%m-%d %H:%M:%S")})
    return decision


def timed(run: Callable[[], Any], out_of_time: Callable[[], bool], *, warmup: int, device: Any) -> list[float]:
    """``warmup`` untimed calls of ``run``, then up to TIMED_ITERATIONS timed ones (each synchronised)."""
    import torch

    for _ in range(warmup):
        run()
    torch.cuda.synchronize(device)
    times: list[float] = []
    while len(times) < TIMED_ITERATIONS and not out_of_time():
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def iwae_measure(model: Any, x: Any, k: int) -> tuple[Measure, int]:
    """``measure`` for :func:`choose_backend` on ``fastnca eval``'s job: one chunk of importance samples of the
    batch ``x`` (as ``model.iwae`` evaluates them, replayed as a CUDA graph where evaluation captures it), on a
    copy of the model per backend. Returns the measure and the chunk's number of samples."""
    import copy

    import torch

    from fastnca.graphs import IWAE_WARMUP_CALLS, iwae_graph_for

    chunk = max(1, min(k, 256 // x.shape[0]))  # VNCA.iwae's default chunk for this batch

    def time_copy(backend: str, out_of_time: Callable[[], bool]) -> list[float]:
        m = copy.deepcopy(model)
        m.config = m.config.replace(backend=backend)
        m.nca.configure(backend=backend)
        gen = torch.Generator(device=x.device).manual_seed(0)
        graph = iwae_graph_for(m)
        if graph is not None:
            return timed(lambda: graph(x, chunk, gen), out_of_time, warmup=IWAE_WARMUP_CALLS + 1, device=x.device)
        return timed(lambda: m.iwae(x, chunk, generator=gen), out_of_time, warmup=1, device=x.device)

    def measure(backend: str, out_of_time: Callable[[], bool]) -> list[float]:
        times = time_copy(backend, out_of_time)
        release_cuda_memory()  # the copy is gone now
        return times

    return measure, chunk


def decide_eval_backend(model: Any, images: Any, *, k: int, batch_size: int, batches: int,
                        log: Callable[[str], None]) -> Decision | None:
    """``fastnca eval`` with ``backend="auto"`` on CUDA: point ``model`` at the faster backend for its IWAE
    (cached like training's decisions; the job is one chunk of samples). Returns the decision, or None where
    nothing was decided (an explicit backend, the CPU, a GPU without the fused kernels)."""
    import math

    from fastnca.data import to_model
    from fastnca.run import resolve_backend

    settings = model.settings
    if model.config.backend != "auto" or settings.device.type != "cuda" or resolve_backend(
            "auto", settings.device) != "triton":
        return None
    x = to_model(images[:batch_size], model.config.likelihood, device=settings.device)
    measure, chunk = iwae_measure(model, x, k)
    n_batches = math.ceil(images.shape[0] / batch_size) if batches == 0 else min(batches, math.ceil(
        images.shape[0] / batch_size))
    key = {**machine_key(settings.device), **job_key(model.config, "iwae", extra={"chunk": chunk, "eval_batch": int(
        x.shape[0])})}
    decision = choose_backend(key, ["triton", "torch"], measure,
                              planned_iterations=n_batches * math.ceil(k / chunk), cache=DecisionCache(warn=log),
                              gpu=key["gpu"], progress=lambda msg: log(f"backend auto: {msg} ..."))
    log(decision.line())
    model.nca.configure(backend=decision.backend)
    return decision

