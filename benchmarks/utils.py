"""Benchmark plumbing: environment facts, timing, NVML power/memory sampling and the two measured peaks.

Nothing here makes a speed claim on the CPU: there the timer is ``time.perf_counter`` and the rows are
code-path checks. On CUDA every repeat is timed with a pair of CUDA events after warm-up.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastnca.kernels import interpreter_on

__all__ = [
    "REPO_ROOT",
    "Timing",
    "NvmlMonitor",
    "env_info",
    "git_commit",
    "time_fn",
    "measure_peaks",
    "rel_err",
    "quantile",
    "sync",
]

REPO_ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    """Wait for the device (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_err(ref: Tensor, out: Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (inf when out is not finite)."""
    ref64, out64 = ref.detach().double().cpu(), out.detach().double().cpu()
    if ref64.shape != out64.shape:
        raise ValueError(f"parity: expected shape {tuple(ref64.shape)}, got {tuple(out64.shape)}")
    if not torch.isfinite(out64).all():
        return float("inf")
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300)).item()


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile of a non-empty list (q in [0, 1])."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def git_commit() -> dict[str, Any]:
    """The commit being measured: $FASTNCA_COMMIT, else ``git`` in the checkout, else "unknown".

    A copy of the checkout without ``.git`` (e.g. a working tree copied onto a GPU machine) names its commit
    through FASTNCA_COMMIT (see benchmarks/README.md).
    """
    if os.environ.get("FASTNCA_COMMIT"):
        return {"commit": os.environ["FASTNCA_COMMIT"].strip(), "source": "FASTNCA_COMMIT"}
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": sha, "dirty": bool(dirty), "source": "git"}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": "unknown", "source": "none (no git checkout; set FASTNCA_COMMIT)"}


# ----------------------------------------------------------------------------------------------- NVML
def _nvml():
    """The pynvml module, initialised, or None (not installed, no driver)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None


def _nvml_handle(nvml, device: torch.device):
    idx = device.index if device.index is not None else torch.cuda.current_device()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if idx < len(ids) and ids[idx].isdigit():
            idx = int(ids[idx])
    return nvml.nvmlDeviceGetHandleByIndex(idx)


@dataclass
class NvmlMonitor:
    """Samples board power and used memory in a background thread; reads the energy counter at both ends.

    Use as a context manager around the timed loop. Without NVML every field stays None and
    ``unavailable`` says why.
    """

    device: torch.device
    interval_s: float = 0.02
    power_w: list[float] = field(default_factory=list)
    mem_used_max: int | None = None
    energy_j: float | None = None
    unavailable: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _handle: Any = None
    _nvml: Any = None
    _e0: int | None = None

    def __enter__(self) -> NvmlMonitor:
        if self.device.type != "cuda":
            self.unavailable = "no CUDA device"
            return self
        self._nvml = _nvml()
        if self._nvml is None:
            self.unavailable = "pynvml (nvidia-ml-py) not importable or NVML not initialised"
            return self
        try:
            self._handle = _nvml_handle(self._nvml, self.device)
        except Exception as err:
            self.unavailable = f"NVML handle: {err}"
            return self
        try:
            self._e0 = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)  # mJ since driver load
        except Exception:
            self._e0 = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        nvml, h = self._nvml, self._handle
        while not self._stop.is_set():
            try:
                self.power_w.append(nvml.nvmlDeviceGetPowerUsage(h) / 1000.0)  # mW
            except Exception:
                pass
            try:
                used = int(nvml.nvmlDeviceGetMemoryInfo(h).used)
                self.mem_used_max = used if self.mem_used_max is None else max(self.mem_used_max, used)
            except Exception:
                pass
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=1.0)
        if self._e0 is not None:
            try:
                self.energy_j = (self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) - self._e0) / 1000.0
            except Exception:
                self.energy_j = None

    def summary(self, elapsed_s: float, reps: int) -> dict[str, Any]:
        """Average power (energy counter over elapsed time when it moved, else mean sample) and J per call."""
        if self.unavailable:
            return {"unavailable": self.unavailable}
        avg_sampled = statistics.fmean(self.power_w) if self.power_w else None
        if self.energy_j is not None and self.energy_j > 0 and elapsed_s > 0:
            avg, source, energy = self.energy_j / elapsed_s, "energy counter", self.energy_j
        elif avg_sampled is not None:
            avg, source, energy = avg_sampled, f"{len(self.power_w)} power samples", avg_sampled * elapsed_s
        else:
            return {"unavailable": "NVML returned no power reading"}
        return {"avg_w": avg, "avg_w_sampled": avg_sampled, "energy_j_per_call": energy / max(reps, 1),
                "samples": len(self.power_w), "source": source, "nvml_mem_used_max": self.mem_used_max}


# --------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Per-call times in ms of the timed repeats (after warm-up), and the wall time of the timed loop."""

    times_ms: list[float]
    elapsed_s: float
    timer: str

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    def as_dict(self) -> dict[str, Any]:
        return {"median": self.median, "p20": quantile(self.times_ms, 0.2), "p80": quantile(self.times_ms, 0.8),
                "min": min(self.times_ms), "reps": len(self.times_ms), "timer": self.timer}


def time_fn(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int = 3,
    min_reps: int = 3,
    max_reps: int = 100,
    target_s: float = 1.0,
    monitor: NvmlMonitor | None = None,
) -> Timing:
    """Time ``fn`` after ``warmup`` calls: as many repeats as fit ``target_s`` within [min_reps, max_reps].

    On CUDA each repeat is bracketed by CUDA events (median over repeats is robust to a late launch); on the
    CPU by ``time.perf_counter``. The NVML monitor, if given, runs around the timed repeats only.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    est = max(time.perf_counter() - t0, 1e-6)
    reps = int(max(min_reps, min(max_reps, target_s / est)))
    cuda = device.type == "cuda"
    if monitor is not None:
        monitor.__enter__()
    try:
        start = time.perf_counter()
        if cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(reps)]
            for e0, e1 in events:
                e0.record()
                fn()
                e1.record()
            torch.cuda.synchronize(device)
            times = [e0.elapsed_time(e1) for e0, e1 in events]
        else:
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        elapsed = time.perf_counter() - start
    finally:
        if monitor is not None:
            monitor.__exit__(None, None, None)
    return Timing(times, elapsed, "cuda events" if cuda else "perf_counter")


# ---------------------------------------------------------------------------------------------- peaks
def measure_peaks(device: torch.device, *, tiny: bool = False, fp32: bool = False) -> dict[str, Any]:
    """The ceilings of this run: a large bf16 matmul (FLOP/s) and a device-to-device copy (bytes/s).

    Random inputs (zeros run faster on some cards). Copy bandwidth counts bytes read plus bytes written.
    ``fp32=True`` also times an fp32 matmul with TF32 disabled (the ceiling of the 'ieee' fp32 kernels).
    """
    n = 512 if tiny else 8192
    copy_bytes = (8 << 20) if tiny else (1 << 30)
    out: dict[str, Any] = {}
    kinds = [("matmul_bf16", torch.bfloat16)] + ([("matmul_fp32", torch.float32)] if fp32 else [])
    for name, dtype in kinds:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            t = time_fn(lambda a=a, b=b: torch.mm(a, b), device, warmup=3, min_reps=5, max_reps=50,
                        target_s=0.2 if tiny else 1.0)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        out[name] = {"n": n, "ms": t.median, "tflops": 2 * n**3 / (t.median * 1e-3) / 1e12}
        del a, b
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda src=src, dst=dst: dst.copy_(src), device, warmup=3, min_reps=5, max_reps=50,
                target_s=0.2 if tiny else 1.0)
    out["copy"] = {"bytes": 2 * copy_bytes, "ms": t.median, "tbps": 2 * copy_bytes / (t.median * 1e-3) / 1e12}
    del src, dst
    return out


# -------------------------------------------------------------------------------------------- environment
def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception:
        return None


def env_info(device: torch.device) -> dict[str, Any]:
    """GPU name, SM count, driver, library versions, commit and date: stored with every result."""
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "pytest_benchmark": _version("pytest_benchmark"),
        "cuda": torch.version.cuda,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "triton_interpret": interpreter_on(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        **git_commit(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, sm_count=p.multi_processor_count, gpu_mem_bytes=p.total_memory,
                    capability=f"{p.major}.{p.minor}")
        nvml = _nvml()
        if nvml is not None:
            try:
                drv = nvml.nvmlSystemGetDriverVersion()
                info["driver"] = drv.decode() if isinstance(drv, bytes) else drv
                info["power_limit_w"] = nvml.nvmlDeviceGetPowerManagementLimit(_nvml_handle(nvml, device)) / 1000
            except Exception as err:
                info["driver"] = f"unavailable: {err}"
        else:
            info["driver"] = "unavailable: nvidia-ml-py/NVML missing"
    else:
        info.update(gpu=None, sm_count=None, driver=None)
    return info
