"""How many distinct Triton kernels one training run of each preset compiles, and how long compiling them takes.

Usage::

    python -m benchmarks.compiles                              # every preset: counts, then sm_90 compile times
    python -m benchmarks.compiles --presets mnist-doubling --workers 1 2 --python .ci/.venv-triton36/bin/python
    python -m benchmarks.compiles --no-compile                 # counts only (seconds)

Runs on a machine without a GPU. For each preset, the trainer's warm-up job (``fastnca.train.warmup_job``: one
training iteration, one periodic evaluation's IWAE chunk, the final samples) is recorded with
``fastnca.kernels.warmup.record_launches`` (nothing runs) with the settings a CUDA run of ``fastnca train --preset
P`` resolves to (the fused backend; fp32 presets compute their dots in TF32, PyTorch's default) and with the kernels'
tile pickers acting as they do on a GPU (``fastnca.kernels.tiles.as_compiled``), so the recorded launches are the
ones a GPU run compiles. Then, for each interpreter (``--python``: each with its own Triton release) and each worker
count, ``python -m fastnca.kernels.warmup --compile`` compiles them for ``--arch`` into an empty Triton cache, and
once more into the same cache (the second run of a user: every kernel cached).

Prints a table and writes ``compiles.json`` into ``--out`` (one row per preset, release and worker count).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_LINE = re.compile(r"compiled (\d+) of (\d+) kernels .* in ([\d.]+) s "
                   r"\((\d+) cached, (\d+) workers\)(?:, (\d+) failed)?")


def record_preset(preset: str) -> list[Any]:
    """The launches a CUDA training run of ``preset`` at its defaults makes in its warm-up job, recorded on this
    machine (interpreter mode, nothing runs) with the tile pickers acting as compiled."""
    import torch

    from fastnca.config import get_preset
    from fastnca.kernels import tiles
    from fastnca.kernels.warmup import record_launches
    from fastnca.run import resolve_run
    from fastnca.train import warmup_job

    cfg = get_preset(preset)
    # what _arithmetic decides for a CUDA device with torch.backends.cudnn.allow_tf32 at its default (True)
    arithmetic = "tf32" if cfg.precision == "fp32" else None
    settings = resolve_run(cfg, "cpu", backend="triton", backend_source="explicit", arithmetic=arithmetic)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 2, (cfg.batch_size, cfg.image_channels, cfg.image_size, cfg.image_size),
                           generator=gen, dtype=torch.uint8) * (255 if cfg.likelihood == "dml" else 1)
    with tiles.as_compiled(), record_launches() as launches:
        warmup_job(cfg, settings, images)
    return launches


def kernel_names(launches: list[Any]) -> dict[str, int]:
    """Distinct specialisations per kernel function (``module:qualname`` -> count)."""
    out: dict[str, int] = {}
    for launch in {launch.dedupe_key(): launch for launch in launches}.values():
        name = launch.kernel.split(":")[-1]
        out[name] = out.get(name, 0) + 1
    return dict(sorted(out.items()))


def compile_once(python: str, launches_file: Path, cache: Path, workers: int, arch: int,
                 timeout: float) -> dict[str, Any]:
    """Run ``python -m fastnca.kernels.warmup --compile`` into ``cache``: its report line's numbers, the wall time
    of the whole command (interpreter start and imports included, as a user waits for them) and the CPU seconds of
    it and its workers (what the wall time would be on one otherwise idle core)."""
    from fastnca.kernels import env_without_interpreter

    env = env_without_interpreter()
    env["TRITON_CACHE_DIR"] = str(cache)
    cmd = [python, "-m", "fastnca.kernels.warmup", "--compile", str(launches_file), "--workers", str(workers),
           "--arch", str(arch)]
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    match = None
    for line in proc.stdout.splitlines():
        match = _LINE.search(line) or match
    if proc.returncode != 0 or match is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: {' | '.join(tail)}")
    compiled, kernels, seconds, cached, used, failed = match.groups()
    return {"compiled": int(compiled), "kernels": int(kernels), "seconds": float(seconds), "cached": int(cached),
            "workers": int(used), "failed": int(failed or 0), "wall_s": round(wall, 1),
            "cpu_s": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 1)}


def triton_of(python: str) -> str:
    proc = subprocess.run([python, "-c", "import triton; print(triton.__version__)"], capture_output=True,
                          text=True, timeout=300, check=True)
    return proc.stdout.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    from fastnca.config import preset_names

    p = argparse.ArgumentParser(prog="python -m benchmarks.compiles", description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=preset_names(), metavar="P")
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2], metavar="N",
                   help="compile processes to time (default: 1 and 2)")
    p.add_argument("--python", nargs="+", default=[sys.executable], metavar="PY",
                   help="interpreters to compile with, each with its own Triton release (default: this one)")
    p.add_argument("--arch", type=int, default=90, help="the CUDA arch to compile for (default 90: H100/H200)")
    p.add_argument("--no-compile", action="store_true", help="count the kernels only")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per compile command")
    p.add_argument("--out", default=None, help="a folder for compiles.json")
    args = p.parse_args(argv)
    from fastnca.kernels import use_interpreter

    use_interpreter(True)  # the recording runs on this machine's CPU tensors; before a kernel module is imported
    from fastnca.kernels.warmup import save_launches

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fastnca-compiles-") as tmp:
        recorded: dict[str, Path] = {}
        for preset in args.presets:
            t0 = time.perf_counter()
            launches = record_preset(preset)
            names = kernel_names(launches)
            recorded[preset] = Path(tmp) / f"{preset}.pkl"
            save_launches(launches, recorded[preset])
            print(f"{preset}: {len(launches)} launches, {sum(names.values())} distinct kernels "
                  f"({', '.join(f'{k} x{v}' for k, v in names.items())}) recorded in {time.perf_counter() - t0:.1f} s",
                  flush=True)
            rows.append({"preset": preset, "launches": len(launches), "distinct": sum(names.values()),
                         "by_kernel": names})
        if not args.no_compile:
            for python in args.python:
                release = triton_of(python)
                for preset in args.presets:
                    for workers in args.workers:
                        cache = Path(tempfile.mkdtemp(prefix="cache-", dir=tmp))
                        first = compile_once(python, recorded[preset], cache, workers, args.arch, args.timeout)
                        again = compile_once(python, recorded[preset], cache, workers, args.arch, args.timeout)
                        row = {"preset": preset, "triton": release, "workers": workers, "arch": args.arch,
                               "first": first, "second": again}
                        rows.append(row)
                        failed = f"; {first['failed']} failed" if first["failed"] else ""
                        print(f"{preset}: Triton {release}, {workers} worker(s): {first['kernels']} kernels "
                              f"compiled for sm_{args.arch} in {first['wall_s']} s wall, {first['cpu_s']} s CPU "
                              f"({first['seconds']} s in the warm-up); second run {again['cached']} cached in "
                              f"{again['wall_s']} s{failed}", flush=True)
    meta = {"machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPUs", "date": time.strftime("%Y-%m-%d"),
            "commit": _commit()}
    print(json.dumps(meta))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compiles.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


def _commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return proc.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
