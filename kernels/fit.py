"""Fit of the fused step's kernels on the H100, measured on the CPU: compile for sm_90 and read the machine code.

Usage::

    python -m fastnca.kernels.fit              # forward and backward tables of every shipped configuration
    python -m fastnca.kernels.fit --only bwd   # one of them ("fwd" or "bwd")
    python -m fastnca.kernels.fit --json       # the same as JSON lines

Every kernel is compiled with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (no GPU needed)
(:func:`compile_sm90`), and the cubin is read with the ``cuobjdump`` / ``nvdisasm`` that ship in
``triton/backends/nvidia/bin``: registers and local memory per thread (spills: ptxas reports them as STACK, so
STACK + LOCAL is counted, with the STL/LDL instructions), shared memory per program, and the count of Hopper
warpgroup (HGMMA) and older (HMMA) tensor-core instructions.

The kernel modules say what they launch: ``nca_step.fwd_kernel_spec`` and ``nca_step_bwd.bwd_kernel_specs``
return :class:`KernelSpec` s (jit function, signature, constexprs, warps, stages); :func:`fit_kernels` compiles
a list of them. With ``TRITON_INTERPRET=1`` (set by tests/conftest.py without a GPU) ``@triton.jit`` has already
produced an interpreter function that ``triton.compile`` cannot take, so :func:`fit_kernels` then compiles in
one child process with TRITON_INTERPRET removed from its environment (the function is found there by module
and name). Results are kept for the rest of the process, and Triton caches the compiles on disk.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

from .spec import KernelSpec

__all__ = [
    "BWD_SHIPPED",
    "SHIPPED",
    "SMEM_LIMIT",
    "BwdFitResult",
    "BwdFitSpec",
    "FitResult",
    "FitSpec",
    "KernelFit",
    "KernelSpec",
    "compile_sm90",
    "fit",
    "fit_bwd",
    "fit_rollout",
    "fit_kernels",
    "fit_many",
    "format_bwd_table",
    "format_table",
]

SMEM_LIMIT = 232448  # bytes of shared memory one H100 program may use (227 KiB)


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


def _bin(tool: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def compile_sm90(
    fn: Any, signature: dict[str, str], constexprs: dict[str, Any], num_warps: int, num_stages: int
) -> KernelFit:
    """Compile one jit function for sm_90 in this process and read registers, spills, shared memory, MMA counts.

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
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
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
    )


def _job(spec: KernelSpec) -> dict[str, Any]:
    """A spec as JSON: the jit function by module and name, so that a child process can import it."""
    py_fn = spec.fn.fn  # the decorated Python function, under both JITFunction and InterpretedFunction
    return {
        "module": py_fn.__module__,
        "qualname": py_fn.__qualname__,
        "signature": spec.signature,
        "constexprs": spec.constexprs,
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
    }


def _compile_job(job: dict[str, Any]) -> KernelFit:
    fn = getattr(importlib.import_module(job["module"]), job["qualname"])
    return compile_sm90(fn, job["signature"], job["constexprs"], job["num_warps"], job["num_stages"])


_FITS: dict[str, KernelFit] = {}  # compiled this process: json of the job -> fit


def fit_kernels(specs: list[KernelSpec] | tuple[KernelSpec, ...]) -> list[KernelFit]:
    """Compile kernels for sm_90; in one child process without TRITON_INTERPRET when it is set here.

    Each distinct kernel is compiled once per process (identical specs, e.g. the backward's weight-gradient GEMMs
    of equal shapes, share one compile).
    """
    keys = [json.dumps(_job(s), sort_keys=True) for s in specs]
    todo = list(dict.fromkeys(k for k in keys if k not in _FITS))
    if todo and os.environ.get("TRITON_INTERPRET") != "1":
        for k in todo:
            _FITS[k] = _compile_job(json.loads(k))
    elif todo:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run(
            [sys.executable, "-m", "fastnca.kernels.fit", "--jobs-stdin"],
            env=env,
            input="[" + ",".join(todo) + "]",
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"fit: the sm_90 compile failed:\n{proc.stderr[-4000:]}")
        results = [KernelFit(**json.loads(line)) for line in proc.stdout.splitlines() if line.startswith("{")]
        if len(results) != len(todo):
            raise RuntimeError(f"fit: expected {len(todo)} results from the child, got {len(results)}")
        _FITS.update(zip(todo, results))
    return [_FITS[k] for k in keys]


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


def fit(spec: FitSpec, config: tuple[int, ...] | None = None) -> FitResult:
    """Compile one configuration for sm_90 (``config``: a ``StepConfig`` tuple overriding the shipped tiling)."""
    return fit_many([spec], [config])[0]


def fit_many(
    specs: list[FitSpec] | tuple[FitSpec, ...], configs: list[tuple[int, ...] | None] | None = None
) -> list[FitResult]:
    """Compile several configurations of the forward kernel (see :func:`fit_kernels`)."""
    from . import nca_step as ns

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
        FitResult(s.name, k.constexprs["BLOCK_M"], k.constexprs["BLOCK_K"], k.num_warps, k.num_stages, *f)
        for s, k, f in zip(specs, kernels, fit_kernels(kernels))
    ]


def format_table(results: list[FitResult]) -> str:
    """A markdown table of forward fit results."""
    head = (
        "| config | BLOCK_M | BLOCK_K | warps | stages | registers | spills (B) | STL+LDL | shared (B) | HGMMA | HMMA |"
    )
    rows = [head, "|" + "---|" * 11]
    for r in results:
        rows.append(
            f"| {r.name} | {r.block_m} | {r.block_k} | {r.num_warps} | {r.num_stages} | {r.registers} | "
            f"{r.spills} | {r.spill_ops} | {r.shared} | {r.hgmma} | {r.hmma} |"
        )
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


def fit_bwd(fits: list[BwdFitSpec] | tuple[BwdFitSpec, ...] = BWD_SHIPPED) -> list[BwdFitResult]:
    """Compile every kernel the backward launches for each configuration (see :func:`fit_kernels`)."""
    from . import nca_step_bwd as nb

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
    results = fit_kernels([k for _, k in named])
    return [
        BwdFitResult(
            name,
            k.name,
            k.num_warps,
            k.num_stages,
            {c: v for c, v in k.constexprs.items() if c.startswith("BLOCK_")},
            *f,
        )
        for (name, k), f in zip(named, results)
    ]


def format_bwd_table(rows: list[BwdFitResult]) -> str:
    """A markdown table of backward fit results, one row per kernel."""
    head = "| config | kernel | warps/stages | tiles | regs | spills (B) | smem (B) | HGMMA | HMMA |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        tiles = " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in r.tiles.items())
        lines.append(
            f"| {r.config} | {r.kernel} | {r.warps}/{r.stages} | {tiles} | {r.registers} | {r.spills} | "
            f"{r.shared} | {r.hgmma} | {r.hmma} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- rollout
def fit_rollout(fits: list[BwdFitSpec] | tuple[BwdFitSpec, ...] = BWD_SHIPPED) -> list[BwdFitResult]:
    """Compile the kernel the rollout's backward adds (``rollout.post_kernel_spec``, with and without doubling)
    for each configuration."""
    from . import rollout as ro

    named = [
        (f.name, k)
        for f in fits
        for k in ro.rollout_kernel_specs(f.state_channels, f.hidden_channels, f.n_blocks, _torch_dtype(f.dtype),
                                         input_precision=f.input_precision)
    ]
    results = fit_kernels([k for _, k in named])
    return [
        BwdFitResult(name, k.name, k.num_warps, k.num_stages,
                     {c: v for c, v in k.constexprs.items() if c.startswith(("BLOCK_", "BA_", "BB_", "DS_BLOCK"))}, *f)
        for (name, k), f in zip(named, results)
    ]


# ------------------------------------------------------------------------------------------------------- CLI
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of tables")
    parser.add_argument("--only", choices=("fwd", "bwd", "rollout"), help="only one of the tables")
    parser.add_argument("--jobs-stdin", action="store_true", help="internal: compile the JSON job list on stdin")
    args = parser.parse_args()
    if args.jobs_stdin:
        for job in json.loads(sys.stdin.read()):
            print(json.dumps(_compile_job(job)._asdict()), flush=True)
        return
    fwd = fit_many(SHIPPED) if args.only in (None, "fwd") else []
    bwd = fit_bwd(BWD_SHIPPED) if args.only in (None, "bwd") else []
    post = fit_rollout(BWD_SHIPPED) if args.only in (None, "rollout") else []
    if args.json:
        for r in fwd:
            print(json.dumps({"pass": "fwd", **r._asdict()}))
        for r in bwd:
            print(json.dumps({"pass": "bwd", **r._asdict()}))
        for r in post:
            print(json.dumps({"pass": "rollout", **r._asdict()}))
        return
    import triton

    print(f"sm_90 fit, triton {triton.__version__}, {time.strftime('%Y-%m-%d')}")
    if fwd:
        print("\nforward (nca_step.py)\n" + format_table(fwd))
    if bwd:
        print("\nbackward (nca_step_bwd.py)\n" + format_bwd_table(bwd))
    if post:
        print("\nrollout backward (rollout.py)\n" + format_bwd_table(post))


if __name__ == "__main__":
    main()
