"""A memory model: the predicted peak memory of one training iteration (forward, backward, gradient clipping, Adam).

The peak is the largest of three moments, each the sum of the tensors alive at it (not one sum of everything):

- ``forward``: inside the rollout's forward at its last step: the parameters, Adam's state, the batch, what the
  encoder keeps for its backward, the rollout's input (the seed), what the rollout keeps for its backward under its
  checkpoint policy (``rollout_states``, kept activations and cast weight copies), its final state, and its working
  buffers (the fused forward's two ping-pong states, its packed weights);
- ``backward``: during the rollout's backward: the same, less what the likelihood kept, plus the final state's
  gradient (and its channels-last copy), the backward's working set (``step_working_set``: per-cell buffers,
  recomputed segment inputs under ``recompute``, the fused backward's fp32 weight-gradient accumulator), the
  backward's packed weights and the update network's gradients;
- ``step``: gradient clipping and the Adam step: parameters, gradients, Adam's two moments and step counts, and the
  temporaries of a ``foreach`` (not ``fused``) Adam.

Every moment is a list of tensors, so that on a CUDA device each one can be rounded as the caching allocator
rounds it (:func:`cuda_block_bytes`: ``torch.cuda.max_memory_allocated`` counts blocks, not requested bytes), and
on CUDA the cuBLAS workspace of every stream that ran a cuBLAS call is added (:func:`cublas_workspace_bytes`): the
encoder's linear layer runs in cuBLAS, and the workspace is cached per handle and stream for the process's life.
Under CUDA graphs (``graphs=True``, the trainer's default on CUDA; ``fastnca/graphs.py``) the graph's static input
copy, its static outputs and the workspaces of the warm-up and capture streams are added; the captured iteration's
own allocations come from the graph's private pool and count as allocated only while alive, as eagerly.

What is not modelled: the CUDA context and the allocator's cached (reserved, not allocated) blocks (NVML's number
includes both), cuDNN's per-call workspaces (the encoder's convolutions; they live for one call, outside the peak
moment), Triton's and the launch tuner's own buffers, and the data loader's pinned host memory. The pool's storage
(``pool_size`` final states and their images) is reported beside the total, not inside it.

The reference backend on the CPU is what :class:`LiveStorage` measures (every storage alive at each moment, by its
bytes) and ``tests/model/test_memory.py`` holds the model to it; on a GPU the benchmarks' training rows and the
GPU-marked test compare the model with ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastnca.config import Config, get_preset
from fastnca.kernels.schedule import RolloutPlan, batch_cell_elems, plan_rollout, rollout_flags
from fastnca.run import state_dtype

__all__ = ["predict_peak_memory", "rollout_plan", "rollout_state_sizes", "live_at_peak", "cuda_block_bytes",
           "cublas_workspace_bytes", "LiveStorage", "GIB", "MOMENTS"]

_MAX_SPLITS = 32  # split slots of the fused backward's fp32 weight-gradient accumulator (kernels/tiles.py MAX_SPLITS)

GIB = 1024**3
MOMENTS = ("forward", "backward", "step")

# PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp, the native backend without expandable
# segments or a max_split_size): requests are rounded up to 512 bytes (round_size, kMinBlockSize); requests of at
# most 1 MiB (kSmallSize) come from the small pool's 2 MiB segments, where a block is split whenever at least 512
# bytes remain (should_split); larger ones from the large pool, whose new segments are 20 MiB (kLargeBuffer) for
# requests under 10 MiB (kMinLargeAlloc) and the request rounded up to 2 MiB (kRoundLarge) above that, and a large
# block is split only when more than 1 MiB (kSmallSize) would remain, else the whole block is allocated (and counted
# by memory_allocated).
_MIN_BLOCK = 512
_SMALL_SIZE = 1 << 20
_LARGE_BUFFER = 20 << 20
_MIN_LARGE_ALLOC = 10 << 20
_ROUND_LARGE = 2 << 20


def cuda_block_bytes(nbytes: int) -> int:
    """The bytes ``torch.cuda.memory_allocated`` counts for one allocation of ``nbytes`` (0 for none): the request
    rounded to 512 bytes, or, in the large pool, the whole segment when splitting it would leave 1 MiB or less
    (a fresh segment's size: 20 MiB under 10 MiB, else the request rounded up to 2 MiB). A cached free block that is
    larger than a fresh segment would be can make the block larger still; the model assumes fresh segments."""
    if nbytes <= 0:
        return 0
    size = _MIN_BLOCK * -(-nbytes // _MIN_BLOCK)
    if size <= _SMALL_SIZE:
        return size
    segment = _LARGE_BUFFER if size < _MIN_LARGE_ALLOC else _ROUND_LARGE * -(-size // _ROUND_LARGE)
    return size if segment - size > _SMALL_SIZE else segment


def cublas_workspace_bytes(capability: tuple[int, int] = (9, 0)) -> int:
    """The cuBLAS workspace PyTorch allocates (through the caching allocator) per cuBLAS handle and stream, without
    ``CUBLAS_WORKSPACE_CONFIG`` (aten/src/ATen/cuda/CublasHandlePool.cpp, parseChosenWorkspaceSize): 4096 KiB x 8 =
    32 MiB on sm_90 (Hopper: H100, H200), 4096 KiB x 2 + 16 KiB x 8 elsewhere. cuBLASLt shares it (its unified
    workspace, on by default), so a stream holds one."""
    return 4096 * 8 * 1024 if tuple(capability) == (9, 0) else 4096 * 1024 * 2 + 16 * 1024 * 8


# ------------------------------------------------------------------------------------------------- the config
def _param_numels(cfg: Config) -> tuple[list[int], list[int], list[int]]:
    """(encoder, NCA, NCA weights without biases) parameter tensors' element counts, from the config alone."""
    c0 = cfg.enc_channels
    enc = [cfg.image_channels * c0 * 25, c0]
    c = c0
    for _ in range(4):
        enc += [c * 2 * c * 25, 2 * c]
        c *= 2
    side = cfg.image_size + 2 * cfg.enc_first_padding - 4
    for _ in range(4):
        side = (side - 1) // 2 + 1
    enc += [c * side * side * 2 * cfg.state_channels, 2 * cfg.state_channels]
    zc, h, nb = cfg.state_channels, cfg.hidden_channels, cfg.n_blocks
    weights = [9 * zc * h] + [h * h] * (2 * nb) + [h * zc]
    nca = [9 * zc * h] + ([h] if cfg.bias else [])
    for _ in range(nb):
        nca += [h * h] + ([h] if cfg.bias else []) + [h * h] + ([h] if cfg.bias else [])
    nca += [h * zc] + ([zc] if cfg.use_out_bias else [])
    return enc, nca, weights


def _param_count(cfg: Config) -> tuple[int, int]:
    """(encoder, NCA) parameter counts, computed from the config without building the model."""
    enc, nca, _ = _param_numels(cfg)
    return sum(enc), sum(nca)


def _encoder_sides(cfg: Config) -> list[tuple[int, int]]:
    """(channels, side) of each encoder conv's output."""
    side, c = cfg.image_size + 2 * cfg.enc_first_padding - 4, cfg.enc_channels
    out = [(c, side)]
    for _ in range(4):
        side, c = (side - 1) // 2 + 1, 2 * c
        out.append((c, side))
    return out


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


# --------------------------------------------------------------------------------------------- the reference
def _ref_step_saved(cfg: Config, m: int, elem: int, act_elem: int, *, masked: bool,
                    weight_copies: int) -> list[int]:
    """What autograd keeps of one reference step (``kernels/reference.py``) on ``m`` output cells: the conv's input
    (the step's input state, or its doubled copy), the blocks' inputs y_0 .. y_nb (conv inputs), their
    pre-activations a_i (ELU inputs) and activations u_i (conv inputs); without blocks the perception's output
    (the ELU's input) and its activation; the mask as the update's dtype (``mul`` keeps it); the weights cast to the
    state's dtype (each conv keeps its weight; ``weight_copies`` bytes, 0 when no cast happens)."""
    zc, h, nb = cfg.state_channels, cfg.hidden_channels, cfg.n_blocks
    planes = 2 if nb == 0 else (nb + 1) + 2 * nb
    out = [m * zc * elem] + [m * h * act_elem] * planes
    if masked:
        out.append(m * act_elem)
    if weight_copies:
        out.append(weight_copies)
    return out


def _sum(tensors: list[int], rounded: bool) -> int:
    return sum(cuda_block_bytes(t) for t in tensors) if rounded else sum(tensors)


def predict_peak_memory(
    cfg: Config | str,
    *,
    checkpoint: str | None = None,
    num_steps: int | None = None,
    backend: str = "triton",
    batch_size: int | None = None,
    wgrad: str | None = None,
    device: str = "cuda",
    graphs: bool = False,
    autocast: bool = False,
    optimizer: str = "fused",
    capability: tuple[int, int] = (9, 0),
    warmup_calls: int = 2,
) -> dict[str, Any]:
    """Predict the peak memory of one training iteration, in bytes: the largest of the moments of :data:`MOMENTS`
    (see the module's docstring), not the sum of every term.

    Args:
        cfg: a Config or a preset name.
        checkpoint: the rollout's policy ('none', 'step', 'segments=k', 'auto'); default the config's.
        num_steps: T for non-doubling rollouts (default: max_steps, the worst case).
        backend: 'triton' (the fused rollout: the inputs the policy stores, under 'none' also every step's
            activations, 2 nb + 1 planes of h per cell) or 'torch' (reference ops under autograd).
        batch_size: default the config's.
        wgrad: the fused backward's weight-gradient design (``kernels/schedule.py`` WGRADS); default the config's.
            The batched designs replace the per-step working set by their batch buffers (the largest batch's;
            ``RolloutPlan.wgrad_batches``), plus, for 'batched-cublas', two gathered ``(K, hp)`` operands.
        device: 'cuda' (every tensor rounded to the caching allocator's block, plus the cuBLAS workspaces) or 'cpu'
            (the bytes of the tensors themselves, what :class:`LiveStorage` measures).
        graphs: the iteration captured and replayed as a CUDA graph (``fastnca.graphs.TrainGraph``).
        autocast: the reference under ``torch.autocast(bfloat16)`` with an fp32 state (the benchmarks'
            ``torch-bf16-cl``): convolutions keep bf16 copies of their inputs, bf16 activations, and one bf16 copy
            of every weight (autocast's cache).
        optimizer: 'fused' (the trainer's ``Adam(fused=True)``: step counts on the device, no temporaries),
            'foreach' (``Adam()``'s default on CUDA, as the benchmarks run it: one parameter-sized temporary) or
            'single' (one tensor at a time, ``Adam()``'s default on the CPU: temporaries of one parameter).
        capability: the GPU's compute capability (the cuBLAS workspace's size).
        warmup_calls: under ``graphs``, the eager calls before the capture (each on a new side stream).

    Returns:
        dict with the components (bytes; each the raw bytes of its tensors), ``moments`` (each moment's total as
        counted on ``device``), ``peak_moment``, ``allocator_rounding`` (what the block rule adds at the peak),
        ``cublas_workspace``, ``graph_buffers``, 'total' (the peak), 'stored_states' (how many grids the policy keeps
        at the peak), 'pool' (the pool's own storage, reported beside the total) and 'total_gib'.
    """
    if isinstance(cfg, str):
        cfg = get_preset(cfg)
    cuda = device == "cuda"
    b = cfg.batch_size if batch_size is None else batch_size
    elem = state_dtype(cfg.precision).itemsize
    zc, h, nb = cfg.state_channels, cfg.hidden_channels, cfg.n_blocks
    sizes = rollout_state_sizes(cfg, num_steps)
    steps = len(sizes)
    policy = checkpoint or cfg.checkpoint
    plan = rollout_plan(cfg, num_steps, checkpoint=policy, wgrad=wgrad)
    seg = plan.segment
    fused = backend == "triton"
    autocast = autocast and not fused

    enc_numels, nca_numels, weight_numels = _param_numels(cfg)
    params_t = [4 * n for n in enc_numels + nca_numels]
    params = sum(params_t)
    enc_grads_t = [4 * n for n in enc_numels]
    optimiser_t = params_t + params_t  # Adam's exp_avg and exp_avg_sq
    # Adam's step counts: fused and capturable Adam (CUDA graphs make it capturable) keep one fp32 scalar per
    # parameter on the parameter's device, the others on the host; foreach Adam computes one parameter-sized
    # temporary (the sqrt of exp_avg_sq), one tensor at a time ('single') a parameter's at a time
    if optimizer not in ("fused", "foreach", "single"):
        raise ValueError(f"optimizer: expected 'fused', 'foreach' or 'single', got {optimizer!r}")
    steps_t = [4] * len(params_t) if optimizer == "fused" or graphs else []
    opt_temp_t = list(params_t) if optimizer == "foreach" else []

    # The batch and the encoder's saved activations: the input, then each conv's output (the ELU's input) and its
    # ELU output (the next conv's input); under autocast bf16 outputs and the batch's bf16 copy; the posterior's
    # (B, |z|) tensors (mu / log sigma, the noise, exp(log sigma), exp(2 log sigma), z).
    x_bytes = b * cfg.image_channels * cfg.image_size**2 * 4
    enc_elem = 2 if autocast else 4
    enc_t = [b * cfg.image_channels * cfg.image_size**2 * 2] if autocast else []
    for c, side in _encoder_sides(cfg):
        enc_t += [b * c * side * side * enc_elem] * 2
    enc_t += [b * 2 * zc * 4, b * zc * 4, b * zc * 4, b * zc * 4, b * zc * 4]
    enc_act = sum(enc_t)

    seed_cells = b * (cfg.seed_size**2 if cfg.doubling else cfg.grid_size**2)
    state_cells = [b * n for n in sizes]
    biggest = max(state_cells)
    final_cells = state_cells[-1]
    masked = cfg.p_update < 1.0
    mask_t = [b * sum(sizes)] if masked else []  # the bool update masks, one buffer (kernels/schedule.py draw_masks)
    weight_bytes = sum(weight_numels) * elem
    hp = 1 << (h - 1).bit_length()

    copies_t: list[int] = []  # cast weight copies kept from the forward into the backward
    bwd_copies_t: list[int] = []  # and those the backward adds
    recompute_t: list[int] = []
    if fused:
        # nca_rollout (kernels/rollout.py): the forward keeps the inputs of plan.stored_inputs (the first is the
        # seed, owned by the caller); the backward recomputes one segment's inputs into a workspace and runs each
        # step with per-cell buffers sized for the largest step: (nb + 1) y, a, da, dy (nb each, at least 1),
        # g (C) and dpre (hp) values per cell in the state's dtype, two state gradients, and the fp32
        # weight-gradient accumulator (one slot per split of the cells).
        # Under 'none' (plan.keeps_activations) the forward also keeps every step's activations, (2 nb + 1) planes
        # of hp per cell, and the backward needs no y / a buffers.
        cells_in = [seed_cells] + state_cells[:-1]  # step i's input grid
        stored_t = [sum(cells_in[i] for i in plan.stored_inputs[1:]) * elem * zc]
        if plan.keeps_activations:
            stored_t[0] += sum(state_cells) * (2 * nb + 1) * hp * elem
        stored = sum(stored_t)
        n_stored = plan.stored_states
        recompute = (plan.stride - 1) * biggest * elem * zc
        recompute_t = [recompute]
        ya = (nb + 1) + max(nb, 1) if not plan.keeps_activations else 0
        work_t = [biggest * ya * hp * elem, 2 * biggest * max(nb, 1) * hp * elem, biggest * zc * elem,
                  biggest * hp * elem, biggest * zc * elem, biggest * zc * elem]
        if plan.batched_wgrad:  # kernels/wgrad.py: every cell's buffers of the largest batch of steps, no per-step ones
            step_bytes = [n * batch_cell_elems(zc, hp, nb, recompute=not plan.keeps_activations) * elem
                          for n in state_cells]
            batches = plan.wgrad_batches(step_bytes)
            rows = max(sum(state_cells[a:e]) for a, e in batches)  # the largest batch's cells (and bytes)
            nbp = max(nb, 1)
            work_t = [nbp * rows * hp * elem, nbp * rows * hp * elem, rows * zc * elem, rows * hp * elem]
            if not plan.keeps_activations:
                work_t.append((2 * nb + 1) * rows * hp * elem)
            work_t += [biggest * zc * elem, biggest * zc * elem]
            if plan.wgrad == "batched-cublas":
                work_t.append(2 * rows * hp * elem)
        slot = 9 * hp * zc + hp + zc * hp + zc + 2 * nb * (hp * hp + hp)
        work_t.append(_MAX_SPLITS * 4 * slot)
        # StepPlan's packed weights (kernels/nca_step.py pack_weights): w3 (9, C, hp), w1 / w2 (nb, hp, hp), wout
        # (hp, C) in the state's dtype, biases fp32 (hp each, C for the output's), kept from the forward into the
        # backward; the backward adds W1, W2 and Wout transposed and the transposed-conv weights of each step kind
        # (3x3 taps without doubling, 4x4 with; ``_transposed_conv_weights``) and an fp32 zero vector
        cp = 1 << (zc - 1).bit_length()
        copies_t = [9 * zc * hp * elem, hp * zc * elem] + [nb * hp * hp * elem] * (2 if nb else 0)
        copies_t += [4 * hp] * (1 if cfg.bias else 0) + [4 * nb * hp] * (2 if cfg.bias and nb else 0)
        copies_t += [4 * zc] if cfg.use_out_bias else []
        kinds = sorted({bool(f) for f in plan.flags})
        bwd_copies_t = [nb * hp * hp * elem] * (2 if nb else 0) + [zc * hp * elem]
        bwd_copies_t += [(16 if d else 9) * hp * cp * elem for d in kinds] + [4 * max(hp, zc)]
        fwd_work_t = [biggest * zc * elem] * 2  # the forward's ping-pong states
        nca_grads_t = [4 * slot]  # the accumulator's fp32 sum; the weights' gradients are views of it
    else:
        act_elem = 2 if autocast else elem
        cells_in_all = [seed_cells] + state_cells[:-1]
        in_elem = 2 if autocast else elem  # under autocast the conv keeps the bf16 copy of the fp32 state
        per_step_copy = weight_bytes if (elem != 4 and not autocast) else 0
        saved = [_ref_step_saved(cfg, m, in_elem, act_elem, masked=masked, weight_copies=per_step_copy)
                 for m in state_cells]
        if autocast:
            # autocast's cache: one bf16 copy of every weight (the encoder's and the update network's), which the
            # convolutions and the linear layer keep for their backward
            copies_t = [2 * n for n in enc_numels[0::2] + weight_numels]
        if seg == 0:  # autograd keeps every step's activations
            stored_t = [t for s in saved for t in s]
            n_stored = steps
            recompute_t = []
            work_t = [biggest * h * act_elem] * 2
        else:  # torch.utils.checkpoint: each segment's input (the seed too) and the masks until its backward
            segs = plan.segments()
            cells_in = [seed_cells] + state_cells[:-1]
            stored_t = [cells_in[a] * zc * elem for a, _ in segs] + mask_t
            n_stored = len(segs)
            # the backward walks the segments last first: segment k's backward recomputes its steps and keeps what
            # autograd keeps of them (less its stored input, when its first step does not double it), while the
            # stored inputs of segments 0..k are still alive; its peak is in the backward of its last step's output
            # conv: the gradient of the step's output (|z|), of the masked update (|z|, under a mask, whose float
            # copy ``mul`` kept is then freed) and of the conv's input (h)
            def seg_moment(k: int) -> list[int]:
                a, e = segs[k]
                m = state_cells[e - 1]
                out = [t for i in range(a, e) for t in saved[i]]
                if not plan.flags[a]:
                    out.remove(state_cells[a] * zc * in_elem)
                out += [cells_in[j] * zc * elem for j, _ in segs[:k + 1]]
                out += [m * zc * elem, m * h * act_elem]
                if masked:
                    out.remove(m * act_elem)
                    out.append(m * zc * act_elem)
                if autocast:  # the update's gradient, cast to its bf16
                    out.append(m * zc * act_elem)
                # the update network's gradients: after the last segment's, all of them; in it, the output conv's
                # and the last block's second conv's
                last = [4 * h * zc] + ([4 * zc] if cfg.use_out_bias else [])
                if nb:
                    last += [4 * h * h] + ([4 * h] if cfg.bias else [])
                return out + (last if k == len(segs) - 1 else [4 * n for n in nca_numels])
            seg_peak_t = max((seg_moment(k) for k in range(len(segs))), key=sum)
            recompute_t = []
            work_t = []
        fwd_work_t = []
        nca_grads_t = [4 * n for n in nca_numels]
        act_elem = 2 if autocast else elem
    stored = sum(stored_t)
    recompute = sum(recompute_t)

    # the final state: the likelihood's input (the Bernoulli logits view keeps the whole state in fp32; a cast keeps
    # only its fp32 logits); its gradient, and, where that gradient is not channels-last (the Bernoulli slice's
    # backward), the fused backward's channels-last copy; the reference DML keeps ~12 fp32 values per pixel and
    # component; the fused DML likelihood (kernels/likelihood.py) keeps only its input
    out_elem = 4 if (autocast and cfg.likelihood == "bernoulli") else elem
    final_t = [final_cells * zc * out_elem]
    if cfg.likelihood == "bernoulli":
        lik_t = [final_cells * cfg.image_channels * 4] * (2 if out_elem != 4 else 1)
    elif fused:
        lik_t = [final_cells * cfg.image_channels * 4]
    else:
        lik_t = [final_cells * 12 * 4 * cfg.n_mix]
    lik_grad_t = [final_cells * cfg.image_channels * 4]  # the likelihood's first gradient (its logits' or params')
    grad_final_t = [final_cells * zc * elem] * (2 if fused and cfg.likelihood == "bernoulli" else 1)
    if cfg.likelihood == "bernoulli" and out_elem == 4 and elem != 4:
        grad_final_t.append(final_cells * zc * 4)

    common = [x_bytes] + params_t + optimiser_t + steps_t + enc_t
    if fused:
        forward_t = common + [seed_cells * zc * elem] + stored_t + final_t + fwd_work_t + copies_t + mask_t
        backward_t = (common + [seed_cells * zc * elem] + stored_t + recompute_t + work_t + grad_final_t + copies_t
                      + bwd_copies_t + nca_grads_t + mask_t)
    else:
        # the reference's forward peaks at its last step's residual update: every kept tensor, the new final state
        # and the update f (and f * m under a mask) the add reads
        if seg == 0:  # the update f (or the blocks' v) is the one tensor not kept; f * m too under a mask
            last_t = final_t + [final_cells * max(zc, h) * act_elem] * (2 if masked else 1)
            if autocast:  # the last step's fp32 input (its convolution kept the bf16 copy) is alive until its add
                last_t.append(cells_in_all[-1] * zc * elem)
        else:  # nothing kept inside the last step: its transients peak at y_i, u_i, v_i (y_0, u_0 without blocks)
            last_t = [final_cells * act_elem * max(3 * h if nb else 2 * h, h + zc, 2 * zc)]
            if plan.segments()[-1][1] - plan.segments()[-1][0] > 1:  # the last step's input, inside its segment
                last_t.append(cells_in[-1] * zc * elem)
            last_t += [per_step_copy] if per_step_copy else []
        forward_t = common + stored_t + copies_t + last_t
        if seg == 0:
            # the backward's first node (the likelihood's) makes its input's gradient on top of a set as large as
            # the forward's peak (the final state's gradient then takes the place of the last update f); after it,
            # each node frees the tensors it saved as it makes their gradients
            backward_t = forward_t + lik_grad_t
        else:
            backward_t = common + mask_t + copies_t + seg_peak_t
    moments_t = {
        "forward": forward_t,
        "backward": backward_t,
        "step": [x_bytes] + params_t + optimiser_t + steps_t + enc_grads_t + nca_grads_t + opt_temp_t,
    }
    raw = {k: sum(v) for k, v in moments_t.items()}
    counted = {k: _sum(v, cuda) for k, v in moments_t.items()}
    extra = 0
    cublas = graph_buffers = 0
    if cuda:
        streams = 1 + (warmup_calls + 1 if graphs else 0)  # the eager stream; each warm-up's side stream, the capture's
        cublas = streams * cuda_block_bytes(cublas_workspace_bytes(capability))
        extra += cublas
    if graphs:
        # the static input (the batch's copy) and static outputs (loss, statistics, the final state for pools)
        graph_buffers = _sum([x_bytes] + [4] * 4, cuda)
        extra += graph_buffers
    counted = {k: v + extra for k, v in counted.items()}
    peak_moment = max(counted, key=counted.get)
    total = counted[peak_moment]
    pool = cfg.pool_size * (zc * cfg.output_size**2 * elem + cfg.image_channels * cfg.image_size**2)
    return {
        "params": params, "grads": params, "optimiser": sum(optimiser_t), "adam_steps": sum(steps_t),
        "optimizer_temporaries": sum(opt_temp_t), "encoder_activations": enc_act, "batch": x_bytes,
        "rollout_states": stored, "recompute": recompute, "step_working_set": sum(work_t),
        "weight_copies": sum(copies_t) + sum(bwd_copies_t), "likelihood": sum(lik_t) + sum(final_t),
        "final_grad": sum(grad_final_t), "cublas_workspace": cublas, "graph_buffers": graph_buffers,
        "moments": counted, "peak_moment": peak_moment, "allocator_rounding": counted[peak_moment] - extra
        - raw[peak_moment],
        "total": total, "total_gib": total / GIB, "stored_states": n_stored, "pool": pool, "pool_gib": pool / GIB,
        "policy": policy, "segment": seg, "num_steps": steps, "backend": backend, "wgrad": plan.wgrad,
        "device": device, "graphs": graphs, "autocast": autocast, "optimizer": optimizer, "batch_size": b,
    }


# ------------------------------------------------------------------------------------------- measurements
class LiveStorage(TorchDispatchMode):
    """Measures, on any device, the bytes of the storages alive while it is active: what a memory model predicts,
    without a GPU.

    Every tensor an operator returns while the mode is active is seen (``__torch_dispatch__``, below autograd, so
    the tensors autograd saves and the gradients it makes are seen too); its storage is counted once, by its bytes
    (``untyped_storage().nbytes()``), until the storage is freed (``weakref.finalize`` on the storage, whose Python
    object lives as long as the storage does). Tensors made before the mode (parameters, the batch) are counted from
    :meth:`track`. Kernels' internal temporaries that no operator returns (a native kernel's scratch, Triton's
    launches) are not seen. ``peak`` is the largest sum; :meth:`mark` starts a named phase, and ``phases`` holds
    each phase's peak.

    The fused backend on the CPU runs in Triton's interpreter, whose every launch leaves its arguments' storages in
    a reference cycle (``GridExecutor``'s self-recursive argument-copying closures hold them), alive until Python's
    cyclic collector runs; compiled launches on a GPU hold nothing. Measuring that backend here, call
    ``gc.collect()`` after the backward, or the backward's buffers count into the step
    (``tests/kernels/test_refcycles.py`` checks that the rollout forms no cycle of its own).

    Example::

        with LiveStorage() as live:
            live.track(list(model.parameters()), x)
            model(x)["loss"].backward()
        live.peak
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[int, int]] = {}  # data pointer -> (bytes, registration)
        self.current = 0
        self.peak = 0
        self.phases: dict[str, int] = {}
        self._phase: str | None = None
        self._tokens = itertools.count()

    def track(self, *objs: Any) -> None:
        """Count the storages of these tensors (any nesting of lists, tuples and dicts) from now on."""
        for t in tree_flatten(objs)[0]:
            self._see(t)

    def mark(self, name: str) -> None:
        """End the current phase and start ``name``: ``phases[name]`` is the peak from now to the next mark."""
        self._phase = name
        self.phases[name] = max(self.phases.get(name, 0), self.current)

    def _see(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        s = t.untyped_storage()
        n, ptr = s.nbytes(), s.data_ptr()
        if n == 0:
            return
        old = self.live.get(ptr)
        if old is not None:
            if old[0] != n:  # resized in place
                self.current += n - old[0]
                self.live[ptr] = (n, old[1])
        else:
            token = next(self._tokens)
            self.live[ptr] = (n, token)
            self.current += n
            weakref.finalize(s, self._free, ptr, token)
        if self.current > self.peak:
            self.peak = self.current
        if self._phase is not None and self.current > self.phases[self._phase]:
            self.phases[self._phase] = self.current

    def _free(self, ptr: int, token: int) -> None:
        entry = self.live.get(ptr)
        if entry is not None and entry[1] == token:
            del self.live[ptr]
            self.current -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's signature
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._see(t)
        return out


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

