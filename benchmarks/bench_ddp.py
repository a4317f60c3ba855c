"""Data-parallel scaling: training iterations per second under torchrun at 1, 2, 4, ... GPUs, same global batch.

Usage (on a node with several GPUs)::

    python benchmarks/bench_ddp.py --gpus 1,2,4 --preset celeba-doubling --seconds 60
    python benchmarks/bench_ddp.py --gpus 1,2 --preset small --seconds 20 --csv runs/ddp.csv
    python benchmarks/bench_ddp.py --gpus 1,2 --preset small --seconds 20 --device cpu   # the script's code path

Each world size W runs ``torchrun --nproc-per-node W -m fastnca train --preset P --time-limit S`` (no evaluation,
CUDA graphs off in every row so that W = 1 runs the same eager iteration as the DDP ranks) and reads the
it/s that rank 0 logged in ``metrics.jsonl`` (start-up and the first log window, which holds the kernel
compiles, left out). One row per W: it/s, images/s = it/s x global batch, speedup and efficiency against W = 1.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def run_one(world: int, preset: str, seconds: float, sets: list[str], root: Path, port: int, device: str,
            data_dir: str | None) -> dict:
    out = root / f"w{world}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
           "--master-addr", "127.0.0.1", "--master-port", str(port),
           "-m", "fastnca", "train", "--preset", preset, "--out", str(out), "--time-limit", str(seconds),
           "--no-progress", "--no-final-eval", "--set", "eval_every=0", "--set", "cuda_graphs=false",
           "--device", device]
    if device == "cpu":
        cmd += ["--threads", "1"]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True, timeout=seconds + 600)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["it_per_s"] for r in rows if r.get("split") == "train" and r.get("it_per_s")][1:]
    if not rates:
        raise RuntimeError(f"W={world}: fewer than two log windows in {seconds} s; raise --seconds")
    cfg = json.loads((out / "config.json").read_text())
    its = sum(rates) / len(rates)
    return {"world_size": world, "it_per_s": round(its, 3), "images_per_s": round(its * cfg["batch_size"], 1),
            "global_batch": cfg["batch_size"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", default="1,2", help="comma-separated world sizes")
    p.add_argument("--preset", default="celeba-doubling")
    p.add_argument("--seconds", type=float, default=60.0, help="training time per world size")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--port", type=int, default=29511)
    p.add_argument("--data-dir", default=None, help="data directory (default: $FASTNCA_DATA, else ./data)")
    p.add_argument("--csv", default=None, help="append the rows to this CSV file")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: gloo ranks (no speed claim)")
    args = p.parse_args(argv)
    worlds = [int(w) for w in args.gpus.split(",")]
    if args.device == "cuda" and max(worlds) > torch.cuda.device_count():
        print(f"bench_ddp: {max(worlds)} GPUs asked for, {torch.cuda.device_count()} visible", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, w in enumerate(worlds):
            rows.append(run_one(w, args.preset, args.seconds, args.sets, Path(tmp), args.port + i, args.device,
                                args.data_dir))
    base = next((r for r in rows if r["world_size"] == 1), None)
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (no speed claim)"
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"| preset | GPU | W | global batch | it/s | images/s | speedup | efficiency |  ({stamp})")
    for r in rows:
        speedup = r["it_per_s"] / base["it_per_s"] if base else float("nan")
        r.update(preset=args.preset, gpu=gpu, torch=torch.__version__, timestamp=stamp,
                 speedup=round(speedup, 3), efficiency=round(speedup / r["world_size"], 3))
        print(f"| {args.preset} | {gpu} | {r['world_size']} | {r['global_batch']} | {r['it_per_s']:.2f} | "
              f"{r['images_per_s']:.0f} | {speedup:.2f}x | {r['efficiency']:.0%} |")
    if args.csv:
        path = Path(args.csv)
        new = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
