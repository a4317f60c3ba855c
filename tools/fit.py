"""Fit of the fused step's kernels on the H100, measured on the CPU: compile for sm_90 and read the machine code.

Usage::

    python -m tools.fit              # forward and backward tables of every shipped configuration
    python -m tools.fit --only bwd   # one of them ("fwd", "bwd", "rollout" or "likelihood")
    python -m tools.fit --json       # the same as JSON lines, each pass's rows when it is done
    FASTNCA_FIT_JOBS=1 python -m tools.fit   # one compile at a time (default: CPUs, at most 8)
    python -m tools.fit --python .ci/.venv-triton36/bin/python   # compiled by another Triton release
    python -m tools.fit --only small-smem   # the tiles each kernel falls back to on a 99 KiB sm_86 GPU

Every kernel is compiled with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (no GPU needed)
(:func:`compile_sm90`), and the cubin is read with the ``cuobjdump`` / ``nvdisasm`` that ship in
``triton/backends/nvidia/bin``: registers and local memory per thread (spills: ptxas reports them as STACK, so
STACK + LOCAL is counted, with the STL/LDL instructions), shared memory per program, and the count of Hopper
warpgroup (HGMMA) and older (HMMA) tensor-core instructions.

The kernel modules say what they launch: ``nca_step.fwd_kernel_spec`` and ``nca_step_bwd.bwd_kernel_specs``
return :class:`KernelSpec` s (jit function, signature, constexprs, warps, stages); :func:`fit_kernels` compiles
a list of them. In the interpreter (``fastnca.kernels.use_interpreter``, which tests/conftest.py calls without a
GPU) ``@triton.jit`` has already produced an interpreter function that ``triton.compile`` cannot take, so
:func:`fit_kernels` then compiles in a child process with TRITON_INTERPRET removed from its environment
(``fastnca.kernels.env_without_interpreter``; the function is found there by module and name). Several kernels
are compiled by several such children at once, ``FASTNCA_FIT_JOBS`` of them (default: the usable CPUs, at most 8;
1: one child, or this process where it can compile). Results are kept for the rest of the process, and Triton
caches the compiles on disk. With ``--json`` each pass's rows are printed (flushed) as
soon as that pass is done, so a caller's timeout keeps the passes already compiled.

Tiles must fit every Triton release the kernels run under: CI's (the one installed with torch) and the GPU
machines' (3.6, ``GPU_TRITON``), which allocates registers differently. ``python=`` (``--python``) compiles in
a child process of another interpreter, e.g. a virtual environment with ``triton==3.6.0`` beside this torch
(``.ci/run`` makes one); the child imports this very checkout's kernels (checked). The tests find such
interpreters in the environment variable ``FASTNCA_FIT_PYTHONS`` (paths separated by ``os.pathsep``).

Other GPUs: ``fit_kernels(arch=86)`` compiles for another compute capability; :func:`fit_fallback` walks each launch
site's fallback tiles (``kernels/launch.py``) compiled for sm_86 until one fits its 99 KiB of shared memory.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import fastnca.kernels
from fastnca.kernels import env_without_interpreter, interpreter_on
from fastnca.kernels.spec import KernelSpec

__all__ = [
    "BWD_SHIPPED",
    "FIT_JOBS_ENV",
    "FIT_PYTHONS_ENV",
    "GPU_TRITON",
    "LIKELIHOOD_SHIPPED",
    "SHIPPED",
    "SMALL_SMEM",
    "SMALL_SMEM_ARCH",
    "SMALL_SMEM_FITS",
    "SMEM_LIMIT",
    "BwdFitResult",
    "FallbackResult",
    "BwdFitSpec",
    "FitResult",
    "FitSpec",
    "KernelFit",
    "KernelSpec",
    "compile_sm90",
    "fit",
    "fit_bwd",
    "fit_fallback",
    "fit_rollout",
    "fit_kernels",
    "fit_likelihood",
    "fit_jobs",
    "fit_many",
    "fit_pythons",
    "format_bwd_table",
    "format_fallback_table",
    "format_table",
    "triton_version",
]

SMEM_LIMIT = 232448  # bytes of shared memory one H100 program may use (227 KiB)
GPU_TRITON = "3.6"  # the Triton release of the GPU machines (PyTorch 2.11); CI has the one torch 2.14 brings
FIT_PYTHONS_ENV = "FASTNCA_FIT_PYTHONS"  # interpreters with other Triton releases to fit under (os.pathsep list)
FIT_JOBS_ENV = "FASTNCA_FIT_JOBS"  # compiling child processes at once (default: the usable CPUs, at most 8)


# ----------------------------------------------------------------------------------------- generic sm_90 fit
class KernelFit(NamedTuple):
    """What the sm_90 machine code of one kernel uses."""

    registers: int  # per thread
    spills: int  # bytes of local memory per thread: cuobjdump's STACK + LOCAL (ptxas spills land in STACK)
    spill_ops: int  # STL/LDL instructions in the SASS
    shared: int  # bytes per program
    hgmma: int  # Hopper warpgroup MMA instructions (static count)
    hmma: int  # pre-Hopper tensor-core MMA instructions
    compile_s: float
    hgmma_shapes: dict[str, int] = {}  # static HGMMA count per instruction shape "MxNxK" (one warpgroup's work)
    copy_widths: dict[str, int] = {}  # static LDGSTS (cp.async global -> shared) count per width in bytes


def _copy_width(op: str) -> str:
    """Bytes one LDGSTS moves per thread: a ``.128`` / ``.64`` modifier, else 4 (``LTC128B`` is an L2 hint)."""
    mods = op.split(".")[1:]
    return "16" if "128" in mods else "8" if "64" in mods else "4"


def _bin(tool: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def compile_sm90(
    fn: Any, signature: dict[str, str], constexprs: dict[str, Any], num_warps: int, num_stages: int, arch: int = 90
) -> KernelFit:
    """Compile one jit function for sm_90 (``arch``: another compute capability, e.g. 86) in this process and read
    registers, spills, shared memory, MMA counts.

    Needs a real ``JITFunction`` (not decorated under TRITON_INTERPRET=1; :func:`fit_kernels` handles that case).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("fit: the kernel was decorated in interpreter mode; use fit_kernels (it runs a subprocess)")
    pointers = [k for k, v in signature.items() if v.startswith("*")]
    # the launchers' tensors are 16-byte aligned: tell the compiler, as the JIT does for real launches
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in pointers}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    t0 = time.perf_counter()
    compiled = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run(
            [_bin("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run([_bin("nvdisasm"), str(cubin)], capture_output=True, text=True, check=True).stdout
    fields = {key: re.search(rf"{key}:(\d+)", usage) for key in ("REG", "STACK", "LOCAL")}
    if any(v is None for v in fields.values()):
        raise RuntimeError(f"fit: cannot parse cuobjdump output:\n{usage}")
    return KernelFit(
        registers=int(fields["REG"].group(1)),
        spills=int(fields["STACK"].group(1)) + int(fields["LOCAL"].group(1)),
        spill_ops=len(re.findall(r"\b(?:STL|LDL)\b", sass)),
        shared=int(compiled.metadata.shared),
        hgmma=len(re.findall(r"\bHGMMA\b", sass)),
        hmma=len(re.findall(r"\bHMMA\b", sass)),
        compile_s=round(seconds, 1),
        hgmma_shapes=dict(sorted(Counter(re.findall(r"\bHGMMA\.(\d+x\d+x\d+)", sass)).items())),
        copy_widths=dict(sorted(Counter(_copy_width(op) for op in re.findall(r"\bLDGSTS(?:\.\w+)*", sass)).items())),
    )


def tensor_flops(shapes: dict[str, int], num_warps: int) -> int:
    """FLOPs of one pass through the SASS's HGMMAs by the whole program: each warpgroup (4 warps) runs every one."""
    per_warpgroup = sum(n * 2 * math.prod(int(x) for x in shape.split("x")) for shape, n in shapes.items())
    return per_warpgroup * (num_warps // 4)


def needed_flops(spec: KernelSpec) -> int | None:
    """FLOPs the tile needs in one pass through the kernel's dot sites (each site once, as the SASS holds it when no
    loop is unrolled or peeled): sum of 2 M N K over the kernel's ``tl.dot`` s. None for fp32 "ieee" (no tensor
    cores). The dot sites are read off the kernel bodies (nca_step.py, nca_step_bwd.py, utils.perceive_conv3x3,
    rollout.py, small_grid.py, wgrad.py)."""
    c = spec.constexprs
    operand = next(spec.signature[p] for p in ("z_ptr", "dpre_ptr", "a_ptr") if p in spec.signature)
    if operand == "*fp32" and c["INPUT_PRECISION"] == "ieee":
        return None
    if spec.name in ("fwd", "small-fwd", "fwd-store", "small-fwd-store"):  # small-grid: the forward's step body
        m, k, hid = c["BLOCK_M"], c["BLOCK_K"], c["HID"]
        sites = [(m, hid, k)] + [(m, k, hid), (m, hid, k)] * (c["N_BLOCKS"] > 0) + [(m, c["BLOCK_N"], hid)]
    elif spec.name in ("main", "main-stored"):
        m, k, cc, hid = c["BLOCK_M"], c["BLOCK_K"], c["BLOCK_C"], c["HID"]
        blocks = [(m, k, hid), (m, hid, k)] * (c["N_BLOCKS"] > 0)
        sites = [(m, hid, cc), *blocks] if c.get("RECOMPUTE", True) else []  # recompute (not on kept activations)
        sites += [(m, hid, cc), *blocks]  # the backward
    elif spec.name in ("post", "post-double"):  # the weight-gradient GEMMs + the post's dstate
        cells = c["BLOCK_CELLS"]
        sites = [(c["BA_P"], c["BB_P"], cells), (c["BA_O"], c["BB_O"], cells)]
        sites += [(c["BA_H"], c["BA_H"], cells)] * (2 * (c["N_BLOCKS"] > 0))
        sites.append((c["DS_BLOCK_M"], c["DS_BLOCK_N"], c["DS_BLOCK_K"]))
    elif spec.name == "wgrad-batched":  # kernels/wgrad.py: the perception's, the output conv's, W1's and W2's tiles
        cells = c["BLOCK_CELLS"]
        sites = [(c["BA_P"], c["BB_P"], cells), (c["BA_O"], c["BB_O"], cells)]
        sites += [(c["BA_H"], c["BA_H"], cells)] * (2 * (c["N_BLOCKS"] > 0))
    elif spec.name == "dstate":
        sites = [(c["BLOCK_M"], c["C_PAD"], c["BLOCK_K"])]
    elif spec.name.startswith("wgrad"):
        sites = [(c["BLOCK_A"], c["BLOCK_B"], c["BLOCK_CELLS"])]
    else:
        raise ValueError(f"needed_flops: no dot sites known for kernel {spec.name!r}")
    return sum(2 * m * n * k for m, n, k in sites)


def _job(spec: KernelSpec, arch: int = 90) -> dict[str, Any]:
    """A spec as JSON: the jit function by module and name, so that a child process can import it."""
    py_fn = spec.fn.fn  # the decorated Python function, under both JITFunction and InterpretedFunction
    return {
        **({"arch": arch} if arch != 90 else {}),
        "module": py_fn.__module__,
        "qualname": py_fn.__qualname__,
        "signature": spec.signature,
        "constexprs": spec.constexprs,
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
    }


def _compile_job(job: dict[str, Any]) -> KernelFit:
    fn = getattr(importlib.import_module(job["module"]), job["qualname"])
    return compile_sm90(fn, job["signature"], job["constexprs"], job["num_warps"], job["num_stages"],
                        job.get("arch", 90))


_FITS: dict[tuple[str, str], KernelFit] = {}  # compiled this process: (python, json of the job) -> fit
_KERNELS_DIR = Path(fastnca.kernels.__file__).resolve().parent  # the kernels this process imported
_ROOT = Path(__file__).resolve().parents[1]  # the checkout this tool belongs to
_SHIM = Path(__file__).resolve().parent / "_import_shim"


def _child_env() -> dict[str, str]:
    """The environment of a compiling child: no TRITON_INTERPRET, and this checkout first on its import path.

    pyproject maps ``fastnca.kernels`` to ``kernels/``; the child gets the checkout (for ``tools``) and
    ``tools/_import_shim`` (a sitecustomize that serves ``fastnca.kernels`` from ``kernels/``) on PYTHONPATH, so
    that another interpreter compiles exactly this checkout's kernels whatever it has installed.
    """
    env = env_without_interpreter()
    env["PYTHONPATH"] = os.pathsep.join([str(_SHIM), str(_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _run_child(python: str, todo: list[str]) -> list[KernelFit]:
    """Compile the JSON jobs in a child ``python -m tools.fit --jobs-stdin``; check it read our kernels."""
    proc = subprocess.run(
        [python, "-m", "tools.fit", "--jobs-stdin"],
        env=_child_env(),
        input="[" + ",".join(todo) + "]",
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"fit: the sm_90 compile under {python} failed:\n{proc.stderr[-4000:]}")
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines or "kernels" not in lines[0]:
        raise RuntimeError(f"fit: no header from the child {python}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    if Path(lines[0]["kernels"]).resolve() != _KERNELS_DIR:
        raise RuntimeError(f"fit: {python} imported the kernels from {lines[0]['kernels']}, not {_KERNELS_DIR} "
                           f"(the compiling children read the kernels of this tool's checkout, {_ROOT / 'kernels'}: "
                           "run it with that checkout's fastnca, e.g. pip install -e .)")
    results = [KernelFit(**line) for line in lines[1:]]
    if len(results) != len(todo):
        raise RuntimeError(f"fit: expected {len(todo)} results from the child {python}, got {len(results)}")
    return results


def fit_jobs() -> int:
    """How many compiling child processes one :func:`fit_kernels` call may run at once: ``FASTNCA_FIT_JOBS``, else
    the CPUs this process may use, at most 8."""
    env = os.environ.get(FIT_JOBS_ENV, "").strip()
    if env:
        return max(1, int(env))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cpus or 1, 8))


def _run_children(python: str, todo: list[str], jobs: int) -> list[KernelFit]:
    """:func:`_run_child` on ``jobs`` interleaved shares of ``todo`` at once (one thread each; neighbouring jobs,
    often the heavy kernels of one configuration, go to different children); results in the order of ``todo``."""
    shares = [todo[i::jobs] for i in range(jobs)]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        done = list(pool.map(lambda share: _run_child(python, share), shares))
    results: list[KernelFit | None] = [None] * len(todo)
    for i, fits in enumerate(done):
        results[i::jobs] = fits
    return results  # type: ignore[return-value]


def fit_kernels(specs: list[KernelSpec] | tuple[KernelSpec, ...], python: str | None = None,
                arch: int = 90) -> list[KernelFit]:
    """Compile kernels for sm_90 (``arch``: another compute capability): in this process, or in child processes
    (of ``python``, another interpreter with its own Triton release, or of this one without TRITON_INTERPRET when
    that is set here).

    Several kernels are compiled by :func:`fit_jobs` child processes at once (``FASTNCA_FIT_JOBS=1``: one child,
    or this process where it can compile); the results are the same, in the same order. Each distinct kernel is
    compiled once per process and interpreter (identical specs, e.g. the backward's weight-gradient GEMMs of equal
    shapes, share one compile).
    """
    who = str(python) if python else ""
    keys = [json.dumps(_job(s, arch), sort_keys=True) for s in specs]
    todo = list(dict.fromkeys(k for k in keys if (who, k) not in _FITS))
    jobs = min(fit_jobs(), len(todo))
    if jobs > 1:
        _FITS.update(zip(((who, k) for k in todo), _run_children(python or sys.executable, todo, jobs)))
    elif todo and not python and not interpreter_on():
        for k in todo:
            _FITS[who, k] = _compile_job(json.loads(k))
    elif todo:
        _FITS.update(zip(((who, k) for k in todo), _run_child(python or sys.executable, todo)))
    return [_FITS[who, k] for k in keys]


_VERSIONS: dict[str, str] = {}


def triton_version(python: str | None = None) -> str:
    """The Triton release of ``python`` (None: this process's)."""
    if not python:
        import triton

        return triton.__version__
    if python not in _VERSIONS:
        proc = subprocess.run(
            [python, "-c", "import triton; print(triton.__version__)"],
            env=_child_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"fit: cannot import triton with {python}:\n{proc.stderr[-2000:]}")
        _VERSIONS[python] = proc.stdout.strip().splitlines()[-1]
    return _VERSIONS[python]


def fit_pythons() -> list[str]:
    """The interpreters named by ``FASTNCA_FIT_PYTHONS`` (``os.pathsep``-separated; empty when unset)."""
    return [p for p in os.environ.get(FIT_PYTHONS_ENV, "").split(os.pathsep) if p]


# --------------------------------------------------------------------------------------------------- forward
class FitSpec(NamedTuple):
    """One configuration of the fused step: the network shape, dtype, flags; tiling from ``step_config``."""

    name: str
    state_channels: int
    hidden_channels: int
    n_blocks: int
    dtype: str  # "bf16" or "fp32"
    input_precision: str = "ieee"
    bias: bool = True
    out_bias: bool = True
    double: bool = False
    mask: bool = False


class FitResult(NamedTuple):
    name: str
    block_m: int
    block_k: int
    num_warps: int
    num_stages: int
    registers: int
    spills: int  # bytes of local memory per thread: cuobjdump's STACK + LOCAL (ptxas spills land in STACK)
    spill_ops: int  # STL/LDL instructions in the SASS
    shared: int  # bytes per program
    hgmma: int
    hmma: int
    compile_s: float
    hgmma_shapes: dict[str, int]
    copy_widths: dict[str, int]
    tensor_flops: int  # FLOPs of the SASS's HGMMAs over all warpgroups, one pass through the dot sites
    needed_flops: int | None  # what the tile's dots need in that pass (None: fp32 "ieee", FFMA)


# The networks the presets run (docs/PAPER.md): 256/256 x 4 blocks (doubling MNIST, CelebA, emoji),
# 128/128 x 4 blocks, and the non-doubling MNIST net (128/128, no blocks, no output bias).
SHIPPED: tuple[FitSpec, ...] = (
    FitSpec("z256-h256-nb4-bf16", 256, 256, 4, "bf16"),
    FitSpec("z256-h256-nb4-bf16-double-mask", 256, 256, 4, "bf16", double=True, mask=True),
    FitSpec("z256-h256-nb4-tf32", 256, 256, 4, "fp32", "tf32"),
    FitSpec("z256-h256-nb4-fp32", 256, 256, 4, "fp32", "ieee"),
    FitSpec("z256-h128-nb4-bf16", 256, 128, 4, "bf16"),
    FitSpec("z128-h128-nb4-bf16", 128, 128, 4, "bf16"),
    FitSpec("z128-h128-nb4-tf32", 128, 128, 4, "fp32", "tf32"),
    FitSpec("z128-h128-nb4-fp32", 128, 128, 4, "fp32", "ieee"),
    FitSpec("z128-h128-nb0-nobout-bf16", 128, 128, 0, "bf16", out_bias=False, mask=True),
    FitSpec("z128-h128-nb0-nobout-tf32", 128, 128, 0, "fp32", "tf32", out_bias=False, mask=True),
    FitSpec("z128-h128-nb0-nobout-fp32", 128, 128, 0, "fp32", "ieee", out_bias=False, mask=True),
)


def _torch_dtype(name: str) -> Any:
    import torch

    return torch.bfloat16 if name == "bf16" else torch.float32


def fit(spec: FitSpec, config: tuple[int, ...] | None = None, *, python: str | None = None) -> FitResult:
    """Compile one configuration for sm_90 (``config``: a ``StepConfig`` tuple overriding the shipped tiling)."""
    return fit_many([spec], [config], python=python)[0]


def fit_many(
    specs: list[FitSpec] | tuple[FitSpec, ...],
    configs: list[tuple[int, ...] | None] | None = None,
    *,
    python: str | None = None,
) -> list[FitResult]:
    """Compile several configurations of the forward kernel (see :func:`fit_kernels`; ``python``: compile with
    another interpreter's Triton)."""
    from fastnca.kernels import nca_step as ns

    configs = list(configs) if configs is not None else [None] * len(specs)
    kernels = [
        ns.fwd_kernel_spec(
            s.state_channels,
            s.hidden_channels,
            s.n_blocks,
            _torch_dtype(s.dtype),
            input_precision=s.input_precision,
            bias=s.bias,
            out_bias=s.out_bias,
            double=s.double,
            mask=s.mask,
            config=ns.StepConfig(*c) if c else None,
        )
        for s, c in zip(specs, configs)
    ]
    return [
        FitResult(s.name, k.constexprs["BLOCK_M"], k.constexprs["BLOCK_K"], k.num_warps, k.num_stages, *f,
                  tensor_flops(f.hgmma_shapes, k.num_warps), needed_flops(k))
        for s, k, f in zip(specs, kernels, fit_kernels(kernels, python))
    ]


def _work(r: Any) -> str:
    """HGMMA work over what the tile needs, e.g. "1" or "1.33" ("-" for fp32 "ieee")."""
    return "-" if r.needed_flops is None else f"{r.tensor_flops / r.needed_flops:.3g}"


def _widths(r: Any) -> str:
    """The LDGSTS widths in bytes, e.g. "16" or "4,16"."""
    return ",".join(sorted(r.copy_widths, key=int)) or "-"


def _cells(rows: tuple[Any, ...], *fields: str) -> list[str]:
    """One table cell per field: the value, or the values of each release joined by " / " (same row, several
    Triton releases). Fields "work" and "copies" are :func:`_work` and :func:`_widths`."""
    get = {"work": _work, "copies": _widths}
    return [" / ".join(str(get[f](r) if f in get else getattr(r, f)) for r in rows) for f in fields]


def format_table(results: list[FitResult], *others: list[FitResult]) -> str:
    """A markdown table of forward fit results; ``others``: the same rows compiled by other Triton releases,
    shown as ``this / other`` in each measured column."""
    head = (
        "| config | BLOCK_M | BLOCK_K | warps | stages | registers | spills (B) | STL+LDL | shared (B) | HGMMA | HMMA "
        "| tensor work | LDGSTS (B) |"
    )
    rows = [head, "|" + "---|" * 13]
    for same in zip(results, *others):
        r = same[0]
        measured = _cells(same, "registers", "spills", "spill_ops", "shared", "hgmma", "hmma", "work", "copies")
        rows.append(f"| {r.name} | {r.block_m} | {r.block_k} | {r.num_warps} | {r.num_stages} | "
                    + " | ".join(measured) + " |")
    return "\n".join(rows)


# -------------------------------------------------------------------------------------------------- backward
class BwdFitSpec(NamedTuple):
    """One network configuration of the backward: every kernel it launches is compiled."""

    name: str
    state_channels: int
    hidden_channels: int
    n_blocks: int
    dtype: str  # "bf16" or "fp32"
    input_precision: str = "ieee"
    double: bool = False
    mask: bool = False


class BwdFitResult(NamedTuple):
    config: str  # the BwdFitSpec's name
    kernel: str  # "main", "dstate", "wgrad-perceive", "wgrad-out", "wgrad-w1", "wgrad-w2"
    warps: int
    stages: int
    tiles: dict[str, int]  # the BLOCK_* constexprs
    registers: int
    spills: int
    spill_ops: int
    shared: int
    hgmma: int
    hmma: int
    compile_s: float
    hgmma_shapes: dict[str, int]
    copy_widths: dict[str, int]
    tensor_flops: int
    needed_flops: int | None


# The networks the presets train (docs/PAPER.md): 256/256 x 4 blocks (doubling MNIST, CelebA, emoji), 256/128 and
# 128/128 x 4 blocks, and the block-free non-doubling MNIST net (128/128, masked updates).
BWD_SHIPPED: tuple[BwdFitSpec, ...] = (
    BwdFitSpec("z256-h256-nb4-bf16", 256, 256, 4, "bf16"),
    BwdFitSpec("z256-h256-nb4-bf16-double-mask", 256, 256, 4, "bf16", double=True, mask=True),
    BwdFitSpec("z256-h256-nb4-tf32", 256, 256, 4, "fp32", "tf32"),
    BwdFitSpec("z256-h256-nb4-fp32", 256, 256, 4, "fp32", "ieee"),
    BwdFitSpec("z256-h128-nb4-bf16", 256, 128, 4, "bf16", mask=True),
    BwdFitSpec("z128-h128-nb4-bf16", 128, 128, 4, "bf16"),
    BwdFitSpec("z128-h128-nb4-tf32", 128, 128, 4, "fp32", "tf32"),
    BwdFitSpec("z128-h128-nb4-fp32", 128, 128, 4, "fp32", "ieee"),
    BwdFitSpec("z128-h128-nb0-bf16-mask", 128, 128, 0, "bf16", mask=True),
    BwdFitSpec("z128-h128-nb0-tf32-mask", 128, 128, 0, "fp32", "tf32", mask=True),
    BwdFitSpec("z128-h128-nb0-fp32-mask", 128, 128, 0, "fp32", "ieee", mask=True),
)


def fit_bwd(
    fits: list[BwdFitSpec] | tuple[BwdFitSpec, ...] = BWD_SHIPPED, *, python: str | None = None
) -> list[BwdFitResult]:
    """Compile every kernel the backward launches for each configuration (see :func:`fit_kernels`; ``python``:
    compile with another interpreter's Triton)."""
    from fastnca.kernels import nca_step_bwd as nb

    named = [
        (f.name, k)
        for f in fits
        for k in nb.bwd_kernel_specs(
            f.state_channels,
            f.hidden_channels,
            f.n_blocks,
            _torch_dtype(f.dtype),
            double=f.double,
            mask=f.mask,
            input_precision=f.input_precision,
        )
    ]
    results = fit_kernels([k for _, k in named], python)
    return [
        BwdFitResult(
            name,
            k.name,
            k.num_warps,
            k.num_stages,
            {c: v for c, v in k.constexprs.items() if c.startswith("BLOCK_")},
            *f,
            tensor_flops(f.hgmma_shapes, k.num_warps),
            needed_flops(k),
        )
        for (name, k), f in zip(named, results)
    ]


def format_bwd_table(rows: list[BwdFitResult], *others: list[BwdFitResult]) -> str:
    """A markdown table of backward fit results, one row per kernel; ``others`` as in :func:`format_table`."""
    head = (
        "| config | kernel | warps/stages | tiles | regs | spills (B) | STL+LDL | smem (B) | HGMMA | HMMA "
        "| tensor work | LDGSTS (B) |"
    )
    lines = [head, "|" + "---|" * 12]
    for same in zip(rows, *others):
        r = same[0]
        tiles = " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in r.tiles.items())
        measured = _cells(same, "registers", "spills", "spill_ops", "shared", "hgmma", "hmma", "work", "copies")
        lines.append(f"| {r.config} | {r.kernel} | {r.warps}/{r.stages} | {tiles} | " + " | ".join(measured) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- rollout
def fit_rollout(
    fits: list[BwdFitSpec] | tuple[BwdFitSpec, ...] = BWD_SHIPPED, *, python: str | None = None
) -> list[BwdFitResult]:
    """Compile the kernel the rollout's backward adds (``rollout.post_kernel_spec``, with and without doubling)
    for each configuration (``python``: compile with another interpreter's Triton, see :func:`fit_kernels`)."""
    from fastnca.kernels import rollout as ro

    named = [
        (f.name, k)
        for f in fits
        for k in ro.rollout_kernel_specs(f.state_channels, f.hidden_channels, f.n_blocks, _torch_dtype(f.dtype),
                                         input_precision=f.input_precision)
    ]
    results = fit_kernels([k for _, k in named], python)
    return [
        BwdFitResult(name, k.name, k.num_warps, k.num_stages,
                     {c: v for c, v in k.constexprs.items() if c.startswith(("BLOCK_", "BA_", "BB_", "DS_BLOCK"))}, *f,
                     tensor_flops(f.hgmma_shapes, k.num_warps),
                     needed_flops(k))
        for (name, k), f in zip(named, results)
    ]


# ------------------------------------------------------------------------------------------------ likelihood
# (n_mix, params dtype) of the presets' DML likelihood: n_mix 1 (CelebA, emoji) or 4 (celeba-doubling-beta100),
# on a bf16 (celeba-nondoubling-256) or fp32 NCA state
LIKELIHOOD_SHIPPED: tuple[tuple[int, str], ...] = ((1, "bf16"), (1, "fp32"), (4, "fp32"))


def fit_likelihood(
    shipped: tuple[tuple[int, str], ...] = LIKELIHOOD_SHIPPED, *, python: str | None = None
) -> list[BwdFitResult]:
    """Compile the fused DML likelihood's two kernels (``likelihood.likelihood_kernel_specs``) for each shipped
    (n_mix, dtype) (``python``: compile with another interpreter's Triton, see :func:`fit_kernels`)."""
    from fastnca.kernels import likelihood as lk

    named = [(f"dml-n{n}-{dt}", k) for n, dt in shipped for k in lk.likelihood_kernel_specs(n, _torch_dtype(dt))]
    results = fit_kernels([k for _, k in named], python)
    return [
        BwdFitResult(name, k.name, k.num_warps, k.num_stages,
                     {c: v for c, v in k.constexprs.items() if c.startswith("BLOCK_")}, *f, 0, None)  # no dots
        for (name, k), f in zip(named, results)
    ]


# ------------------------------------------------------------------------------- GPUs with less shared memory
SMALL_SMEM = 101376  # bytes of shared memory one program may use on sm_86 / sm_89 / sm_120 GPUs (99 KiB)
SMALL_SMEM_ARCH = 86
# the networks whose shipped tiles need more than that (compiled for sm_86: the 256-channel ones; the 128-channel
# kernels need at most 72 KiB)
SMALL_SMEM_FITS: tuple[BwdFitSpec, ...] = tuple(f for f in BWD_SHIPPED if f.hidden_channels >= 256)


class FallbackResult(NamedTuple):
    config: str
    kernel: str
    shipped: int  # shared memory of the shipped tiles on the small-memory GPU (B)
    tried: int  # tilings compiled, the shipped one first
    runs: str | None  # the first tiling that fits (warps/stages, tiles), as the launch site takes it; None: none
    shared: int | None  # its shared memory (B)


def _describe(k: KernelSpec) -> str:
    tiles = {c: v for c, v in k.constexprs.items() if c.startswith(("BLOCK_", "BA_", "BB_", "DS_BLOCK"))}
    return f"{k.num_warps}/{k.num_stages} " + " ".join(f"{c}={v}" for c, v in tiles.items())


def _fallback_chains(f: BwdFitSpec) -> list[tuple[str, list[KernelSpec]]]:
    """Every kernel the fused backend launches for ``f`` by default (per-step forward and backward, the rollout's
    forward that keeps activations, small-grid forward, main kernel on kept activations, post kernel), each with the
    tilings its launch site tries on a GPU with less shared memory (``kernels/launch.py``), the shipped one first."""
    from fastnca.kernels import rollout as ro
    from fastnca.kernels import small_grid as sg
    from fastnca.kernels.launch import fewer_stages
    from fastnca.kernels.nca_step import fwd_candidates, fwd_kernel_spec
    from fastnca.kernels.nca_step_bwd import bwd_kernel_specs, main_candidates
    from fastnca.kernels.tiles import bwd_config, post_config, small_config, step_config

    dt = _torch_dtype(f.dtype)
    c, h, nb, ip = f.state_channels, f.hidden_channels, f.n_blocks, f.input_precision
    hp = 1 << (h - 1).bit_length()
    out: list[tuple[str, list[KernelSpec]]] = []
    for store in (False, True):
        cfg = step_config(c, h, dt, input_precision=ip, store_acts=store, interpret=False)
        out.append(("fwd-store" if store else "fwd", [
            fwd_kernel_spec(c, h, nb, dt, input_precision=ip, double=f.double, mask=f.mask, store_acts=store,
                            config=k) for k in fwd_candidates(cfg)]))
        small = small_config(c, h, dt, input_precision=ip, store_acts=store, interpret=False)
        if small is not None:
            out.append(("small-fwd-store" if store else "small-fwd", [
                sg.small_fwd_kernel_spec(c, h, nb, dt, input_precision=ip, mask=f.mask, store_acts=store, config=k)
                for k in fwd_candidates(small, keep_cells=True)]))

    def bwd(cfg: Any, i: int, recompute: bool = True) -> KernelSpec:
        return bwd_kernel_specs(c, h, nb, dt, double=f.double, mask=f.mask, input_precision=ip, recompute=recompute,
                                config=cfg)[i]

    for recompute in (True, False):
        cfg = bwd_config(c, hp, dt, ip, n_blocks=nb, recompute=recompute, interpret=False)
        out.append(("main" if recompute else "main-stored", [bwd(k, 0, recompute) for k in main_candidates(cfg)]))
    cfg = bwd_config(c, hp, dt, ip, n_blocks=nb, interpret=False)
    out.append(("dstate", [bwd(k, 1) for k in fewer_stages("ds_stages")(cfg)]))
    wgrads = [bwd_kernel_specs(c, h, nb, dt, double=f.double, mask=f.mask, input_precision=ip, config=k)[2:]
              for k in fewer_stages("wg_stages")(cfg)]
    out += [(specs[0].name, list(specs)) for specs in zip(*wgrads)]
    pcfg = post_config(c, hp, dt, ip, n_blocks=nb, interpret=False)
    for d in (False, True):
        out.append(("post-double" if d else "post", [
            ro.post_kernel_spec(c, h, nb, dt, double=d, input_precision=ip, cfg=k)
            for k in fewer_stages("wg_stages")(pcfg)]))
    return out


def fit_fallback(fits: list[BwdFitSpec] | tuple[BwdFitSpec, ...] = SMALL_SMEM_FITS, *, arch: int = SMALL_SMEM_ARCH,
                 limit: int = SMALL_SMEM, python: str | None = None) -> list[FallbackResult]:
    """Which tiling each kernel runs with on a GPU with ``limit`` bytes of shared memory per program: compile each
    launch site's candidates for ``arch`` in order (``kernels/launch.py``), until one fits."""
    chains = [(f.name, name, chain) for f in fits for name, chain in _fallback_chains(f)]
    pos = [0] * len(chains)
    shipped: list[int] = [0] * len(chains)
    found: dict[int, KernelFit | None] = {}
    while len(found) < len(chains):
        todo = [i for i in range(len(chains)) if i not in found]
        for i, fit in zip(todo, fit_kernels([chains[i][2][pos[i]] for i in todo], python, arch)):
            if pos[i] == 0:
                shipped[i] = fit.shared
            if fit.shared <= limit:
                found[i] = fit
            elif pos[i] + 1 == len(chains[i][2]):
                found[i] = None
            else:
                pos[i] += 1
    return [FallbackResult(cfg, name, shipped[i], pos[i] + 1, None if found[i] is None else _describe(chain[pos[i]]),
                           None if found[i] is None else found[i].shared)
            for i, (cfg, name, chain) in enumerate(chains)]


def format_fallback_table(rows: list[FallbackResult]) -> str:
    lines = ["| config | kernel | shipped smem (B) | tilings tried | runs with (warps/stages, tiles) | smem (B) |",
             "|---|---|---:|---:|---|---:|"]
    lines += [f"| {r.config} | {r.kernel} | {r.shipped} | {r.tried} | {r.runs or 'none fits'} | {r.shared or '-'} |"
              for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- CLI
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of tables")
    parser.add_argument("--only", choices=("fwd", "bwd", "rollout", "likelihood", "small-smem"),
                        help="only one of the tables ('small-smem': the tilings each kernel falls back to on a "
                        f"sm_{SMALL_SMEM_ARCH} GPU, {SMALL_SMEM} B of shared memory; not in the default set)")
    parser.add_argument(
        "--python",
        action="append",
        help=f"compile with this interpreter's Triton (e.g. a venv with triton=={GPU_TRITON}.0); repeat it to "
        "compare releases side by side ('self': this interpreter), e.g. --python self --python PATH",
    )
    parser.add_argument("--jobs-stdin", action="store_true", help="internal: compile the JSON job list on stdin")
    args = parser.parse_args()
    if args.jobs_stdin:
        import triton

        print(json.dumps({"triton": triton.__version__, "kernels": str(_KERNELS_DIR)}), flush=True)
        for job in json.loads(sys.stdin.read()):
            print(json.dumps(_compile_job(job)._asdict()), flush=True)
        return
    pythons = [None if p == "self" else p for p in args.python or ["self"]]
    if args.only == "small-smem":
        for p in pythons:
            print(f"fallback tilings on sm_{SMALL_SMEM_ARCH} ({SMALL_SMEM} B of shared memory), triton "
                  f"{triton_version(p)}, {time.strftime('%Y-%m-%d')}\n" + format_fallback_table(fit_fallback(python=p)))
        return
    passes = {"fwd": lambda p: fit_many(SHIPPED, python=p), "bwd": lambda p: fit_bwd(BWD_SHIPPED, python=p),
              "rollout": lambda p: fit_rollout(BWD_SHIPPED, python=p), "likelihood": lambda p: fit_likelihood(python=p)}
    if args.json:
        # each pass's rows as soon as it is done (a caller's timeout keeps the passes already done)
        for p in pythons:
            release = triton_version(p)
            for name, run in passes.items():
                if args.only in (None, name):
                    for r in run(p):
                        print(json.dumps({"pass": name, "triton": release, **r._asdict()}), flush=True)
        return
    fwd, bwd, post, lik = ([run(p) if args.only in (None, name) else [] for p in pythons]
                           for name, run in passes.items())
    releases = " / ".join(triton_version(p) for p in pythons)
    print(f"sm_90 fit, triton {releases}, {time.strftime('%Y-%m-%d')}")
    if fwd[0]:
        print("\nforward (nca_step.py)\n" + format_table(*fwd))
    if bwd[0]:
        print("\nbackward (nca_step_bwd.py)\n" + format_bwd_table(*bwd))
    if post[0]:
        print("\nrollout backward (rollout.py)\n" + format_bwd_table(*post))
    if lik[0]:
        print("\nDML likelihood (likelihood.py)\n" + format_bwd_table(*lik))


if __name__ == "__main__":
    main()
