"""One time-to-quality training run for gpu_check.sh: ``fastnca``'s Trainer for a wall-clock budget, nothing after.

Usage::

    python -m benchmarks.ttq --backend triton --time-limit 40 --out DIR [--preset mnist-doubling]
        [--data-dir DIR] [--device cuda] [--set KEY=VALUE ...] [--threads N]

The same training as ``fastnca train --time-limit S`` (same seed, data order, metrics rows in DIR/metrics.jsonl)
but without the final evaluation and the sample pictures, which cost GPU seconds (and minutes in the CPU dry
run's interpreter) and say nothing about speed. Exit codes: 0 trained, 1 a non-finite loss, 3 no data.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ttq", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mnist-doubling")
    p.add_argument("--backend", required=True, choices=("triton", "torch"))
    p.add_argument("--time-limit", type=float, required=True, metavar="S")
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir", default=None, help="default: $FASTNCA_DATA, else fastnca's default")
    p.add_argument("--device", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)

    import torch

    from fastnca.cli import parse_overrides
    from fastnca.config import get_preset
    from fastnca.data import DataError
    from fastnca.train import NonFiniteLossError, Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset, **{**parse_overrides(args.overrides), "backend": args.backend})
    t0 = time.perf_counter()
    try:
        trainer = Trainer(cfg, args.out, data_dir=args.data_dir, device=args.device, time_limit=args.time_limit,
                          progress=False, final_outputs=False)
    except (DataError, FileNotFoundError) as err:
        print(f"ttq: no data: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 3
    # what the NCA's dots do (fastnca.run): the trainer's settings, as resolved for its device
    print(f"ttq: {args.preset} backend={args.backend}: {trainer.settings.describe()}, precision {cfg.precision}, "
          f"set-up {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        summary = trainer.fit()
    except NonFiniteLossError as err:
        print(f"ttq: error: {err}", file=sys.stderr)
        return 1
    print(f"ttq: done: step {summary['step']} ({summary['stopped']}), {summary['elapsed_s']:.1f} s of training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
