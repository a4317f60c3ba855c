"""FLOP and byte floors of the NCA step, rollouts and training iterations (the cost model of docs/KERNELS.md).

Usage::

    python -m benchmarks.flops              # the floor table of benchmarks/RESULTS.md, as markdown
    python -m benchmarks.flops --wgrad-k    # the weight-gradient FLOPs grouped by GEMM K, per backward design

Counting rules (a multiply-add is 2 FLOPs; biases and ELUs are ignored, they are < 0.5 % of the total):

* forward FLOPs per cell per step, state |z| = C, hidden h, ``n_blocks`` residual blocks:
  ``2 * (9*C*h + 2*n_blocks*h*h + h*C)`` (3x3 perception conv, two 1x1 convs per block, output 1x1 conv).
  At C = h = 256, n_blocks = 4 that is 2,359,296 FLOPs (docs/PAPER.md: "about 2.36 MFLOP").
* backward: 2x forward (gradient with respect to the input and to the weights), plus one forward of
  recomputation when the step's activations are not kept (checkpointing, or the fused backward under any policy
  but 'none', which the doubling presets' 'auto' resolves to). "Model" FLOPs count forward + backward only, so
  the achieved TFLOP/s of two backends compare like for like; "executed" FLOPs add the recomputation.
* the bytes floor of a step: one read and one write of the state (``2 * C * itemsize`` per cell), plus one
  read of the update network's weights per step; a backward step reads the saved state and the upstream
  gradient and writes the input gradient (``3 * C * itemsize`` per cell) and reads the weights again.
* a rollout's cells: the sum over its steps of ``B * H_t * W_t`` (the grid after the step); the doubling
  schedule has ``M`` steps per stage on a ``seed * 2**k`` grid, k = 0..K.
* the encoder (5x5 convs and one linear layer) is counted in training iterations and IWAE; it is about
  0.4 % of the MNIST doubling model's forward FLOPs.
* weight gradients: one forward's FLOPs per cell (each weight's GEMM ``dW = A^T B`` has the forward product's
  multiply-adds), reduced over cells: a GEMM's K is the cells it sums. The fused backward's 'per-step' design runs
  each step's GEMMs on its own (K = the step's cells); the 'batched' designs run one GEMM per weight over a batch
  of steps (K = the batch's cells; ``RolloutPlan.wgrad_batches``, the batch buffers' cap). :func:`wgrad_k_table`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

__all__ = [
    "step_flops_per_cell",
    "update_params",
    "schedule_grids",
    "rollout_cells",
    "encoder_flops",
    "Cost",
    "step_cost",
    "rollout_cost",
    "train_cost",
    "iwae_cost",
    "floor_table",
    "wgrad_gemm_k",
    "wgrad_k_table",
    "wgrad_ks",
]


def step_flops_per_cell(state_channels: int, hidden_channels: int, n_blocks: int) -> int:
    """Forward FLOPs of one NCA step for one cell: ``2 * (9*C*h + 2*n_blocks*h*h + h*C)``."""
    c, h = state_channels, hidden_channels
    return 2 * (9 * c * h + 2 * n_blocks * h * h + h * c)


def update_params(state_channels: int, hidden_channels: int, n_blocks: int, *, bias: bool = True) -> int:
    """Number of parameters of the update network (weights and biases); with bias, MNIST doubling: 1,182,208."""
    c, h = state_channels, hidden_channels
    n = 9 * c * h + 2 * n_blocks * h * h + h * c
    if bias:
        n += h + 2 * n_blocks * h + (c if n_blocks > 0 else 0)
    return n


def schedule_grids(
    *, doubling: bool, seed_size: int = 2, n_doublings: int = 4, steps_per_stage: int = 8, grid_size: int = 32,
    num_steps: int | None = None,
) -> list[int]:
    """Side of the grid after each step of a rollout (doubling: M steps per stage; else ``num_steps`` steps)."""
    if doubling:
        return [seed_size * 2**k for k in range(n_doublings + 1) for _ in range(steps_per_stage)]
    if num_steps is None:
        raise ValueError("num_steps: a non-doubling rollout needs the number of steps")
    return [grid_size] * num_steps


def rollout_cells(batch: int, grids: list[int]) -> int:
    """Cell updates of a rollout: ``sum_t B * side_t**2``."""
    return batch * sum(s * s for s in grids)


def encoder_flops(image_channels: int, image_size: int, *, channels: int = 32, first_padding: int = 2,
                  latent: int = 256) -> int:
    """Forward FLOPs of the paper's encoder for one image: 5x5 convs (the last 4 with stride 2) and a linear."""
    side = image_size + 2 * first_padding - 4
    total = 2 * image_channels * channels * 25 * side * side
    c = channels
    for _ in range(4):
        side = (side - 1) // 2 + 1
        total += 2 * c * (2 * c) * 25 * side * side
        c *= 2
    total += 2 * (c * side * side) * (2 * latent)
    return total


@dataclass(frozen=True)
class Cost:
    """The work of one timed call.

    Attributes:
        cells: cell updates (sum over steps of B * H * W).
        flops_fwd: forward FLOPs.
        flops_model: forward + backward FLOPs (3x forward when there is a backward), no recomputation.
        flops_executed: flops_model plus recomputed forwards.
        bytes_floor: least device-memory traffic (state in and out per step, weights once per step).
        steps: NCA steps (kernel launches of the fused backend) per call.
    """

    cells: int
    flops_fwd: int
    flops_model: int
    flops_executed: int
    bytes_floor: int
    steps: int

    def floor_s(self, peak_flops: float, peak_bytes_per_s: float) -> float:
        """max(model FLOPs / peak rate, bytes floor / bandwidth): no implementation runs faster."""
        return max(self.flops_model / peak_flops, self.bytes_floor / peak_bytes_per_s)

    def as_dict(self) -> dict[str, int]:
        return {"cells": self.cells, "flops_fwd": self.flops_fwd, "flops_model": self.flops_model,
                "flops_executed": self.flops_executed, "bytes_floor": self.bytes_floor, "steps": self.steps}


def _nca_cost(cells: int, steps: int, c: int, h: int, n_blocks: int, *, itemsize: int, backward: bool,
              recompute: bool) -> Cost:
    fwd = cells * step_flops_per_cell(c, h, n_blocks)
    weight_bytes = update_params(c, h, n_blocks) * itemsize
    bytes_fwd = cells * 2 * c * itemsize + steps * weight_bytes
    if not backward:
        return Cost(cells, fwd, fwd, fwd, bytes_fwd, steps)
    bytes_bwd = cells * 3 * c * itemsize + steps * weight_bytes
    return Cost(cells, fwd, 3 * fwd, 3 * fwd + (fwd if recompute else 0), bytes_fwd + bytes_bwd, steps)


def step_cost(batch: int, side: int, state_channels: int, hidden_channels: int, n_blocks: int, *,
              itemsize: int = 4, backward: bool = False, recompute: bool = False) -> Cost:
    """One step on a ``batch x side x side`` grid (forward, or forward + backward)."""
    return _nca_cost(batch * side * side, 1, state_channels, hidden_channels, n_blocks, itemsize=itemsize,
                     backward=backward, recompute=recompute)


def rollout_cost(cfg, batch: int, num_steps: int | None = None, *, itemsize: int = 4, backward: bool = False,
                 recompute: bool = False, first_steps: int | None = None) -> Cost:
    """A full rollout of the NCA of :class:`fastnca.config.Config` ``cfg`` (forward, or with backward), or its
    ``first_steps`` leading steps."""
    grids = schedule_grids(doubling=cfg.doubling, seed_size=cfg.seed_size, n_doublings=cfg.n_doublings,
                           steps_per_stage=cfg.steps_per_stage, grid_size=cfg.grid_size, num_steps=num_steps)
    grids = grids if first_steps is None else grids[:first_steps]
    return _nca_cost(rollout_cells(batch, grids), len(grids), cfg.state_channels, cfg.hidden_channels,
                     cfg.n_blocks, itemsize=itemsize, backward=backward, recompute=recompute)


def _with_encoder(cost: Cost, enc: int, *, backward: bool) -> Cost:
    k = 3 if backward else 1
    return Cost(cost.cells, cost.flops_fwd + enc, cost.flops_model + k * enc, cost.flops_executed + k * enc,
                cost.bytes_floor, cost.steps)


def train_cost(cfg, batch: int, num_steps: int | None = None, *, itemsize: int = 4, recompute: bool = True) -> Cost:
    """One training iteration: encoder + NCA rollout, forward and backward (the optimizer step is ignored)."""
    nca = rollout_cost(cfg, batch, num_steps, itemsize=itemsize, backward=True, recompute=recompute)
    enc = batch * encoder_flops(cfg.image_channels, cfg.image_size, channels=cfg.enc_channels,
                                first_padding=cfg.enc_first_padding, latent=cfg.state_channels)
    return _with_encoder(nca, enc, backward=True)


def iwae_cost(cfg, batch: int, k: int, num_steps: int | None = None, *, itemsize: int = 4) -> Cost:
    """IWAE evaluation of ``batch`` images with ``k`` samples each: one encoder pass, ``batch * k`` rollouts."""
    nca = rollout_cost(cfg, batch * k, num_steps, itemsize=itemsize)
    enc = batch * encoder_flops(cfg.image_channels, cfg.image_size, channels=cfg.enc_channels,
                                first_padding=cfg.enc_first_padding, latent=cfg.state_channels)
    return _with_encoder(nca, enc, backward=False)


def _gf(x: int) -> str:
    return f"{x / 1e9:,.1f}"


def _mb(x: int) -> str:
    return f"{x / 1e6:,.1f}"


def floor_table() -> str:
    """Markdown table of the benchmark cases at their GPU sizes: cells, FLOPs and byte floors.

    The per-row "floor at 800 TFLOP/s" uses the bf16 matmul rate docs/KERNELS.md quotes for an
    H100; a run measures its own peak and reports fractions of that.
    """
    from fastnca.config import get_preset

    rows: list[tuple[str, Cost, Cost, int]] = []
    c = h = 256
    rows.append(("step fwd (B=32, 64x64, C=h=256, 4 blocks)",
                 step_cost(32, 64, c, h, 4, itemsize=2), step_cost(32, 64, c, h, 4, itemsize=4), 1))
    rows.append(("step fwd+bwd (same; recompute 1 fwd)",
                 step_cost(32, 64, c, h, 4, itemsize=2, backward=True, recompute=True),
                 step_cost(32, 64, c, h, 4, itemsize=4, backward=True, recompute=True), 1))
    for preset, t in (("mnist-doubling", None), ("celeba-doubling", None), ("celeba-nondoubling-256", 64),
                      ("celeba-nondoubling-256", 128)):
        cfg = get_preset(preset)
        name = f"rollout fwd {preset}" + (f" T={t}" if t else "") + f" (B={cfg.batch_size})"
        rows.append((name, rollout_cost(cfg, cfg.batch_size, t, itemsize=2),
                     rollout_cost(cfg, cfg.batch_size, t, itemsize=4), 1))
    # as the fused backend runs them by default (the preset's own rollout plan): the doubling presets keep every
    # step's activations ('auto' -> 'none', no recompute), the non-doubling ones recompute each step
    from fastnca.memory import rollout_plan

    for preset, t in (("mnist-doubling", None), ("celeba-doubling", None), ("celeba-nondoubling-256", 128)):
        cfg = get_preset(preset)
        recompute = not rollout_plan(cfg, t).keeps_activations
        how = "recompute 1 fwd" if recompute else "activations kept, no recompute"
        name = f"train iter {preset}" + (f" T={t}" if t else "") + f" (B={cfg.batch_size}; {how})"
        rows.append((name, train_cost(cfg, cfg.batch_size, t, itemsize=2, recompute=recompute),
                     train_cost(cfg, cfg.batch_size, t, itemsize=4, recompute=recompute), 1))
    cfg = get_preset("mnist-doubling")
    rows.append(("IWAE mnist-doubling (B=8, k=128)", iwae_cost(cfg, 8, 128, itemsize=2),
                 iwae_cost(cfg, 8, 128, itemsize=4), 1))
    out = ["| case | cell updates | GFLOP model (fwd or fwd+bwd) | GFLOP executed | MB floor bf16 | MB floor fp32 "
           "| ms at 800 TFLOP/s |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for name, c16, c32, _ in rows:
        out.append(f"| {name} | {c16.cells:,} | {_gf(c16.flops_model)} | {_gf(c16.flops_executed)} "
                   f"| {_mb(c16.bytes_floor)} | {_mb(c32.bytes_floor)} | {c16.flops_model / 800e12 * 1e3:.3f} |")
    return "\n".join(out)


def wgrad_ks(cfg, batch: int, num_steps: int | None = None, *, wgrad: str, itemsize: int = 2) -> list[int]:
    """The K (cells summed) of the weight-gradient GEMMs of one fused backward of ``cfg``'s rollout, one per step
    ('per-step') or one per batch of steps ('batched', 'batched-cublas': the batches its plan cuts under the
    preset's checkpoint policy; ``itemsize``: the state's bytes, which size the batch buffers), in backward order."""
    from fastnca.kernels.schedule import batch_cell_elems
    from fastnca.memory import rollout_plan

    plan = rollout_plan(cfg, num_steps, wgrad=wgrad)
    side = cfg.seed_size if cfg.doubling else cfg.grid_size
    cells = [batch * h * w for h, w in plan.grids(side, side)]
    if not plan.batched_wgrad:
        return cells[::-1]
    hp = 1 << (cfg.hidden_channels - 1).bit_length()
    elems = batch_cell_elems(cfg.state_channels, hp, cfg.n_blocks, recompute=not plan.keeps_activations)
    return [sum(cells[a:e]) for a, e in plan.wgrad_batches([m * elems * itemsize for m in cells])]


def wgrad_gemm_k(cfg, batch: int, num_steps: int | None = None, *, wgrad: str, itemsize: int = 2) -> dict[int, int]:
    """Weight-gradient FLOPs of one fused backward by GEMM K (:func:`wgrad_ks`): one forward's FLOPs per cell."""
    per_cell = step_flops_per_cell(cfg.state_channels, cfg.hidden_channels, cfg.n_blocks)
    out: dict[int, int] = {}
    for k in wgrad_ks(cfg, batch, num_steps, wgrad=wgrad, itemsize=itemsize):
        out[k] = out.get(k, 0) + k * per_cell
    return dict(sorted(out.items()))


WGRAD_K_CASES = (("mnist-doubling", None), ("celeba-nondoubling-256", 128))
LONG_K = 65_536  # the goal of issue 30: every weight-gradient FLOP of mnist-doubling in a GEMM with K >= 64k cells


def wgrad_k_table() -> str:
    """Markdown: per preset (B = 32, bf16) and backward design, the weight-gradient GFLOP by GEMM K and the share in
    GEMMs with K >= 64k cells."""
    from fastnca.config import get_preset

    out = ["| case | design | GEMM K (cells): GFLOP of weight gradients | share at K >= 64k |", "|---|---|---|---:|"]
    for preset, t in WGRAD_K_CASES:
        cfg = get_preset(preset)
        for design in ("per-step", "batched"):
            by_k = wgrad_gemm_k(cfg, 32, t, wgrad=design)
            total = sum(by_k.values())
            long = sum(v for k, v in by_k.items() if k >= LONG_K)
            counts: dict[int, int] = {}
            for k in wgrad_ks(cfg, 32, t, wgrad=design):
                counts[k] = counts.get(k, 0) + 1
            groups = ", ".join(f"{k:,}{f' (x{counts[k]})' if counts[k] > 1 else ''}: {_gf(v)}"
                               for k, v in by_k.items())
            name = preset + (f" T={t}" if t else "") + " (B=32, bf16)"
            out.append(f"| {name} | {design} | {groups} | {100 * long / total:.1f} % |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    """Print the floor table (markdown), or the weight-gradient FLOPs by GEMM K."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flops", description=__doc__.split("\n")[0])
    parser.add_argument("--wgrad-k", action="store_true",
                        help="the weight-gradient FLOPs grouped by GEMM K, per-step vs batched backward")
    args = parser.parse_args(argv)
    print(wgrad_k_table() if args.wgrad_k else floor_table())


if __name__ == "__main__":
    main()
