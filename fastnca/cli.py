"""fastnca command line: train, evaluate, sample and damage VNCAs, list and download data.

Usage::

    fastnca train --preset small --out runs/small                 # a few minutes on a laptop CPU
    fastnca train --preset mnist-doubling --set batch_size=64 --set lr=2e-4 --out runs/mnist
    fastnca train --out runs/mnist --resume [--set iterations=200000]
    fastnca eval --checkpoint runs/small/checkpoint.pt --k 128 [--units bpd] [--batches 10] [--json out.json]
    fastnca sample --checkpoint runs/small/checkpoint.pt --out figs [--n 64] [--gif]
    fastnca damage --checkpoint runs/small/checkpoint.pt --out figs [--kind half|square]
    fastnca data [--data-dir DIR] [--download]
    fastnca presets

The data directory comes from ``--data-dir``, else ``$FASTNCA_DATA``, else ``./data``; with neither of the
first two, MNIST presets use the binarized MNIST shipped in the package. ``--set key=value``
overrides any field of ``fastnca.config.Config`` (its type is checked). ``python -m fastnca`` works too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "parse_overrides"]


class CLIError(Exception):
    """A user error: printed as ``fastnca: error: ...`` with exit status 2."""


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` -> typed overrides, checked against the Config fields."""
    from fastnca.config import parse_value

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise CLIError(f"--set {item!r}: expected key=value, e.g. --set batch_size=64")
        key, text = item.split("=", 1)
        try:
            out[key.strip()] = parse_value(key.strip(), text.strip())
        except ValueError as err:
            raise CLIError(f"--set {item!r}: {err}") from None
    return out


def _add_common(p: argparse.ArgumentParser, *, data: bool = True, device: bool = True) -> None:
    if data:
        p.add_argument("--data-dir", default=None, help="data directory (default: $FASTNCA_DATA, else ./data)")
    if device:
        p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: the config's, auto)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is often fastest on a busy or 2-core machine)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastnca", description="Variational Neural Cellular Automata.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train a preset (writes metrics, checkpoints, pictures to --out)")
    p.add_argument("--preset", default=None, help="preset name (see `fastnca presets`); not needed with --resume")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set iterations=500 (repeatable)",
    )
    p.add_argument("--out", default=None, help="run directory (default: runs/PRESET-YYYYmmdd-HHMMSS)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="S",
        help="stop cleanly after S seconds of training (checkpoint, final evaluation, pictures)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-final-eval",
        action="store_true",
        help="skip the evaluation at the end (timed benchmark runs; add --set eval_every=0 for none at all)",
    )
    _add_common(p)

    p = sub.add_parser("eval", help="importance-weighted log-likelihood on the test split")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    p.add_argument("--k", type=int, default=128, help="importance samples (the paper: 128)")
    p.add_argument(
        "--units",
        choices=("nats", "bpd"),
        default=None,
        help="report unit (default: nats for Bernoulli models, bits/dim for RGB)",
    )
    p.add_argument("--batches", type=int, default=0, help="test batches to use (0: the whole split)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: the config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON")
    _add_common(p)

    p = sub.add_parser("sample", help="prior samples grid and growth sequence pictures")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=64, help="samples in the grid")
    p.add_argument("--growth-n", type=int, default=8, help="rows of the growth picture")
    p.add_argument("--mode", choices=("mean", "sample"), default="mean", help="likelihood mean or a sample")
    p.add_argument("--gif", action="store_true", help="also write an animated growth.gif")
    p.add_argument("--seed", type=int, default=0)
    _add_common(p, data=False)

    p = sub.add_parser("damage", help="damage-recovery figure (paper figs. 9-11)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=8, help="samples per row")
    p.add_argument(
        "--kind",
        choices=("half", "square", "both"),
        default="both",
        help="zero the right half, a random square, or make both figures",
    )
    p.add_argument(
        "--size", type=int, default=None, help="side of the square (default: the config's damage_size or half the grid)"
    )
    p.add_argument("--seed", type=int, default=0)
    _add_common(p, data=False)

    p = sub.add_parser("data", help="list the datasets found in the data directory; --download fetches them")
    p.add_argument("--data-dir", default=None, help="data directory (default: $FASTNCA_DATA, else ./data)")
    p.add_argument("--download", action="store_true", help="download MNIST, Noto Emoji and CelebA (internet)")
    p.add_argument("--datasets", default="mnist,emoji,celeba", help="comma-separated subset for --download")

    sub.add_parser("presets", help="list the presets")
    return parser


# ---------------------------------------------------------------------------------------------- commands
def _threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _say_if_embedded(splits) -> None:  # noqa: ANN001 - fastnca.data.Splits, imported lazily
    """One stderr line when the data is the MNIST copy shipped in the package (no data directory was given)."""
    from fastnca.data import embedded_note

    note = embedded_note(splits)
    if note:
        print(note, file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    from fastnca.config import get_preset
    from fastnca.evaluate import CHECKPOINT_NAME
    from fastnca.train import NonFiniteLossError, Trainer

    overrides = parse_overrides(args.overrides)
    kwargs = dict(
        data_dir=args.data_dir,
        device=args.device,
        time_limit=args.time_limit,
        progress=not args.no_progress,
        final_eval=not args.no_final_eval,
    )
    if args.resume:
        if not args.out:
            raise CLIError("--resume needs --out, the run directory to continue")
        trainer = Trainer.resume(args.out, overrides=overrides, **kwargs)
        if args.preset and args.preset != "custom":
            print(
                f"resuming {args.out} at step {trainer.step} (its checkpoint's config; --preset is ignored)",
                file=sys.stderr,
            )
        else:
            print(f"resuming {args.out} at step {trainer.step}", file=sys.stderr)
    else:
        if not args.preset:
            raise CLIError("train: --preset NAME is required (or --resume --out DIR); see `fastnca presets`")
        try:
            cfg = get_preset(args.preset, **overrides)
        except ValueError as err:
            raise CLIError(str(err)) from None
        out = Path(args.out or f"runs/{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
        if (out / CHECKPOINT_NAME).exists():
            raise CLIError(
                f"--out {str(out)!r} already holds a checkpoint: pass --resume to continue it, or choose another --out"
            )
        trainer = Trainer(cfg, out, **kwargs)
        print(f"training {args.preset} on {trainer.device} -> {out}", file=sys.stderr)
    _say_if_embedded(trainer.splits)
    try:
        summary = trainer.fit()
    except NonFiniteLossError as err:
        print(f"fastnca: error: {err}", file=sys.stderr)
        return 1
    ev = summary.get("eval")
    line = f"done: step {summary['step']} ({summary['stopped']}), {summary['elapsed_s']:.1f} s of training"
    if ev:
        line += f"; test IWAE({ev['k']}) {ev['iwae']:.2f} nats = {ev['bpd']:.4f} bits/dim"
    print(line)
    print(f"outputs in {trainer.out_dir}: config.json metrics.jsonl checkpoint.pt samples.png growth.png")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fastnca.data import load_for_config
    from fastnca.evaluate import evaluate_iwae, load_checkpoint

    if args.k < 1:
        raise CLIError(f"--k: expected an integer >= 1, got {args.k}")
    if args.batches < 0:
        raise CLIError(f"--batches: expected an integer >= 0, got {args.batches}")
    model, ckpt = load_checkpoint(args.checkpoint, args.device or "auto")
    cfg = model.config
    splits = load_for_config(cfg, args.data_dir)
    _say_if_embedded(splits)
    t0 = time.perf_counter()
    res = evaluate_iwae(
        model,
        splits.test,
        k=args.k,
        batch_size=args.batch_size or cfg.batch_size,
        batches=args.batches,
        seed=args.seed,
        progress=True,
        desc=f"IWAE k={args.k}",
    )
    res.update(
        checkpoint=str(args.checkpoint),
        step=int(ckpt["step"]),
        dataset=cfg.dataset,
        seconds=round(time.perf_counter() - t0, 2),
    )
    units = args.units or ("nats" if cfg.likelihood == "bernoulli" else "bpd")
    value = f"{res['iwae']:.2f} nats" if units == "nats" else f"{res['bpd']:.4f} bits/dim"
    other = f"{res['bpd']:.4f} bits/dim" if units == "nats" else f"{res['iwae']:.2f} nats"
    print(f"test log p(x) >= {value} ({other}; IWAE k={args.k}, {res['n_images']} images, step {res['step']})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from fastnca.evaluate import load_checkpoint
    from fastnca.figures import growth_figure, growth_gif, sample_grid

    if args.n < 1 or args.growth_n < 1:
        raise CLIError("--n and --growth-n: expected integers >= 1")
    model, _ = load_checkpoint(args.checkpoint, args.device or "auto")
    device = next(model.parameters()).device
    out = Path(args.out)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    written = [sample_grid(model, out / "samples.png", n=args.n, generator=gen, mode=args.mode)]
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    written.append(growth_figure(model, out / "growth.png", n=args.growth_n, generator=gen))
    if args.gif:
        gen = torch.Generator(device=device).manual_seed(args.seed + 1)
        written.append(growth_gif(model, out / "growth.gif", n=min(16, args.n), generator=gen))
    print("wrote " + " ".join(str(p) for p in written))
    return 0


def cmd_damage(args: argparse.Namespace) -> int:
    import torch

    from fastnca.evaluate import load_checkpoint
    from fastnca.figures import damage_figure

    model, _ = load_checkpoint(args.checkpoint, args.device or "auto")
    device = next(model.parameters()).device
    size = args.size or (model.config.damage_size or None)
    kinds = ("half", "square") if args.kind == "both" else (args.kind,)
    written = []
    for kind in kinds:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        cpu_gen = torch.Generator().manual_seed(args.seed)
        written.append(
            damage_figure(
                model,
                Path(args.out) / f"damage_{kind}.png",
                n=args.n,
                kind=kind,
                size=size,
                generator=gen,
                cpu_generator=cpu_gen,
            )
        )
    print("wrote " + " ".join(str(p) for p in written))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from fastnca.data import DATASETS, describe, download

    if args.download:
        import os

        target = args.data_dir or os.environ.get("FASTNCA_DATA") or "data"
        names = tuple(n.strip() for n in args.datasets.split(",") if n.strip())
        bad = [n for n in names if n not in DATASETS]
        if bad:
            raise CLIError(f"--datasets: unknown {bad}; expected a comma-separated subset of {list(DATASETS)}")
        try:
            download(target, names)
        except OSError as err:  # no network, a moved URL, a full disk: say so instead of a traceback
            raise CLIError(
                f"download into {target!r} failed: {err}; files that arrived completely are kept, "
                "re-running resumes with the rest"
            ) from None
        args.data_dir = target
    print("\n".join(describe(args.data_dir)))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from fastnca.config import PRESETS, get_preset

    for name in PRESETS:
        c = get_preset(name)
        sched = (
            f"doubling K={c.n_doublings} M={c.steps_per_stage}"
            if c.doubling
            else f"T~U{{{c.min_steps}..{c.max_steps}}}"
        )
        pool = f" pool={c.pool_size} damage={c.damage_size}" if c.pool_size else ""
        print(
            f"{name:24s} {c.dataset:6s} {c.image_size}px |z|={c.state_channels} h={c.hidden_channels} "
            f"{sched} batch={c.batch_size} iters={c.iterations}{pool}"
        )
    return 0


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "sample": cmd_sample,
    "damage": cmd_damage,
    "data": cmd_data,
    "presets": cmd_presets,
}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 training diverged, 2 bad input or missing data)."""
    from fastnca.data import DataError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse prints its own message
        return int(exc.code or 0)
    try:
        _threads(args)
        return COMMANDS[args.command](args)
    except (CLIError, DataError, FileNotFoundError, ValueError) as err:
        print(f"fastnca {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastnca: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
