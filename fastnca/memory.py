"""A memory model: the predicted peak training memory of a preset under a checkpoint policy.

peak = parameters, gradients and Adam moments (fp32)
     + encoder activations (kept for backward)
     + stored rollout states (what the checkpoint policy keeps) x state bytes
     + the working set of one step's backward (recomputed activations, gradient buffers)
     + the likelihood's activations on the final state.
The pool's own storage (pool_size final states and their images) is reported beside it, not inside it.

It is a model, not a measurement: benchmarks compare it with ``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

import math
from typing import Any

from fastnca.config import Config, get_preset
from fastnca.kernels.schedule import RolloutPlan, batch_cell_elems, plan_rollout, rollout_flags
from fastnca.run import state_dtype

__all__ = ["predict_peak_memory", "rollout_plan", "rollout_state_sizes", "live_at_peak", "GIB"]

_MAX_SPLITS = 32  # split slots of the fused backward's fp32 weight-gradient accumulator (kernels/tiles.py MAX_SPLITS)

GIB = 1024**3


def _param_count(cfg: Config) -> tuple[int, int]:
    """(encoder, NCA) parameter counts, computed from the config without building the model."""
    c0 = cfg.enc_channels
    enc = cfg.image_channels * c0 * 25 + c0
    c = c0
    for _ in range(4):
        enc += c * 2 * c * 25 + 2 * c
        c *= 2
    side = cfg.image_size + 2 * cfg.enc_first_padding - 4
    for _ in range(4):
        side = (side - 1) // 2 + 1
    enc += c * side * side * 2 * cfg.state_channels + 2 * cfg.state_channels
    zc, h, nb = cfg.state_channels, cfg.hidden_channels, cfg.n_blocks
    nca = 9 * zc * h + (h if cfg.bias else 0) + nb * 2 * (h * h + (h if cfg.bias else 0))
    nca += h * zc + (zc if cfg.use_out_bias else 0)
    return enc, nca


def rollout_state_sizes(cfg: Config, num_steps: int | None = None) -> list[int]:
    """Number of cells (per example) of each step's output grid, in rollout order."""
    side = cfg.seed_size if cfg.doubling else cfg.grid_size
    return [h * w for h, w in rollout_plan(cfg, num_steps).grids(side, side)]


def rollout_plan(cfg: Config, num_steps: int | None = None, *, checkpoint: str | None = None,
                 wgrad: str | None = None) -> RolloutPlan:
    """The plan the model runs for this config (the schedule and ``kernels.schedule.plan_rollout`` the model's
    settings use; the plan does not depend on the backend). ``wgrad``: the fused backward's weight-gradient design,
    default the config's."""
    t = cfg.max_steps if num_steps is None else num_steps
    flags = rollout_flags(cfg.doubling, steps_per_stage=cfg.steps_per_stage, n_doublings=cfg.n_doublings,
                          num_steps=None if cfg.doubling else t)
    return plan_rollout(flags, checkpoint or cfg.checkpoint, doubling=cfg.doubling, wgrad=wgrad or cfg.wgrad,
                        wgrad_batch_bytes=cfg.wgrad_batch_mib * 2**20)


def predict_peak_memory(
    cfg: Config | str,
    *,
    checkpoint: str | None = None,
    num_steps: int | None = None,
    backend: str = "triton",
    batch_size: int | None = None,
    wgrad: str | None = None,
) -> dict[str, Any]:
    """Predict the peak memory of one training iteration, in bytes.

    Args:
        cfg: a Config or a preset name.
        checkpoint: the rollout's policy ('none', 'step', 'segments=k', 'auto'); default the config's.
        num_steps: T for non-doubling rollouts (default: max_steps, the worst case).
        backend: 'triton' (the fused rollout: the inputs the policy stores, under 'none' also every step's
            activations, 2 nb + 1 planes of h per cell) or 'torch' (reference ops).
        batch_size: default the config's.
        wgrad: the fused backward's weight-gradient design (``kernels/schedule.py`` WGRADS); default the config's.
            The batched designs replace the per-step working set by their batch buffers (the largest batch's;
            ``RolloutPlan.wgrad_batches``), plus, for 'batched-cublas', two gathered ``(K, hp)`` operands.

    Returns:
        dict with the components (bytes), 'total', 'stored_states' (how many grids the policy keeps at the
        peak), 'pool' (the pool's own storage, reported beside the total) and 'total_gib'.
    """
    if isinstance(cfg, str):
        cfg = get_preset(cfg)
    b = cfg.batch_size if batch_size is None else batch_size
    elem = state_dtype(cfg.precision).itemsize
    zc, h, nb = cfg.state_channels, cfg.hidden_channels, cfg.n_blocks
    sizes = rollout_state_sizes(cfg, num_steps)
    steps = len(sizes)
    policy = checkpoint or cfg.checkpoint
    plan = rollout_plan(cfg, num_steps, checkpoint=policy, wgrad=wgrad)
    seg = plan.segment

    enc_params, nca_params = _param_count(cfg)
    params = 4 * (enc_params + nca_params)
    optimiser = 2 * params  # Adam's two moments
    grads = params

    # Encoder activations saved for backward: input, then each conv's output and its ELU (2 tensors per layer).
    enc_act = b * cfg.image_channels * cfg.image_size**2 * 4
    side, c = cfg.image_size + 2 * cfg.enc_first_padding - 4, cfg.enc_channels
    enc_act += 2 * b * c * side * side * 4
    for _ in range(4):
        side, c = (side - 1) // 2 + 1, 2 * c
        enc_act += 2 * b * c * side * side * 4

    # One step's activations as the reference keeps them for autograd, per cell: input state, perception output,
    # per block conv1 out, ELU out, conv2 out and the residual sum, the output conv and the masked update.
    ref_step_per_cell = (2 * zc + h + (h if nb == 0 else 0) + 4 * h * nb + zc) * elem
    state_cells = [b * n for n in sizes]
    biggest = max(state_cells)
    if backend == "triton":
        # nca_rollout (kernels/rollout.py): the forward keeps the inputs of plan.stored_inputs (the first is the
        # seed, owned by the caller); the backward recomputes one segment's inputs into a workspace and runs each
        # step with per-cell buffers sized for the largest step: (nb + 1) y, a, da, dy (nb each, at least 1),
        # g (C) and dpre (hp) values per cell in the state's dtype, two state gradients, and the fp32
        # weight-gradient accumulator (one slot per split of the cells).
        # Under 'none' (plan.keeps_activations) the forward also keeps every step's activations, (2 nb + 1) planes
        # of hp per cell, and the backward needs no y / a buffers.
        hp = 1 << (h - 1).bit_length()
        seed_cells = b * cfg.seed_size**2 if cfg.doubling else b * cfg.grid_size**2
        cells_in = [seed_cells] + state_cells[:-1]  # step i's input grid
        stored = sum(cells_in[i] for i in plan.stored_inputs[1:]) * elem * zc
        if plan.keeps_activations:
            stored += sum(state_cells) * (2 * nb + 1) * hp * elem
        n_stored = plan.stored_states
        recompute = (plan.stride - 1) * biggest * elem * zc
        ya = (nb + 1) + max(nb, 1) if not plan.keeps_activations else 0
        work = biggest * ((ya + 2 * max(nb, 1)) * hp + zc + hp) * elem + 2 * biggest * zc * elem
        if plan.batched_wgrad:  # kernels/wgrad.py: every cell's buffers of the largest batch of steps, no per-step ones
            step_bytes = [n * batch_cell_elems(zc, hp, nb, recompute=not plan.keeps_activations) * elem
                          for n in state_cells]
            batches = plan.wgrad_batches(step_bytes)
            work = max(sum(step_bytes[a:e]) for a, e in batches) + 2 * biggest * zc * elem
            if plan.wgrad == "batched-cublas":
                work += 2 * max(sum(state_cells[a:e]) for a, e in batches) * hp * elem
        work += _MAX_SPLITS * 4 * (9 * hp * zc + hp + zc * hp + zc + 2 * nb * (hp * hp + hp))
    elif seg == 0:  # the reference keeps every activation
        stored = sum(state_cells) * ref_step_per_cell
        n_stored = steps
        recompute = 0
        work = biggest * 2 * zc * elem
    else:  # the reference under torch.utils.checkpoint: segment inputs, and one segment's steps while recomputing
        n_stored = math.ceil(steps / seg) + (seg if seg > 1 else 0)
        stored = n_stored * biggest * elem * zc
        recompute = biggest * ref_step_per_cell
        work = biggest * 2 * zc * elem
    # the final state's gradient, plus the likelihood's fp32 activations: the reference keeps ~12 per pixel and
    # component; the fused DML likelihood (kernels/likelihood.py, the triton backend) keeps none (it recomputes)
    fused_dml = backend == "triton" and cfg.likelihood == "dml"
    acts = 0 if fused_dml else 12 * 4 * max(1, cfg.n_mix if cfg.likelihood == "dml" else 1)
    final = b * (cfg.output_size**2) * (zc * elem + acts)
    total = params + grads + optimiser + enc_act + stored + recompute + work + final
    pool = cfg.pool_size * (zc * cfg.output_size**2 * elem + cfg.image_channels * cfg.image_size**2)
    return {
        "params": params, "grads": grads, "optimiser": optimiser, "encoder_activations": enc_act,
        "rollout_states": stored, "recompute": recompute, "step_working_set": work, "likelihood": final,
        "total": total, "total_gib": total / GIB, "stored_states": n_stored, "pool": pool, "pool_gib": pool / GIB,
        "policy": policy, "segment": seg, "num_steps": steps, "backend": backend, "wgrad": plan.wgrad,
    }


def live_at_peak(trace: list[dict[str, Any]], top: int = 12) -> tuple[int, list[tuple[int, str]]]:
    """Where the memory is at the peak of a CUDA caching-allocator trace: ``(peak bytes, [(bytes, where), ...])``.

    ``trace`` is ``torch.cuda.memory._snapshot()["device_traces"][device]`` recorded with
    ``torch.cuda.memory._record_memory_history()``: events with ``action`` ("alloc", "free_completed", ...),
    ``addr``, ``size`` and ``frames`` (the Python / C++ stack). The allocations alive at the peak are grouped by
    their innermost frame in fastnca (else the innermost Python frame), largest first, ``top`` of them. Used by the
    GPU test of this model to say what a mismatch is made of.
    """
    live: dict[int, dict[str, Any]] = {}
    cur = peak = 0
    at_peak: list[dict[str, Any]] = []
    for ev in trace:
        action = ev.get("action")
        if action == "alloc":
            live[ev["addr"]] = ev
            cur += ev["size"]
            if cur > peak:
                peak, at_peak = cur, list(live.values())
        elif action == "free_completed" and ev.get("addr") in live:
            cur -= live.pop(ev["addr"])["size"]
    groups: dict[str, int] = {}
    for ev in at_peak:
        frames = ev.get("frames") or []
        py = [f for f in frames if str(f.get("filename", "")).endswith(".py")]
        ours = [f for f in py if "fastnca" in str(f.get("filename", ""))]
        f = (ours or py or frames or [{}])[0]
        where = f"{f.get('filename', '?')}:{f.get('line', '?')} {f.get('name', '')}".strip()
        groups[where] = groups.get(where, 0) + ev["size"]
    return peak, sorted(((b, w) for w, b in groups.items()), reverse=True)[:top]
