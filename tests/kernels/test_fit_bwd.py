"""Fit of the fused backward on the H100, checked on the CPU: every shipped kernel configuration compiles for sm_90
with no local-memory spills and fits in shared memory.

``triton.compile`` cannot take a kernel that ``@triton.jit`` decorated in interpreter mode (the
``InterpretedFunction`` has no ``cache_key``), so with ``TRITON_INTERPRET=1`` (tests/conftest.py) the compiles
run once per module in a child process with the variable removed. Run this file as a script for the table::

    python tests/kernels/test_fit_bwd.py          # table of every shipped configuration
    python tests/kernels/test_fit_bwd.py --json   # JSON lines (what the tests read)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import pytest

SMEM_LIMIT = 232448  # bytes of shared memory one H100 program may use (227 KiB)


class BwdFit(NamedTuple):
    """One network configuration of the backward: every kernel it launches is compiled."""

    name: str
    state_channels: int
    hidden_channels: int
    n_blocks: int
    dtype: str  # "bf16" or "fp32"
    input_precision: str = "ieee"
    double: bool = False
    mask: bool = False


# The networks the presets train (docs/PAPER.md): 256/256 x 4 blocks (doubling MNIST, CelebA, emoji), 256/128 and
# 128/128 x 4 blocks, and the block-free non-doubling MNIST net (128/128, masked updates).
SHIPPED: tuple[BwdFit, ...] = (
    BwdFit("z256-h256-nb4-bf16", 256, 256, 4, "bf16"),
    BwdFit("z256-h256-nb4-bf16-double-mask", 256, 256, 4, "bf16", double=True, mask=True),
    BwdFit("z256-h256-nb4-tf32", 256, 256, 4, "fp32", "tf32"),
    BwdFit("z256-h256-nb4-fp32", 256, 256, 4, "fp32", "ieee"),
    BwdFit("z256-h128-nb4-bf16", 256, 128, 4, "bf16", mask=True),
    BwdFit("z128-h128-nb4-bf16", 128, 128, 4, "bf16"),
    BwdFit("z128-h128-nb4-tf32", 128, 128, 4, "fp32", "tf32"),
    BwdFit("z128-h128-nb4-fp32", 128, 128, 4, "fp32", "ieee"),
    BwdFit("z128-h128-nb0-bf16-mask", 128, 128, 0, "bf16", mask=True),
    BwdFit("z128-h128-nb0-tf32-mask", 128, 128, 0, "fp32", "tf32", mask=True),
    BwdFit("z128-h128-nb0-fp32-mask", 128, 128, 0, "fp32", "ieee", mask=True),
)


def _bin(tool: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def _compile_spec(spec: Any) -> dict[str, Any]:
    """Compile one ``KernelSpec`` for sm_90 and read registers, spills, shared memory and MMA counts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointers = [k for k, v in spec.signature.items() if v.startswith("*")]
    # the launcher's tensors are 16-byte aligned: tell the compiler, as the JIT does for real launches
    attrs = {(spec.fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in pointers}
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    )
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run(
            [_bin("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run([_bin("nvdisasm"), str(cubin)], capture_output=True, text=True, check=True).stdout
    fields = {key: re.search(rf"{key}:(\d+)", usage) for key in ("REG", "STACK", "LOCAL")}
    if any(v is None for v in fields.values()):
        raise RuntimeError(f"cannot parse cuobjdump output:\n{usage}")
    return {
        "registers": int(fields["REG"].group(1)),
        # ptxas puts spills in STACK; count LOCAL too, and the spill instructions themselves
        "spills": int(fields["STACK"].group(1)) + int(fields["LOCAL"].group(1)),
        "spill_ops": len(re.findall(r"\b(?:STL|LDL)\b", sass)),
        "shared": int(compiled.metadata.shared),
        "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
        "hmma": len(re.findall(r"\bHMMA\b", sass)),
    }


def _fit_in_process(fits: tuple[BwdFit, ...]) -> list[dict[str, Any]]:
    import torch

    from fastnca.kernels import nca_step_bwd as nb

    rows = []
    for fit in fits:
        dtype = torch.bfloat16 if fit.dtype == "bf16" else torch.float32
        specs = nb.bwd_kernel_specs(
            fit.state_channels,
            fit.hidden_channels,
            fit.n_blocks,
            dtype,
            double=fit.double,
            mask=fit.mask,
            input_precision=fit.input_precision,
        )
        for spec in specs:
            tiles = {k: v for k, v in spec.constexprs.items() if k.startswith("BLOCK_")}
            rows.append(
                {"config": fit.name, "kernel": spec.name, "warps": spec.num_warps, "stages": spec.num_stages,
                 "tiles": tiles, **_compile_spec(spec)}
            )  # fmt: skip
    return rows


def fit_rows(fits: tuple[BwdFit, ...] = SHIPPED) -> list[dict[str, Any]]:
    """Compile every kernel of ``fits``; in a child process without TRITON_INTERPRET when it is set here."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return _fit_in_process(fits)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    names = ",".join(f.name for f in fits)
    proc = subprocess.run(
        [sys.executable, __file__, "--json", "--only", names], capture_output=True, text=True, env=env, timeout=1200
    )
    if proc.returncode:
        raise RuntimeError(f"sm_90 compile failed:\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def format_table(rows: list[dict[str, Any]]) -> str:
    head = "| config | kernel | warps/stages | tiles | regs | spills (B) | smem (B) | HGMMA | HMMA |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        tiles = " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in r["tiles"].items())
        lines.append(
            f"| {r['config']} | {r['kernel']} | {r['warps']}/{r['stages']} | {tiles} | {r['registers']} | "
            f"{r['spills']} | {r['shared']} | {r['hgmma']} | {r['hmma']} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def shipped_rows() -> dict[str, list[dict[str, Any]]]:
    """All shipped configurations compiled once per module (about a minute cold, seconds with Triton's cache)."""
    by_config: dict[str, list[dict[str, Any]]] = {}
    for row in fit_rows(SHIPPED):
        by_config.setdefault(row["config"], []).append(row)
    return by_config


@pytest.mark.parametrize("fit", SHIPPED, ids=[f.name for f in SHIPPED])
def test_shipped_backward_fits_sm90(fit: BwdFit, shipped_rows: dict[str, list[dict[str, Any]]]) -> None:
    rows = shipped_rows.get(fit.name)
    assert rows, f"{fit.name}: expected compiled kernels, got none"
    kernels = {r["kernel"] for r in rows}
    expected = {"main", "dstate", "wgrad-perceive", "wgrad-out"} | ({"wgrad-w1", "wgrad-w2"} if fit.n_blocks else set())
    assert kernels == expected, f"{fit.name}: expected kernels {sorted(expected)}, got {sorted(kernels)}"
    for r in rows:
        where = f"{fit.name}/{r['kernel']}"
        assert r["spills"] == 0 and r["spill_ops"] == 0, (
            f"{where}: expected no local-memory spills, got {r['spills']} B/thread, {r['spill_ops']} STL/LDL "
            f"({r['registers']} registers)"
        )
        assert r["shared"] <= SMEM_LIMIT, f"{where}: expected shared memory <= {SMEM_LIMIT} B, got {r['shared']}"
        if fit.dtype == "bf16" or fit.input_precision == "tf32":
            assert r["hgmma"] > 0, f"{where}: expected Hopper warpgroup MMAs (HGMMA), got {r['hgmma']}"


if __name__ == "__main__":
    only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None
    chosen = tuple(f for f in SHIPPED if only is None or f.name in only)
    if "--json" in sys.argv:
        for fit in chosen:  # one configuration at a time, so that a slow compile still shows progress
            for row in _fit_in_process((fit,)):
                print(json.dumps(row), flush=True)
    else:
        print(format_table(fit_rows(chosen)))
