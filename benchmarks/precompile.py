"""Record the Triton launches of the GPU check's jobs, so that one parallel pass compiles them all up front.

Usage::

    python -m benchmarks.precompile --out LAUNCHES.pkl [--device cuda] [--tiny] [--preset mnist-doubling]

Records (nothing runs: ``fastnca.kernels.warmup.record_launches``) the fused kernels of

* the time-to-quality stage's training run at default settings (``fastnca.train.warmup_job`` of the preset's
  config, resolved for the device as the trainer resolves it, fused);
* every fused row of the quick benchmark plan (``benchmarks.runner.QUICK_PLAN``) and of the profile targets,
  at the sizes they run (``--tiny``: the dry run's sizes);

and writes them to ``LAUNCHES.pkl``. ``python -m fastnca.kernels.warmup --compile LAUNCHES.pkl TESTS.pkl`` then
compiles the union in parallel into Triton's cache (``benchmarks/gpu_check.sh``'s compile stage; the kernel tests'
launches come from ``benchmarks/record_plugin.py``).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


def _train_job(preset: str, device: Any, tiny: bool) -> None:
    import torch

    from benchmarks.cases import tiny_overrides
    from fastnca.config import get_preset
    from fastnca.run import resolve_run
    from fastnca.train import warmup_job

    cfg = get_preset(preset, **(tiny_overrides(preset) if tiny else {}))
    settings = resolve_run(cfg, device, backend="triton", backend_source="measured")
    images = torch.randint(0, 2, (cfg.batch_size, cfg.image_channels, cfg.image_size, cfg.image_size),
                           dtype=torch.uint8, device=device) * (255 if cfg.likelihood == "dml" else 1)
    warmup_job(cfg, settings, images)


def _bench_jobs(device: Any, tiny: bool) -> list[tuple[str, str]]:
    """Record each fused (case, backend) of the quick plan and the profile targets; return the pairs tried."""
    from benchmarks.cases import CASES, CaseContext, parse_backend
    from benchmarks.profiling import TARGETS, TINY_TARGETS
    from benchmarks.runner import QUICK_PLAN

    pairs = [(case, b) for case, backends in QUICK_PLAN for b in backends if b.startswith("triton")]
    pairs += [(case, b) for _, case, b in (TINY_TARGETS if tiny else TARGETS) if b.startswith("triton")]
    done = []
    for case, backend in dict.fromkeys(pairs):
        ctx = CaseContext(CASES[case], device, tiny=tiny)
        try:
            prep = ctx.prepare(parse_backend(backend))
        except NotImplementedError:
            continue
        prep.fn()
        done.append((case, backend))
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.precompile", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="where the recorded launches go (a pickle)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the dry run's sizes")
    p.add_argument("--preset", default="mnist-doubling", help="the time-to-quality stage's preset")
    args = p.parse_args(argv)
    from fastnca.kernels import use_interpreter

    use_interpreter()  # the dry run (no GPU) records the interpreted kernels; before a kernel module is imported
    from fastnca.kernels.warmup import record_launches, save_launches
    from fastnca.run import resolve_device

    device = resolve_device(args.device)
    t0 = time.perf_counter()
    with record_launches() as launches:
        _train_job(args.preset, device, args.tiny)
        pairs = _bench_jobs(device, args.tiny)
    save_launches(launches, args.out)
    distinct = len({launch.dedupe_key() for launch in launches})
    print(f"precompile: {len(launches)} launches ({distinct} distinct) recorded from the {args.preset} training job "
          f"and {len(pairs)} benchmark rows in {time.perf_counter() - t0:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
