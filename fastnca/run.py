"""How a run computes, decided once: the device, the backend, the state dtype, the NCA's dot arithmetic and the
rollout checkpoint policy.

:func:`resolve_run` turns what a config asks for (``backend``, ``precision``, ``checkpoint``, ``small_grid``) into a
:class:`RunSettings` for one device. A model resolves its settings when it is built and again only when it is
moved to another device (``model.to``); the trainer, the CUDA graphs, the memory model and the benchmarks read the
model's settings and decide nothing themselves.

Precision follows PyTorch's convention for convolutions. A fused NCA step is a convolution, so an fp32 model's
dots run in TF32 on the tensor cores wherever PyTorch would run a convolution in TF32
(``torch.backends.cudnn.allow_tf32``, True by default; ``torch.backends.cudnn.conv.fp32_precision`` on newer
releases), and in IEEE fp32 only when that flag is off or ``precision="fp32-ieee"`` asks for it:

============  ==========  =======================================================================
precision     state       the NCA's dots
============  ==========  =======================================================================
fp32          float32     TF32 on a CUDA device when PyTorch's cuDNN TF32 flag is on (its default), else IEEE
tf32          float32     TF32
fp32-ieee     float32     IEEE fp32 (on a GPU without tensor cores: the accuracy path, several times slower)
bf16          bfloat16    bf16 operands, fp32 accumulation
============  ==========  =======================================================================

On the reference backend (``backend="torch"``) the convolutions are PyTorch's own, so on a GPU their arithmetic is
whatever PyTorch's flag says when they run; ``precision`` chooses the state dtype there. The flag is read when the
settings are resolved, i.e. when the model is built or moved: set it before that. ``RunSettings.arithmetic`` says
what the NCA's dots do; the trainer records it in the run's files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fastnca.config import BACKENDS, PRECISIONS, check_choice
from fastnca.kernels import interpreter_on
from fastnca.kernels.schedule import RolloutPlan, plan_rollout

__all__ = [
    "RunSettings",
    "resolve_run",
    "resolve_backend",
    "resolve_device",
    "conv_allows_tf32",
    "state_dtype",
    "MIN_TRITON_CAPABILITY",
    "ARITHMETICS",
]

# the fused kernels' bf16 / tf32 dots need tensor cores of compute capability 8.0 (A100, RTX 30xx) or newer
MIN_TRITON_CAPABILITY = (8, 0)
ARITHMETICS = ("fp32-ieee", "tf32", "bf16")  # what RunSettings.arithmetic can be


def conv_allows_tf32() -> bool:
    """Whether PyTorch runs fp32 convolutions in TF32 now (its default on CUDA devices of compute capability 8.0+).

    Reads ``torch.backends.cudnn.conv.fp32_precision`` where the release has it ('none' inherits from
    ``torch.backends.cudnn.fp32_precision``, then from ``torch.backends.fp32_precision``), else the older
    ``torch.backends.cudnn.allow_tf32``.
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    setting = getattr(conv, "fp32_precision", None)
    if setting is None:
        return bool(torch.backends.cudnn.allow_tf32)
    for parent in (torch.backends.cudnn, torch.backends):
        if setting != "none":
            break
        setting = getattr(parent, "fp32_precision", "none")
    return setting == "tf32"


def state_dtype(precision: str) -> torch.dtype:
    """The NCA state's dtype under ``precision``: bfloat16 for 'bf16', float32 otherwise."""
    check_choice("precision", precision, PRECISIONS)
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend ``backend`` ('torch', 'triton' or 'auto') means on ``device``.

    'auto' takes the fused Triton kernels on CUDA GPUs of compute capability 8.0 or newer and the reference
    elsewhere (older GPUs such as the T4 have no bf16 / tf32 tensor cores and too little shared memory for the
    kernels' tiles). The trainer's 'auto' goes further and times both backends on the run's job
    (``fastnca.autobackend``); this rule is what a model built by hand gets.
    """
    check_choice("backend", backend, BACKENDS)
    if backend != "auto":
        return backend
    if device.type != "cuda" or not _triton_available():
        return "torch"
    return "triton" if torch.cuda.get_device_capability(device) >= MIN_TRITON_CAPABILITY else "torch"


def _arithmetic(precision: str, backend: str, device: torch.device) -> str:
    if precision == "bf16":
        return "bf16"
    if backend == "torch":  # PyTorch's own convolutions: its flag decides on a GPU; the CPU computes fp32
        return "tf32" if device.type == "cuda" and conv_allows_tf32() else "fp32-ieee"
    if precision == "fp32":
        return "tf32" if device.type == "cuda" and conv_allows_tf32() else "fp32-ieee"
    return precision  # 'tf32' or 'fp32-ieee', as asked


@dataclass(frozen=True)
class RunSettings:
    """How a model computes on one device; made by :func:`resolve_run`, read by everything downstream.

    Attributes:
        device: where the model runs.
        backend: 'triton' (the fused kernels) or 'torch' (the plain-PyTorch reference).
        precision: the precision asked for ('fp32', 'tf32', 'fp32-ieee', 'bf16'; see the module's table).
        arithmetic: what the NCA's dots do: 'fp32-ieee', 'tf32' or 'bf16'.
        checkpoint: the rollout checkpoint policy ('auto', 'none', 'step', 'segments=k').
        doubling: whether the model's rollouts double the grid (the policy's 'auto' depends on it).
        small_grid: fused backend: the steps on grids of <= 8x8 cells in one launch.
        wgrad: fused backend: the backward's weight-gradient design ('per-step', 'batched', 'batched-cublas';
            ``kernels/schedule.py``), and ``wgrad_batch_mib`` its batches' cap; both reach the rollout plan.
        requested_backend: the backend asked for ('auto', 'torch', 'triton').
        backend_source: why ``backend`` was chosen: 'explicit', 'capability' (the rule of :func:`resolve_backend`),
            or what the caller said ('measured', 'checkpoint').
    """

    device: torch.device
    backend: str
    precision: str
    arithmetic: str
    checkpoint: str
    doubling: bool
    small_grid: bool = True
    wgrad: str = "per-step"
    wgrad_batch_mib: int = 2048
    requested_backend: str = "auto"
    backend_source: str = "explicit"

    @property
    def fused(self) -> bool:
        """Whether the NCA runs the fused Triton kernels."""
        return self.backend == "triton"

    @property
    def state_dtype(self) -> torch.dtype:
        """The NCA state's dtype."""
        return state_dtype(self.precision)

    @property
    def input_precision(self) -> str:
        """The fused kernels' dot precision for fp32 states: 'tf32' or 'ieee' (bf16 states ignore it)."""
        return "tf32" if self.arithmetic == "tf32" else "ieee"

    def plan(self, flags: list[bool] | tuple[bool, ...] | int, checkpoint: str | None = None) -> RolloutPlan:
        """The rollout plan of ``flags`` (per-step doubling flags, or a number of plain steps) under the run's
        checkpoint policy, or ``checkpoint`` for this one rollout."""
        return plan_rollout(flags, checkpoint or self.checkpoint, doubling=self.doubling, wgrad=self.wgrad,
                            wgrad_batch_bytes=self.wgrad_batch_mib * 2**20)

    def check_device(self) -> None:
        """Raise ValueError where the fused backend cannot run on this device (before any work is done).

        The fused kernels need a CUDA device; on the CPU they run only in the Triton interpreter
        (``TRITON_INTERPRET=1``, slowly: tests do that).
        """
        if self.fused and self.device.type != "cuda" and not interpreter_on():
            raise ValueError(
                f"backend: 'triton' needs a CUDA device, and {self.device} is not one (TRITON_INTERPRET=1 runs the "
                "fused kernels in the Triton interpreter on the CPU, slowly); use --set backend=auto or backend=torch"
            )

    def moved_to(self, device: torch.device) -> RunSettings:
        """The settings for ``device``: unchanged on the same device, resolved again from the request elsewhere
        (a measured or recorded backend is kept on another device of the same type)."""
        device = torch.device(device)
        if device == self.device:
            return self
        keep = self.backend_source in ("measured", "checkpoint") and device.type == self.device.type
        return resolve_run(self, device, backend=self.backend if keep else None,
                           backend_source=self.backend_source if keep else None)

    def replace(self, **changes: Any) -> RunSettings:
        """The settings resolved again on the same device with some requests changed (``backend``, ``precision``,
        ``checkpoint``, ``small_grid``, ``wgrad``, ``wgrad_batch_mib``), as benchmarks do to point one model at
        several backends."""
        request = {"backend": self.requested_backend, "precision": self.precision, "checkpoint": self.checkpoint,
                   "small_grid": self.small_grid, "doubling": self.doubling, "wgrad": self.wgrad,
                   "wgrad_batch_mib": self.wgrad_batch_mib}
        unknown = set(changes) - set(request)
        if unknown:
            raise ValueError(f"RunSettings.replace: unknown setting(s) {sorted(unknown)}; expected {sorted(request)}")
        request.update(changes)
        return resolve_run(_Request(**request), self.device)

    def record(self) -> dict[str, Any]:
        """The settings as JSON values, for a run's files (config.json, the checkpoint, metrics rows)."""
        return {
            "device": str(self.device),
            "backend": self.backend,
            "backend_source": self.backend_source,
            "precision": self.precision,
            "arithmetic": self.arithmetic,
            "checkpoint": self.checkpoint,
            "wgrad": self.wgrad,
        }

    def describe(self) -> str:
        """One line for a log: e.g. 'fused Triton kernels on cuda:0, TF32 dots (PyTorch's cuDNN TF32 flag)'."""
        what = "fused Triton kernels" if self.fused else "PyTorch reference"
        dots = {"fp32-ieee": "IEEE fp32 dots", "tf32": "TF32 dots", "bf16": "bf16 dots, fp32 accumulation"}
        why = ""
        if self.arithmetic == "tf32" and self.precision == "fp32":
            why = " (PyTorch's cuDNN TF32 flag; precision=fp32-ieee for IEEE fp32)"
        elif self.arithmetic == "tf32" and not self.fused and self.precision != "tf32":
            why = " (PyTorch's cuDNN TF32 flag)"
        return f"{what} on {self.device}, {dots[self.arithmetic]}{why}"


@dataclass(frozen=True)
class _Request:
    """What a caller asks for, when it is not a Config or a RunSettings (``RunSettings.replace``, ``NCA``)."""

    backend: str = "auto"
    precision: str = "fp32"
    checkpoint: str = "auto"
    small_grid: bool = True
    doubling: bool = True
    wgrad: str = "per-step"
    wgrad_batch_mib: int = 2048


def resolve_run(
    request: Any,
    device: torch.device | str,
    *,
    backend: str | None = None,
    backend_source: str | None = None,
    arithmetic: str | None = None,
) -> RunSettings:
    """Resolve what ``request`` asks for on ``device``: the one place where backend, precision and the checkpoint
    policy are decided.

    Args:
        request: anything with ``backend``, ``precision``, ``checkpoint``, ``small_grid`` and ``doubling``
            attributes: a :class:`fastnca.config.Config`, a :class:`RunSettings` (its ``requested_backend`` is the
            request), or the NCA's constructor arguments.
        device: the device the model runs on.
        backend: a backend already decided for an 'auto' request ('torch' or 'triton'): the trainer's measurement,
            or the one a resumed run's checkpoint recorded. None: :func:`resolve_backend`'s rule.
        backend_source: why ``backend`` was chosen ('measured', 'checkpoint'); recorded in the settings.
        arithmetic: the fused backend's dot arithmetic already decided (a resumed run's record, so that a resume
            does not change the run's numerics); it must fit the precision (bf16 with 'bf16', the fp32 ones with
            'tf32' or 'fp32-ieee'). None: decided from the precision as the module's table says.

    Raises:
        ValueError: a request outside the documented values (the message names the setting).
    """
    device = torch.device(device)
    requested = request.requested_backend if isinstance(request, RunSettings) else request.backend
    check_choice("backend", requested, BACKENDS)
    check_choice("precision", request.precision, PRECISIONS)
    # the fused backward's weight-gradient design (requests without one: the default)
    wgrad, wgrad_mib = getattr(request, "wgrad", "per-step"), getattr(request, "wgrad_batch_mib", 2048)
    # raises on a policy outside the grammar, a design not known
    plan_rollout(1, request.checkpoint, doubling=request.doubling, wgrad=wgrad, wgrad_batch_bytes=wgrad_mib * 2**20)
    if backend is not None:
        check_choice("backend", backend, ("torch", "triton"))
        source = backend_source or "explicit"
    else:
        backend = resolve_backend(requested, device)
        source = "explicit" if requested != "auto" else "capability"
    decided = _arithmetic(request.precision, backend, device)
    if arithmetic is not None and backend == "triton":
        fits = ("bf16",) if request.precision == "bf16" else ("tf32", "fp32-ieee")
        check_choice(f"arithmetic (for precision={request.precision})", arithmetic, fits)
        decided = arithmetic
    return RunSettings(
        device=device,
        backend=backend,
        precision=request.precision,
        arithmetic=decided,
        checkpoint=request.checkpoint,
        doubling=bool(request.doubling),
        small_grid=bool(request.small_grid),
        wgrad=wgrad,
        wgrad_batch_mib=int(wgrad_mib),
        requested_backend=requested,
        backend_source=source,
    )


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (or None) is CUDA when available, else the CPU; anything but auto, cpu, cuda, cuda:N is refused.

    A CUDA device is made the process's current one (``torch.cuda.set_device``): CUDA graphs capture on a stream
    of the current device and Triton launches there, so ``--device cuda:1`` must not leave ``cuda:0`` current."""
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {str(device)!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {str(device)!r} was asked for but CUDA is not available here; use --device cpu")
        if dev.index is None:  # an explicit index, so generator and tensor devices compare equal
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index != torch.cuda.current_device():
            torch.cuda.set_device(dev)
    return dev
