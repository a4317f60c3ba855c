"""The VNCA trainer: Adam, gradient clipping, pool and damage training, evaluation, atomic checkpoints, resume.

One training step (Palm et al., 2022, sec. 2 and appendix A.3)::

    x       <- the next batch of the epoch's shuffled training images
    [pool]  half the batch comes from the pool of earlier (image, final state) pairs; half of those states are
            damaged (every channel zeroed in a random damage_size x damage_size square)
    mu, s   <- encoder(x);  z = mu + exp(s) * eps
    state   <- the NCA grown from seed(z); pool entries continue from their (detached) stored state instead
    loss    <- mean over the batch of -log p(x | state) + beta * KL(q(z|x) || N(0, I))
    Adam step after clipping the gradient norm to grad_clip
    [pool]  every final state (detached) goes into the pool with its image; shuffle; keep pool_size

Randomness comes from explicit generators: ``gen`` (CPU: data order, T, pool shuffles, damage squares) and
``dev_gen`` (the training device: posterior noise, update masks). Their states, the global RNGs, the optimiser,
the pool and the data order are in every checkpoint, so ``resume`` continues exactly (bitwise on the CPU).

Files in ``out_dir``: ``config.json``, ``metrics.jsonl`` (train rows every log_every steps, test rows at each
evaluation), ``checkpoint.pt`` (loads with ``torch.load(path, weights_only=True)``), ``samples.png`` and
``growth.png`` at the end, and ``.fastnca.lock`` while a trainer is at work there (``fastnca.utils.FolderLock``: a
second process training into the folder is refused; the lock ends with its process, however that ends).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastnca import autobackend, distributed
from fastnca.autobackend import Decision
from fastnca.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    METRICS_NAME,
    checkpoint_config,
    load_weights,
    no_checkpoint_message,
    read_checkpoint,
    remove_orphan_temps,
    save_checkpoint,
)
from fastnca.config import RESOLVED_KEY, Config
from fastnca.data import Splits, load_for_config, to_model
from fastnca.evaluate import evaluate_iwae
from fastnca.graphs import WARMUP_CALLS, not_captured_reason, train_graph_for
from fastnca.pool import Pool, damage, damage_masks
from fastnca.rng import rng_state, set_rng_state
from fastnca.run import RunSettings, resolve_device, resolve_run
from fastnca.utils import FolderLock, atomic_write, release_cuda_memory

__all__ = [
    "Trainer",
    "Pool",
    "NonFiniteLossError",
    "TrainingInterrupted",
    "damage",
    "damage_masks",
    "rng_state",
    "set_rng_state",
    "training_measure",
    "warmup_job",
]

STAT_KEYS = ("loss", "recon", "kl", "elbo", "grad_norm")  # per-step training statistics, in this order
EVAL_SEED_OFFSET = 1_000_003  # the evaluation generator's seed is cfg.seed + this, apart from the training streams
PROBE_SEED_OFFSET = 2_000_003  # the checkpoint probe's generator, apart from the training and evaluation streams
# Config fields a resumed run cannot change: they fix the model's shapes, the data, or the run's random streams.
RESUME_FIXED = (
    "dataset",
    "image_size",
    "image_channels",
    "likelihood",
    "n_mix",
    "enc_channels",
    "enc_first_padding",
    "state_channels",
    "hidden_channels",
    "n_blocks",
    "bias",
    "out_bias",
    "doubling",
    "seed_size",
    "n_doublings",
    "grid_size",
    "seed",
)


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; the message names the step."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class TrainingInterrupted(Exception):
    """SIGINT (Ctrl-C) or SIGTERM stopped training at a step boundary, after a checkpoint was written.

    ``exit_status`` is the shell's convention for a process ended by the signal: 130 for SIGINT, 143 for SIGTERM.
    """

    def __init__(self, message: str, step: int, signum: int) -> None:
        super().__init__(message)
        self.step = step
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + int(self.signum)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _StopRequests:
    """Signal handlers for the training loop: the first SIGINT or SIGTERM asks for a stop at the next step boundary.

    A KeyboardInterrupt raised in the middle of a step would leave the model updated (or the data position and
    the RNGs advanced) without the step counted, so a checkpoint written then cannot resume exactly. The handlers
    only record the request; the loop finishes the step in flight and checkpoints at the boundary. A second signal
    stops at once (KeyboardInterrupt, no new checkpoint). The handlers are installed explicitly, so a run started
    in the background (where the shell sets SIGINT to be ignored) is stopped the same way.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequests:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}


# ---------------------------------------------------------------------------------------------- files
def _write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def precision_note(settings: RunSettings) -> str | None:
    """A line for the log where the run's arithmetic is much slower than it need be, else None.

    On CUDA the fused backend's IEEE fp32 dots run without tensor cores: measured on an H100, a mnist-doubling
    iteration took 218 ms in fp32 against 45 ms in bf16 (docs/TRAINING.md, "Precision on a GPU").
    """
    if settings.device.type == "cuda" and settings.fused and settings.arithmetic == "fp32-ieee":
        why = ("precision=fp32-ieee" if settings.precision == "fp32-ieee"
               else "PyTorch's cuDNN TF32 flag is off, so precision=fp32 means IEEE fp32")
        return (f"note: {why}: the fused kernels' dots run without tensor cores, about 5x slower than bf16 on an "
                "H100 (docs/TRAINING.md, 'Precision on a GPU'); --set precision=tf32 or precision=bf16 use them")
    return None


def warmup_job(cfg: Config, settings: RunSettings, images: Tensor) -> None:
    """What a training run launches, on a throw-away copy of the model: one training iteration (forward and
    backward), one periodic evaluation's IWAE chunk and the final samples (``images``: one uint8 batch). Run under
    ``fastnca.kernels.warmup.record_launches`` it records the run's kernels without running them."""
    from fastnca.vae import VNCA

    device = settings.device
    model = VNCA(cfg, settings=settings).to(device)
    x = to_model(images[: cfg.batch_size], cfg.likelihood, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    steps = {} if cfg.doubling else {"num_steps": cfg.max_steps}
    model(x, generator=gen, check_values=False, **steps)["loss"].backward()
    with torch.no_grad():
        model.iwae(x, min(cfg.eval_samples, max(1, 256 // cfg.batch_size)), generator=gen)
        model.sample(8, generator=gen, **steps)


def training_measure(config: Any, device: Any, splits: Any) -> autobackend.Measure:
    """``measure`` for :func:`fastnca.autobackend.choose_backend`: real training iterations of ``config`` on
    ``device`` and ``splits``.

    Each backend trains a throw-away copy of the run (its own trainer, a temporary folder, the run's shapes,
    precision, CUDA-graph setting and pool) for its warm-up (the eager iterations and the capture of a CUDA
    graph, twice where a pool changes the batch's layout) and then the timed iterations. A non-doubling rollout
    runs at one T, the middle of the run's range, so that one graph is timed, not the capture of a new T.
    """
    def measure(backend: str, out_of_time: Callable[[], bool]) -> list[float]:
        cfg = config.replace(backend=backend, eval_every=0, ckpt_every=0, log_every=10**9)
        if not cfg.doubling:
            mid = (cfg.min_steps + cfg.max_steps) // 2
            cfg = cfg.replace(min_steps=mid, max_steps=mid)
        with tempfile.TemporaryDirectory(prefix="fastnca-auto-") as tmp:
            trainer = Trainer(cfg, tmp, device=str(device), splits=splits, progress=False, log=lambda msg: None,
                              final_outputs=False, auto_backend=False, precompile=False)
            warmup = (WARMUP_CALLS + 1 if trainer.train_graph is not None else 1) * (2 if cfg.pool_size else 1)
            times = autobackend.timed(trainer.train_step, out_of_time, warmup=warmup, device=device)
            del trainer
        release_cuda_memory()
        return times

    return measure


def pool_note(cfg: Config, capacity: int, dist: Any = None) -> str | None:
    """A warning where pool training is asked for but can never happen, else None.

    Half of each (per-rank) batch comes from the pool only while the pool holds more entries than that half
    (:meth:`Trainer.pool_batch`); a pool of at most half a batch is never drawn from, and the run trains as if
    ``pool_size`` were 0.
    """
    if cfg.pool_size <= 0:
        return None
    local = cfg.batch_size // (1 if dist is None else dist.world_size)
    half = local // 2
    if half > 0 and capacity > half:
        return None
    world = 1 if dist is None else dist.world_size
    ranks = "" if dist is None else f" per rank ({world} ranks)"
    fix = (f"--set pool_size={(half + 1) * world} or more turns it on (the paper: 1024)" if half > 0 else
           f"a batch of at least {2 * world} images turns it on")
    return (f"warning: pool_size={cfg.pool_size} holds {capacity} entries{ranks}, and a pool is drawn from only when "
            f"it holds more than half a batch ({local} // 2 = {half}): pool and damage training is off in this run; "
            f"{fix}")


class _SessionClock:
    """Training time of a run over its sessions: ``elapsed()`` adds this session's wall time, less the periodic
    evaluations (``exclude``), to what earlier sessions trained."""

    def __init__(self, elapsed_before: float) -> None:
        self.start = time.perf_counter()
        self.before = elapsed_before
        self.excluded = 0.0

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.start - self.excluded


class _TrainLog:
    """The training statistics between log points: the steps' device-side stats (read back in one transfer at a log
    point, a checkpoint or an evaluation), the current window (resumed from the checkpoint), and its rows."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.pending: list[Tensor] = []
        self.window = trainer.window  # an interrupted window continues
        self.carried = len(self.window)  # its steps trained by an earlier session: not in this session's it/s
        self.t0 = time.perf_counter()
        self.last_row: dict[str, Any] = {}

    def add(self, stats: Tensor) -> None:
        self.pending.append(stats)

    def exclude(self, seconds: float) -> None:
        """Time spent on something else (an evaluation) is not the window's training time."""
        self.t0 += seconds

    def sync(self) -> None:
        """Read the pending steps back; NonFiniteLossError (saying where the last good checkpoint is) on a NaN."""
        t = self.trainer
        try:
            self.window.extend(t.sync_stats(self.pending, t.step - len(self.pending) + 1))
        except NonFiniteLossError as err:
            where = (f"the last good checkpoint is {t.checkpoint_path}" if t.checkpoint_path.is_file()
                     else "no checkpoint was written yet")
            raise NonFiniteLossError(f"{err}; training stopped, {where}", err.step) from None
        self.pending = []

    def log_row(self) -> dict[str, Any]:
        """Sync, write the window's means as a train row of metrics.jsonl, start a new window."""
        self.sync()
        t, window = self.trainer, self.window
        dt = time.perf_counter() - self.t0
        row = {
            "step": t.step,
            "split": "train",
            **{k: sum(s[k] for s in window) / len(window) for k in STAT_KEYS},
            "it_per_s": round((len(window) - self.carried) / dt, 3) if dt > 0 and len(window) > self.carried else None,
            "elapsed_s": round(t.elapsed_s, 3),
            "backend": t.settings.backend,
            "arithmetic": t.settings.arithmetic,
        }
        t.write_metrics(row)
        window.clear()
        self.t0, self.carried, self.last_row = time.perf_counter(), 0, row
        return row


# ---------------------------------------------------------------------------------------------- the trainer
class Trainer:
    """Trains a VNCA on its config's dataset and writes metrics, checkpoints and pictures to ``out_dir``.

    Args:
        config: the run's Config (preset plus overrides).
        out_dir: the run directory.
        data_dir: the data directory (default: ``$FASTNCA_DATA``, else ./data).
        device: overrides ``config.device`` ('auto', 'cpu', 'cuda', 'cuda:1', ...).
        splits: already-loaded data (tests); default loads the config's dataset.
        time_limit: stop cleanly after this many seconds of training in this process (checkpoint, final eval).
        progress: show a tqdm bar.
        log: where messages go.
        final_outputs: evaluate and draw samples at the end.
        final_eval: the evaluation at the end (False: only the pictures; for short timed benchmark runs).
        auto_backend: on a CUDA device, decide ``backend="auto"`` by timing both backends on this run's job
            (``fastnca.autobackend``, cached); False: the capability rule of ``fastnca.run.resolve_backend``.
        recorded_run: the settings a resumed run's checkpoint recorded (``RunSettings.record``): an 'auto'
            backend keeps the backend recorded there on a device of the same type, so a resume never changes the
            run's numerics.
        precompile: on a CUDA device with the fused kernels, compile every kernel the run will launch before the
            first step, in parallel worker processes, into Triton's cache (``fastnca.kernels.warmup``); a second
            run finds them cached.
    """

    def __init__(
        self,
        config: Config,
        out_dir: str | os.PathLike[str],
        *,
        data_dir: str | os.PathLike[str] | None = None,
        device: str | None = None,
        splits: Splits | None = None,
        time_limit: float | None = None,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
        final_outputs: bool = True,
        final_eval: bool = True,
        auto_backend: bool = True,
        recorded_run: dict[str, Any] | None = None,
        precompile: bool = True,
    ) -> None:
        from fastnca.vae import VNCA

        config.validate()
        if config.pool_size > 0 and config.doubling:
            raise ValueError(
                "pool_size: pool and damage training needs a non-doubling model (doubling=False); "
                "pool states live on the final grid, which a doubling rollout only reaches at its end"
            )
        self.dist = distributed.active()  # None in one process; under torchrun: rank, world size (DDP)
        distributed.check_config(config, self.dist)
        if time_limit is not None and not time_limit > 0:  # NaN too
            raise ValueError(f"time_limit: expected a positive number of seconds, got {time_limit}")
        self.cfg = config
        self.out_dir = Path(out_dir)
        self.device = resolve_device(device or config.device)
        self.settings = resolve_run(config, self.device)
        self.settings.check_device()
        self.time_limit = time_limit
        self.is_main = self.dist is None or self.dist.is_main  # rank 0 alone logs and writes files
        self.progress = progress and self.is_main
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        if not self.is_main:
            self.log = lambda msg: None
        self.final_outputs = final_outputs
        self.final_eval = final_eval
        self.splits = splits if splits is not None else load_for_config(config, data_dir)
        if self.splits.shape != (config.image_channels, config.image_size, config.image_size):
            raise ValueError(
                f"image_size: the data is {self.splits.shape}, the config expects "
                f"{(config.image_channels, config.image_size, config.image_size)}"
            )
        if self.splits.train.shape[0] < config.batch_size:
            raise ValueError(
                f"batch_size: {config.batch_size} is more than the {self.splits.train.shape[0]} training images"
            )
        # training images go to the device once when they fit comfortably, so batches are cheap to gather
        on_device = self.device.type == "cuda" and self.splits.train.nbytes < 4 * 2**30
        self.train_images = self.splits.train.to(self.device) if on_device else self.splits.train
        self.backend_decision: Decision | None = None
        self.compile_report: Any = None
        recorded_torch = (recorded_run or {}).get("backend") == "torch" and config.backend == "auto"
        if precompile and self.device.type == "cuda" and self.settings.fused and not recorded_torch:
            self.compile_report = self._precompile()  # before anything launches a kernel (and before timing)
        self.settings = self._resolve_settings(recorded_run, auto_backend)
        self.log(f"model: {self.settings.describe()}")
        if (note := precision_note(self.settings)) is not None:
            self.log(note)

        torch.manual_seed(config.seed)  # parameter initialisation
        self.model = VNCA(config, settings=self.settings).to(self.device)
        self.settings = self.model.settings  # the same decision, now on the model's device
        self.model.train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, fused=True)  # one kernel
        self.gen = torch.Generator().manual_seed(config.seed)
        self.dev_gen = (
            self.gen if self.device.type == "cpu" else torch.Generator(device=self.device).manual_seed(config.seed + 1)
        )
        self.pool = Pool(config.pool_size // (1 if self.dist is None else self.dist.world_size))
        self.step = 0
        self.elapsed_s = 0.0  # training wall time over all sessions (evaluation excluded)
        self.perm = torch.randperm(self.splits.train.shape[0], generator=self.gen)
        self.pos = 0
        self.window: list[dict[str, float]] = []  # read-back stats of the current logging window (checkpointed)
        self.tracker: Any = None  # e.g. fastnca.tracking.TensorBoardTracker: mirrors every metrics row
        # the model's loss: the VNCA itself, or under torchrun its DDP wrapper on this rank's rows
        self.loss_module: Callable[..., dict[str, Tensor]] = self.model
        self.train_graph = None
        if self.dist is not None:
            self.loss_module = distributed.ShardedLoss(self.model, self.dist, self.dev_gen, self.device)
            if self.device.type == "cuda" and config.cuda_graphs:
                self.log("CUDA graphs are off under DDP (torchrun): training and evaluation run eagerly")
        else:
            # CUDA: the whole iteration replays as a graph (one per T for non-doubling models); None where it
            # runs eagerly
            self.train_graph = train_graph_for(self)
            why = not_captured_reason(config, self.settings)
            if self.device.type == "cuda" and config.cuda_graphs and why is not None:
                self.log(f"CUDA graphs: training runs eagerly ({why})")
        if (note := pool_note(config, self.pool.capacity, self.dist)) is not None:
            self.log(note)
        # one run at a time writes into out_dir: a second process (a new run or a --resume) is refused here, before
        # it truncates or appends to this run's files; rank 0 alone writes them under torchrun
        self.lock = FolderLock(self.out_dir)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
            weakref.finalize(self, self.lock.release)

    def _precompile(self) -> Any:
        """Compile the fused kernels of one training iteration, one periodic evaluation's IWAE chunk and the final
        samples (recorded on a throw-away copy of the model, nothing of which runs), in worker processes."""
        from tqdm.auto import tqdm

        from fastnca.kernels import warmup

        cfg, device = self.cfg, self.device
        gpu = torch.cuda.get_device_name(device)
        job = functools.partial(warmup_job, cfg, self.settings, self.train_images[: cfg.batch_size])
        ranks = 1 if self.dist is None else self.dist.world_size  # every rank of a node compiles: share the CPUs
        workers = max(1, warmup.default_workers() // ranks)
        with tqdm(desc=f"compiling kernels for {gpu}", unit="kernel", disable=not self.progress, leave=False) as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            report = warmup.precompile(job, warmup.target_of(device), workers=workers, progress=progress)
        self.log(report.line(gpu))
        for failure in report.failed[:3]:
            self.log(f"  not precompiled: {failure}")
        release_cuda_memory()
        return report

    def _resolve_settings(self, recorded: dict[str, Any] | None, measure: bool) -> RunSettings:
        """The run's settings: a resumed run keeps what its checkpoint recorded (``recorded``: its backend where
        the config says 'auto' and the device type is the same, and the fused dots' arithmetic), so that its
        numerics do not change; a new 'auto' run on CUDA takes the faster backend by a (cached) measurement."""
        cfg, settings = self.cfg, self.settings
        if recorded is not None:
            same_type = str(recorded.get("device", "")).split(":")[0] == self.device.type
            backend = recorded.get("backend") if cfg.backend == "auto" and same_type else None
            arithmetic = recorded.get("arithmetic") if same_type else None
            if backend is not None:
                self.log(f"backend auto: {backend}, as the checkpoint recorded (a resume keeps its backend)")
            kept = resolve_run(cfg, self.device, backend=backend, backend_source="checkpoint" if backend else None,
                               arithmetic=arithmetic if (backend or settings.backend) == "triton" else None)
            return kept
        if cfg.backend != "auto" or self.device.type != "cuda" or not measure or settings.backend != "triton":
            return settings  # explicit, not a GPU, or the fused kernels cannot run here: nothing to compare
        candidates = ["triton", "torch"]
        key = {**autobackend.machine_key(self.device),
               **autobackend.job_key(cfg, "train", world_size=1 if self.dist is None else self.dist.world_size)}
        cache = autobackend.DecisionCache(warn=self.log)
        if self.dist is not None:  # every rank must take the same path: a cached decision, else the rule
            entry = cache.get(key)
            if entry is None:
                self.log("backend auto: under torchrun no measurement runs (time it once in one process: the "
                         "decision is cached and shared); triton by the capability rule")
                return settings
            decision = autobackend.Decision(entry["backend"], "cached", ms=dict(entry["ms"]), gpu=key["gpu"])
        else:
            decision = autobackend.choose_backend(
                key, candidates, training_measure(cfg, self.device, self.splits),
                planned_iterations=cfg.iterations, planned_seconds=self.time_limit, cache=cache, gpu=key["gpu"],
                progress=lambda msg: self.log(f"backend auto: {msg} ..."))
        self.log(decision.line())
        self.backend_decision = decision
        return resolve_run(cfg, self.device, backend=decision.backend, backend_source=decision.settings_source)

    def run_record(self) -> dict[str, Any]:
        """What ran, for the run's files: the settings' record, and the times behind a measured 'auto'."""
        record = self.settings.record()
        if self.backend_decision is not None and self.backend_decision.ms:
            record["auto_ms_per_iteration"] = dict(self.backend_decision.ms)
        return record

    # ------------------------------------------------------------------------------------------ data
    def next_batch(self) -> Tensor:
        """The next ``batch_size`` training images (uint8) of the current shuffled epoch; partial tails dropped."""
        b = self.cfg.batch_size
        if self.pos + b > self.perm.numel():
            self.perm = torch.randperm(self.splits.train.shape[0], generator=self.gen)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + b]
        self.pos += b
        if self.dist is not None:  # this rank's rows of the global batch
            local = b // self.dist.world_size
            idx = idx[self.dist.rank * local : (self.dist.rank + 1) * local]
        return self.train_images[idx.to(self.train_images.device)]

    # ------------------------------------------------------------------------------------------ one step
    def pool_batch(self, x: Tensor) -> tuple[Tensor, Tensor | None, int]:
        """Replace the last half of the batch with pool entries, damaging the first half of those.

        Returns:
            ``(x, pool_states, n_damaged)``: the batch (fresh images first, pool images last), the pool's states
            for the last ``B // 2`` rows (detached, the first ``n_damaged`` of them damaged), or None while the
            pool holds no more than ``B // 2`` entries.
        """
        b = x.shape[0]
        n_pool = b // 2
        if self.cfg.pool_size <= 0 or not 0 < n_pool < len(self.pool):
            return x, None, 0
        pool_x, pool_states = self.pool.take(n_pool)
        n_damaged = n_pool // 2
        pool_states = pool_states.detach().clone()
        if self.cfg.damage_size > 0 and n_damaged > 0:
            pool_states[:n_damaged] = damage(pool_states[:n_damaged], self.cfg.damage_size, generator=self.gen)
        x = torch.cat([x[: b - n_pool], pool_x.to(x.dtype)])
        return x, pool_states, n_damaged

    def loss_terms(self, x: Tensor) -> dict[str, Tensor]:
        """Forward pass of one training step on a data-domain batch, pool included: the model's own loss.

        Returns:
            The model's loss dict (loss, recon, kl, elbo, state: the final NCA states) plus ``x``, the batch
            actually used (pool images in its last rows).
        """
        x, pool_states, _ = self.pool_batch(x)
        return self.model_loss(x, pool_states, None)  # T (non-doubling) is drawn after the posterior sample

    def host_batch(self, x: Tensor) -> tuple[Tensor, Tensor | None, int | None]:
        """The host's part of a step, done before the device work (the captured iteration, fastnca/graphs.py).

        Returns:
            ``(x, pool_states, num_steps)``: :meth:`pool_batch`'s batch and states, and T of a non-doubling model
            drawn from the data generator (None for a doubling one). The data generator draws as in
            :meth:`loss_terms`, where T comes after the posterior sample, which draws from the device generator.
        """
        x, pool_states, _ = self.pool_batch(x)
        nca = getattr(self.model, "nca", None)
        num_steps = None if nca is None or nca.doubling else nca.sample_num_steps(self.gen)
        return x, pool_states, num_steps

    def model_loss(self, x: Tensor, pool_states: Tensor | None, num_steps: int | None) -> dict[str, Tensor]:
        """The model's loss on the batch ``x`` (pool rows last, continuing from ``pool_states``) with T
        ``num_steps`` (None: drawn after the posterior sample, from the data generator); plus ``x``."""
        # the batch comes from to_model (in the likelihood's domain by construction): no per-step value check,
        # which would read back from the device every step
        out = self.loss_module(x, beta=self.cfg.beta, generator=self.dev_gen, steps_generator=self.gen,
                               num_steps=num_steps, start_states=pool_states, check_values=False)
        return {**out, "x": x}

    def train_step(self) -> Tensor:
        """One optimiser step.

        Returns:
            The step's statistics ``STAT_KEYS`` as one fp32 tensor on the training device. They are not read
            back here, so a GPU keeps its queue full; :meth:`sync_stats` reads them in one transfer and raises
            :class:`NonFiniteLossError` for the first step with a NaN or infinite value (before any checkpoint).
        """
        x = to_model(self.next_batch(), self.cfg.likelihood, device=self.device)
        if self.train_graph is not None:  # the same iteration, captured (fastnca/graphs.py)
            self.step += 1
            return self.train_graph(x)
        self.optimizer.zero_grad(set_to_none=True)
        out = self.loss_terms(x)
        loss = out["loss"]
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip, foreach=True)
        self.optimizer.step()
        if self.cfg.pool_size > 0:
            self.pool.add(out["x"], out["state"], generator=self.gen)
        self.step += 1
        stats = [loss, out["recon"].mean(), out["kl"].mean(), out["elbo"].mean(), grad_norm]
        return torch.stack([v.detach().float() for v in stats])

    def sync_stats(self, pending: list[Tensor], first_step: int) -> list[dict[str, float]]:
        """Read the statistics of steps ``first_step, first_step + 1, ...`` back; raise on the first non-finite."""
        if not pending:
            return []
        rows = torch.stack(pending)
        if self.dist is not None:  # global-batch means of loss, recon, kl, elbo (grad_norm is already global)
            n_mean = STAT_KEYS.index("grad_norm")
            rows = torch.cat([distributed.mean_over_ranks(rows[:, :n_mean], self.dist), rows[:, n_mean:]], 1)
        rows = rows.tolist()
        for i, vals in enumerate(rows):
            bad = [k for k, v in zip(STAT_KEYS, vals) if not math.isfinite(v)]
            if bad:
                what = "loss" if "loss" in bad else bad[0].replace("_", " ")
                value = vals[STAT_KEYS.index("loss" if "loss" in bad else bad[0])]
                raise NonFiniteLossError(f"non-finite {what} ({value}) at step {first_step + i}", first_step + i)
        return [dict(zip(STAT_KEYS, vals)) for vals in rows]

    # ------------------------------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    def state_dict(self) -> dict[str, Any]:
        gens = {"gen": self.gen} if self.dev_gen is self.gen else {"gen": self.gen, "dev_gen": self.dev_gen}
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(gens),
            "pool": self.pool.state_dict() if self.cfg.pool_size > 0 else None,
            "data": {"perm": self.perm, "pos": self.pos},
            "elapsed_s": self.elapsed_s,
            "log_window": [[row[k] for k in STAT_KEYS] for row in self.window],
            "run": self.run_record(),  # what ran: backend and arithmetic (a resume keeps both)
            "torch_version": str(torch.__version__),
        }

    def save(self) -> Path:
        """Write the checkpoint, after :meth:`check_parameters` (a diverged model never replaces a good one).

        Under torchrun every rank calls this (a collective): rank 0 gathers every rank's RNG states and pool shard
        and writes the file.

        Raises:
            OSError: the write failed (a full disk, a read-only folder); the message names the checkpoint and says
                that the previous one is unchanged.
        """
        self.check_parameters()
        state = self.state_dict()
        if self.dist is not None:
            state = distributed.gather_checkpoint(state, self.dist)
            if state is None:  # not rank 0
                return self.checkpoint_path
        try:
            return save_checkpoint(state, self.checkpoint_path)
        except OSError as err:
            before = "the previous checkpoint is unchanged" if self.checkpoint_path.is_file() else "none was written"
            raise OSError(
                err.errno, f"checkpoint {self.checkpoint_path} could not be written ({err.strerror or err}); {before}"
            ) from err

    @torch.no_grad()
    def check_parameters(self) -> None:
        """Raise NonFiniteLossError unless the current parameters are finite and give a finite loss.

        A step's loss is computed before its update, so a finite loss does not show that the updated parameters
        are good (a huge learning rate gives finite but exploding weights). The probe is one forward pass on the
        first training batch with its own generator (the training RNG streams do not move), run at each
        checkpoint only (on every rank under torchrun: the parameters are the same everywhere, so is the verdict).
        """
        cfg = self.cfg
        bad = [name for name, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            what = f"parameter {bad[0]} holds NaN or inf"
        else:
            x = to_model(self.train_images[: cfg.batch_size], cfg.likelihood, device=self.device)
            gen = torch.Generator(device=self.device).manual_seed(cfg.seed + PROBE_SEED_OFFSET)
            steps = {} if cfg.doubling else {"num_steps": cfg.max_steps}
            loss = float(self.model(x, beta=cfg.beta, generator=gen, **steps)["loss"])
            if math.isfinite(loss):
                return
            what = f"they give a non-finite loss ({loss}) on the first training batch"
        where = (
            f"the last good checkpoint is {self.checkpoint_path}"
            if self.checkpoint_path.is_file()
            else "no checkpoint was written yet"
        )
        raise NonFiniteLossError(
            f"the parameters after step {self.step} diverged ({what}); training stopped, {where}", self.step
        )

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint: expected format {CHECKPOINT_FORMAT!r}, got {ckpt.get('format')!r}")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self._apply_optimizer_config()
        gens = {"gen": self.gen} if self.dev_gen is self.gen else {"gen": self.gen, "dev_gen": self.dev_gen}
        set_rng_state(ckpt["rng"], gens)
        if ckpt.get("pool") is not None and self.cfg.pool_size > 0:
            self.pool.load_state_dict(ckpt["pool"], self.device)
            self.pool.capacity = self.cfg.pool_size
        self.perm = ckpt["data"]["perm"]
        self.pos = int(ckpt["data"]["pos"])
        self.step = int(ckpt["step"])
        self.elapsed_s = float(ckpt.get("elapsed_s", 0.0))
        self.window = [dict(zip(STAT_KEYS, vals)) for vals in ckpt.get("log_window", [])]
        distributed.restore_rank_state(self, ckpt, self.dist, self.log)

    def _apply_optimizer_config(self) -> None:
        """Settings the optimiser state owns (the learning rate) follow the config, also after loading a state."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr

    @classmethod
    def resume(
        cls, out_dir: str | os.PathLike[str], *, overrides: dict[str, Any] | None = None, **kwargs: Any
    ) -> Trainer:
        """A trainer that continues the run in ``out_dir`` from its checkpoint (config overrides allowed)."""
        path = Path(out_dir) / CHECKPOINT_NAME
        if not path.is_file():
            raise FileNotFoundError(no_checkpoint_message(Path(out_dir)))
        ckpt = read_checkpoint(path)
        cfg = checkpoint_config(ckpt, path)
        fixed = {k: v for k, v in (overrides or {}).items() if k in RESUME_FIXED and v != getattr(cfg, k)}
        if fixed:
            key, value = next(iter(fixed.items()))
            raise ValueError(
                f"--set {key}={value}: {key} cannot change on --resume (the checkpoint's model, data and random "
                f"streams were made with {key}={getattr(cfg, key)!r}); start a new run with another --out"
            )
        if overrides:
            cfg = cfg.replace(**overrides)
        # a checkpoint from before runs recorded their settings ran 'auto' by the capability rule and, on the fused
        # backend, fp32 as IEEE fp32: a resume keeps both
        recorded = ckpt.get("run") or {"device": "cuda", "arithmetic": "fp32-ieee" if cfg.precision == "fp32" else None}
        trainer = cls(cfg, out_dir, recorded_run=recorded, **kwargs)
        load_weights(trainer, ckpt, path, what="training")
        trainer._truncate_metrics(trainer.step)
        return trainer

    # ------------------------------------------------------------------------------------------ metrics
    @property
    def metrics_path(self) -> Path:
        return self.out_dir / METRICS_NAME

    def write_metrics(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tracker is not None:
            self.tracker.log_row(row, self.model)

    def _truncate_metrics(self, step: int) -> None:
        """Drop rows logged after ``step`` by an interrupted session, so a resumed run's log has no duplicates.

        A damaged last line (a crash in the middle of writing it) is dropped with a warning; a damaged line
        anywhere else is an error that names the file and the line. Rank 0 alone writes run files under torchrun.
        """
        if not self.is_main or not self.metrics_path.is_file():
            return
        lines = [(i, line) for i, line in enumerate(self.metrics_path.read_text().splitlines(), 1) if line.strip()]
        kept = []
        for i, line in lines:
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            except ValueError as err:
                if i == lines[-1][0]:
                    self.log(f"warning: {self.metrics_path}: dropped its damaged last line {i} ({err})")
                    break
                raise ValueError(f"{self.metrics_path}: line {i} is not a metrics row ({err})") from None
            if row.get("step", 0) <= step:
                kept.append(line)
        _write_text_atomic(self.metrics_path, "".join(line + "\n" for line in kept))

    def evaluate(self, *, progress: bool | None = None) -> dict[str, Any]:
        """IWAE with eval_samples importance samples over eval_batches test batches (0: all); writes a row."""
        cfg = self.cfg
        t0 = time.perf_counter()
        res = evaluate_iwae(
            self.model,
            self.splits.test,
            k=cfg.eval_samples,
            batch_size=cfg.batch_size,
            batches=cfg.eval_batches,
            seed=cfg.seed + EVAL_SEED_OFFSET,
            progress=self.progress if progress is None else progress,
        )
        row = {
            "step": self.step,
            "split": "test",
            **res,
            "eval_s": round(time.perf_counter() - t0, 3),
            "elapsed_s": round(self.elapsed_s, 3),
        }
        self.write_metrics(row)
        return row

    # ------------------------------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train up to ``config.iterations`` steps (or the time limit), then checkpoint, evaluate and draw.

        A run that already finished (all its iterations trained and its summary.json written) is left as it is: the
        log says there is nothing to do and its summary is returned, so no file of it is rewritten.

        Returns:
            A summary: step, stopped ('done' | 'time_limit'), elapsed_s, last train row, last eval row.

        Raises:
            NonFiniteLossError: the last good checkpoint on disk is kept; the message says where it is.
            TrainingInterrupted: SIGINT or SIGTERM; the step in flight was finished and checkpointed.
            KeyboardInterrupt: a second signal; no new checkpoint (the last one on disk is kept).
        """
        cfg = self.cfg
        if self.is_main:
            self.lock.acquire()  # held from __init__ on; taken again by a second fit() after the first released it
        try:
            finished = self._finished_summary()
            if finished is not None:
                self.log(f"nothing to do: the run in {self.out_dir} finished at step {self.step} "
                         f"(iterations={cfg.iterations}); --set iterations=N with N > {self.step} trains it longer")
                return finished
            return self._fit()
        finally:
            self.lock.release()

    def _finished_summary(self) -> dict[str, Any] | None:
        """The summary of a run that already trained all its iterations and wrote it, else None."""
        path = self.out_dir / "summary.json"
        if self.step < self.cfg.iterations or self.step == 0 or not path.is_file():
            return None
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # damaged: finishing again rewrites it
        return summary if isinstance(summary, dict) and summary.get("step") == self.step else None

    def _fit(self) -> dict[str, Any]:
        """The training loop, top to bottom: step, log, evaluate, checkpoint, stop; then the run's end."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        self._start_session()
        stats = _TrainLog(self)  # steps' statistics: read back from the device at log points only
        clock = _SessionClock(self.elapsed_s)
        stopped, last_eval = "done", None
        bar = tqdm(total=cfg.iterations, initial=self.step, desc="train", unit="it", disable=not self.progress,
                   dynamic_ncols=True)
        with bar, _StopRequests() as stop, self._said_where_on_a_second_signal():
            while self.step < cfg.iterations:
                stats.add(self.train_step())
                self.elapsed_s = clock.elapsed()
                bar.update(1)
                if self._due(cfg.log_every) or self.step == cfg.iterations:
                    row = stats.log_row()
                    bar.set_postfix(loss=f"{row['loss']:.2f}", kl=f"{row['kl']:.2f}", its=f"{row['it_per_s'] or 0:.2f}")
                if self._due(cfg.eval_every) and self.step < cfg.iterations:
                    stats.sync()
                    last_eval = ev = self.evaluate(progress=False)
                    bar.write(f"step {self.step}: test IWAE({cfg.eval_samples}) {ev['iwae']:.2f} nats "
                              f"({ev['bpd']:.4f} bits/dim)")
                    clock.exclude(ev["eval_s"])
                    stats.exclude(ev["eval_s"])
                if self._due(cfg.ckpt_every):
                    stats.sync()
                    self.save()
                if self.time_limit is not None and self._time_up(clock.start):
                    stopped = "time_limit"
                    break
                if self._stop_requested(stop):
                    stats.sync()
                    self._checkpoint_and_raise_interrupted(stop)
            stats.sync()
        if stats.window:  # the steps of a time-limited stop between log points
            stats.log_row()
        return self._finish(stopped, stats.last_row, last_eval)

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def _start_session(self) -> None:
        """Run files at the start of a session: orphan temps removed, the metrics cut to the checkpoint's step (a
        fresh run starts a fresh file), config.json (the config as asked, and how this process resolved it)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not self.is_main:  # rank 0 alone writes run files under torchrun
            return
        orphans = remove_orphan_temps(self.out_dir)
        if orphans:
            self.log(f"removed {len(orphans)} temporary file(s) left in {self.out_dir} by an interrupted write")
        self._truncate_metrics(self.step)
        doc = {**self.cfg.to_dict(), RESOLVED_KEY: self.run_record()}  # --config reads it back, ignoring 'resolved'
        _write_text_atomic(self.out_dir / "config.json", json.dumps(doc, indent=2) + "\n")

    def _checkpoint_and_raise_interrupted(self, stop: _StopRequests) -> None:
        """SIGINT / SIGTERM: checkpoint at this step boundary (the unlogged window included, so --resume continues
        exactly) and raise TrainingInterrupted."""
        self.save()
        signum = stop.signum if stop.signum is not None else signal.SIGTERM  # another rank's signal
        raise TrainingInterrupted(
            f"{signal.Signals(signum).name} at step {self.step}: checkpoint written to {self.checkpoint_path} "
            "(continue with --resume)", self.step, signum)

    @contextlib.contextmanager
    def _said_where_on_a_second_signal(self) -> Iterator[None]:
        """A second signal stops at once (KeyboardInterrupt, no new checkpoint): say where the last one is."""
        try:
            yield
        except KeyboardInterrupt:
            where = (f"the last checkpoint is {self.checkpoint_path}" if self.checkpoint_path.is_file()
                     else "no checkpoint was written yet")
            self.log(f"stopped at once during step {self.step + 1}, without a new checkpoint; {where}")
            raise

    def _finish(self, stopped: str, last_train: dict[str, Any], last_eval: dict[str, Any] | None) -> dict[str, Any]:
        """The run's end: a checkpoint, the final evaluation (else the last periodic one is the summary's) and
        pictures, summary.json."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.save()
        if stopped == "time_limit":
            self.log(f"time limit of {self.time_limit:g} s reached at step {self.step}; checkpoint written")
        if self.final_outputs and self.final_eval:
            last_eval = self.evaluate()
            tqdm.write(  # results go to stdout, like the periodic evaluations' lines (messages go to self.log)
                f"step {self.step}: test IWAE({cfg.eval_samples}, {last_eval['n_images']} images) "
                f"{last_eval['iwae']:.2f} nats ({last_eval['bpd']:.4f} bits/dim)"
            )
        if self.final_outputs:
            self.draw()
        summary = {"step": self.step, "stopped": stopped, "elapsed_s": round(self.elapsed_s, 3), "train": last_train,
                   "eval": last_eval, "out_dir": str(self.out_dir)}
        if self.is_main:
            _write_text_atomic(self.out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        if self.tracker is not None:
            self.tracker.close()
        return summary

    def _stop_requested(self, stop: _StopRequests) -> bool:
        """A SIGINT/SIGTERM asked to stop. Under torchrun every rank must stop at the same step (a rank that
        stopped alone would leave the others waiting in the next all-reduce), so the ranks agree at log points
        only (one sync per window): the stop then lands on the next multiple of log_every."""
        requested = stop.signum is not None
        if self.dist is None:
            return requested
        if self.cfg.log_every > 0 and self.step % self.cfg.log_every != 0 and self.step < self.cfg.iterations:
            return False
        return distributed.any_rank(requested, self.dist, self.device)

    def _time_up(self, session_start: float) -> bool:
        """The time limit is reached; under torchrun every rank agrees, at log points only (one sync per window)."""
        up = time.perf_counter() - session_start >= (self.time_limit or math.inf)
        if self.dist is None:
            return up
        if self.cfg.log_every > 0 and self.step % self.cfg.log_every != 0 and self.step < self.cfg.iterations:
            return False
        return distributed.any_rank(up, self.dist, self.device)

    def draw(self, n: int = 64) -> None:
        """samples.png (prior samples, likelihood means) and growth.png (every step of 8 samples)."""
        from fastnca.figures import growth_figure, sample_grid

        if not self.is_main:
            return
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 7)
        sample_grid(self.model, self.out_dir / "samples.png", n=n, generator=gen)
        growth_figure(self.model, self.out_dir / "growth.png", n=8, generator=gen)


def steps_per_second(rows: list[dict[str, Any]]) -> float:
    """Mean it/s over train rows (helper for experiment scripts)."""
    vals = [r["it_per_s"] for r in rows if r.get("split") == "train" and r.get("it_per_s")]
    return sum(vals) / len(vals) if vals else math.nan
