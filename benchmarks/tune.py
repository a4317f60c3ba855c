"""Tile and split sweep of the fused rollout's backward, timed on the GPU: which configuration to ship.

Usage::

    python -m benchmarks.tune --out DIR                    # mnist-doubling, B = 32, bf16: every variant below
    python -m benchmarks.tune --only post small --out DIR  # some groups (post, main, ckpt, small, wgrad)
    python -m benchmarks.tune --only wgrad --preset celeba-nondoubling-256 --out DIR   # issue 30's designs
    python -m benchmarks.tune --tiny --device cpu          # CPU dry run (interpreter, tiny sizes): the code path

Each variant changes one thing against the shipped configuration (the kernels' own ``bwd_config`` /
``post_config``, the post kernel's weight-gradient splits ``tiles.split_cells().post``, the NCA's
``small_grid``) and times the whole rollout forward + backward
(``kernels.rollout.nca_rollout``: the latents' and every weight's gradient) at the preset's shape, with CUDA
events. Every variant's gradients are compared with the shipped configuration's (relative error), so a variant that
computes something else is flagged, not timed as a win. After the single changes, the best variant of each group is
combined and timed, and ``torch.profiler`` splits the shipped and the combined run into kernels.

Variants are applied through the kernels' tile overrides (``kernels/tiles.py``, ``tiles.override``) for the
duration of one variant only (``_patched``); nothing here changes what ships. A variant that fails to compile or
launch (shared memory, registers) is reported as such.
Whether a variant also fits both Triton releases without spills is the sm_90 fit's job (``python -m
tools.fit``), which must pass before a variant ships.

Writes ``tune.json`` (every row) and ``tune.md`` (the table) into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.utils import rel_err, time_fn

# (group, name, changes): changes are "post.<field>" / "main.<field>" (BwdConfig fields), "min_cells_per_split"
# (the post kernel's, kernels.tiles.split_cells().post), "small_grid" (the NCA's
# option of that name), "checkpoint" (the rollout's policy; shipped: the preset's), "wgrad" (the backward's
# weight-gradient design, RolloutPlan.wgrad; shipped: per-step), "wgrad.<field>" (the batched kernel's WgradConfig,
# kernels/wgrad.py) and "wgrad_min_cells" (its splits' least cells, tiles.split_cells().batched)
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("post", "64 cells per k-step, splits >= 1024 (before 2026-11-28)",
     {"post.wg_block_cells": 64, "min_cells_per_split": 1024}),
    ("post", "splits >= 16384", {"min_cells_per_split": 16384}),
    # one warpgroup per program, 64x64 instructions instead of 64x32 (measured 1.08x at 81ffdd1 while it spilled
    # 72-112 B); no spills since the state gradient's channel split: 168 / 174 registers (Triton 3.8 / 3.6, bf16
    # z = h = 256), 188 with doubling under 3.6
    ("post", "4 warps", {"post.wg_warps": 4}),
    # 2 stages leave no copy in flight while a k-step waits for its operands: the loop waits for all outstanding
    # copies (TTGIR ``async_wait {num = 0}``), then issues the dot and the next k-step's copies; 3 stages wait for
    # one k-step's copies with the next one's in flight (``num = 2``). 98304 B of shared memory, <= 128 registers
    # (Triton 3.8 / 3.6, bf16 z = h = 256), no spills: still two programs per SM
    ("post", "3 stages", {"post.wg_stages": 3}),
    # two k-steps of copies in flight at the same 98304 B (and <= 124 registers) as 3 stages of 128 cells
    ("post", "4 stages, 64 cells per k-step", {"post.wg_stages": 4, "post.wg_block_cells": 64}),
    ("post", "128x128 tiles", {"post.wg_block": 128}),
    # fits both Triton releases without spills (255 registers: one program per SM instead of two), twice the tensor
    # work per k-step for about the same instructions (sm_90 SASS, bf16 z = h = 256: dWp 193 vs 204 per k-step,
    # the 1x1 GEMMs 105-107 vs 115-117), half the operand bytes per multiply-add
    ("post", "128x128 tiles, 64 cells per k-step", {"post.wg_block": 128, "post.wg_block_cells": 64}),
    ("post", "128x128 tiles, 4 warps", {"post.wg_block": 128, "post.wg_warps": 4}),
    # the state-gradient programs over every state channel: 130-218 registers, one program per SM; shipped: 128
    # channels (bf16) / 64 (tf32) per program, <= 128 registers, two per SM (kernels/tiles.post_config)
    ("post", "state gradient over all channels (before 2026-11-28)", {"post.ds_block_n": None}),
    ("main", "2 stages (before 2026-11-28)", {"main.stages": 2}),
    ("main", "hidden chunk 64", {"main.block_k": 64}),
    ("main", "state chunk 64", {"main.block_c": 64}),
    ("main", "128 cells", {"main.block_m": 128}),
    ("main", "4 warps", {"main.warps": 4}),
    ("main", "state-gradient 128 cells", {"main.ds_block_m": 128}),
    # each warpgroup its own 64 rows at h = 256 (no duplicated chained dots): sm_90 spills 40 / 48 B (Triton 3.8 / 3.6)
    # without a mask, 0 with one (kernels/BACKWARD.md)
    ("main", "128 cells, operand reloaded, int32 offsets, chunks 16, stages 3/3/2",
     {"main.block_m": 128, "main.block_k": 16, "main.reload_operand": True, "main.int32_index": True,
      "main.blk_stages": 3, "main.out_stages": 2}),
    ("main", "int32 offsets", {"main.int32_index": True}),
    # 64 cells x 8 warps: the hidden-chunk loops' first dots as chained dots, laid out [8,1], so both warpgroups
    # compute them (4/3 of the tensor work, 5/4 in tf32) on wider instructions; shipped: unchained (utils.mma_first)
    ("main", "chained hidden-chunk dots (before 2026-11-28)", {"main.unchain": False}),
    # tf32 at h = 256 (--precision tf32): N-major weights, copied 4 bytes at a time; shipped: K-major, 16-byte copies
    # (they fit both Triton releases since the dots are unchained, kernels/BACKWARD.md)
    ("main", "N-major weights (before 2026-11-28)", {"main.k_major": False}),
    # 'step': the backward main kernel recomputes each step's forward from its input (26 h^2 multiply-adds per cell
    # at |z| = h = 256 with 4 blocks instead of 9); the doubling presets' 'auto' keeps the activations (2026-11-28)
    ("ckpt", "per-step checkpointing: recompute in the backward (before 2026-11-28)", {"checkpoint": "step"}),
    # issue 30: the weight gradients of a batch of steps (the whole mnist-doubling rollout under 'none') as long-K
    # GEMMs after the steps' data gradients, instead of each step's in its post kernel (kernels/wgrad.py)
    ("wgrad", "batched weight gradients (Triton split-K GEMM)", {"wgrad": "batched"}),
    ("wgrad", "batched weight gradients, cuBLAS for the 1x1 weights", {"wgrad": "batched-cublas"}),
    # sm_90 fit of these tiles, bf16 z = h = 256 (Triton 3.8): 143 registers (128 cells), 184 (4 warps), no spills
    ("wgrad", "batched, 128 cells per k-step", {"wgrad": "batched", "wgrad.block_cells": 128}),
    ("wgrad", "batched, 4 warps", {"wgrad": "batched", "wgrad.warps": 4}),
    ("wgrad", "batched, splits >= 16384 cells", {"wgrad": "batched", "wgrad_min_cells": 16384}),
    ("small", "small-grid off (forward too)", {"small_grid": False}),
]


@contextlib.contextmanager
def _patched(changes: dict[str, Any]) -> Iterator[None]:
    """Apply one variant's tile changes through the kernels' override hook (``kernels/tiles.py``); undone on exit.
    The NCA options (``small_grid``, ``checkpoint``, ``wgrad``) are :meth:`Bench.run`'s."""
    from fastnca.kernels import tiles

    kinds = {"post": "post", "main": "bwd", "wgrad": "wgrad"}  # "wgrad" alone is the design, not a tile field
    fields: dict[str, dict[str, Any]] = {}
    for key, value in changes.items():
        prefix, _, name = key.partition(".")
        if name and prefix in kinds:
            fields.setdefault(kinds[prefix], {})[name] = value
    split = {"post": changes.get("min_cells_per_split"), "batched": changes.get("wgrad_min_cells")}
    split = {k: v for k, v in split.items() if v is not None}
    if split:
        fields["splits"] = split
    with contextlib.ExitStack() as stack:
        for kind, f in fields.items():
            stack.enter_context(tiles.override(kind, **f))
        yield


class Bench:
    """The rollout of a preset (forward + backward of the update network and the latents) at a fixed input."""

    def __init__(self, preset: str, batch: int, precision: str, device: torch.device, tiny: bool) -> None:
        from benchmarks.cases import randomize_out, tiny_overrides
        from fastnca.config import get_preset
        from fastnca.nca import nca_from_config

        over = tiny_overrides(preset) if tiny else {}
        # the sweep's fp32 is the fused kernels' IEEE fp32 path (fastnca/run.py: the model's fp32 follows cuDNN's flag)
        over.update(batch_size=batch, precision="fp32-ieee" if precision == "fp32" else precision, backend="triton",
                    p_update=1.0)
        self.cfg = get_preset(preset, **over)
        gen = torch.Generator().manual_seed(1234)
        torch.manual_seed(0)
        nca = nca_from_config(self.cfg)
        randomize_out(nca.update_net, gen)
        self.nca = nca.to(device)
        self.z = torch.randn(batch, self.cfg.state_channels, generator=gen).to(device)
        self.flags = self.nca.schedule(None if self.cfg.doubling else self.cfg.max_steps)
        out_side = self.cfg.seed_size * 2 ** self.cfg.n_doublings if self.cfg.doubling else self.cfg.grid_size
        self.dy = torch.randn(batch, self.cfg.state_channels, out_side, out_side, generator=gen).to(device)
        self.device = device

    def run(self, changes: dict[str, Any]) -> list[torch.Tensor]:
        """One forward + backward under a variant's NCA options; returns [final state, dL/dz, every weight's
        gradient]."""
        params = list(self.nca.update_net.parameters())
        for p in params:
            p.grad = None
        z = self.z.detach().clone().requires_grad_(True)
        self.nca.small_grid = changes.get("small_grid", self.cfg.small_grid)
        if self.nca.settings.wgrad != changes.get("wgrad", self.cfg.wgrad):
            self.nca.configure(wgrad=changes.get("wgrad", self.cfg.wgrad))
        out = self.nca.run(self.nca.seed(z), self.flags, checkpoint=changes.get("checkpoint"))
        out.backward(self.dy.to(out.dtype).contiguous(memory_format=torch.channels_last))
        return [out.detach().float(), z.grad.float()] + [p.grad.float() for p in params]


def _time(fn: Callable[[], Any], device: torch.device, reps: int) -> list[float]:
    return time_fn(fn, device, warmup=1, min_reps=reps, max_reps=reps, target_s=0.0).times_ms


def _kernels(fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """GPU time per kernel name (us) over one call, by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    out: dict[str, float] = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", 0.0) if device.type == "cuda" else 0.0
        if t > 0 and (e.key.startswith("_") or "triton" in e.key):
            out[e.key] = round(t, 1)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _measure(bench: Bench, name: str, group: str, changes: dict[str, Any], ref: list[torch.Tensor] | None,
             reps: int) -> tuple[dict[str, Any], list[torch.Tensor] | None]:
    """Time one variant; returns its row and its outputs (None where it failed)."""
    row: dict[str, Any] = {"group": group, "variant": name, "changes": changes}
    t0 = time.perf_counter()
    try:
        with _patched(changes):
            grads = bench.run(changes)  # compiles what the variant needs
            if bench.device.type == "cuda":
                torch.cuda.synchronize(bench.device)
            row["first_call_s"] = round(time.perf_counter() - t0, 2)
            row["rel_err_vs_shipped"] = 0.0 if ref is None else max(rel_err(r, o) for r, o in zip(ref, grads))
            times = _time(lambda: bench.run(changes), bench.device, reps)
    except Exception as err:  # noqa: BLE001 - a variant that cannot run is a result, not a crash
        row["status"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        return row, None
    row["median_ms"] = round(sorted(times)[len(times) // 2], 3)
    row["min_ms"] = round(min(times), 3)
    bad = ref is not None and not row["rel_err_vs_shipped"] < 0.05
    row["status"] = "MISMATCH vs shipped" if bad or not math.isfinite(row["rel_err_vs_shipped"]) else "ok"
    return row, grads


def _combined(rows: list[dict[str, Any]], base_ms: float) -> dict[str, Any]:
    """The best ok variant of each group that beats the shipped configuration, merged."""
    changes: dict[str, Any] = {}
    for group in dict.fromkeys(r["group"] for r in rows):
        ok = [r for r in rows if r["group"] == group and r.get("status") == "ok" and r["median_ms"] < base_ms]
        if ok:
            changes.update(min(ok, key=lambda r: r["median_ms"])["changes"])
    return changes


def _table(rows: list[dict[str, Any]], base_ms: float) -> str:
    lines = ["| group | variant | median ms | vs shipped | first call s | rel. err vs shipped | status |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        ms = r.get("median_ms")
        speed = f"{base_ms / ms:.2f}x" if ms else "-"
        err = r.get("rel_err_vs_shipped")
        lines.append(f"| {r['group']} | {r['variant']} | {ms if ms is not None else '-'} | {speed} | "
                     f"{r.get('first_call_s', '-')} | {'-' if err is None else f'{err:.1e}'} | {r['status']} |")
    return "\n".join(lines)


def _kernel_table(prof: dict[str, dict[str, float]]) -> str:
    names = list(dict.fromkeys(k for p in prof.values() for k in p))
    lines = ["| kernel | " + " | ".join(f"{k} us" for k in prof) + " |", "|---|" + "---:|" * len(prof)]
    for n in names:
        lines.append(f"| `{n[:60]}` | " + " | ".join(str(p.get(n, "-")) for p in prof.values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mnist-doubling")
    p.add_argument("--batch", type=int, default=None, help="default: the preset's batch (tiny: 2)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "tf32", "fp32"))
    p.add_argument("--only", nargs="+", choices=("post", "main", "ckpt", "small", "wgrad"), help="only these groups")
    p.add_argument("--reps", type=int, default=5, help="timed repeats per variant (after one warm-up)")
    p.add_argument("--time-budget", type=float, default=240.0, help="seconds; variants not started by then skip")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="CPU dry run: tiny sizes, interpreter, two variants")
    p.add_argument("--out", type=Path, default=None, help="folder for tune.json and tune.md")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the torch.profiler split of the shipped and the combined run into kernels")
    args = p.parse_args(argv)
    if args.tiny:
        from fastnca.kernels import use_interpreter

        use_interpreter()  # the dry run without a GPU: the interpreter, chosen before the kernels are imported
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("tune: no CUDA device (use --tiny --device cpu for the dry run)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    from fastnca.config import get_preset

    batch = args.batch or (2 if args.tiny else get_preset(args.preset).batch_size)
    bench = Bench(args.preset, batch, args.precision, device, args.tiny)
    variants = [v for v in VARIANTS if not args.only or v[0] in args.only]
    if args.tiny:  # one per kind of patch: the code path, not a sweep
        variants = [v for v in variants if v[1] in ("splits >= 16384", "hidden chunk 64",
                                                    "small-grid off (forward too)", "batched, 4 warps")]
        args.reps = 1
    shipped, ref = _measure(bench, "shipped", "-", {}, None, args.reps)
    base = shipped.get("median_ms") or float("nan")
    print(f"tune: {args.preset} B={batch} {args.precision} on {device}: shipped {base} ms "
          f"(first call {shipped.get('first_call_s')} s)", flush=True)
    rows: list[dict[str, Any]] = []
    prof: dict[str, dict[str, float]] = {}
    doc = {"preset": args.preset, "batch": batch, "precision": args.precision, "reps": args.reps, "shipped": shipped,
           "rows": rows, "combined": {}, "kernels": prof}
    if args.out:
        from benchmarks.utils import env_info

        doc["env"] = env_info(device)
    title = f"# Rollout backward sweep: {args.preset}, B = {batch}, {args.precision}, {device}"

    def write() -> str:  # after every row: a run stopped by a timeout keeps what it measured
        md = (f"{title}\n\nShipped configuration: {base} ms per forward + backward (median of {args.reps}).\n\n"
              + _table([shipped] + rows, base) + "\n")
        if prof:
            md += "\n## Kernels (torch.profiler, one call)\n\n" + _kernel_table(prof) + "\n"
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "tune.json").write_text(json.dumps(doc, indent=1, default=str))
            (args.out / "tune.md").write_text(md)
        return md

    write()
    for group, name, changes in variants:
        if time.perf_counter() - start > args.time_budget:
            rows.append({"group": group, "variant": name, "changes": changes, "status": "skipped: time budget"})
            continue
        row, _ = _measure(bench, name, group, changes, ref, args.reps)
        rows.append(row)
        write()
        print(f"tune: {group:5s} {name:48s} {row.get('median_ms', '-')!s:>9} ms  {row['status']}", flush=True)
    combo = _combined(rows, base)
    doc["combined"] = combo
    if combo and time.perf_counter() - start < args.time_budget + 60:
        row, _ = _measure(bench, "best of each group", "combined", combo, ref, args.reps)
        rows.append(row)
        write()
        print(f"tune: combined {combo}: {row.get('median_ms', '-')} ms {row['status']}", flush=True)
    if args.profile:
        prof["shipped"] = _kernels(lambda: bench.run({}), device)
        if combo:
            with _patched(combo):
                prof["combined"] = _kernels(lambda: bench.run(combo), device)
    print(write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
