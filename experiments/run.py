"""Run one of the paper's experiments: train, evaluate (IWAE, 128 samples), draw its figures, record the result.

Usage::

    python experiments/run.py --preset mnist-doubling                     # the paper's run: 100k updates (GPU)
    python experiments/run.py --preset mnist-doubling --iterations 2000 --eval-batches 20
    python experiments/run.py --preset small --iterations 300 --eval-batches 2   # what a laptop CPU can do
    python experiments/run.py --preset celeba-nondoubling --time-limit 3600 --device cuda
    python experiments/run.py --preset emoji-doubling --eval-only --out runs/experiments/emoji-doubling

Presets: mnist-doubling, celeba-doubling, celeba-doubling-beta100, emoji-doubling, mnist-nondoubling,
celeba-nondoubling, celeba-nondoubling-256 (and small). The run directory (default
``runs/experiments/PRESET``) gets the trainer's files plus ``figures/`` (every paper figure that applies to the
run, with a caption file each: ``fastnca figures``) and ``result.json``; one CSV row per run is appended to
``experiments/results.csv`` beside the paper's number. An existing run directory is resumed (continue a run
with a larger ``--iterations``). A row records exactly what ran: iterations, images evaluated, k, hardware,
commit, date. Do not copy numbers into experiments/RESULTS.md without such a row behind them.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastnca.checkpoints import CHECKPOINT_NAME, load_checkpoint
from fastnca.cli import parse_overrides
from fastnca.config import get_preset, preset_names
from fastnca.evaluate import evaluate_iwae
from fastnca.figures import FIGURES, make_figures
from fastnca.run import resolve_device
from fastnca.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
RESULTS_CSV = ROOT / "experiments" / "results.csv"

# The paper's test-set numbers (Palm et al., 2022; IWAE with 128 samples): (value, unit).
PAPER = {
    "mnist-doubling": (-84.23, "nats"),
    "celeba-doubling": (4.42, "bpd"),
    "celeba-doubling-beta100": (5.40, "bpd"),
    "emoji-doubling": (3.09, "bpd"),
    "mnist-nondoubling": (-90.97, "nats"),
    "celeba-nondoubling": (5.03, "bpd"),
    "celeba-nondoubling-256": (None, "bpd"),  # the paper ran h=128 only (5.03 bits/dim); h=256 is this project's
    "small": (None, "nats"),
}

FIELDS = [
    "date",
    "commit",
    "preset",
    "iterations",
    "train_s",
    "it_per_s",
    "hardware",
    "device",
    "torch",
    "k",
    "test_images",
    "test_images_total",
    "iwae_nats",
    "bpd",
    "paper_value",
    "paper_unit",
    "overrides",
    "run_dir",
    "notes",
]


def git_commit(device: torch.device) -> str:
    """HEAD's short sha, with '-dirty' when a file this run executes differs from it.

    Several engineers share the checkout: on the CPU only the library, the reference step and this script run,
    so uncommitted work on the fused kernels does not mark a CPU run dirty.
    """
    if device.type == "cuda":
        paths = ["fastnca", "kernels", "experiments"]
    else:
        paths = ["fastnca", "kernels/reference.py", "experiments/run.py"]
    try:
        git = ["git", "-C", str(ROOT)]
        sha = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no", "--", *paths],
            capture_output=True,
            text=True,
            check=True,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def append_row(row: dict) -> None:
    new = not RESULTS_CSV.exists()
    RESULTS_CSV.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS_CSV, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in FIELDS})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, choices=preset_names())
    p.add_argument("--iterations", type=int, default=None, help="training updates (default: the preset's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None, help="run directory (default: runs/experiments/PRESET)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--time-limit", type=float, default=None, help="stop training after S seconds")
    p.add_argument("--k", type=int, default=128, help="importance samples for the final evaluation")
    p.add_argument("--eval-batches", type=int, default=0, help="test batches for the final IWAE (0: all)")
    p.add_argument("--eval-only", action="store_true", help="skip training; evaluate the run directory's model")
    p.add_argument("--notes", default="", help="free text for the results row")
    p.add_argument("--no-record", action="store_true", help="do not append to experiments/results.csv")
    p.add_argument(
        "--figures",
        nargs="*",
        default=None,
        choices=list(FIGURES),
        metavar="NAME",
        help=f"draw only these figures (default: all that apply: {', '.join(FIGURES)}); none with no names",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = parse_overrides(args.overrides)
    if args.iterations is not None:
        overrides["iterations"] = args.iterations
    out = Path(args.out or ROOT / "runs" / "experiments" / args.preset)
    commit = git_commit(resolve_device(args.device))  # the code as it is when the run starts
    if not args.eval_only:
        kwargs = dict(data_dir=args.data_dir, device=args.device, time_limit=args.time_limit, final_outputs=False)
        if (out / CHECKPOINT_NAME).exists():
            trainer = Trainer.resume(out, overrides=overrides, **kwargs)
            print(f"resuming {out} at step {trainer.step}", file=sys.stderr)
        else:
            trainer = Trainer(get_preset(args.preset, **overrides), out, **kwargs)
        trainer.fit()

    model, ckpt = load_checkpoint(out, args.device or "auto")
    cfg = model.config
    device = next(model.parameters()).device
    from fastnca.data import load_for_config

    splits = load_for_config(cfg, args.data_dir)
    t0 = time.perf_counter()
    res = evaluate_iwae(
        model,
        splits.test,
        k=args.k,
        batch_size=cfg.batch_size,
        batches=args.eval_batches,
        seed=0,
        progress=True,
        desc=f"IWAE k={args.k}",
    )
    eval_s = time.perf_counter() - t0

    figs = out / "figures"
    figures_written, figures_skipped = {}, {}
    if args.figures != []:  # None: every figure that applies; []: none
        figures_written, figures_skipped = make_figures(
            out, figs, only=args.figures, seed=0, data_dir=args.data_dir, device=args.device or "auto"
        )

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [r["it_per_s"] for r in rows if r.get("split") == "train" and r.get("it_per_s")]
    paper_value, paper_unit = PAPER.get(args.preset, (None, ""))
    row = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "commit": commit,
        "preset": args.preset,
        "iterations": int(ckpt["step"]),
        "train_s": round(float(ckpt.get("elapsed_s", 0.0)), 1),
        "it_per_s": round(sum(speeds) / len(speeds), 3) if speeds else "",
        "hardware": hardware(device),
        "device": str(device),
        "torch": str(torch.__version__),
        "k": args.k,
        "test_images": res["n_images"],
        "test_images_total": int(splits.test.shape[0]),
        "iwae_nats": round(res["iwae"], 3),
        "bpd": round(res["bpd"], 4),
        "paper_value": "" if paper_value is None else paper_value,
        "paper_unit": paper_unit,
        "overrides": " ".join(f"{k}={v}" for k, v in overrides.items()),
        "run_dir": str(out.resolve().relative_to(ROOT)) if out.resolve().is_relative_to(ROOT) else str(out),
        "notes": args.notes,
    }
    result = {**row, "eval_s": round(eval_s, 1), "figures": sorted(figures_written), "figures_skipped": figures_skipped}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_record:
        append_row(row)
    unit_value = f"{row['iwae_nats']:.2f} nats" if paper_unit == "nats" else f"{row['bpd']:.4f} bits/dim"
    paper = f"paper: {paper_value} {paper_unit}" if paper_value is not None else "no paper number"
    print(
        f"{args.preset}: {unit_value} (IWAE k={args.k}, {res['n_images']} of {row['test_images_total']} test "
        f"images, {row['iterations']} iterations; {paper}); figures in {figs}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
