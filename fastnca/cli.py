"""fastnca command line: train, evaluate, sample and damage VNCAs, serve a demo page, list and download data.

Usage::

    fastnca train --preset small --out runs/small                 # a few minutes on a laptop CPU
    fastnca train --preset mnist-doubling --set batch_size=64 --set lr=2e-4 --out runs/mnist
    fastnca train --out runs/mnist --resume [--set iterations=200000]
    fastnca train --config run.toml [--set lr=3e-4] [--tensorboard]   # a preset and overrides from a file
    fastnca eval --checkpoint runs/small/checkpoint.pt --k 128 [--units bpd] [--batches 10] [--json out.json]
    fastnca sample --checkpoint runs/small/checkpoint.pt --out figs [--n 64] [--gif]
    fastnca damage --checkpoint runs/small/checkpoint.pt --out figs [--kind half|square]
    fastnca damage --checkpoint runs/small --out figs --image digit.png [--mask mask.png]   # inpainting
    fastnca figures --checkpoint runs/small [--out DIR] [--only growth tsne ...]     # the paper's figures
    fastnca demo --checkpoint runs/small [--port 8000] [--device cuda]   # a local page: grow, damage, regrow
    fastnca data [--data-dir DIR] [--download]
    fastnca presets
    torchrun --nproc-per-node 4 -m fastnca train ...   # data-parallel (DDP) training; `eval` likewise

The data directory comes from ``--data-dir``, else ``$FASTNCA_DATA``, else ``./data``; with neither of the
first two, MNIST presets use the binarized MNIST shipped in the package. ``--set key=value``
overrides any field of ``fastnca.config.Config`` (its type is checked). ``python -m fastnca`` works too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "parse_overrides"]


# fastnca.data.IMAGE_PIXEL_LIMIT, here so that parsing arguments does not import torch (a test keeps them equal)
IMAGE_PIXEL_LIMIT = 50_000_000


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


def _argument(text: str, convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Any:
    """``convert(text)`` where it parses and ``ok`` accepts it, else argparse's error saying ``expected``."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def _seed(text: str) -> int:
    """An argparse type: a seed in 0..MAX_SEED (torch's generators take 64 bits; offsets are added to it)."""
    from fastnca.config import MAX_SEED

    return _argument(text, int, lambda v: 0 <= v <= MAX_SEED, f"an integer in 0..{MAX_SEED}")


def _seconds(text: str) -> float:
    """An argparse type: a positive number of seconds (inf: no limit; NaN, 0 and negative numbers refused)."""
    return _argument(text, float, lambda v: v > 0, "a positive number of seconds")


def _add_backend(p: argparse.ArgumentParser, help: str) -> None:
    """``--backend auto | triton | torch`` (default None: the config's), explained by ``help``."""
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default=None, help=help)


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
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="a .toml or .json file with a preset name and config overrides (a run's config.json works); "
        "--preset and --set apply on top",
    )
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log scalars and growth images to OUT/tensorboard (needs the tensorboard package)",
    )
    p.add_argument("--out", default=None, help="run directory (default: runs/PRESET-YYYYmmdd-HHMMSS)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    _add_backend(
        p,
        "the NCA's backend, as --set backend=...: auto (the default) times both on a GPU and keeps the faster "
        "(cached), triton / torch skip that",
    )
    p.add_argument(
        "--time-limit",
        type=_seconds,
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
    p.add_argument("--k", type=int, default=128, help="importance samples (default: 128, as in the paper)")
    p.add_argument(
        "--units",
        choices=("nats", "bpd"),
        default=None,
        help="report unit (default: nats for Bernoulli models, bits/dim for RGB)",
    )
    p.add_argument(
        "--batches",
        type=int,
        default=0,
        help="test batches to use, a fixed random subset (default: 0, the whole split)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: the config's)")
    p.add_argument(
        "--iwae-steps",
        choices=("image", "sample"),
        default=None,
        help="non-doubling models: one step count T per image, shared by its k samples (the authors' test), or "
        "one per sample (default: the config's iwae_steps, 'image')",
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed of the evaluation's draws (default: 0)")
    p.add_argument(
        "--json", default=None, metavar="PATH", help="also write the result as JSON (not onto the run's own files)"
    )
    _add_backend(
        p,
        "the NCA's backend (default: the checkpoint's config); auto on a GPU times both on the IWAE and keeps "
        "the faster (cached)",
    )
    _add_common(p)

    p = sub.add_parser("sample", help="prior samples grid and growth sequence pictures")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=64, help="samples in the grid")
    p.add_argument("--growth-n", type=int, default=8, help="rows of the growth picture")
    p.add_argument("--mode", choices=("mean", "sample"), default="mean", help="likelihood mean or a sample")
    p.add_argument("--gif", action="store_true", help="also write an animated growth.gif")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the samples (default: 0)")
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
    p.add_argument(
        "--image",
        default=None,
        metavar="FILE.png",
        help="inpainting: encode this image, damage it (--mask, else --kind) and show the regrowth (PNG, JPEG, "
        "TIFF, ...; 8- or 16-bit, float TIFFs in [0, 1]; at most FASTNCA_MAX_IMAGE_PIXELS pixels, default "
        f"{IMAGE_PIXEL_LIMIT // 10**6} Mpx)",
    )
    p.add_argument(
        "--mask",
        default=None,
        metavar="FILE.png",
        help="with --image: light pixels mark the cells to zero (the same formats and pixel limit as --image)",
    )
    p.add_argument("--invert", action="store_true", help="with --image on MNIST models: dark strokes on light")
    p.add_argument("--steps", type=int, default=None, help="with --image: regrowth steps (default: as in figures)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the samples and the damage (default: 0)")
    _add_common(p, data=False)

    p = sub.add_parser("figures", help="every figure of the paper that applies to a run, with captions")
    p.add_argument("--checkpoint", default=None, help="checkpoint file or run directory (required but with --list)")
    p.add_argument("--list", action="store_true", help="name every figure and what it shows, then exit")
    p.add_argument("--out", default=None, help="output folder (default: RUN/figures)")
    p.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="NAME",
        help="draw only these figures (--list names them)",
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed of every figure's draws (default: 0)")
    p.add_argument("--tsne-images", type=int, default=5000, help="test images in the t-SNE (the paper: 5000)")
    _add_common(p)

    p = sub.add_parser("demo", help="a local web page: watch a model grow, paint damage, watch it regrow")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0: any free one)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 lets the network in)",
    )
    p.add_argument(
        "--frame-ms", type=int, default=80, metavar="MS", help="shortest time the page shows each step (default: 80)"
    )
    _add_common(p, data=False)

    p = sub.add_parser("data", help="list the datasets found in the data directory; --download fetches them")
    p.add_argument("--data-dir", default=None, help="data directory (default: $FASTNCA_DATA, else ./data)")
    p.add_argument("--download", action="store_true", help="download MNIST, Noto Emoji and CelebA (internet)")
    p.add_argument("--datasets", default="mnist,emoji,celeba", help="comma-separated subset for --download")

    sub.add_parser("presets", help="list the presets")
    return parser


# ---------------------------------------------------------------------------------------------- commands
def _is_main() -> bool:
    from fastnca import distributed

    ctx = distributed.active()
    return ctx is None or ctx.is_main


def _info(message: str) -> None:
    """A progress message on stderr, from rank 0 only under torchrun."""
    if _is_main():
        print(message, file=sys.stderr)


def _threads(args: argparse.Namespace) -> None:
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise CLIError(f"--threads: expected an integer >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


_WRITE_PROBE = ".fastnca-write-check."  # prefix of _check_writable's probe files


def _check_writable(folder: Path, flag: str = "--out") -> None:
    """Create ``folder`` and write a probe file into it, so an unusable output folder is named before any work."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=_WRITE_PROBE, suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise CLIError(f"{flag} {str(folder)!r}: cannot write there ({err.strerror or err})") from None


def _os_error_message(err: OSError) -> str:
    """One line for a failed file operation: what failed and on which file."""
    if err.filename and err.strerror:
        return f"{err.strerror}: {str(err.filename)!r}"
    return err.strerror or str(err)


def _new_folders(folder: Path) -> list[Path]:
    """The folders that creating ``folder`` (with its parents) would make, deepest first."""
    missing, p = [], folder.absolute()
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


@contextlib.contextmanager
def _removed_if_left_empty(folders: list[Path]) -> Iterator[None]:
    """On an error, remove those of ``folders`` (deepest first) that the failed command made and left empty."""
    try:
        yield
    except BaseException:
        for folder in folders:
            try:
                folder.rmdir()
            except OSError:  # not empty (or not ours to remove): keep it and its parents
                break
        raise


def _running_refusal(out: Path, err: Any) -> CLIError:  # noqa: ANN401 - a fastnca.utils.FolderLocked
    return CLIError(f"--out {str(out)!r}: another fastnca train is running in this folder ({err.owner}); wait for it "
                    "to finish (or stop it), or choose another --out")


def _refuse_if_running(out: Path) -> None:
    """Refuse an ``--out`` that another process is training into (its lock file is held)."""
    from fastnca.utils import FolderLock, FolderLocked

    lock = FolderLock(out)
    if not lock.path.is_file():
        return
    try:
        lock.acquire()
    except FolderLocked as err:
        raise _running_refusal(out, err) from None
    lock.release()


def _check_new_run_folder(out: Path, checkpoint_name: str) -> None:
    """A new run needs an empty (or new) --out: its files would mix with, or overwrite, another run's."""
    from fastnca.checkpoints import METRICS_NAME
    from fastnca.utils import FolderLock

    _refuse_if_running(out)
    if (out / checkpoint_name).exists():
        raise CLIError(
            f"--out {str(out)!r} already holds a checkpoint: pass --resume to continue it, or choose another --out"
        )
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {str(out)!r} is a file, not a folder: choose another --out")
    if out.is_dir():
        # under torchrun every rank checks and probes the folder at once: another rank's probe is not a run's file;
        # a lock file left by a run that ended is not one either
        lock = FolderLock(out).path.name
        held = sorted(p.name for p in out.iterdir() if not p.name.startswith(_WRITE_PROBE) and p.name != lock)
        started = [n for n in ("config.json", METRICS_NAME) if n in held]
        if started:
            raise CLIError(
                f"--out {str(out)!r} holds a run that stopped before writing its first checkpoint (it has "
                f"{' and '.join(started)}, no {checkpoint_name}), so --resume cannot continue it: remove the "
                "folder's files to start it again there, or choose another --out"
            )
        if held:
            shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
            raise CLIError(
                f"--out {str(out)!r} is not empty (it holds {shown}): a new run needs an empty folder; "
                "pass --resume to continue a run that wrote a checkpoint there, or choose another --out"
            )


def _say_if_embedded(splits) -> None:  # noqa: ANN001 - fastnca.data.Splits, imported lazily
    """One stderr line when the data is the MNIST copy shipped in the package (no data directory was given)."""
    from fastnca.data import embedded_note

    note = embedded_note(splits)
    if note:
        _info(note)


def cmd_train(args: argparse.Namespace) -> int:
    from fastnca.checkpoints import CHECKPOINT_NAME
    from fastnca.config import get_preset
    from fastnca.train import Trainer
    from fastnca.utils import FolderLocked

    file_preset, overrides = None, {}
    if args.config:
        from fastnca.configfile import load_config_file

        file_preset, overrides = load_config_file(args.config)
    overrides.update(parse_overrides(args.overrides))  # --set applies on top of the file
    if args.backend is not None:
        overrides["backend"] = args.backend
    args.preset = args.preset or file_preset or (None if not args.config or args.resume else "custom")
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
        out = Path(args.out)
        _refuse_if_running(out)
        if Path(args.out, CHECKPOINT_NAME).is_file():
            _check_writable(out)
        try:
            trainer = Trainer.resume(args.out, overrides=overrides, **kwargs)
        except FolderLocked as err:
            raise _running_refusal(out, err) from None
        if args.preset and args.preset != "custom":
            _info(f"resuming {args.out} at step {trainer.step} (its checkpoint's config; --preset is ignored)")
        else:
            _info(f"resuming {args.out} at step {trainer.step}")
        return _fit(args, trainer)
    if not args.preset:
        raise CLIError("train: --preset NAME is required (or --resume --out DIR); see `fastnca presets`")
    try:
        if args.preset == "custom":  # a config file without a preset: Config's defaults under its fields
            from fastnca.config import Config

            cfg = Config().replace(**overrides)
        else:
            cfg = get_preset(args.preset, **overrides)
    except ValueError as err:
        raise CLIError(str(err)) from None
    out = Path(args.out or f"runs/{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    _check_new_run_folder(out, CHECKPOINT_NAME)
    with _removed_if_left_empty(_new_folders(out)):  # a failed start leaves no empty run folder behind
        _check_writable(out)
        try:
            trainer = Trainer(cfg, out, **kwargs)
        except FolderLocked as err:
            raise _running_refusal(out, err) from None
        ranks = f" x {trainer.dist.world_size} ranks (DDP)" if trainer.dist is not None else ""
        _info(f"training {args.preset} on {trainer.device}{ranks} -> {out}")
        return _fit(args, trainer)


def _fit(args: argparse.Namespace, trainer: Any) -> int:
    """``fastnca train``'s second half: the trainer's fit, its result line and the files it wrote."""
    from fastnca.train import NonFiniteLossError, TrainingInterrupted

    try:
        _say_if_embedded(trainer.splits)
        if args.tensorboard and _is_main():  # rank 0 writes every run file under torchrun
            from fastnca.tracking import TENSORBOARD_DIR, TensorBoardTracker

            try:
                trainer.tracker = TensorBoardTracker(trainer.out_dir / TENSORBOARD_DIR, seed=trainer.cfg.seed)
            except ImportError as err:
                raise CLIError(str(err)) from None
        summary = trainer.fit()
    except NonFiniteLossError as err:
        print(f"fastnca: error: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as err:
        print(f"fastnca: {err}", file=sys.stderr)
        return err.exit_status
    finally:
        trainer.lock.release()  # fit releases it too; an error before fit must not leave it held
    ev = summary.get("eval")
    line = f"done: step {summary['step']} ({summary['stopped']}), {summary['elapsed_s']:.1f} s of training"
    if ev:
        line += (f"; test IWAE({ev['k']}, {ev['n_images']} images) {ev['iwae']:.2f} nats = {ev['bpd']:.4f} "
                 "bits/dim")
    print(line)
    names = ["config.json", "metrics.jsonl", "checkpoint.pt", "summary.json", "samples.png", "growth.png"]
    print(f"outputs in {trainer.out_dir}: " + " ".join(n for n in names if (trainer.out_dir / n).is_file()))
    return 0


CPU_EVAL_WARN_S = 60.0  # warn when an evaluation on the CPU is estimated to take longer than this


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"


def _cpu_eval_warning(k: int, batch_size: int) -> Any:
    """An ``on_first_batch`` hook: warn with the estimated time and the quicker ``--batches N`` alternative."""

    def warn(first_s: float, n_batches: int) -> None:
        estimate = first_s * n_batches
        if estimate < CPU_EVAL_WARN_S:
            return
        from tqdm.auto import tqdm

        quick = max(1, int(CPU_EVAL_WARN_S // max(first_s, 1e-9)))
        tqdm.write(
            f"warning: on the CPU this evaluation takes about {_duration(estimate)} ({n_batches} batches of "
            f"{batch_size} images, k={k}, {first_s:.1f} s per batch); --batches {quick} estimates the bound on "
            f"{quick * batch_size} images in about {_duration(quick * first_s)} (or use a smaller --k, or a GPU)",
            file=sys.stderr,
        )

    return warn


def _check_json_target(path: Path, checkpoint: str) -> None:
    """Refuse, before the evaluation, a --json that is a folder, cannot be written, or is one of the run's files."""
    from fastnca.checkpoints import RUN_FILES, checkpoint_file

    if path.is_dir():
        raise CLIError(f"--json {str(path)!r} is a folder: name a file, e.g. {str(path / 'eval.json')!r}")
    ckpt = checkpoint_file(checkpoint)
    target = path.resolve()
    if target == ckpt.resolve() or (target.parent == ckpt.resolve().parent and target.name in RUN_FILES):
        what = "the checkpoint being read" if target == ckpt.resolve() else f"the run's own {target.name}"
        raise CLIError(
            f"--json {str(path)!r} would overwrite {what} in {str(ckpt.parent)!r}: name another file, e.g. "
            f"{str(ckpt.parent / 'eval.json')!r}"
        )


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def cmd_eval(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise CLIError(f"--k: expected an integer >= 1, got {args.k}")
    if args.batches < 0:
        raise CLIError(f"--batches: expected an integer >= 0, got {args.batches}")
    if args.batch_size is not None and args.batch_size < 1:
        raise CLIError(f"--batch-size: expected an integer >= 1, got {args.batch_size}")
    json_path = Path(args.json) if args.json else None
    new = _new_folders(json_path.parent) if json_path is not None else []
    with _removed_if_left_empty(new):
        if json_path is not None:  # before the work: an evaluation can take hours
            _check_json_target(json_path, args.checkpoint)
            if _is_main():
                _check_writable(json_path.parent, "--json")
        return _eval(args, json_path)


def _eval(args: argparse.Namespace, json_path: Path | None) -> int:
    from fastnca.checkpoints import load_checkpoint
    from fastnca.data import load_for_config
    from fastnca.evaluate import evaluate_iwae

    model, ckpt = load_checkpoint(args.checkpoint, args.device or "auto")
    if args.backend is not None:
        model.config = model.config.replace(backend=args.backend)
        model.nca.configure(backend=args.backend)
    cfg = model.config
    splits = load_for_config(cfg, args.data_dir)
    _say_if_embedded(splits)
    batch_size = cfg.batch_size if args.batch_size is None else args.batch_size
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # under torchrun every rank keeps the checkpoint's backend
        from fastnca.autobackend import decide_eval_backend

        decide_eval_backend(model, splits.test, k=args.k, batch_size=batch_size, batches=args.batches, log=_info)
    on_cpu = next(model.parameters()).device.type == "cpu"
    t0 = time.perf_counter()
    res = evaluate_iwae(
        model,
        splits.test,
        k=args.k,
        batch_size=batch_size,
        batches=args.batches,
        seed=args.seed,
        progress=True,
        desc=f"IWAE k={args.k}",
        on_first_batch=_cpu_eval_warning(args.k, batch_size) if on_cpu else None,
        steps=args.iwae_steps,
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
    finite = math.isfinite(res["iwae"])
    if json_path is not None and _is_main():
        from fastnca.utils import atomic_write

        # strict JSON: a non-finite bound is written as null (json.dumps would write a bare NaN, which is not JSON)
        text = json.dumps({k: _finite_or_none(v) for k, v in res.items()}, indent=2, allow_nan=False) + "\n"
        atomic_write(json_path, lambda f: f.write(text), binary=False)
    if not finite:
        print(f"fastnca eval: error: the bound is {res['iwae']} nats: the model gives non-finite log-likelihoods on "
              "these test images (a diverged or damaged checkpoint); use an earlier checkpoint", file=sys.stderr)
        return 1
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from fastnca.checkpoints import load_checkpoint
    from fastnca.figures import growth_figure, growth_gif, sample_grid

    if args.n < 1 or args.growth_n < 1:
        raise CLIError(f"--n and --growth-n: expected integers >= 1, got {args.n} and {args.growth_n}")
    with _removed_if_left_empty(_new_folders(Path(args.out))):  # a refused checkpoint leaves no empty --out
        _check_writable(Path(args.out))
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

    if args.image:
        return cmd_inpaint(args)
    if args.mask:
        raise CLIError("--mask needs --image (the picture to inpaint)")

    from fastnca.checkpoints import load_checkpoint
    from fastnca.figures import damage_figure

    if args.n < 1:
        raise CLIError(f"--n: expected an integer >= 1, got {args.n}")
    if args.size is not None and args.size < 1:
        raise CLIError(f"--size: expected an integer >= 1, got {args.size}")
    with _removed_if_left_empty(_new_folders(Path(args.out))):  # a refused checkpoint leaves no empty --out
        _check_writable(Path(args.out))
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


def cmd_inpaint(args: argparse.Namespace) -> int:
    """``fastnca damage --image FILE``: encode a user's image, zero cells, show the regrowth."""
    import torch

    from fastnca.checkpoints import load_checkpoint
    from fastnca.figures import DAMAGE_NOTE, image_from_file, inpaint, mask_from_file, untrained_damage_note

    model, ckpt = load_checkpoint(args.checkpoint, args.device or "auto")
    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps: expected an integer >= 1, got {args.steps}")
    cfg = model.config
    device = next(model.parameters()).device
    image = image_from_file(args.image, cfg, invert=args.invert)
    mask = mask_from_file(args.mask, cfg.image_size) if args.mask else None
    kind = "half" if args.kind == "both" else args.kind
    written = inpaint(
        model,
        image,
        args.out,
        mask=mask,
        kind=kind,
        size=args.size or (cfg.damage_size or None),
        steps=args.steps,
        generator=torch.Generator(device=device).manual_seed(args.seed),
        cpu_generator=torch.Generator().manual_seed(args.seed),
    )
    damage = f"the mask {args.mask}" if args.mask else f"damage '{kind}'"
    caption = Path(args.out) / "inpaint.txt"
    caption.write_text(
        f"Inpainting: {args.image} encoded (posterior mean), grown, cells zeroed by {damage}, then regrown; "
        f"columns: the image, its reconstruction, the damaged state, regrowth steps (+t).\n"
        f"checkpoint: {args.checkpoint} (step {int(ckpt['step'])}); seed {args.seed}\n"
        f"{DAMAGE_NOTE}.\n" + (f"{note}\n" if (note := untrained_damage_note(cfg)) else "")
    )
    print("wrote " + " ".join(str(p) for p in [*written, caption]))
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from fastnca.figures import FIGURES, make_figures

    if args.list:
        for fig in FIGURES.values():
            print(f"{fig.name:16s} {fig.description}")
        return 0
    if args.checkpoint is None:
        raise CLIError("figures: --checkpoint FILE_OR_RUN is required (or --list)")
    if args.only:
        bad = [n for n in args.only if n not in FIGURES]
        if bad:
            raise CLIError(f"--only: unknown figure(s) {', '.join(bad)}; expected some of {', '.join(FIGURES)}")
    if args.tsne_images < 10:
        raise CLIError(f"--tsne-images: expected an integer >= 10, got {args.tsne_images}")
    ckpt = Path(args.checkpoint)
    out = Path(args.out) if args.out else (ckpt if ckpt.is_dir() else ckpt.parent) / "figures"
    written, skipped = make_figures(
        args.checkpoint,
        out,
        only=args.only,
        seed=args.seed,
        data_dir=args.data_dir,
        device=args.device or "auto",
        tsne_images=args.tsne_images,
        log=lambda msg: print(msg, file=sys.stderr),
    )
    for name, files in written.items():
        print(f"{name}: " + " ".join(str(p) for p in files))
    return 0 if written or not skipped else 2


def cmd_demo(args: argparse.Namespace) -> int:
    """``fastnca demo``: listen first (a port in use is said at once), then load the model and serve the page."""
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port: expected a TCP port in 0..65535 (0: any free one), got {args.port}")
    if args.frame_ms < 0:
        raise CLIError(f"--frame-ms: expected an integer >= 0, got {args.frame_ms}")
    from fastnca.checkpoints import checkpoint_file, load_checkpoint
    from fastnca.demo import Demo, bind, bind_message, url_of

    try:
        server = bind(args.host, args.port)
    except OSError as err:
        raise CLIError(bind_message(err, args.host, args.port)) from None
    try:
        model, ckpt = load_checkpoint(args.checkpoint, args.device or "auto")
        server.demo = Demo(model, (checkpoint_file(args.checkpoint), ckpt), frame_ms=args.frame_ms)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            _info(f"fastnca demo: listening on {args.host}: anyone who can reach this machine can use the page")
        print(
            f"fastnca demo: {args.checkpoint} (step {int(ckpt['step'])}) on {server.demo.device} at "
            f"{url_of(server)} (Ctrl-C stops it)",
            flush=True,
        )
        server.serve_forever()
    except KeyboardInterrupt:
        print("fastnca demo: stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from fastnca.data import DATASETS, describe
    from fastnca.downloads import download

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


DISTRIBUTED_COMMANDS = ("train", "eval")  # the commands that run data-parallel under torchrun
COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "sample": cmd_sample,
    "damage": cmd_damage,
    "figures": cmd_figures,
    "demo": cmd_demo,
    "data": cmd_data,
    "presets": cmd_presets,
}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status.

    0 ok, 1 training diverged (NaN/inf), 2 bad input, missing data or an unusable output folder, 130 / 143 training
    stopped by SIGINT / SIGTERM after writing a checkpoint (130 also for a Ctrl-C outside training).
    """
    from fastnca.data import DataError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse prints its own message
        return int(exc.code or 0)
    from fastnca import distributed

    try:
        _threads(args)
        if args.command in DISTRIBUTED_COMMANDS:  # under torchrun: join the process group, rank = device
            _, args.device = distributed.setup(args.device)
            if not _is_main():  # results are printed by rank 0; errors still go to every rank's stderr
                sys.stdout = open(os.devnull, "w")  # for the rest of this process
        return COMMANDS[args.command](args)
    except (CLIError, DataError, FileNotFoundError, ValueError) as err:
        print(f"fastnca {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a read-only or vanished folder: one line, not a traceback
        print(f"fastnca {args.command}: error: {_os_error_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastnca: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
