"""The VNCA: a VAE whose decoder is a neural cellular automaton, and the deep convolutional VAE baseline.

Images are ``(B, C, H, W)`` in the likelihood's data domain: {0, 1} floats for Bernoulli presets,
[-1, 1] (``2 * uint8 / 255 - 1``) for the discretized logistic mixture.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from fastnca.config import Config, get_preset
from fastnca.likelihoods import (
    bernoulli_log_prob,
    bernoulli_mean,
    bernoulli_sample,
    dml_log_prob,
    dml_mean,
    dml_sample,
)
from fastnca.nca import NCA, nca_from_config
from fastnca.rng import generator_on
from fastnca.run import RunSettings, resolve_run

__all__ = ["Encoder", "VNCA", "ConvVAE", "build_model", "gaussian_kl", "LOG_2PI", "IWAE_STEPS"]

LOG_2PI = math.log(2 * math.pi)
IWAE_STEPS = ("image", "sample")  # VNCA.iwae(steps=...): a non-doubling model's T per image or per sample


def _check_count(n: object) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an integer >= 1 (the number of samples), got {n!r}")


class Encoder(nn.Module):
    """The paper's encoder: Conv k5 ELU, then 4 x [Conv k5 stride 2 ELU] (32 -> 512 channels), Linear to 2|z|.

    Args:
        in_channels: image channels.
        image_size: side of the square input.
        latent: |z|.
        channels: first conv's channels (32 in the paper); doubled by each strided conv.
        first_padding: padding of the first conv (2; 4 for the 28x28 non-doubling MNIST model).
    """

    def __init__(self, in_channels: int, image_size: int, latent: int, *, channels: int = 32,
                 first_padding: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 5, padding=first_padding), nn.ELU()]
        c = channels
        for _ in range(4):
            layers += [nn.Conv2d(c, 2 * c, 5, stride=2, padding=2), nn.ELU()]
            c *= 2
        self.convs = nn.Sequential(*layers)
        side = image_size + 2 * first_padding - 4
        for _ in range(4):
            side = (side - 1) // 2 + 1
        self.linear = nn.Linear(c * side * side, 2 * latent)
        self.in_channels = in_channels
        self.image_size = image_size

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, C, H, W) -> (mu, log_sigma)``, each ``(B, |z|)``."""
        h = self.linear(self.convs(x).flatten(1))
        mu, log_sigma = h.chunk(2, dim=1)
        return mu, log_sigma


def gaussian_kl(mu: Tensor, log_sigma: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) summed over latent dimensions: ``(B,)``."""
    return 0.5 * (mu.pow(2) + torch.exp(2 * log_sigma) - 1 - 2 * log_sigma).sum(1)


def _normal_log_prob(z: Tensor, mu: Tensor, log_sigma: Tensor) -> Tensor:
    return (-0.5 * ((z - mu) * torch.exp(-log_sigma)).pow(2) - log_sigma - 0.5 * LOG_2PI).sum(-1)


class _LatentVAE(nn.Module):
    """What the VNCA and the baseline share: encoder, posterior, likelihood, bounds, sampling."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = Encoder(config.image_channels, config.image_size, config.state_channels,
                               channels=config.enc_channels, first_padding=config.enc_first_padding)

    # subclasses implement: decode(z, ...) -> decoder output whose first channels parameterise p(x|z)
    def decode(self, z: Tensor, **kwargs) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def latent_size(self) -> int:
        return self.config.state_channels

    def check_images(self, x: Tensor, name: str = "x", *, values: bool = True) -> Tensor:
        """Check a batch of images and return it in the model's dtype.

        Any floating-point dtype is accepted and converted to the encoder's (float64, float16 and bfloat16 inputs
        give the float32 model's result). With ``values`` the batch must lie in the likelihood's data domain:
        {0, 1} for Bernoulli, [-1, 1] for the discretized logistic mixture (one reduction, i.e. one host sync,
        per call); anything else would give a finite but meaningless loss, so it raises ValueError.
        """
        cfg = self.config
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point image tensor, got {x.dtype} "
                            "(fastnca.data.to_model maps uint8 batches to the data domain)")
        want = (cfg.image_channels, cfg.image_size, cfg.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"{name}: expected shape (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(x.shape)}")
        if x.shape[0] == 0:  # a mean over no images is NaN, not a loss
            raise ValueError(f"{name}: expected a batch of at least one image, got shape {tuple(x.shape)}")
        dtype = self.encoder.linear.weight.dtype
        if x.dtype != dtype:
            x = x.to(dtype)
        # the value check reads back from the device: skipped inside a CUDA-graph capture, where a read-back is
        # illegal (the captured callers feed batches made by fastnca.data.to_model, in the domain by construction)
        if values and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            if cfg.likelihood == "bernoulli":
                bad = (x != 0) & (x != 1)
                domain = "binary images with values in {0, 1} (Bernoulli likelihood)"
            else:
                bad = ~((x >= -1) & (x <= 1))  # NaN is outside too
                domain = "images in [-1, 1], i.e. 2 * uint8 / 255 - 1 (discretized logistic likelihood)"
            if bool(bad.any()):
                value = x[bad].flatten()[0].item()
                raise ValueError(f"{name}: expected {domain}; got {value!r} in {int(bad.sum())} pixel(s)")
        return x

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q(z|x): ``(B, C, H, W) -> (mu, log_sigma)``, each ``(B, |z|)`` (shape and dtype checked, not values)."""
        return self.encoder(self.check_images(x, values=False))

    @staticmethod
    def sample_posterior(mu: Tensor, log_sigma: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised sample ``z = mu + sigma * eps``."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(log_sigma) * eps

    @staticmethod
    def kl(mu: Tensor, log_sigma: Tensor) -> Tensor:
        return gaussian_kl(mu, log_sigma)

    @property
    def settings(self) -> RunSettings:
        """How the model computes (``fastnca.run.RunSettings``): resolved when it is built, again when moved."""
        raise NotImplementedError

    def log_likelihood(self, x: Tensor, out: Tensor) -> Tensor:
        """log p(x | decoder output) in nats, ``(B,)``.

        On the fused backend the discretized logistic mixture is the Triton kernel pair
        (``fastnca.kernels.likelihood``: one launch forward, one backward, instead of ~130 small ATen ops);
        elsewhere it is the reference :func:`fastnca.likelihoods.dml_log_prob`, the kernels' oracle.
        """
        if self.config.likelihood == "bernoulli":
            return bernoulli_log_prob(x, out)
        if self.settings.fused:
            from fastnca.kernels.likelihood import dml_log_prob_fused

            return dml_log_prob_fused(x, out, self.config.n_mix)
        return dml_log_prob(x, out, self.config.n_mix)

    def mean_image(self, out: Tensor) -> Tensor:
        """The likelihood's mean, in the data domain."""
        c = self.config.image_channels
        if self.config.likelihood == "bernoulli":
            return bernoulli_mean(out[:, :c])
        return dml_mean(out, self.config.n_mix)

    def sample_image(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        c = self.config.image_channels
        if self.config.likelihood == "bernoulli":
            return bernoulli_sample(out[:, :c], generator=generator)
        return dml_sample(out, self.config.n_mix, generator=generator)

    def to_display(self, x: Tensor) -> Tensor:
        """Data-domain images to [0, 1] floats for pictures."""
        x = x.float()
        return x.clamp(0, 1) if self.config.likelihood == "bernoulli" else ((x + 1) / 2).clamp(0, 1)

    def bits_per_dim(self, nats: Tensor | float) -> Tensor | float:
        """bits/dim = -log p(x) / (H W C ln 2) for a log-likelihood in nats (sign flipped: lower is better)."""
        cfg = self.config
        return -nats / (cfg.image_size**2 * cfg.image_channels * math.log(2))

    def forward(self, x: Tensor, *, beta: float = 1.0, generator: torch.Generator | None = None,
                check_values: bool = True, **decode_kwargs) -> dict[str, Tensor]:
        """One-sample beta-ELBO: loss = mean over the batch of ``-log p(x|z) + beta * KL``.

        This is the training loss; the trainer calls it as is. ``decode_kwargs`` go to :meth:`decode` (the
        VNCA's: ``num_steps``, ``steps_generator``, ``start_states`` for pool training, ``checkpoint``).
        ``x`` is converted to the model's dtype and, with ``check_values``, must lie in the likelihood's domain
        (see :meth:`check_images`; that check reads a value back from the device, so the trainer, whose batches
        come from :func:`fastnca.data.to_model`, turns it off: no host sync per step, and CUDA graphs can capture
        the step).

        Returns:
            dict with loss (scalar), elbo, recon, kl (each ``(B,)``), z ``(B, |z|)`` and state (decoder output;
            the VNCA's final NCA state, which pool training stores).
        """
        if not isinstance(beta, Tensor) and (isinstance(beta, bool) or not isinstance(beta, (int, float))
                                             or not math.isfinite(beta) or beta < 0):
            raise ValueError(f"beta: expected a finite number >= 0 (the KL weight), got {beta!r}")
        x = self.check_images(x, values=check_values)
        mu, log_sigma = self.encoder(x)
        z = self.sample_posterior(mu, log_sigma, generator)
        out = self.decode(z, generator=generator, **decode_kwargs)
        recon = self.log_likelihood(x, out)
        kl = self.kl(mu, log_sigma)
        elbo = recon - beta * kl
        return {"loss": -elbo.mean(), "elbo": elbo, "recon": recon, "kl": kl, "z": z, "state": out}

    def elbo(self, x: Tensor, beta: float = 1.0, *, generator: torch.Generator | None = None,
             **decode_kwargs) -> Tensor:
        """One-sample (analytic KL) beta-ELBO per example in nats, ``(B,)``."""
        return self.forward(x, beta=beta, generator=generator, **decode_kwargs)["elbo"]

    def log_weights(self, x: Tensor, z: Tensor, mu: Tensor, log_sigma: Tensor,
                    generator: torch.Generator | None = None, num_steps: Tensor | None = None) -> Tensor:
        """log p(x|z) + log p(z) - log q(z|x) for ``z`` ``(B, |z|)``: ``(B,)``.

        ``num_steps``: a non-doubling VNCA's T per row ``(B,)`` (see :meth:`draw_iwae_steps`); None: the decoder's
        own draw."""
        out = self.decode(z, generator=generator) if num_steps is None else self.decode(
            z, generator=generator, num_steps=num_steps)
        log_pz = (-0.5 * z.pow(2) - 0.5 * LOG_2PI).sum(-1)
        return self.log_likelihood(x, out) + log_pz - _normal_log_prob(z, mu, log_sigma)

    def draw_iwae_steps(self, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor | None:
        """``n`` step counts T for :meth:`iwae`, or None for a model without a random T (this one)."""
        return None

    @torch.no_grad()
    def iwae(self, x: Tensor, k: int = 128, *, chunk: int | None = None,
             generator: torch.Generator | None = None, steps: str = "image") -> Tensor:
        """Importance-weighted bound on log p(x) with ``k`` samples (Burda et al., 2015), ``(B,)`` nats.

        ``log p(x) >= logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log k``, evaluated ``chunk``
        samples at a time (default: enough to decode about 256 grids at once) so that k = 128 fits in memory.

        ``steps`` says how a non-doubling VNCA's random step count T enters (doubling models and the baseline have
        none; :data:`IWAE_STEPS`):

        - ``'image'`` (default): one T ~ U{min_steps..max_steps} per image, shared by all k samples of that image:
          the authors' test (one image at a time, k = 128, one T per forward call), so the number compares with
          the paper's. It averages over T the bound on log p(x | T): a valid, looser bound on log p(x).
        - ``'sample'``: T drawn with each z_k, as one more latent whose proposal is its prior: the bound on
          log p(x) = log E_T p(x | T), which is at least as tight for large k.

        T is drawn on ``generator`` (on its device; torch's global generator when None), with the update masks.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected an integer >= 1 (number of importance samples), got {k!r}")
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk: expected an integer >= 1 or None, got {chunk!r}")
        if steps not in IWAE_STEPS:
            raise ValueError(f"steps: expected one of {IWAE_STEPS} (one T per image, or per sample), got {steps!r}")
        x = self.check_images(x)
        mu, log_sigma = self.encoder(x)
        b = x.shape[0]
        chunk = chunk or max(1, min(k, 256 // max(1, b)))
        per_image = self.draw_iwae_steps(b, generator, x.device) if steps == "image" else None
        log_w = []
        for start in range(0, k, chunk):
            n = min(chunk, k - start)
            mu_r, ls_r = mu.repeat(n, 1), log_sigma.repeat(n, 1)  # (n B, |z|), sample-major
            z = self.sample_posterior(mu_r, ls_r, generator)
            rows = per_image.repeat(n) if per_image is not None else (
                self.draw_iwae_steps(n * b, generator, x.device) if steps == "sample" else None)
            log_w.append(self.log_weights(x.repeat(n, 1, 1, 1), z, mu_r, ls_r, generator, rows).view(n, b))
        return torch.logsumexp(torch.cat(log_w, 0), dim=0) - math.log(k)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, mode: str = "mean",
               **decode_kwargs) -> Tensor:
        """``n`` images from the prior, in the data domain: the likelihood's mean or a sample."""
        if mode not in ("mean", "sample"):
            raise ValueError(f"mode: expected 'mean' or 'sample', got {mode!r}")
        _check_count(n)
        dev = next(self.parameters()).device
        z = torch.randn((n, self.latent_size), generator=generator, device=dev)
        out = self.decode(z, generator=generator, **decode_kwargs)
        return self.mean_image(out) if mode == "mean" else self.sample_image(out, generator)


class VNCA(_LatentVAE):
    """Variational Neural Cellular Automaton (Palm et al., ICLR 2022).

    ``build_model(preset)`` is the usual way to make one. Attributes: ``config`` (what was asked for),
    ``settings`` (how it computes: the decoder's ``fastnca.run.RunSettings``), ``encoder``, ``nca`` (the decoder;
    ``nca.update_net`` is the update network).

    Args:
        config: the model and its requests (backend, precision, checkpoint policy).
        settings: the run's settings already resolved for its device (the trainer's); default: resolved from
            ``config`` for the CPU, where the parameters are made, and again when the model is moved.
    """

    def __init__(self, config: Config, *, settings: RunSettings | None = None) -> None:
        super().__init__(config)
        self.nca: NCA = nca_from_config(config, settings)

    @property
    def settings(self) -> RunSettings:
        return self.nca.settings

    def draw_iwae_steps(self, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor | None:
        """``n`` step counts T ~ U{min_steps..max_steps} for :meth:`iwae` (None for a doubling model)."""
        if self.nca.doubling:
            return None
        return self.nca.draw_num_steps(n, generator_on(generator, device), device)

    def decode(self, z: Tensor, *, num_steps: int | None = None, generator: torch.Generator | None = None,
               return_states: bool = False, checkpoint: str | None = None,
               steps_generator: torch.Generator | None = None, start_states: Tensor | None = None):
        """Grow the final state ``(B, |z|, H, W)`` from ``z`` ``(B, |z|)`` (and every state on request).

        Args:
            z: ``(B, |z|)`` latents; row i seeds the grid of example i.
            num_steps: T of a non-doubling rollout, or a ``(B,)`` tensor of one T per row
                (:meth:`NCA.run_per_row`; not with ``start_states``); None draws T ~ U{min_steps..max_steps} after
                the posterior sample, on ``steps_generator`` (else on ``generator`` when it is a CPU generator, else on
                torch's global RNG).
            generator: draws the update masks (on z's device).
            return_states: also return every step's state.
            checkpoint: overrides the rollout checkpoint policy.
            steps_generator: the CPU generator that draws T (the trainer's data generator).
            start_states: ``(n, |z|, H, W)`` final-grid states (pool training, non-doubling models only): the
                last n rows continue from these instead of growing from their seeds; their z are not used by
                the decoder (the loss's KL still counts every row).
        """
        if start_states is None and steps_generator is None:
            return self.nca(z, num_steps=num_steps, generator=generator, return_states=return_states,
                            checkpoint=checkpoint)
        nca = self.nca
        if not nca.doubling and num_steps is None:
            if steps_generator is None and generator is not None and generator.device.type == "cpu":
                steps_generator = generator
            num_steps = nca.sample_num_steps(steps_generator)
        if start_states is None:
            return nca(z, num_steps=num_steps, generator=generator, return_states=return_states,
                       checkpoint=checkpoint)
        if nca.doubling:
            raise ValueError("start_states: pool states live on the final grid; they need a non-doubling model")
        n_fresh = z.shape[0] - start_states.shape[0]
        grid = (nca.state_channels, nca.grid_size, nca.grid_size)
        if start_states.dim() != 4 or tuple(start_states.shape[1:]) != grid or n_fresh < 0:
            raise ValueError(f"start_states: expected shape (n <= {z.shape[0]}, {grid[0]}, {grid[1]}, {grid[2]}), "
                             f"got {tuple(start_states.shape)}")
        seeds = nca.seed(z[:n_fresh])
        start = torch.cat([seeds, start_states.to(seeds.dtype)])
        return nca.run(start, nca.schedule(num_steps), generator=generator_on(generator, z.device),
                       return_states=return_states, checkpoint=checkpoint)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, mode: str = "mean",
               num_steps: int | None = None, return_states: bool = False):
        """Prior samples; with ``return_states`` also the images of every step (a growth sequence)."""
        if not return_states:
            return super().sample(n, generator=generator, mode=mode, num_steps=num_steps)
        _check_count(n)
        dev = next(self.parameters()).device
        z = torch.randn((n, self.latent_size), generator=generator, device=dev)
        final, states = self.decode(z, num_steps=num_steps, generator=generator, return_states=True)
        img = self.mean_image if mode == "mean" else lambda s: self.sample_image(s, generator)
        return img(final), [img(s) for s in states]


class ConvVAE(_LatentVAE):
    """The deep convolutional VAE baseline of appendix A.6: the same encoder, a transposed-conv decoder.

    Decoder: Linear(|z|, 1024 * 2 * 2) ELU, then log2(S / 2) x [ConvTranspose k5 s2 ELU] halving channels
    from 1024, then ConvTranspose k5 s1 to the likelihood's channels (1 for Bernoulli, 10 n_mix for DML).
    28 px images are decoded at 32 px and cropped.
    """

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._settings = resolve_run(config, "cpu")
        size = 32 if config.image_size == 28 else config.image_size
        n_up = int(round(math.log2(size / 2)))
        if 2 * 2**n_up != size:
            raise ValueError(f"image_size: the baseline needs 28, 32 or 64 px images, got {config.image_size}")
        self.decoder_linear = nn.Sequential(nn.Linear(config.state_channels, 1024 * 4), nn.ELU())
        layers: list[nn.Module] = []
        c = 1024
        for _ in range(n_up):
            layers += [nn.ConvTranspose2d(c, c // 2, 5, stride=2, padding=2, output_padding=1), nn.ELU()]
            c //= 2
        out_c = config.image_channels if config.likelihood == "bernoulli" else 10 * config.n_mix
        layers.append(nn.ConvTranspose2d(c, out_c, 5, stride=1, padding=2))
        self.decoder = nn.Sequential(*layers)
        self.crop = (size - config.image_size) // 2

    @property
    def settings(self) -> RunSettings:
        """The likelihood's backend (the fused DML kernels on 'triton'); the decoder is plain PyTorch."""
        return self._settings

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        out = super()._apply(fn, recurse)
        self._settings = self._settings.moved_to(self.decoder_linear[0].weight.device)
        return out

    def decode(self, z: Tensor, **_unused) -> Tensor:
        h = self.decoder_linear(z).view(-1, 1024, 2, 2)
        out = self.decoder(h)
        if self.crop:
            out = out[:, :, self.crop : -self.crop, self.crop : -self.crop]
        return out


def build_model(preset: str | Config = "mnist-doubling", /, **overrides) -> VNCA:
    """Build a VNCA from a preset name (see ``fastnca.config.PRESETS``) or a Config, with overrides.

    Example: ``build_model("mnist-doubling", backend="torch")``.
    """
    if isinstance(preset, Config):
        cfg = preset.replace(**overrides) if overrides else preset
    elif isinstance(preset, str):
        cfg = get_preset(preset, **overrides)
    else:
        raise TypeError(f"preset: expected a preset name or a Config, got {type(preset).__name__}")
    return VNCA(cfg)
