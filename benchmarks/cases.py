"""The benchmark cases and backends: what is timed, how inputs are built, and what parity compares.

Cases (GPU sizes; ``tiny=True`` shrinks every one to C = h = 16, 1 block, B = 2, 16 px for CPU code-path checks):

* ``step`` / ``step-bwd``: one NCA step, forward (no grad) / forward + backward, B = 32, 64x64, |z| = h = 256.
* ``rollout-<preset>[-T<n>]``: a full forward rollout of a preset's NCA (no grad), B = the preset's batch.
* ``rollout-mnist-doubling-early``: only the leading steps whose grids have at most 8x8 cells per sample
  (mnist-doubling: the first 24 steps, 2x2, 4x4 and 8x8; the steps the small-grid forward of
  ``kernels/small_grid.py`` runs in one launch), forward (no grad).
* ``rollout-bwd-mnist-doubling``: the whole 40-step rollout, forward + backward to the latents and the update
  network's weights (no encoder, decoder or optimizer). Compare ``triton-*`` with ``triton-*-perstep`` on both:
  the backward and the later steps run the same kernels either way, so the rows differ in the early steps' forward.
* ``rollout-bwd-celeba-nondoubling-256-T128``: the same for the non-doubling 62x62 preset at T = 128 (its
  'auto' policy: sqrt(T) segments, recomputed in the backward), the batched weight gradients' other A/B shape.
* ``train-<preset>[-T<n>]``: one training iteration of the whole VNCA (forward, backward, gradient clipping,
  Adam step) on random images of the preset's shape.
* ``iwae-mnist-doubling``: the importance-weighted bound with k = 128 samples on B = 8 images (samples/s).

Backends (``name[@checkpoint]``, the suffix overrides the model's checkpoint policy):

* ``torch-fp32``: the plain-PyTorch reference in fp32 (cuDNN's TF32 setting is recorded in the run's meta).
* ``torch-bf16-cl``: the reference under ``torch.autocast(bfloat16)``, channels-last state.
* ``compile-fp32`` / ``compile-bf16``: ``torch.compile`` of the reference step (step cases only; on the CPU
  the 'eager' compile backend, so CI exercises the path without a C++ build).
* ``triton-fp32`` / ``triton-tf32`` / ``triton-bf16``: the fused Triton step (``fastnca.kernels.nca_step``);
  model cases run the fused rollout with its small-grid path on (the default).
* ``triton-fp32-perstep`` / ``triton-bf16-perstep``: the same with the small-grid path off
  (``nca.configure(small_grid=False)``: one forward and two backward launches per step). Model cases only.
* ``triton-bf16-batched`` / ``triton-bf16-batched-cublas`` (and ``triton-tf32-batched``): the fused rollout
  with the backward's weight gradients batched over steps (``RolloutPlan.wgrad``, ``kernels/wgrad.py``: the Triton
  split-K GEMM, or cuBLAS for the 1x1 weights), against ``triton-bf16``'s per-step post kernels on the same
  shapes. Model cases with a backward only (rollout-bwd, train).
* ``triton-bf16-graph``: ``triton-bf16``'s training iteration captured once as a CUDA graph and replayed
  (``fastnca.graphs.TrainGraph``, as the trainer runs it on CUDA; the warm-up calls are the eager call and the
  capture). Train cases on CUDA only: with the other ``triton-*`` rows it gives the graphs-on/off pair.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from benchmarks.flops import Cost, iwae_cost, rollout_cost, step_cost, train_cost
from fastnca.rng import generator_on

__all__ = [
    "BACKENDS",
    "CASES",
    "Backend",
    "CaseSpec",
    "Prepared",
    "parse_backend",
    "tolerance",
    "triton_unavailable",
    "CaseContext",
]

BACKENDS = ("torch-fp32", "torch-bf16-cl", "compile-fp32", "compile-bf16", "triton-fp32", "triton-tf32",
            "triton-bf16", "triton-fp32-perstep", "triton-bf16-perstep", "triton-bf16-graph", "triton-bf16-batched",
            "triton-bf16-batched-cublas", "triton-tf32-batched")

# Cells per sample of the largest grid the small-grid kernels run (kernels/small_grid.py, SMALL_GRID_CELLS; a
# copy, so that the torch backends run without Triton): the early-stage cases stop at the last such step.
SMALL_GRID_CELLS = 64

# Output weights of the update net are zero at init (the first step is then the identity); benchmarks and
# parity use small random ones so that every step does real work and errors can show.
OUT_STD = 0.05

# Relative-error tolerances of parity (docs/KERNELS.md, "Precision and tolerances"), per one step and per
# rollout / model output. fp32 allows TF32 convolutions in the eager reference on GPUs where cuDNN uses them.
_TOL = {
    ("fp32", "step"): 1e-3, ("tf32", "step"): 3e-3, ("bf16", "step"): 3e-2,
    ("fp32", "model"): 1e-2, ("tf32", "model"): 3e-2, ("bf16", "model"): 1.5e-1,
}


@dataclass(frozen=True)
class Backend:
    """A parsed backend name: implementation, precision, autocast, checkpoint override."""

    name: str
    impl: str  # torch | compile | triton
    precision: str  # fp32 | tf32 | bf16
    autocast: bool
    checkpoint: str | None = None
    small_grid: bool = True  # fused rollouts: the leading steps on small grids in one launch (False: per step)
    graph: bool = False  # train cases: the iteration replayed as a CUDA graph
    wgrad: str = "per-step"  # fused backward: the weight-gradient design (kernels/schedule.py WGRADS)

    @property
    def label(self) -> str:
        return self.name + (f"@{self.checkpoint}" if self.checkpoint else "")

    @property
    def model_backend(self) -> str:
        """The fastnca NCA module's backend for model-level cases."""
        return "triton" if self.impl == "triton" else "torch"

    @property
    def model_precision(self) -> str:
        """The NCA module's precision (``fastnca.run``): autocast keeps an fp32 state and weights; the fused
        ``fp32`` rows are IEEE fp32 dots (``fp32-ieee``), the ``tf32`` rows TF32."""
        if self.autocast:
            return "fp32"
        return "fp32-ieee" if self.impl == "triton" and self.precision == "fp32" else self.precision

    @property
    def compute_dtype(self) -> str:
        return "bf16" if self.precision == "bf16" else "fp32"


def parse_backend(spec: str) -> Backend:
    """``'torch-fp32@step'`` -> Backend(impl='torch', precision='fp32', checkpoint='step')."""
    name, _, ckpt = spec.partition("@")
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} (optionally @checkpoint), got {spec!r}")
    if ckpt:
        from fastnca.kernels.schedule import parse_checkpoint

        parse_checkpoint(ckpt, 1, True)  # validates
    impl, prec = name.split("-")[0], name.split("-")[1]
    wgrad = "batched-cublas" if name.endswith("-batched-cublas") else "batched" if name.endswith("-batched") else \
        "per-step"
    return Backend(name, impl, prec, name.endswith("-cl") or (impl == "compile" and prec == "bf16"), ckpt or None,
                   small_grid=not name.endswith("-perstep"), graph=name.endswith("-graph"), wgrad=wgrad)


def tolerance(backend: Backend, kind: str) -> float:
    return _TOL[(backend.precision, "step" if kind.startswith("step") else "model")]


@dataclass(frozen=True)
class CaseSpec:
    """One benchmark case: its kind, preset and sizes (GPU sizes; tiny mode shrinks them)."""

    name: str
    kind: str  # step | step-bwd | rollout | rollout-bwd | train | iwae
    preset: str | None = None
    num_steps: int | None = None
    batch: int | None = None  # None: the preset's batch size
    iwae_k: int = 128
    description: str = ""
    early: bool = False  # only the leading steps on grids of <= SMALL_GRID_CELLS cells per sample


CASES: dict[str, CaseSpec] = {c.name: c for c in [
    CaseSpec("step", "step", description="one step forward, B=32, 64x64, |z|=h=256, 4 blocks"),
    CaseSpec("step-bwd", "step-bwd", description="one step forward+backward, B=32, 64x64, |z|=h=256"),
    CaseSpec("rollout-mnist-doubling", "rollout", "mnist-doubling", description="2x2 -> 32x32, 40 steps"),
    CaseSpec("rollout-celeba-doubling", "rollout", "celeba-doubling", description="2x2 -> 64x64, 48 steps"),
    CaseSpec("rollout-mnist-doubling-early", "rollout", "mnist-doubling", early=True,
             description="the first 24 steps (2x2, 4x4, 8x8): the small-grid kernels' part"),
    CaseSpec("rollout-bwd-mnist-doubling", "rollout-bwd", "mnist-doubling",
             description="2x2 -> 32x32, 40 steps, forward + backward to z and the weights"),
    CaseSpec("rollout-celeba-nondoubling-256-T64", "rollout", "celeba-nondoubling-256", 64,
             description="62x62, h=256, T=64"),
    CaseSpec("rollout-celeba-nondoubling-256-T128", "rollout", "celeba-nondoubling-256", 128,
             description="62x62, h=256, T=128"),
    CaseSpec("rollout-bwd-celeba-nondoubling-256-T128", "rollout-bwd", "celeba-nondoubling-256", 128,
             description="62x62, h=256, T=128, forward + backward to z and the weights"),
    CaseSpec("train-mnist-doubling", "train", "mnist-doubling", description="fwd+bwd+clip+Adam, B=32"),
    CaseSpec("train-celeba-doubling", "train", "celeba-doubling", description="fwd+bwd+clip+Adam, B=32"),
    CaseSpec("train-celeba-nondoubling-256-T128", "train", "celeba-nondoubling-256", 128,
             description="fwd+bwd+clip+Adam, B=32, T=128 (peak memory)"),
    CaseSpec("train-celeba-nondoubling-256-T1024", "train", "celeba-nondoubling-256", 1024,
             description="fwd+bwd+clip+Adam, B=32, T=1024 (memory under sqrt(T) segments; goal <= 8 GB)"),
    CaseSpec("iwae-mnist-doubling", "iwae", "mnist-doubling", batch=8,
             description="IWAE k=128 on 8 images (samples/s)"),
]}


def triton_unavailable(device: torch.device) -> str | None:
    """Why the fused step cannot run here, or None when it can."""
    from fastnca.kernels import interpreter_on

    if device.type != "cuda" and not interpreter_on():
        return "no GPU and the kernels are not interpreted (fastnca.kernels.use_interpreter)"
    try:
        from fastnca.kernels.nca_step import nca_step  # noqa: F401
    except Exception as err:  # ImportError, or a module still being written
        return f"fastnca.kernels.nca_step.nca_step not importable ({type(err).__name__}: {err})"
    return None


@dataclass
class Prepared:
    """A case bound to one backend: the timed call and what parity compares.

    Attributes:
        fn: one timed call (inputs built beforehand).
        parity: returns the outputs to compare with the case's reference (at the parity size).
        cost: FLOPs and byte floor of one call of ``fn``.
        checkpoint: the checkpoint policy as run, in words.
        extra: per-row facts (samples per call, number of steps, predicted memory...).
    """

    fn: Callable[[], Any]
    parity: Callable[[], list[Tensor]]
    cost: Cost
    checkpoint: str
    extra: dict[str, Any] = field(default_factory=dict)


def _autocast(device: torch.device, on: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """True fp32 for the parity reference."""
    prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev


def randomize_out(net: nn.Module, generator: torch.Generator | None = None) -> None:
    """Small random output conv (weights std OUT_STD/sqrt(h), bias std OUT_STD/10) instead of zeros."""
    with torch.no_grad():
        w = net.out.weight
        w.copy_(torch.randn(w.shape, generator=generator) * (OUT_STD / math.sqrt(w.shape[1])))
        if net.out.bias is not None:
            net.out.bias.copy_(torch.randn(net.out.bias.shape, generator=generator) * (OUT_STD / 10))


def tiny_overrides(preset: str) -> dict[str, Any]:
    """Shrink a preset for CPU code-path checks: C = h = 16, 1 block, B = 2, 16 px images."""
    from fastnca.config import get_preset

    cfg = get_preset(preset)
    t: dict[str, Any] = dict(state_channels=16, hidden_channels=16, n_blocks=min(cfg.n_blocks, 1), enc_channels=4,
                             batch_size=2, n_mix=1)
    if cfg.doubling:
        t.update(n_doublings=3, steps_per_stage=2, image_size=16)
    else:
        t.update(grid_size=16, image_size=16, min_steps=1, max_steps=8)
    return t


def _fake_images(cfg, batch: int, device: torch.device, gen: torch.Generator) -> Tensor:
    shape = (batch, cfg.image_channels, cfg.image_size, cfg.image_size)
    if cfg.likelihood == "bernoulli":
        return (torch.rand(shape, generator=gen) < 0.5).float().to(device)
    return (torch.randint(0, 256, shape, generator=gen).float() / 255 * 2 - 1).to(device)


def _ckpt_words(policy: str, seg: int, backend: str) -> str:
    resolved = "none" if seg == 0 else "step" if seg == 1 else f"segments={seg}"
    named = resolved if resolved == policy else f"{policy} -> {resolved}"
    if backend == "triton":  # the fused rollout op (kernels/rollout.py)
        what = ("every step's activations kept, the backward recomputes nothing" if seg == 0 else
                "each step's input kept, the backward main kernel recomputes the step" if seg == 1 else
                f"the input of each {seg}-step segment kept, segments recomputed")
        return f"{named} ({what})"
    return f"{named} (all activations kept)" if seg == 0 else named


class CaseContext:
    """Builds a case's shared inputs and model once, and binds them to each backend.

    Args:
        spec: the case.
        device: where to run.
        tiny: CPU code-path sizes.
        parity_batch: batch used by the parity check (smaller than the timed batch to keep it cheap).
    """

    def __init__(self, spec: CaseSpec, device: torch.device, *, tiny: bool, parity_batch: int = 2) -> None:
        self.spec, self.device, self.tiny = spec, device, tiny
        self.parity_batch = parity_batch
        self.gen = torch.Generator().manual_seed(1234)
        self._reference: list[Tensor] | None = None
        if spec.kind.startswith("step"):
            self._init_step()
        else:
            self._init_model()

    # ------------------------------------------------------------------------------------------- step
    def _init_step(self) -> None:
        from fastnca.nca import UpdateNet

        if self.tiny:
            self.batch, self.side, c, h, nb = 2, 8, 16, 16, 1
        else:
            self.batch, self.side, c, h, nb = 32, 64, 256, 256, 4
        self.dims = (c, h, nb)
        torch.manual_seed(0)
        net = UpdateNet(c, h, nb)
        randomize_out(net, self.gen)
        self.net = net.to(self.device)
        self.state = torch.randn(self.batch, c, self.side, self.side, generator=self.gen).to(self.device)
        self.dy = torch.randn(self.state.shape, generator=self.gen).to(self.device)

    def _step_fn(self, b: Backend) -> Callable[[Tensor], Tensor]:
        from fastnca.kernels.reference import nca_step_ref

        weights = self.net.weights()
        dev = self.device
        if b.impl == "triton":
            from fastnca.kernels.nca_step import nca_step

            ip = "tf32" if b.precision == "tf32" else "ieee"
            return lambda s: nca_step(s, weights, None, False, input_precision=ip)

        def ref(s: Tensor) -> Tensor:
            with _autocast(dev, b.autocast):
                return nca_step_ref(s, weights)

        if b.impl == "compile":
            return torch.compile(ref, dynamic=False, backend="inductor" if dev.type == "cuda" else "eager")
        return ref

    def _state_for(self, b: Backend, batch: int | None = None) -> Tensor:
        s = self.state if batch is None else self.state[:batch]
        dtype = torch.bfloat16 if (b.impl == "triton" and b.precision == "bf16") else torch.float32
        return s.detach().to(dtype).clone(memory_format=torch.channels_last)

    def _prepare_step(self, b: Backend) -> Prepared:
        step = self._step_fn(b)
        c, h, nb = self.dims
        itemsize = 2 if b.precision == "bf16" else 4
        bwd = self.spec.kind == "step-bwd"
        params = list(self.net.parameters())
        state = self._state_for(b)
        dy = self.dy.to(state.dtype).contiguous(memory_format=torch.channels_last)
        recompute = bwd and b.impl == "triton"
        cost = step_cost(self.batch, self.side, c, h, nb, itemsize=itemsize, backward=bwd, recompute=recompute)
        if not bwd:
            def fwd() -> Tensor:
                with torch.no_grad():
                    return step(state)

            def parity() -> list[Tensor]:
                with torch.no_grad():
                    return [step(self._state_for(b, self.parity_batch)).float()]

            return Prepared(fwd, parity, cost, "n/a (no grad)")
        state.requires_grad_(True)

        def fwd_bwd() -> None:
            for p in params:
                p.grad = None
            state.grad = None
            step(state).backward(dy)

        def parity_bwd() -> list[Tensor]:
            s = self._state_for(b, self.parity_batch).detach().requires_grad_(True)
            for p in params:
                p.grad = None
            out = step(s)
            out.backward(dy[: self.parity_batch])
            return [out.float(), s.grad.float()] + [p.grad.float() for p in params]

        ckpt = ("step (fused autograd keeps the step input only)" if b.impl == "triton"
                else "none (autograd keeps all activations)")
        return Prepared(fwd_bwd, parity_bwd, cost, ckpt)

    def _step_reference(self) -> list[Tensor]:
        """float64 oracle at the parity batch: the output, and for step-bwd the input and weight gradients."""
        from fastnca.kernels.reference import UpdateWeights, nca_step_ref

        s = self.state[: self.parity_batch].detach().double().cpu().requires_grad_(True)
        flat = [None if t is None else t.detach().double().cpu().requires_grad_(True) for t in
                self.net.weights().flat()]
        w = UpdateWeights.from_flat(flat)
        out = nca_step_ref(s, w)
        if self.spec.kind != "step-bwd":
            return [out.detach()]
        out.backward(self.dy[: self.parity_batch].double().cpu())
        return [out.detach(), s.grad] + [t.grad for t in flat if t is not None]

    # ------------------------------------------------------------------------------------------- model
    def _init_model(self) -> None:
        from fastnca.config import get_preset

        spec = self.spec
        over = tiny_overrides(spec.preset) if self.tiny else {}
        self.cfg = get_preset(spec.preset, **over)
        self.num_steps = spec.num_steps
        if self.tiny and self.num_steps is not None:
            self.num_steps = max(2, min(8, self.num_steps // 16))
        self.batch = (2 if self.tiny else spec.batch) if spec.batch else self.cfg.batch_size
        self.iwae_k = 4 if self.tiny else spec.iwae_k
        torch.manual_seed(0)
        if spec.kind.startswith("rollout"):
            from fastnca.nca import nca_from_config

            self.model = nca_from_config(self.cfg)
            randomize_out(self.model.update_net, self.gen)
            self.nca = self.model
        else:
            import fastnca

            self.model = fastnca.build_model(self.cfg)
            randomize_out(self.model.nca.update_net, self.gen)
            self.nca = self.model.nca
        self.model.to(self.device)
        self.init_state = copy.deepcopy(self.model.state_dict())
        self.z = torch.randn(self.batch, self.cfg.state_channels, generator=self.gen).to(self.device)
        self.x = _fake_images(self.cfg, self.batch, self.device, self.gen)
        self.flags: list[bool] | None = None  # the steps run when not the model's whole schedule
        if spec.early:
            self.flags = self.nca.schedule(self.num_steps)[: early_steps(self.cfg, self.num_steps)]
        if spec.kind == "rollout-bwd":
            flags = self.flags if self.flags is not None else self.nca.schedule(self.num_steps)
            side = self.cfg.seed_size if self.cfg.doubling else self.cfg.grid_size
            side *= 2 ** sum(flags)
            shape = (self.batch, self.cfg.state_channels, side, side)
            self.dy = torch.randn(shape, generator=self.gen).to(self.device)

    def _configure(self, backend: str, precision: str, checkpoint: str, small_grid: bool = True,
                   wgrad: str = "per-step") -> None:
        """Reset the shared model's weights and point it at a backend (the NCA reads these at every run)."""
        self.model.load_state_dict(self.init_state)
        self._point(backend, precision, checkpoint, small_grid, wgrad)

    def _point(self, backend: str, precision: str, checkpoint: str, small_grid: bool = True,
               wgrad: str = "per-step") -> None:
        # every backend sets small_grid and wgrad, so that a per-step or batched row never leaves the shared model in
        # its mode
        self.nca.configure(backend=backend, precision=precision, checkpoint=checkpoint, small_grid=small_grid,
                           wgrad=wgrad)
        if hasattr(self.model, "config"):
            self.model.config = self.model.config.replace(backend=backend, precision=precision,
                                                          checkpoint=checkpoint, small_grid=small_grid, wgrad=wgrad)

    def _rollout(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The case's rollout from latents ``z``: the whole schedule, or its leading steps (``self.flags``)."""
        if self.flags is None:
            return self.nca(z, num_steps=self.num_steps, generator=generator)
        return self.nca.run(self.nca.seed(z), self.flags, generator=generator_on(generator, z.device))

    def _rollout_grads(self, z: Tensor, dy: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        """Forward + backward of the rollout from the leaf latents ``z`` with upstream gradient ``dy``: the final
        state, the latents' gradient and every update-network weight's gradient."""
        params = list(self.nca.update_net.parameters())
        for p in params:
            p.grad = None
        z.grad = None
        out = self._rollout(z, generator)
        out.backward(dy)
        return [out.detach(), z.grad] + [p.grad for p in params]

    def _grad_inputs(self, batch: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """A leaf copy of the first ``batch`` latents, and the upstream gradient in the final state's dtype."""
        dy = self.dy[:batch].to(dtype).contiguous(memory_format=torch.channels_last)
        return self.z[:batch].detach().clone().requires_grad_(True), dy

    def _model_outputs(self, b: Backend | None, batch: int) -> list[Tensor]:
        """Forward outputs at ``batch`` with a fixed seed: the final state (rollout), the decoder's final state
        and the loss terms (train; the summed terms alone can round a small state difference away), or IWAE."""
        dev = self.device
        g = torch.Generator(device=dev).manual_seed(7)
        kind = self.spec.kind
        if kind == "rollout-bwd":
            with _autocast(dev, b is not None and b.autocast):
                return [t.float() for t in self._rollout_grads(*self._grad_inputs(batch, self.nca.state_dtype), g)]
        with torch.no_grad(), _autocast(dev, b is not None and b.autocast):
            if kind == "rollout":
                return [self._rollout(self.z[:batch], g).float()]
            if kind == "train":
                kw = {"num_steps": self.num_steps} if self.num_steps else {}
                out = self.model(self.x[:batch], beta=self.cfg.beta, generator=g, **kw)
                return [out["state"].float(), out["recon"].float(), out["kl"].float()]
            return [self.model.iwae(self.x[:batch], self.iwae_k, generator=g).float()]

    def _model_reference(self) -> list[Tensor]:
        """The reference backend in true fp32 (TF32 off) at the parity batch."""
        self._configure("torch", "fp32", "none")
        with _no_tf32():
            return self._model_outputs(None, self.parity_batch)

    def _prepare_model(self, b: Backend) -> Prepared:
        if b.impl == "compile":
            raise NotImplementedError("torch.compile is benchmarked per step only (step, step-bwd)")
        cfg, kind = self.cfg, self.spec.kind
        if b.graph and (kind != "train" or self.device.type != "cuda"):
            raise NotImplementedError("CUDA graphs are benchmarked on training iterations on a CUDA device only")
        policy = b.checkpoint or cfg.checkpoint
        if b.wgrad != "per-step" and kind not in ("rollout-bwd", "train"):
            raise NotImplementedError("the batched weight-gradient backends differ in cases with a backward only")
        self._configure(b.model_backend, b.model_precision, policy, b.small_grid, b.wgrad)
        itemsize = 2 if b.model_precision == "bf16" else 4
        sched: list[bool] | int = self.flags if self.flags is not None else (
            self.num_steps if self.num_steps else self.nca.schedule(None))
        n_sched = sched if isinstance(sched, int) else len(sched)
        seg = self.nca.plan(sched, policy).segment  # the model's own rollout plan
        dev, model, ac = self.device, self.model, b.autocast
        first = len(self.flags) if self.flags is not None else None
        extra: dict[str, Any] = {"num_steps": n_sched, "batch": self.batch}
        if b.impl == "triton":
            extra["small_grid"] = b.small_grid
            extra["wgrad"] = b.wgrad
        if kind == "rollout":
            cost = rollout_cost(cfg, self.batch, self.num_steps, itemsize=itemsize, first_steps=first)
            z = self.z

            def fn() -> Tensor:
                with torch.no_grad(), _autocast(dev, ac):
                    return self._rollout(z)

            ckpt = "n/a (no grad)"
        elif kind == "rollout-bwd":
            recompute = seg >= 1  # the fused backward too recomputes unless the plan keeps activations
            cost = rollout_cost(cfg, self.batch, self.num_steps, itemsize=itemsize, backward=True,
                                recompute=recompute, first_steps=first)
            z, dy = self._grad_inputs(self.batch, self.nca.state_dtype)

            def fn() -> None:
                with _autocast(dev, ac):
                    self._rollout_grads(z, dy)

            ckpt = _ckpt_words(policy, seg, b.model_backend)
        elif kind == "iwae":
            cost = iwae_cost(cfg, self.batch, self.iwae_k, self.num_steps, itemsize=itemsize)
            x, k = self.x, self.iwae_k
            extra.update(samples_per_call=self.batch * k, iwae_k=k)

            def fn() -> Tensor:
                with _autocast(dev, ac):
                    return model.iwae(x, k)

            ckpt = "n/a (no grad)"
        else:
            recompute = seg >= 1  # the fused backward too recomputes unless the plan keeps activations
            cost = train_cost(cfg, self.batch, self.num_steps, itemsize=itemsize, recompute=recompute)
            opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
            x, beta, clip = self.x, cfg.beta, cfg.grad_clip
            kw = {"num_steps": self.num_steps} if self.num_steps else {}

            def fn() -> None:
                opt.zero_grad(set_to_none=True)
                with _autocast(dev, ac):
                    out = model(x, beta=beta, **kw)
                out["loss"].backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()

            if b.graph:
                from fastnca.graphs import TrainGraph

                graph = TrainGraph(model, opt, lambda xs, _start, _t: model(xs, beta=beta, **kw), grad_clip=clip,
                                   warmup=1)

                def fn() -> None:  # noqa: F811 - the same iteration, captured at its second call
                    graph(x)

            ckpt = _ckpt_words(policy, seg, b.model_backend)
            extra["predicted_memory"] = _predicted_memory(
                cfg.replace(backend=b.model_backend, precision=b.model_precision, wgrad=b.wgrad), policy,
                self.num_steps, b.model_backend, batch=self.batch, device=dev, graphs=b.graph, autocast=ac)
        point = (b.model_backend, b.model_precision, policy, b.small_grid, b.wgrad)

        def run_fn() -> Any:
            self._point(*point)
            return fn()

        def parity() -> list[Tensor]:
            self._point(*point)
            return self._model_outputs(b, self.parity_batch)

        return Prepared(run_fn, parity, cost, ckpt, extra)

    # ------------------------------------------------------------------------------------------- public
    def sizes(self) -> str:
        """The sizes this context actually runs (tiny mode shrinks the GPU case of the description)."""

        def net(c: int, h: int, nb: int) -> str:
            zh = f"|z|=h={c}" if c == h else f"|z|={c}, h={h}"
            return f"{zh}, {nb} block{'s' if nb != 1 else ''}"

        if self.spec.kind.startswith("step"):
            return f"B={self.batch}, {self.side}x{self.side}, {net(*self.dims)}"
        cfg = self.cfg
        shape = net(cfg.state_channels, cfg.hidden_channels, cfg.n_blocks)
        out = f"B={self.batch}, {cfg.image_size}x{cfg.image_size} px, {shape}"
        if self.num_steps is not None:
            out += f", T={self.num_steps}"
        if self.spec.kind == "iwae":
            out += f", k={self.iwae_k}"
        return out

    def reference(self) -> list[Tensor]:
        """The parity oracle (computed once per case)."""
        if self._reference is None:
            self._reference = (self._step_reference() if self.spec.kind.startswith("step")
                               else self._model_reference())
        return self._reference

    def prepare(self, b: Backend) -> Prepared:
        """Bind the case to backend ``b`` (raises NotImplementedError when the pair does not apply)."""
        if not b.small_grid and self.spec.kind.startswith("step"):
            raise NotImplementedError("the per-step backends differ from triton-* in whole rollouts only")
        if b.wgrad != "per-step" and self.spec.kind.startswith("step"):
            raise NotImplementedError("the batched weight-gradient backends differ in whole rollouts only")
        if b.impl == "triton":
            why = triton_unavailable(self.device)
            if why:
                raise ModuleNotFoundError(why)
        return self._prepare_step(b) if self.spec.kind.startswith("step") else self._prepare_model(b)


def early_steps(cfg, num_steps: int | None = None) -> int:
    """How many leading steps of ``cfg``'s schedule have at most SMALL_GRID_CELLS cells per sample after the step
    (the steps ``kernels/small_grid.py`` runs in one launch; mnist-doubling: 24)."""
    from benchmarks.flops import schedule_grids

    grids = schedule_grids(doubling=cfg.doubling, seed_size=cfg.seed_size, n_doublings=cfg.n_doublings,
                           steps_per_stage=cfg.steps_per_stage, grid_size=cfg.grid_size, num_steps=num_steps)
    n = 0
    while n < len(grids) and grids[n] ** 2 <= SMALL_GRID_CELLS:
        n += 1
    return n


def _predicted_memory(cfg, policy: str, num_steps: int | None, backend: str, *, batch: int,
                      device: torch.device, graphs: bool = False, autocast: bool = False) -> dict[str, Any] | str:
    """fastnca.memory's prediction for this row, with the settings the row runs: its backend, precision, policy,
    batch, device (CUDA: the allocator's blocks and the cuBLAS workspace of the GPU's capability), CUDA graph
    (``TrainGraph`` with one warm-up call), autocast, and the optimizer the row builds (``Adam()``: foreach on CUDA,
    one tensor at a time on the CPU; capturable, i.e. step counts on the device, under a graph)."""
    try:
        from fastnca.memory import predict_peak_memory
    except Exception as err:
        return f"unavailable: fastnca.memory.predict_peak_memory not importable ({type(err).__name__})"
    cuda = device.type == "cuda"
    try:
        pred = predict_peak_memory(
            cfg, checkpoint=policy, num_steps=num_steps, backend=backend, batch_size=batch,
            device="cuda" if cuda else "cpu", graphs=graphs, autocast=autocast,
            optimizer="foreach" if cuda else "single", warmup_calls=1,
            capability=torch.cuda.get_device_capability(device) if cuda else (9, 0))
        return {k: v if isinstance(v, (int, float, str, bool)) else repr(v) if not isinstance(v, dict) else v
                for k, v in dict(pred).items()}
    except Exception as err:
        return f"error: {type(err).__name__}: {err}"
