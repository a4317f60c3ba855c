"""Fit of the fused step on the H100, measured on the CPU: compile for sm_90 and read the machine code.

Usage::

    python -m fastnca.kernels.fit            # table of every shipped configuration
    python -m fastnca.kernels.fit --json     # the same as JSON lines

For each configuration the kernel is compiled with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (no GPU
needed), and the cubin is read with the ``cuobjdump`` / ``nvdisasm`` that ship in ``triton/backends/nvidia/bin``:
registers and local memory per thread (spills: ptxas reports them as STACK, so STACK + LOCAL is
counted, with the STL/LDL instructions), shared memory per program, and the count of Hopper warpgroup
(HGMMA) and older (HMMA) tensor-core instructions.

With ``TRITON_INTERPRET=1`` (set by tests/conftest.py without a GPU) ``@triton.jit`` has already produced an
interpreter function that ``triton.compile`` cannot take, so :func:`fit_many` then compiles in a child process
with TRITON_INTERPRET removed from its environment.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

__all__ = ["FitSpec", "FitResult", "SHIPPED", "SMEM_LIMIT", "fit", "fit_many", "format_table"]

SMEM_LIMIT = 232448  # bytes of shared memory one H100 program may use (227 KiB)


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


def _bin(tool: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def _fit_in_process(spec: FitSpec, config: tuple[int, ...] | None = None) -> FitResult:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastnca.kernels import nca_step as ns

    kernel = ns._nca_step_fwd_kernel
    if not isinstance(kernel, triton.runtime.jit.JITFunction):
        raise RuntimeError("fit: the kernel was decorated in interpreter mode; use fit_many (it runs a subprocess)")
    dtype = torch.bfloat16 if spec.dtype == "bf16" else torch.float32
    cfg = ns.StepConfig(*config) if config else ns.step_config(
        spec.state_channels, spec.hidden_channels, dtype, input_precision=spec.input_precision, interpret=False)
    t = "*bf16" if spec.dtype == "bf16" else "*fp32"
    pointers = {"z_ptr": t, "out_ptr": t, "mask_ptr": "*u8", "w3_ptr": t, "b3_ptr": "*fp32", "w1_ptr": t,
                "b1_ptr": "*fp32", "w2_ptr": t, "b2_ptr": "*fp32", "wout_ptr": t, "bout_ptr": "*fp32"}
    constexprs = {
        "C": spec.state_channels, "HID": ns._padded_hidden(spec.hidden_channels), "N_BLOCKS": spec.n_blocks,
        "DOUBLE": spec.double, "HAS_MASK": spec.mask, "HAS_B3": spec.bias, "HAS_B1": spec.bias and spec.n_blocks > 0,
        "HAS_B2": spec.bias and spec.n_blocks > 0, "HAS_BOUT": spec.out_bias, "PERCEIVE_ELU": spec.n_blocks == 0,
        "INPUT_PRECISION": spec.input_precision, "UPCAST_DOT": False,
        "BLOCK_M": cfg.block_m, "BLOCK_K": cfg.block_k, "BLOCK_N": cfg.block_n,
    }
    signature = {**pointers, "M": "i32", "H": "i32", "W": "i32", **{k: "constexpr" for k in constexprs}}
    # the launcher's tensors are 16-byte aligned: tell the compiler, as the JIT does for real launches
    attrs = {(kernel.arg_names.index(k),): [["tt.divisibility", 16]] for k in pointers}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    t0 = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_bin("nvdisasm"), str(cubin)], capture_output=True, text=True, check=True).stdout
    reg = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    if reg is None or local is None or stack is None:
        raise RuntimeError(f"fit: cannot parse cuobjdump output:\n{usage}")
    return FitResult(
        name=spec.name, block_m=cfg.block_m, block_k=cfg.block_k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, registers=int(reg.group(1)),
        spills=int(stack.group(1)) + int(local.group(1)), spill_ops=len(re.findall(r"\b(?:STL|LDL)\b", sass)),
        shared=int(compiled.metadata.shared), hgmma=len(re.findall(r"\bHGMMA\b", sass)),
        hmma=len(re.findall(r"\bHMMA\b", sass)), compile_s=round(seconds, 1),
    )


def fit(spec: FitSpec, config: tuple[int, ...] | None = None) -> FitResult:
    """Compile one configuration for sm_90 (``config``: a ``StepConfig`` tuple overriding the shipped tiling)."""
    return fit_many([spec], [config])[0]


def fit_many(specs: list[FitSpec] | tuple[FitSpec, ...],
             configs: list[tuple[int, ...] | None] | None = None) -> list[FitResult]:
    """Compile several configurations; in a child process without TRITON_INTERPRET when it is set here."""
    configs = list(configs) if configs is not None else [None] * len(specs)
    if os.environ.get("TRITON_INTERPRET") != "1":
        return [_fit_in_process(s, c) for s, c in zip(specs, configs)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    payload = json.dumps([[list(s), c] for s, c in zip(specs, configs)])
    proc = subprocess.run([sys.executable, "-m", "fastnca.kernels.fit", "--specs", payload], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"fit: the sm_90 compile failed:\n{proc.stderr[-4000:]}")
    return [FitResult(**json.loads(line)) for line in proc.stdout.splitlines() if line.startswith("{")]


def format_table(results: list[FitResult]) -> str:
    """A markdown table of fit results."""
    head = ("| config | BLOCK_M | BLOCK_K | warps | stages | registers | spills (B) | STL+LDL | shared (B) "
            "| HGMMA | HMMA |")
    rows = [head, "|" + "---|" * 11]
    for r in results:
        rows.append(f"| {r.name} | {r.block_m} | {r.block_k} | {r.num_warps} | {r.num_stages} | {r.registers} | "
                     f"{r.spills} | {r.spill_ops} | {r.shared} | {r.hgmma} | {r.hmma} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    parser.add_argument("--specs", help="internal: JSON list of [spec, config] pairs to compile")
    args = parser.parse_args()
    if args.specs:
        for spec, cfg in json.loads(args.specs):
            print(json.dumps(_fit_in_process(FitSpec(*spec), tuple(cfg) if cfg else None)._asdict()), flush=True)
        return
    results = fit_many(SHIPPED)
    if args.json:
        for r in results:
            print(json.dumps(r._asdict()))
        return
    import triton

    print(f"sm_90 fit, triton {triton.__version__}, {time.strftime('%Y-%m-%d')}")
    print(format_table(results))


if __name__ == "__main__":
    main()
