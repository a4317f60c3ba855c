"""CUDA graphs: the training iteration of fixed-schedule models and the IWAE evaluation, replayed as graphs.

One training iteration is thousands of small kernel launches (a 2x2 NCA step is a few microseconds of GPU work
and as much host time to launch), so the iteration is bound by the host. Captured once, it replays as one graph.

What is captured, on CUDA with ``Config.cuda_graphs=True`` (the default):

- **Training, doubling models** (a fixed schedule): everything after the batch is on the device, as one graph:
  the model's loss (encoder, posterior noise, the NCA rollout and its update masks, likelihood, KL), backward,
  gradient-norm clipping and the Adam step. The first :data:`WARMUP_CALLS` iterations run eagerly on a side
  stream (they are real training steps; they create Adam's state and compile the kernels), the next one is
  captured, every later one replays the graph.
- **IWAE evaluation, doubling models**: ``model.iwae`` of one batch (encoder, every chunk of importance
  samples, logsumexp), one graph per batch shape and k; the first batch of each shape runs eagerly.
- **Training, non-doubling models on the fused backend**: the same iteration, one graph per drawn T and per
  batch layout (with or without pool rows). The host does what it did before, outside the graph and in the same
  order on the data generator: it rebuilds half the batch from the pool (damaging some states) and draws T;
  the pool's states and the batch are the graph's inputs, and the final states come back through one buffer
  that the host adds to the pool. Every key warms up and is captured on its own; all graphs of one trainer share
  one memory pool (see "Memory" below), so ~65 values of T cost about the memory of the largest one. The fused
  rollout recomputes its own checkpoint segments inside the op, so nothing in it saves RNG states on the host.
- **Not captured**: non-doubling models on the reference backend (its checkpointing is
  ``torch.utils.checkpoint``, which saves and restores RNG states on the host) and the IWAE of non-doubling
  models (T is drawn inside each call on the host); a doubling model trained on the reference backend with an
  explicit ``checkpoint`` policy other than 'auto' / 'none' (its IWAE is still captured). They run eagerly,
  exactly as with ``cuda_graphs=False``.
- The CPU never uses graphs; its path is unchanged.

What makes the captured region safe (``torch.cuda.graphs`` used directly):

- inputs and outputs: the batch is copied into a static buffer before each replay; results are static outputs,
  cloned after the replay (the next replay overwrites them). Host logic (data order, T, the pool) stays outside.
- randomness: the posterior noise and the update masks come from the trainer's device generator, registered
  with the graph, so every replay draws new numbers and advances the generator as eager execution does
  (checkpoints and resume stay exact). For IWAE the caller's generator state is copied into a registered
  generator before the replay and copied back after it.
- Adam runs with ``capturable=True`` (step counts on the device, no host syncs) while warming up and capturing;
  the flag is set back afterwards (the graph keeps the capturable arithmetic) so that checkpoints load on a CPU.
- gradient clipping: ``clip_grad_norm_(foreach=True)`` without ``.item()``; the NaN/inf check stays in
  ``Trainer.sync_stats``, which reads the statistics later. Gradients are set to None before the capture, so
  backward allocates them in the graph's memory and every replay overwrites them (no zero_grad in between).
- the fused step's packed-weight cache (keyed by the parameters' version counters, which a replay does not
  bump) is invalidated before every capture, so the packing is captured, and after every replay, so that eager
  code afterwards (samples, an eager batch) packs the current weights.
- gradients after a replay: ``.grad`` is None (set so after every replay). The gradients live in the graph's
  memory, which other graphs of the same pool reuse, so they are not kept after the iteration.
- memory: the graphs of one cache share one private memory pool. That is safe because they never run
  concurrently (one stream, one replay at a time), every replay writes each buffer it reads before reading it
  (backward writes fresh gradients, the packing writes the packed weights), and what outlives a replay (the
  static outputs, the final-state buffer) stays allocated, so no other capture is ever handed its memory.
- if the parameters are replaced (``model.to``, ``load_state_dict`` with ``assign=True``), the graphs are
  captured again: each call compares the parameters' data pointers with those at capture.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from fastnca.rng import generator_on

__all__ = [
    "WARMUP_CALLS",
    "GraphCache",
    "TrainGraph",
    "IwaeGraph",
    "CudaGraphBackend",
    "capturable_optimizer",
    "invalidate_packed_weights",
    "not_captured_reason",
    "train_graph_for",
    "iwae_graph_for",
]

WARMUP_CALLS = 2  # eager training iterations on a side stream before the capture (Adam state, kernel compiles)
IWAE_WARMUP_CALLS = 1  # eager IWAE batches of a shape before its capture


def not_captured_reason(config: Any, settings: Any, *, training: bool = True) -> str | None:
    """Why a model with ``config`` and run ``settings`` runs eagerly, or None when it is captured.

    Args:
        config: a :class:`fastnca.config.Config` (``cuda_graphs``).
        settings: the model's :class:`fastnca.run.RunSettings` (device, backend, doubling, checkpoint policy).
        training: the training iteration (True) or the IWAE evaluation (False, no gradients).
    """
    if settings.device.type != "cuda":
        return f"CUDA graphs need a CUDA device, the model is on {settings.device.type}"
    if not getattr(config, "cuda_graphs", True):
        return "cuda_graphs=False"
    if not settings.doubling:
        if not training:
            return "non-doubling IWAE: T is drawn on the host inside each call; it runs eagerly"
        if not settings.fused:
            return ("non-doubling model on the reference backend: its rollout checkpointing "
                    "(torch.utils.checkpoint) saves RNG states on the host; it runs eagerly")
    if training and not settings.fused and settings.checkpoint not in ("auto", "none"):
        # a doubling rollout under 'auto' never calls torch.utils.checkpoint, which saves and restores RNG
        # states on the host (not capture-safe); an explicit policy may. The fused rollout recomputes its own
        # segments inside the op.
        return f"checkpoint={settings.checkpoint!r} may recompute through torch.utils.checkpoint; it runs eagerly"
    return None


# ---------------------------------------------------------------------------------------------- machinery
class GraphBackend(Protocol):
    """How :class:`GraphCache` runs, captures and replays (CUDA here; tests on the CPU use a stand-in)."""

    def eager(self, fn: Callable[[], tuple[Tensor, ...]]) -> tuple[Tensor, ...]: ...

    def capture(
        self, fn: Callable[[], tuple[Tensor, ...]], generators: Sequence[torch.Generator]
    ) -> tuple[Any, tuple[Tensor, ...], bool]:
        """Capture ``fn``: returns (graph, static outputs, whether the capture also executed the work)."""
        ...

    def replay(self, graph: Any) -> None: ...


class CudaGraphBackend:
    """``torch.cuda.CUDAGraph`` capture with a side-stream warm-up, as the PyTorch CUDA-graph notes prescribe.

    Every graph one backend captures allocates from one private memory pool (see the module's notes, "memory").
    """

    def __init__(self) -> None:
        self.pool: Any = None  # torch.cuda.graph_pool_handle(), made at the first capture

    def drop_pool(self) -> None:
        """Forget the pool (the cache dropped every graph): the next capture starts a new one."""
        self.pool = None

    def eager(self, fn: Callable[[], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = fn()
        torch.cuda.current_stream().wait_stream(side)
        return out

    def capture(
        self, fn: Callable[[], tuple[Tensor, ...]], generators: Sequence[torch.Generator]
    ) -> tuple[Any, tuple[Tensor, ...], bool]:
        graph = torch.cuda.CUDAGraph()
        for gen in generators:
            if gen.device.type == "cuda":
                graph.register_generator_state(gen)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        return graph, out, False  # a capture records the work without running it

    def replay(self, graph: Any) -> None:
        graph.replay()


@dataclass
class _Entry:
    calls: int = 0  # eager calls so far
    graph: Any = None
    inputs: tuple[Tensor, ...] = ()  # static input buffers
    outputs: tuple[Tensor, ...] = ()  # static outputs
    replays: int = 0


@dataclass
class GraphCache:
    """Graphs keyed by the call's static shape: ``warmup`` eager calls per key, then one capture, then replays.

    Args:
        generators: device generators the captured work draws from (registered with every graph).
        warmup: eager calls of a key before it is captured.
        fingerprint: identifies the tensors the graphs read besides their inputs (the parameters); when it
            changes, every graph is dropped and captured again.
        prepare: runs before every eager call and before a capture (e.g. gradients to None).
        after_replay: runs after every replay.
        backend: :class:`CudaGraphBackend` by default.
    """

    generators: Sequence[torch.Generator] = ()
    warmup: int = WARMUP_CALLS
    fingerprint: Callable[[], Hashable] | None = None
    prepare: Callable[[], None] | None = None
    after_replay: Callable[[], None] | None = None
    backend: GraphBackend = field(default_factory=CudaGraphBackend)
    entries: dict[Hashable, _Entry] = field(default_factory=dict)
    _seen: Hashable = None

    def captured(self, key: Hashable) -> bool:
        return key in self.entries and self.entries[key].graph is not None

    def __call__(self, key: Hashable, fn: Callable[..., tuple[Tensor, ...]], inputs: tuple[Tensor, ...]
                 ) -> tuple[Tensor, ...]:
        """``fn(*inputs)``: eager while ``key`` warms up, captured on the next call, replayed after that.

        ``fn`` must return a tuple of tensors; the returned tensors are the caller's own (clones of the static
        outputs), so the next call never changes them.
        """
        if self.fingerprint is not None:
            seen = self.fingerprint()
            if seen != self._seen:
                self.entries.clear()
                self._seen = seen
                drop_pool = getattr(self.backend, "drop_pool", None)
                if drop_pool is not None:
                    drop_pool()
        entry = self.entries.setdefault(key, _Entry())
        if entry.graph is None:
            if entry.calls < self.warmup:
                entry.calls += 1
                if self.prepare is not None:
                    self.prepare()
                return self.backend.eager(lambda: fn(*inputs))
            entry.inputs = tuple(t.detach().clone() for t in inputs)  # allocated outside the graph's memory
            if self.prepare is not None:
                self.prepare()
            static = entry.inputs
            try:
                entry.graph, entry.outputs, executed = self.backend.capture(lambda: fn(*static), self.generators)
            except RuntimeError as err:
                del self.entries[key]
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise RuntimeError(f"CUDA graph capture failed ({first}); run with --set cuda_graphs=false "
                                   "(Config.cuda_graphs=False) to train and evaluate eagerly") from err
            if executed:
                return tuple(o.clone() for o in entry.outputs)
        else:
            for buf, t in zip(entry.inputs, inputs, strict=True):
                if buf.shape != t.shape or buf.dtype != t.dtype:
                    raise ValueError(f"graph input: expected {tuple(buf.shape)} {buf.dtype} for key {key!r}, "
                                     f"got {tuple(t.shape)} {t.dtype}")
                buf.copy_(t)
        self.backend.replay(entry.graph)
        entry.replays += 1
        if self.after_replay is not None:
            self.after_replay()
        return tuple(o.clone() for o in entry.outputs)


def _param_pointers(module: torch.nn.Module) -> tuple[int, ...]:
    return tuple(p.data_ptr() for p in module.parameters())


def invalidate_packed_weights() -> None:
    """Make the fused step's packed-weight cache miss on its next use.

    The cache (``fastnca.kernels.nca_step``) reuses packed weights while the parameters' version counters are
    unchanged. A capture must record the packing itself (else the graph would read the eager cache's buffers
    forever), and a replay updates the parameters without bumping their counters.
    """
    module = sys.modules.get("fastnca.kernels.nca_step")  # not imported (nor Triton perhaps): nothing is cached
    if module is not None:
        module.forget_packed_weights()


@contextmanager
def capturable_optimizer(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """``capturable=True`` on every param group whose parameters are all on CUDA, restored on exit.

    Step counts kept on the CPU (an eager run, a resumed checkpoint) move to the parameters' device, which both
    capturable and eager Adam accept. Groups on other devices are left alone (capturable Adam refuses the CPU).
    """
    saved = [g.get("capturable") for g in optimizer.param_groups]
    try:
        for group in optimizer.param_groups:
            if "capturable" not in group or not all(p.device.type == "cuda" for p in group["params"]):
                continue
            group["capturable"] = True
            for p in group["params"]:
                state = optimizer.state.get(p)
                if state and torch.is_tensor(state.get("step")) and state["step"].device != p.device:
                    state["step"] = state["step"].to(p.device)
        with warnings.catch_warnings():
            # torch warns that a capturable optimizer stepping outside a capture is slower: the warm-up is that
            warnings.filterwarnings("ignore", message=".*capturable=True.*", category=UserWarning)
            yield
    finally:
        for group, flag in zip(optimizer.param_groups, saved):
            if flag is not None:
                group["capturable"] = flag


# ---------------------------------------------------------------------------------------------- training
HostBatch = tuple[Tensor, "Tensor | None", "int | None"]  # (batch, pool states or None, T or None)


class TrainGraph:
    """One training iteration (loss, backward, clipping, Adam) captured once per key and replayed.

    Args:
        model: the model being trained.
        optimizer: its optimiser (Adam; made capturable while warming up and capturing).
        loss_fn: ``(x, start_states, num_steps) -> dict`` with loss (scalar), recon, kl, elbo (``(B,)``) and
            state (the final NCA states): the model's loss (``Trainer.model_loss``).
        grad_clip: the gradient-norm bound.
        generator: the device generator of the posterior noise and the update masks (None: the loss draws
            from the default CUDA generator, which every graph registers by itself).
        host_fn: ``x -> (x, start_states, num_steps)``, the host's part of the iteration, run before the
            captured work on every call (``Trainer.host_batch``: pool rows, damage, T). None: ``(x, None, None)``.
        on_state: ``(x, final_states)`` after every iteration (``Pool.add``); the states are read from one
            buffer that every graph writes, so they must be copied before the next call. None: not needed.
        warmup: eager iterations of a key before its capture.
        backend: :class:`CudaGraphBackend` by default.

    The key of a graph is the batch's shape and dtype, T and the pool states' shape (or None). Calling it with a
    batch ``(B, C, H, W)`` on the device runs one iteration and returns the statistics
    ``(loss, recon, kl, elbo, grad_norm)`` (``Trainer.STAT_KEYS``) as one fp32 tensor on the device, unread.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[Tensor, Tensor | None, int | None], dict[str, Tensor]],
        *,
        grad_clip: float,
        generator: torch.Generator | None = None,
        host_fn: Callable[[Tensor], HostBatch] | None = None,
        on_state: Callable[[Tensor, Tensor], None] | None = None,
        warmup: int = WARMUP_CALLS,
        backend: GraphBackend | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.grad_clip = grad_clip
        self.host_fn = host_fn
        self.on_state = on_state
        self._state_out: dict[Hashable, Tensor] = {}  # final states, one buffer per shape shared by every graph
        self._state_of_key: dict[Hashable, Tensor] = {}  # the buffer each key's step writes
        self._key: Hashable = None  # the key of the call in progress
        self.cache = GraphCache(
            generators=() if generator is None else (generator,),
            warmup=warmup,
            fingerprint=lambda: _param_pointers(model),
            prepare=self._prepare,
            after_replay=self._after_replay,
            backend=backend or CudaGraphBackend(),
        )

    @classmethod
    def for_trainer(cls, trainer: Any, *, backend: GraphBackend | None = None,
                    warmup: int = WARMUP_CALLS) -> TrainGraph:
        """The iteration of a :class:`fastnca.train.Trainer` (its model loss, host part and pool)."""
        if trainer.dev_gen is trainer.gen and not trainer.cfg.doubling:
            # the host draws T before the captured posterior sample; eagerly T comes after it. Either order
            # gives the same numbers only when the two draw from different generators (always so on CUDA).
            raise ValueError("TrainGraph: a non-doubling model needs a device generator other than the data "
                             "generator (T is drawn on the host before the captured work)")
        pool = trainer.pool if trainer.cfg.pool_size > 0 else None
        on_state = None if pool is None else (lambda x, states: pool.add(x, states, generator=trainer.gen))
        return cls(trainer.model, trainer.optimizer, trainer.model_loss, grad_clip=trainer.cfg.grad_clip,
                   generator=trainer.dev_gen, host_fn=trainer.host_batch, on_state=on_state, warmup=warmup,
                   backend=backend)

    def _prepare(self) -> None:
        # None, not zeros: backward then allocates the gradients (inside the graph's memory when capturing)
        self.optimizer.zero_grad(set_to_none=True)
        invalidate_packed_weights()

    def _after_replay(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # they live in memory that other graphs of the pool reuse
        invalidate_packed_weights()

    def _step(self, x: Tensor, start_states: Tensor | None, num_steps: int | None) -> tuple[Tensor]:
        out = self.loss_fn(x, start_states, num_steps)
        out["loss"].backward()
        # foreach on CUDA: a few fused launches and no host sync (None elsewhere: the CPU has no foreach kernels)
        foreach = True if x.device.type == "cuda" else None
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=foreach)
        self.optimizer.step()
        if self.on_state is not None:
            state = out["state"].detach()
            buf = self._state_of_key[self._key] = self._state_buffer(state)
            buf.copy_(state)
        stats = [out["loss"], out["recon"].mean(), out["kl"].mean(), out["elbo"].mean(), grad_norm]
        return (torch.stack([v.detach().float() for v in stats]),)

    def _state_buffer(self, state: Tensor) -> Tensor:
        key = (tuple(state.shape), state.dtype)
        if key not in self._state_out:  # made by the first (eager) call of a shape: outside every graph's pool
            self._state_out[key] = torch.empty_like(state)
        return self._state_out[key]

    def key(self, x: Tensor, start_states: Tensor | None = None, num_steps: int | None = None) -> Hashable:
        if start_states is None and num_steps is None:
            return (tuple(x.shape), x.dtype)
        return (tuple(x.shape), x.dtype, None if start_states is None else tuple(start_states.shape), num_steps)

    def __call__(self, x: Tensor) -> Tensor:
        x, start_states, num_steps = (x, None, None) if self.host_fn is None else self.host_fn(x)
        key = self._key = self.key(x, start_states, num_steps)
        inputs = (x,) if start_states is None else (x, start_states)

        def step(*ins: Tensor) -> tuple[Tensor]:
            return self._step(ins[0], ins[1] if len(ins) > 1 else None, num_steps)

        if self.cache.captured(key):
            (stats,) = self.cache(key, step, inputs)
        else:
            with capturable_optimizer(self.optimizer):
                (stats,) = self.cache(key, step, inputs)
        if self.on_state is not None:
            self.on_state(x, self._state_of_key[key])
        return stats


def train_graph_for(trainer: Any) -> TrainGraph | None:
    """The trainer's captured iteration, or None where it runs eagerly (see :func:`not_captured_reason`)."""
    if not_captured_reason(trainer.cfg, trainer.settings) is not None:
        return None
    return TrainGraph.for_trainer(trainer)


# ---------------------------------------------------------------------------------------------- evaluation
class IwaeGraph:
    """``model.iwae(x, k, generator=...)`` captured per batch shape and k.

    The graphs draw from a generator of their own, registered with each of them; a call copies the caller's
    generator state into it before the replay and back after it, so the caller's generator advances exactly as
    an eager call would advance it.
    """

    def __init__(self, model: torch.nn.Module, *, warmup: int = IWAE_WARMUP_CALLS,
                 backend: GraphBackend | None = None) -> None:
        self._model = weakref.ref(model)  # the per-model cache must not keep the model alive
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device)
        self.cache = GraphCache(
            generators=(self.generator,),
            warmup=warmup,
            fingerprint=lambda: _param_pointers(self.model),
            prepare=invalidate_packed_weights,
            after_replay=invalidate_packed_weights,
            backend=backend or CudaGraphBackend(),
        )

    @property
    def model(self) -> Any:
        model = self._model()
        if model is None:
            raise RuntimeError("IwaeGraph: its model no longer exists")
        return model

    def __call__(self, x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """The bound ``(B,)`` in nats, as ``model.iwae(x, k, generator=generator)``.

        ``generator=None`` draws from the default generator of the model's device (registered by every graph).
        """
        model = self.model
        if generator is not None and generator_on(generator, self.generator.device) is None:
            return model.iwae(x, k, generator=generator)  # a generator the graphs cannot draw from
        own = None if generator is None else self.generator
        key = (tuple(x.shape), x.dtype, k, model.training, own is None)
        if own is not None:
            own.set_state(generator.get_state())
        (log_px,) = self.cache(key, lambda xs: (model.iwae(xs, k, generator=own),), (x,))
        if own is not None:
            generator.set_state(own.get_state())
        return log_px


_IWAE_GRAPHS: weakref.WeakKeyDictionary[torch.nn.Module, IwaeGraph] = weakref.WeakKeyDictionary()


def iwae_graph_for(model: torch.nn.Module) -> IwaeGraph | None:
    """The model's captured IWAE (one per model, kept while the model lives), or None where it runs eagerly."""
    config, settings = getattr(model, "config", None), getattr(model, "settings", None)
    if config is None or settings is None:  # not a fastnca model
        return None
    if not_captured_reason(config, settings, training=False) is not None:
        return None
    graph = _IWAE_GRAPHS.get(model)
    if graph is None:
        graph = _IWAE_GRAPHS[model] = IwaeGraph(model)
    return graph
