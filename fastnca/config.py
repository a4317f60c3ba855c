"""Typed configuration and the presets, one per experiment of the VNCA paper (see docs/PAPER.md).

One flat dataclass holds the model and the training settings so that ``--set key=value`` maps onto a field
and every checkpoint stores the whole config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Config", "PRESETS", "get_preset", "preset_names", "parse_value", "unknown_key_message", "MAX_SEED",
           "BACKENDS", "PRECISIONS", "RESOLVED_KEY", "check_choice"]

BACKENDS = ("torch", "triton", "auto")
# the key of a run's config.json under which the trainer records how it resolved the config (fastnca.run)
RESOLVED_KEY = "resolved"
# Keys of earlier releases that no setting reads any more: a config file or checkpoint that carries one loads with it
# ignored (small_grid_backward: the small-grid backward kernels, removed; the per-step backward runs those steps)
RETIRED_KEYS = ("small_grid_backward",)
# fp32: fp32 state, the NCA's dots in TF32 where PyTorch runs convolutions in TF32 (its default on a GPU);
# tf32: always TF32; fp32-ieee: IEEE fp32 dots; bf16: bf16 state and dots (fastnca/run.py has the table)
PRECISIONS = ("fp32", "tf32", "fp32-ieee", "bf16")


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise ValueError naming ``key`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")


# Seeds go to torch.Generator.manual_seed (64 bits) with offsets added (fastnca.train, fastnca.figures): 32 bits
# leave room for every offset, as in NumPy's legacy seeding.
MAX_SEED = 2**32 - 1


def unknown_key_message(key: str, keys: list[str] | None = None) -> str:
    """``unknown config key 'iteration'; did you mean 'iterations'?`` (the valid keys when nothing is close)."""
    import difflib

    keys = sorted(keys or Config.keys())
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    if close:
        return f"unknown config key {key!r}; did you mean {' or '.join(repr(k) for k in close)}?"
    return f"unknown config key {key!r}; valid keys: {keys}"


@dataclass
class Config:
    """Everything that defines a VNCA run. Field names are the keys of ``fastnca train --set key=value``."""

    # data
    dataset: str = "mnist"  # mnist | emoji | celeba
    image_size: int = 32  # side of the (square) image the model sees
    image_channels: int = 1
    # likelihood
    likelihood: str = "bernoulli"  # bernoulli | dml (discretized logistic mixture)
    n_mix: int = 1
    # encoder
    enc_channels: int = 32  # first conv's channels; doubles over the 4 strided convs (32 -> 512)
    enc_first_padding: int = 2  # 4 for the 28x28 non-doubling MNIST model (28 + 8 - 4 = 32)
    # NCA decoder
    state_channels: int = 256  # |z|: latent size and cell state size
    hidden_channels: int = 256  # h
    n_blocks: int = 4
    bias: bool = True
    out_bias: bool | None = None  # None: bias and n_blocks > 0 (the block-free net has no output bias)
    doubling: bool = True
    seed_size: int = 2
    n_doublings: int = 4  # K
    steps_per_stage: int = 8  # M
    grid_size: int = 32  # non-doubling: side of the grid the seed fills
    min_steps: int = 32  # non-doubling: T ~ U{min_steps..max_steps}, drawn per batch
    max_steps: int = 64
    p_update: float = 1.0  # mnist-nondoubling: 0.5, the authors' code behind fig. 9 (docs/PAPER.md, "Step")
    backend: str = "auto"  # torch | triton | auto (the faster on CUDA, measured by the trainer; torch elsewhere)
    precision: str = "fp32"  # fp32 | tf32 | fp32-ieee | bf16: the NCA state and its dots (fastnca/run.py)
    checkpoint: str = "auto"  # none | step | segments=k | auto: what the rollout keeps for backward
    small_grid: bool = True  # fused backend: the steps on grids <= 8x8 in one launch (kernels/small_grid.py)
    # fused backward's weight gradients: per-step | batched | batched-cublas (kernels/schedule.py WGRADS); per-step
    # stays the default until a GPU measures a batched design faster (benchmarks/RESULTS.md)
    wgrad: str = "per-step"
    wgrad_batch_mib: int = 2048  # batched designs: the cap of the buffers of one batch of steps (MiB)
    # training
    batch_size: int = 32
    lr: float = 1e-4
    beta: float = 1.0
    grad_clip: float = 10.0
    iterations: int = 100_000
    pool_size: int = 0  # 0: no pool and damage training
    damage_size: int = 0  # side of the zeroed square
    eval_every: int = 5000
    eval_samples: int = 128  # K of the importance-weighted bound
    eval_batches: int = 20  # periodic evaluation on this many test batches (a fixed random subset); 0: all
    # non-doubling models' T in the IWAE: 'image' (one T per image for all its samples: the authors' test, so the
    # paper's numbers compare) or 'sample' (a T drawn with each z: the bound with T as a latent); VNCA.iwae
    iwae_steps: str = "image"
    ckpt_every: int = 1000
    log_every: int = 50
    seed: int = 0
    device: str = "auto"
    cuda_graphs: bool = True  # on CUDA, replay the training step and the IWAE as CUDA graphs (docs/TRAINING.md)
    notes: str = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # whole numbers are fine for float fields: store them as floats
            v = getattr(self, f.name)
            if f.type == "float" and type(v) is int:
                setattr(self, f.name, float(v))
        self.validate()

    @property
    def use_out_bias(self) -> bool:
        return self.bias and self.n_blocks > 0 if self.out_bias is None else self.out_bias

    @property
    def output_size(self) -> int:
        """Side of the NCA's final grid."""
        if self.doubling:
            return self.seed_size * 2**self.n_doublings
        return self.grid_size

    def _check_types(self) -> None:
        """Each field has its declared type: real bools, ints that are not bools or floats, finite-or-not floats."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "bool":
                ok, expected = isinstance(v, bool), "True or False"
            elif f.type == "bool | None":
                ok, expected = v is None or isinstance(v, bool), "True, False or None"
            elif f.type == "int":
                ok = isinstance(v, int) and not isinstance(v, bool)
                expected = "an integer (not a float, bool or string)"
            elif f.type == "float":
                ok = isinstance(v, (int, float)) and not isinstance(v, bool)
                expected = "a number (int or float, not a bool or string)"
            elif f.type == "str":
                ok, expected = isinstance(v, str), "a string"
            else:  # pragma: no cover - a new field with a type this check does not know
                raise TypeError(f"{f.name}: Config.validate has no check for type {f.type!r}")
            if not ok:
                raise ValueError(f"{f.name}: expected {expected}, got {v!r} ({type(v).__name__})")

    def validate(self) -> None:
        """Raise ValueError naming the first field whose type or value is wrong, and what was expected."""
        self._check_types()

        def need(cond: bool, key: str, expected: str) -> None:
            if not cond:
                raise ValueError(f"{key}: expected {expected}, got {getattr(self, key)!r}")

        finite = lambda v: math.isfinite(v)  # noqa: E731
        need(self.dataset in ("mnist", "emoji", "celeba"), "dataset", "one of mnist, emoji, celeba")
        need(self.likelihood in ("bernoulli", "dml"), "likelihood", "'bernoulli' or 'dml'")
        need(self.image_size >= 1, "image_size", "an integer >= 1")
        need(self.image_channels in (1, 3), "image_channels", "1 or 3")
        need(self.n_mix >= 1, "n_mix", "an integer >= 1")
        need(self.enc_channels >= 1, "enc_channels", "a positive integer")
        need(self.enc_first_padding >= 0, "enc_first_padding", "an integer >= 0")
        need(self.image_size + 2 * self.enc_first_padding >= 5, "enc_first_padding",
             f"image_size + 2 * enc_first_padding >= 5 (the encoder's first 5x5 conv), with image_size="
             f"{self.image_size}")
        need(self.state_channels >= 1, "state_channels", "a positive integer")
        need(self.hidden_channels >= 1, "hidden_channels", "a positive integer")
        need(0 <= self.n_blocks <= 16, "n_blocks", "an integer in 0..16")
        need(self.seed_size >= 1, "seed_size", "a positive integer")
        need(self.n_doublings >= 0, "n_doublings", "an integer >= 0")
        need(self.steps_per_stage >= 1, "steps_per_stage", "an integer >= 1")
        need(self.grid_size >= 1, "grid_size", "a positive integer")
        need(1 <= self.min_steps <= self.max_steps, "min_steps", f"1 <= min_steps <= max_steps={self.max_steps}")
        need(0.0 < self.p_update <= 1.0, "p_update", "a probability in (0, 1]")
        check_choice("backend", self.backend, BACKENDS)
        check_choice("precision", self.precision, PRECISIONS)
        need(self.batch_size >= 1, "batch_size", "a positive integer")
        need(self.lr > 0 and finite(self.lr), "lr", "a finite positive number")
        need(self.beta >= 0 and finite(self.beta), "beta", "a finite number >= 0")
        need(self.grad_clip > 0, "grad_clip", "a positive number (inf: no clipping)")
        need(self.iterations >= 0, "iterations", "an integer >= 0")
        need(self.pool_size >= 0, "pool_size", "an integer >= 0")
        side = self.output_size
        need(0 <= self.damage_size <= side, "damage_size", f"an integer in 0..{side} (the side of the final grid)")
        need(self.eval_every >= 0, "eval_every", "an integer >= 0 (0: no periodic evaluation)")
        need(self.eval_samples >= 1, "eval_samples", "an integer >= 1")
        need(self.eval_batches >= 0, "eval_batches", "an integer >= 0 (0: the whole test set)")
        need(self.iwae_steps in ("image", "sample"), "iwae_steps", "'image' or 'sample' (a non-doubling T per "
             "image or per sample in the IWAE)")
        need(self.ckpt_every >= 0, "ckpt_every", "an integer >= 0 (0: no periodic checkpoints)")
        need(self.log_every >= 1, "log_every", "an integer >= 1")
        need(0 <= self.seed <= MAX_SEED, "seed", f"an integer in 0..{MAX_SEED}")
        need(self.device.strip() != "", "device", "a device name such as auto, cpu, cuda or cuda:1")
        from fastnca.kernels.schedule import parse_checkpoint  # the policy's one grammar

        parse_checkpoint(self.checkpoint, self.max_steps, self.doubling)
        from fastnca.kernels.schedule import WGRADS

        check_choice("wgrad", self.wgrad, WGRADS)
        need(self.wgrad_batch_mib >= 1, "wgrad_batch_mib", "an integer >= 1 (MiB)")
        if self.likelihood == "dml":
            need(self.image_channels == 3, "image_channels", "3 for the discretized logistic mixture")
            need(10 * self.n_mix <= self.state_channels, "n_mix",
                 f"10 * n_mix <= state_channels={self.state_channels} (the mixture's parameters live in the state)")
        if self.doubling:
            need(self.output_size == self.image_size, "image_size",
                 f"seed_size * 2**n_doublings = {self.output_size} for a doubling model")
        else:
            need(self.grid_size == self.image_size, "grid_size", f"image_size={self.image_size} (non-doubling)")

    def replace(self, **overrides: Any) -> Config:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(unknown_key_message(sorted(unknown)[0]))
        return dataclasses.replace(self, **overrides)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def parse_value(key: str, text: str) -> Any:
    """Parse ``text`` into the type of Config field ``key`` (for ``--set key=value``)."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    if key not in fields:
        raise ValueError(unknown_key_message(key))
    default = getattr(Config(), key)
    kind = fields[key].type
    try:
        if isinstance(default, bool) or kind in ("bool", "bool | None"):
            if text.lower() in ("none", "null") and "None" in str(kind):
                return None
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        return text
    except ValueError:
        raise ValueError(f"{key}: expected a value of type {kind}, got {text!r}") from None


_DOUBLING = dict(state_channels=256, hidden_channels=256, n_blocks=4, doubling=True, seed_size=2, steps_per_stage=8)

PRESETS: dict[str, dict[str, Any]] = {
    "mnist-doubling": dict(_DOUBLING, dataset="mnist", image_size=32, image_channels=1, likelihood="bernoulli",
                           n_doublings=4, batch_size=32, beta=1.0, grad_clip=10.0),
    "celeba-doubling": dict(_DOUBLING, dataset="celeba", image_size=64, image_channels=3, likelihood="dml",
                            n_mix=1, n_doublings=5, batch_size=32, beta=1.0, grad_clip=10.0),
    "celeba-doubling-beta100": dict(_DOUBLING, dataset="celeba", image_size=64, image_channels=3, likelihood="dml",
                                    n_mix=4, n_doublings=5, batch_size=32, beta=100.0, grad_clip=1.0),
    "emoji-doubling": dict(_DOUBLING, dataset="emoji", image_size=64, image_channels=3, likelihood="dml",
                           n_mix=1, n_doublings=5, batch_size=32, beta=1.0, grad_clip=10.0),
    "mnist-nondoubling": dict(dataset="mnist", image_size=28, image_channels=1, likelihood="bernoulli",
                              enc_first_padding=4, state_channels=128, hidden_channels=128, n_blocks=0,
                              doubling=False, grid_size=28, min_steps=32, max_steps=64, p_update=0.5,
                              batch_size=128, grad_clip=1.0, pool_size=1024, damage_size=14),
    "celeba-nondoubling": dict(dataset="celeba", image_size=62, image_channels=3, likelihood="dml", n_mix=1,
                               state_channels=256, hidden_channels=128, n_blocks=4, doubling=False, grid_size=62,
                               min_steps=64, max_steps=128, batch_size=32, grad_clip=1.0, pool_size=1024,
                               damage_size=16),
    "celeba-nondoubling-256": dict(dataset="celeba", image_size=62, image_channels=3, likelihood="dml", n_mix=1,
                                   state_channels=256, hidden_channels=256, n_blocks=4, doubling=False,
                                   grid_size=62, min_steps=64, max_steps=128, batch_size=32, grad_clip=1.0,
                                   pool_size=1024, damage_size=16, precision="bf16"),
    # Sized for a laptop CPU: ~1000 iterations (a few minutes) on binarized MNIST give digit-like samples.
    "small": dict(dataset="mnist", image_size=32, image_channels=1, likelihood="bernoulli", enc_channels=8,
                  state_channels=32, hidden_channels=32, n_blocks=1, doubling=True, seed_size=2, n_doublings=4,
                  steps_per_stage=4, batch_size=32, lr=1e-3, grad_clip=10.0, iterations=1000, eval_every=250,
                  eval_samples=16, eval_batches=4, ckpt_every=250, log_every=10),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str, **overrides: Any) -> Config:
    """The Config of preset ``name`` with ``overrides`` applied (unknown keys raise ValueError)."""
    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; expected one of {preset_names()}")
    base = dict(PRESETS[name])
    unknown = set(overrides) - set(Config.keys())
    if unknown:
        raise ValueError(f"preset {name!r}: {unknown_key_message(sorted(unknown)[0])}")
    base.update(overrides)
    return Config(**base)
