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
``growth.png`` at the end.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastnca.config import Config
from fastnca.data import Splits, load_for_config, to_model
from fastnca.evaluate import CHECKPOINT_NAME, evaluate_iwae, read_checkpoint, resolve_device
from fastnca.utils import atomic_write

__all__ = [
    "Trainer",
    "Pool",
    "NonFiniteLossError",
    "damage",
    "damage_masks",
    "save_checkpoint",
    "rng_state",
    "set_rng_state",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = "fastnca-checkpoint-v1"
METRICS_NAME = "metrics.jsonl"
STAT_KEYS = ("loss", "recon", "kl", "elbo", "grad_norm")  # per-step training statistics, in this order
EVAL_SEED_OFFSET = 1_000_003  # the evaluation generator's seed is cfg.seed + this, apart from the training streams


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; the message names the step."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


# ---------------------------------------------------------------------------------------------- pool and damage
def damage_masks(
    n: int,
    height: int,
    width: int,
    size: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Per-example 0/1 masks ``(n, 1, H, W)`` that are 0 in one random ``size`` x ``size`` square, 1 elsewhere.

    The square's top-left corner is uniform over the positions that keep it inside the grid; the positions are
    drawn on ``generator`` (a CPU generator) so that they are reproducible.
    """
    size_h, size_w = min(size, height), min(size, width)
    top = torch.randint(0, height - size_h + 1, (n,), generator=generator)
    left = torch.randint(0, width - size_w + 1, (n,), generator=generator)
    rows = torch.arange(height)[None, :, None]
    cols = torch.arange(width)[None, None, :]
    inside = (
        (rows >= top[:, None, None])
        & (rows < (top + size_h)[:, None, None])
        & (cols >= left[:, None, None])
        & (cols < (left + size_w)[:, None, None])
    )
    return (~inside).to(device)[:, None]


def damage(states: Tensor, size: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Zero every channel of each state in a random ``size`` x ``size`` square: ``(n, C, H, W)`` -> same."""
    if states.shape[0] == 0 or size <= 0:
        return states
    keep = damage_masks(
        states.shape[0], states.shape[2], states.shape[3], size, generator=generator, device=states.device
    )
    return states * keep.to(states.dtype)


class Pool:
    """The pool of (image, final NCA state) pairs of pool and damage training, kept on the training device.

    ``take(n)`` removes and returns the first n entries (as the authors' code does); ``add`` appends a batch,
    shuffles the whole pool with the given generator and keeps the first ``capacity`` entries.

    Attributes:
        images: ``(N, C_img, H, W)`` data-domain images, or None while empty.
        states: ``(N, |z|, H, W)`` detached final states, or None while empty.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"pool_size: expected an integer >= 0, got {capacity}")
        self.capacity = capacity
        self.images: Tensor | None = None
        self.states: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.states is None else self.states.shape[0]

    def take(self, n: int) -> tuple[Tensor, Tensor]:
        """Remove the first ``n`` entries and return ``(images, states)``."""
        if self.images is None or self.states is None or n > len(self):
            raise ValueError(f"pool: cannot take {n} entries from a pool of {len(self)}")
        images, states = self.images[:n], self.states[:n]
        self.images, self.states = self.images[n:], self.states[n:]
        return images, states

    def add(self, images: Tensor, states: Tensor, generator: torch.Generator | None = None) -> None:
        """Append detached copies of ``images`` and ``states``, shuffle, cut to capacity."""
        images, states = images.detach(), states.detach()
        if self.images is None or self.states is None or len(self) == 0:
            all_images, all_states = images, states
        else:
            all_images = torch.cat([self.images, images])
            all_states = torch.cat([self.states, states.to(self.states.dtype)])
        order = torch.randperm(all_states.shape[0], generator=generator)[: self.capacity].to(all_states.device)
        self.images = all_images.index_select(0, order)
        self.states = all_states.index_select(0, order).contiguous(memory_format=torch.channels_last)

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "images": self.images, "states": self.states}

    def load_state_dict(self, d: dict[str, Any], device: torch.device | None = None) -> None:
        self.capacity = int(d["capacity"])
        self.images = None if d["images"] is None else d["images"].to(device)
        self.states = (
            None if d["states"] is None else d["states"].to(device).contiguous(memory_format=torch.channels_last)
        )


# ---------------------------------------------------------------------------------------------- RNG and files
def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every RNG state as tensors, lists and numbers (so the checkpoint loads with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    for k, g in generators.items():
        if k in state["generators"]:
            g.set_state(state["generators"][k])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` with torch.save atomically: a temp file in the same folder, fsync, os.replace.

    A crash or an exception mid-write leaves the previous file at ``path`` untouched and no temp file behind.
    """
    return atomic_write(path, lambda f: torch.save(obj, f))


def _write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


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
    ) -> None:
        from fastnca.vae import VNCA

        config.validate()
        if config.pool_size > 0 and config.doubling:
            raise ValueError(
                "pool_size: pool and damage training needs a non-doubling model (doubling=False); "
                "pool states live on the final grid, which a doubling rollout only reaches at its end"
            )
        if time_limit is not None and time_limit <= 0:
            raise ValueError(f"time_limit: expected a positive number of seconds, got {time_limit}")
        self.cfg = config
        self.out_dir = Path(out_dir)
        self.device = resolve_device(device or config.device)
        self.time_limit = time_limit
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
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

        torch.manual_seed(config.seed)  # parameter initialisation
        self.model = VNCA(config).to(self.device)
        self.model.train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, fused=True)  # one kernel
        self.gen = torch.Generator().manual_seed(config.seed)
        self.dev_gen = (
            self.gen if self.device.type == "cpu" else torch.Generator(device=self.device).manual_seed(config.seed + 1)
        )
        self.pool = Pool(config.pool_size)
        self.step = 0
        self.elapsed_s = 0.0  # training wall time over all sessions (evaluation excluded)
        self.perm = torch.randperm(self.splits.train.shape[0], generator=self.gen)
        self.pos = 0

    # ------------------------------------------------------------------------------------------ data
    def next_batch(self) -> Tensor:
        """The next ``batch_size`` training images (uint8) of the current shuffled epoch; partial tails dropped."""
        b = self.cfg.batch_size
        if self.pos + b > self.perm.numel():
            self.perm = torch.randperm(self.splits.train.shape[0], generator=self.gen)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + b]
        self.pos += b
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
        """Forward pass of one training step on a data-domain batch, pool included: loss, recon, kl, elbo, state."""
        cfg, model = self.cfg, self.model
        x, pool_states, _ = self.pool_batch(x)
        mu, log_sigma = model.encode(x)
        z = model.sample_posterior(mu, log_sigma, self.dev_gen)
        num_steps = None if cfg.doubling else model.nca.sample_num_steps(self.gen)
        if pool_states is None:
            state = model.decode(z, num_steps=num_steps, generator=self.dev_gen)
        else:
            n_fresh = x.shape[0] - pool_states.shape[0]
            seeds = model.nca.seed(z[:n_fresh])
            start = torch.cat([seeds, pool_states.to(seeds.dtype)])
            state = model.nca.run(start, num_steps, generator=self.dev_gen)
        recon = model.log_likelihood(x, state)
        kl = model.kl(mu, log_sigma)
        elbo = recon - cfg.beta * kl
        return {"loss": -elbo.mean(), "recon": recon, "kl": kl, "elbo": elbo, "state": state, "x": x}

    def train_step(self) -> Tensor:
        """One optimiser step.

        Returns:
            The step's statistics ``STAT_KEYS`` as one fp32 tensor on the training device. They are not read
            back here, so a GPU keeps its queue full; :meth:`sync_stats` reads them in one transfer and raises
            :class:`NonFiniteLossError` for the first step with a NaN or infinite value (before any checkpoint).
        """
        x = to_model(self.next_batch(), self.cfg.likelihood, device=self.device)
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
        rows = torch.stack(pending).tolist()
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
            "torch_version": str(torch.__version__),
        }

    def save(self) -> Path:
        return save_checkpoint(self.state_dict(), self.checkpoint_path)

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint: expected format {CHECKPOINT_FORMAT!r}, got {ckpt.get('format')!r}")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        gens = {"gen": self.gen} if self.dev_gen is self.gen else {"gen": self.gen, "dev_gen": self.dev_gen}
        set_rng_state(ckpt["rng"], gens)
        if ckpt.get("pool") is not None and self.cfg.pool_size > 0:
            self.pool.load_state_dict(ckpt["pool"], self.device)
            self.pool.capacity = self.cfg.pool_size
        self.perm = ckpt["data"]["perm"]
        self.pos = int(ckpt["data"]["pos"])
        self.step = int(ckpt["step"])
        self.elapsed_s = float(ckpt.get("elapsed_s", 0.0))

    @classmethod
    def resume(
        cls, out_dir: str | os.PathLike[str], *, overrides: dict[str, Any] | None = None, **kwargs: Any
    ) -> Trainer:
        """A trainer that continues the run in ``out_dir`` from its checkpoint (config overrides allowed)."""
        path = Path(out_dir) / CHECKPOINT_NAME
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {str(path)!r}; start the run without --resume")
        ckpt = read_checkpoint(path)
        cfg = Config.from_dict(ckpt["config"])
        if overrides:
            cfg = cfg.replace(**overrides)
        trainer = cls(cfg, out_dir, **kwargs)
        trainer.load_state_dict(ckpt)
        trainer._truncate_metrics(trainer.step)
        return trainer

    # ------------------------------------------------------------------------------------------ metrics
    @property
    def metrics_path(self) -> Path:
        return self.out_dir / METRICS_NAME

    def write_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """Drop rows logged after ``step`` by an interrupted session, so a resumed run's log has no duplicates."""
        if not self.metrics_path.is_file():
            return
        kept = [
            line
            for line in self.metrics_path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
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

        Returns:
            A summary: step, stopped ('done' | 'time_limit'), elapsed_s, last train row, last eval row.

        Raises:
            NonFiniteLossError: the last good checkpoint on disk is kept; the message says where it is.
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(self.out_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        session_start = time.perf_counter()
        stopped = "done"
        last_train: dict[str, Any] = {}
        last_eval: dict[str, Any] | None = None
        pending: list[Tensor] = []  # device-side stats of steps not yet read back
        window: list[dict[str, float]] = []  # read-back stats of the current logging window
        window_t0 = time.perf_counter()
        elapsed_at_start = self.elapsed_s
        eval_s = 0.0  # periodic evaluation time this session, kept out of elapsed_s (but not out of time_limit)

        def sync() -> None:
            nonlocal pending
            first = self.step - len(pending) + 1
            try:
                window.extend(self.sync_stats(pending, first))
            except NonFiniteLossError as err:
                where = (
                    f"the last good checkpoint is {self.checkpoint_path}"
                    if self.checkpoint_path.is_file()
                    else "no checkpoint was written yet"
                )
                raise NonFiniteLossError(f"{err}; training stopped, {where}", err.step) from None
            pending = []

        def log_window() -> dict[str, Any]:
            nonlocal window, window_t0
            dt = time.perf_counter() - window_t0
            row = {
                "step": self.step,
                "split": "train",
                **{k: sum(s[k] for s in window) / len(window) for k in STAT_KEYS},
                "it_per_s": round(len(window) / dt, 3) if dt > 0 else None,
                "elapsed_s": round(self.elapsed_s, 3),
            }
            self.write_metrics(row)
            window, window_t0 = [], time.perf_counter()
            return row

        bar = tqdm(
            total=cfg.iterations,
            initial=self.step,
            desc="train",
            unit="it",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        try:
            while self.step < cfg.iterations:
                pending.append(self.train_step())
                self.elapsed_s = elapsed_at_start + time.perf_counter() - session_start - eval_s
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.iterations:
                    sync()
                    last_train = log_window()
                    bar.set_postfix(
                        loss=f"{last_train['loss']:.2f}",
                        kl=f"{last_train['kl']:.2f}",
                        its=f"{last_train['it_per_s']:.2f}",
                    )
                if cfg.eval_every > 0 and self.step % cfg.eval_every == 0 and self.step < cfg.iterations:
                    sync()
                    last_eval = self.evaluate(progress=False)
                    bar.write(
                        f"step {self.step}: test IWAE({cfg.eval_samples}) {last_eval['iwae']:.2f} nats "
                        f"({last_eval['bpd']:.4f} bits/dim)"
                    )
                    window_t0 += last_eval["eval_s"]
                    eval_s += last_eval["eval_s"]
                if cfg.ckpt_every > 0 and self.step % cfg.ckpt_every == 0:
                    sync()
                    self.save()
                if self.time_limit is not None and time.perf_counter() - session_start >= self.time_limit:
                    stopped = "time_limit"
                    break
            sync()
        except KeyboardInterrupt:
            bar.close()
            sync()
            self.save()
            self.log(
                f"interrupted at step {self.step}; checkpoint written to {self.checkpoint_path} "
                "(continue with --resume)"
            )
            raise
        finally:
            bar.close()
        if window:  # the steps of a time-limited stop between log points
            last_train = log_window()
        self.save()
        if stopped == "time_limit":
            self.log(f"time limit of {self.time_limit:g} s reached at step {self.step}; checkpoint written")
        if self.final_outputs and self.final_eval:
            last_eval = self.evaluate()
            self.log(
                f"step {self.step}: test IWAE({cfg.eval_samples}, {last_eval['n_images']} images) "
                f"{last_eval['iwae']:.2f} nats ({last_eval['bpd']:.4f} bits/dim)"
            )
        if self.final_outputs:
            self.draw()
        summary = {
            "step": self.step,
            "stopped": stopped,
            "elapsed_s": round(self.elapsed_s, 3),
            "train": last_train,
            "eval": last_eval,
            "out_dir": str(self.out_dir),
        }
        _write_text_atomic(self.out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary

    def draw(self, n: int = 64) -> None:
        """samples.png (prior samples, likelihood means) and growth.png (every step of 8 samples)."""
        from fastnca.figures import growth_figure, sample_grid

        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 7)
        sample_grid(self.model, self.out_dir / "samples.png", n=n, generator=gen)
        growth_figure(self.model, self.out_dir / "growth.png", n=8, generator=gen)


def steps_per_second(rows: list[dict[str, Any]]) -> float:
    """Mean it/s over train rows (helper for experiment scripts)."""
    vals = [r["it_per_s"] for r in rows if r.get("split") == "train" and r.get("it_per_s")]
    return sum(vals) / len(vals) if vals else math.nan
