"""A whole NCA rollout as one autograd node: ``nca_rollout(state, weights, plan, masks)``.

Layout: states are ``(B, C, H, W)`` at the API and channels-last in memory (``torch.channels_last``, physically
``(B, H, W, C)``), like every kernel of this package. The schedule and the checkpoint policy come from a
:class:`~fastnca.kernels.schedule.RolloutPlan`; masks are drawn up front (``schedule.draw_masks``).

Forward: the weights are packed once per call (:class:`StepPlan`, inside the op: nothing is cached across calls,
so the op can be captured in a CUDA graph), then one fused forward launch per step; only the inputs of the plan's
``stored_inputs`` steps are kept (one flat buffer, ``_Layout``), the other states live in two ping-pong buffers.
Under the 'none' policy (``RolloutPlan.keeps_activations``) the forward kernels also write every step's activations
(``STORE_ACTS``: the blocks' inputs and ELU outputs, 2 nb + 1 planes of hp per cell) after the stored inputs.

Backward: a reverse walk over the plan's segments. Each segment's inputs are recomputed from its stored input
(one forward launch per step, into a workspace), then per step, last to first:

1. the backward main kernel (``nca_step_bwd._nca_step_bwd_kernel``: recompute on chip, backprop to the per-cell
   buffers; with kept activations ``RECOMPUTE=False``, backprop only, reading y and a where the forward wrote
   them), and
2. :func:`_rollout_bwd_post_kernel`, one launch that runs the state-gradient tiles *and* every weight-gradient
   GEMM tile of the step; the GEMM tiles add their fp32 partials to a per-rollout accumulator (one slot per
   split of the cells, one writer per slot per launch, launches in a fixed order: bitwise deterministic, no
   atomics).

After the last step one ``sum`` over the split slots gives every weight gradient in fp32, cast once to each
weight's dtype. Workspaces (per-cell buffers, state gradients, recomputed states, the accumulator) are allocated
once per call; the host path per step is launches only: two per step in the backward, one in the forward, one more
per recomputed step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .checks import TL_DTYPE, check_inputs
from .launch import fewer_stages, launch_fitting, on_input_device
from .nca_step import (
    fwd_candidates,
    fwd_constexprs,
    fwd_k_major,
    fwd_kernel,
    fwd_kernel_spec,
    fwd_weight_args,
    pack_weights,
)
from .nca_step_bwd import (
    bwd_kernel_specs,
    dstate_constexprs,
    main_candidates,
    main_constexprs,
    main_kernel,
    main_weight_args,
    transposed_conv_weights,
)
from .reference import UpdateWeights
from .schedule import RolloutPlan
from .small_grid import (
    launch_small_fwd,
    samples_per_program,
    small_fwd_kernel_spec,
    small_grid_steps,
)
from .spec import KernelSpec
from .stages import acc_wgrad_1x1_tile, dstate_tile, wgrad_tile
from .tiles import (
    MAX_SPLITS,
    BwdConfig,
    StepConfig,
    bwd_config,
    chunk,
    interpreting,
    post_config,
    small_config,
    split_cells,
    splits,
    step_config,
)
from .utils import k_major
from .wgrad import Batch, batch_cell_elems, launch_batched_wgrad, wgrad_kernel_spec

__all__ = ["StepPlan", "nca_rollout", "post_kernel_spec", "rollout_kernel_specs"]

# --------------------------------------------------------------------------------------------------- kernel
@triton.jit
def _rollout_bwd_post_kernel(
    dpre_ptr,  # (M, HID) perception conv output gradient of the step, compute dtype
    wb_ptr,  # (KS * KS, HID, C_PAD) transposed-conv weights of the state gradient, compute dtype
    gout_ptr,  # (B, H, W, C) upstream gradient of the step's output, compute dtype
    dz_ptr,  # out (B, H_in, W_in, C) gradient of the step's input, compute dtype
    z_ptr,  # (B, H_in, W_in, C) the step's input state (gathered for the perception weight's gradient)
    y_ptr,  # (N_BLOCKS + 1, M, HID) block inputs, then the output conv's input
    a_ptr,  # (N_BLOCKS, M, HID) activations u_i = ELU(a_i) of the blocks
    da_ptr,  # (N_BLOCKS, M, HID) gradients of the pre-activations a_i
    dy_ptr,  # (N_BLOCKS, M, HID) gradients of the blocks' outputs
    g_ptr,  # (M, C) m * grad_out
    acc_ptr,  # (S_MAX, SLOT) fp32 accumulator: per split, [dWp | dbp | dWout | dbout | dW1 | db1 | dW2 | db2]
    M,  # cells of the step's output grid B * H * W
    M_in,  # cells of its input grid
    H,  # output grid height (doubled when DOUBLE)
    W,  # output grid width
    cells_per_split,  # a multiple of BLOCK_CELLS
    S,  # splits of this step's cells (<= S_MAX)
    SLOT,  # fp32 elements per split slot of acc
    n_ds,  # programs of the state gradient
    n_wp,  # programs of the perception weight's GEMM
    n_wo,  # programs of the output weight's GEMM
    n_w1,  # programs of the blocks' first GEMMs (the second ones take the same number)
    C: tl.constexpr,  # |z|
    C_PAD: tl.constexpr,  # |z| rounded up to a power of two
    HID: tl.constexpr,  # h, padded to a power of two
    N_BLOCKS: tl.constexpr,
    DOUBLE: tl.constexpr,  # the step doubles its input first
    INPUT_PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    DS_BLOCK_M: tl.constexpr,  # input cells per state-gradient program
    DS_BLOCK_K: tl.constexpr,  # hidden chunk of the state gradient
    DS_BLOCK_N: tl.constexpr,  # state channels per state-gradient program (C_PAD: all of them)
    DS_KMAJOR: tl.constexpr,  # wb is (KS * KS, C_PAD, HID): K-major for the state gradient's dot (tf32)
    BA_P: tl.constexpr,  # dWp tile rows (over HID)
    BB_P: tl.constexpr,  # dWp tile columns (over C)
    BA_O: tl.constexpr,  # dWout tile rows (over C)
    BB_O: tl.constexpr,  # dWout tile columns (over HID)
    BA_H: tl.constexpr,  # dW1 / dW2 tile edge (over HID)
    BLOCK_CELLS: tl.constexpr,  # cells per step of the GEMMs' reductions
):
    """The state gradient and every weight gradient of one step, accumulated across the rollout's steps.

    Grid: ``(n_ds + n_wp + n_wo + 2 * n_w1,)``, a flat range of programs cut into parts: the first ``n_ds`` run
    the state-gradient tiles (``stages.dstate_tile``: ``dz = S(grad_out + conv3x3^T(dpre))``, ``DS_BLOCK_M``
    input cells x ``DS_BLOCK_N`` state channels each), the others
    one ``(BLOCK_A, BLOCK_B)`` tile of one split of one weight-gradient GEMM (``stages.wgrad_tile``), in the
    order perception (9 taps, B gathered from the input state), output conv, first and second 1x1 of every block.
    Each GEMM tile adds its fp32 partial ``a[cells of s]^T b[cells of s]`` to its slot of ``acc``: one writer per
    slot, launches in order, so the accumulation is deterministic.
    """
    pid = tl.program_id(0)
    if pid < n_ds:
        N_CHUNKS: tl.constexpr = C_PAD // DS_BLOCK_N  # neighbouring programs: one cell tile, its channel chunks
        dstate_tile((pid // N_CHUNKS).to(tl.int64) * DS_BLOCK_M, M_in, (pid % N_CHUNKS) * DS_BLOCK_N, dpre_ptr,
                     wb_ptr, gout_ptr, dz_ptr, H, W, C, C_PAD, HID, DOUBLE, INPUT_PRECISION, INTERP_BF16,
                     DS_BLOCK_M, DS_BLOCK_K, DS_BLOCK_N, DS_BLOCK_N, DS_KMAJOR)
    elif pid < n_ds + n_wp:
        q = pid - n_ds
        GA: tl.constexpr = HID // BA_P
        GTB: tl.constexpr = 9 * (C // BB_P)
        wgrad_tile(q % GA, (q // GA) % GTB, (q // (GA * GTB)).to(tl.int64), dpre_ptr, z_ptr, acc_ptr,
                    acc_ptr + 9 * HID * C, M, H, W, cells_per_split, S, 1, SLOT, SLOT, HID, C, 9, True,
                    1 if DOUBLE else 0, True, INPUT_PRECISION, INTERP_BF16, BA_P, BB_P, BLOCK_CELLS, True, True)
    else:
        acc_wgrad_1x1_tile(pid - n_ds - n_wp, g_ptr, y_ptr, a_ptr, da_ptr, dy_ptr, acc_ptr, M, cells_per_split, S,
                            SLOT, n_wo, n_w1, C, HID, N_BLOCKS, INPUT_PRECISION, INTERP_BF16, BA_O, BB_O, BA_H,
                            BLOCK_CELLS)


# ----------------------------------------------------------------------------------------------------- plan
def _post_constexprs(c: int, hp: int, n_blocks: int, *, double: bool, input_precision: str, interp_bf16: bool,
                     cfg: BwdConfig) -> dict[str, Any]:
    """The post kernel's constexprs: one builder for the launch and the sm_90 fit spec."""
    ds = dstate_constexprs(c, hp, double=double, input_precision=input_precision, interp_bf16=interp_bf16, cfg=cfg)
    return dict(C=c, C_PAD=ds["C_PAD"], HID=hp, N_BLOCKS=n_blocks, DOUBLE=bool(double),
                INPUT_PRECISION=input_precision, INTERP_BF16=interp_bf16, DS_BLOCK_M=ds["BLOCK_M"],
                DS_BLOCK_K=ds["BLOCK_K"], DS_BLOCK_N=min(ds["C_PAD"], cfg.ds_block_n or ds["C_PAD"]),
                DS_KMAJOR=ds["W_KMAJOR"], BA_P=chunk(hp, cfg.wg_block),
                BB_P=chunk(c, cfg.wg_block),
                BA_O=chunk(c, cfg.wg_block), BB_O=chunk(hp, cfg.wg_block), BA_H=chunk(hp, cfg.wg_block),
                BLOCK_CELLS=cfg.wg_block_cells)


@dataclass
class StepPlan:
    """Everything one rollout call's launches share: validated shapes, padded sizes, the packed weights (forward
    and backward), the tiles, and the constexpr builders.

    Built once per ``nca_rollout`` call (forward) and once per backward; never cached across calls.
    """

    weights: UpdateWeights
    dtype: torch.dtype
    input_precision: str
    c: int = field(init=False)
    h: int = field(init=False)
    hp: int = field(init=False)
    nb: int = field(init=False)
    fwd: dict[str, Tensor | None] = field(init=False)

    def __post_init__(self) -> None:
        w = self.weights
        self.c, self.h, self.nb = w.state_channels, w.hidden_channels, w.n_blocks
        self.hp = triton.next_power_of_2(self.h)
        # w3 (9, C, hp), w1 / w2 [blk, k, n], wout (hp, C), fp32 biases; the forward's K-major copies for tf32
        self.fwd = pack_weights(w, self.dtype, k_major=fwd_k_major(self.input_precision))
        self.upcast = interpreting() and self.dtype == torch.bfloat16

    @property
    def key(self) -> tuple[Any, ...]:
        """What the kernels' shared memory depends on besides tiles and flags (``launch.launch_fitting``'s keys)."""
        return self.c, self.h, self.nb, self.dtype, self.input_precision

    def step_config(self, num_cells: int, store_acts: bool = False) -> StepConfig:
        return step_config(self.c, self.h, self.dtype, input_precision=self.input_precision, num_cells=num_cells,
                           store_acts=store_acts)

    def main_config(self, recompute: bool) -> BwdConfig:
        """The backward main kernel's tiles, recomputing the forward or reading the kept activations (n_blocks: the
        main kernel's rows depend on it, as nca_step_bwd launches it and the fit checks it)."""
        return bwd_config(self.c, self.hp, self.dtype, self.input_precision, n_blocks=self.nb, recompute=recompute)

    @property
    def post_config(self) -> BwdConfig:
        return post_config(self.c, self.hp, self.dtype, self.input_precision, n_blocks=self.nb)

    def fwd_constexprs(self, *, double: bool, has_mask: bool, cfg: StepConfig,
                       store_acts: bool = False) -> dict[str, Any]:
        p = self.fwd
        return fwd_constexprs(self.c, self.hp, self.nb, double=double, has_mask=has_mask,
                              has_b3=p["b3"] is not None, has_b1=p["b1"] is not None, has_b2=p["b2"] is not None,
                              has_bout=p["bout"] is not None, input_precision=self.input_precision,
                              upcast_dot=self.upcast, dtype=self.dtype, cfg=cfg, store_acts=store_acts)

    def main_constexprs(self, *, double: bool, has_mask: bool, cfg: BwdConfig, m: int | None = None,
                        recompute: bool = True) -> dict[str, Any]:
        p = self.fwd
        return main_constexprs(self.c, self.hp, self.nb, double=double, has_mask=has_mask,
                                has_b3=p["b3"] is not None, has_b1=p["b1"] is not None, has_b2=p["b2"] is not None,
                                input_precision=self.input_precision, interp_bf16=self.upcast, dtype=self.dtype,
                                cfg=cfg, m=m, recompute=recompute)

    def pack_backward(self, doubles: set[bool]) -> None:
        """The backward's extra operands: W1, W2 untransposed, Wout as (C, hp), the transposed-conv weights."""
        w, dt, hp, c = self.weights, self.dtype, self.hp, self.c
        p = self.fwd
        dev = w.w_perceive.device
        if self.nb:  # the forward's K-major copies where it has them (tf32): the same values
            self.w1 = p["w1k"] if "w1k" in p else p["w1"].transpose(1, 2).contiguous()  # [blk, n, k] = W1[n, k]
            self.w2 = p["w2k"] if "w2k" in p else p["w2"].transpose(1, 2).contiguous()
        self.wout = p["woutk"] if "woutk" in p else p["wout"].t().contiguous()  # (C, hp)
        cp = triton.next_power_of_2(c)
        self.wb = {d: transposed_conv_weights(w.w_perceive, d, dt, hp, cp, k_major(self.input_precision))
                   for d in sorted(doubles)}
        self.zeros_f32 = torch.zeros(max(hp, c), dtype=torch.float32, device=dev)  # absent biases' pointer

    def main_weights(self, consts: dict[str, Any]) -> dict[str, Tensor]:
        """The backward main kernel's weight pointers for its constexprs ``consts`` (after :meth:`pack_backward`):
        each dot's K-major layout where ``W_KMAJOR`` (``nca_step_bwd.main_weight_args``), else the N-major one."""
        p, dummy = self.fwd, self.fwd["w3"]
        names = ("w1_nk", "w1_kn", "w2_nk", "w2_kn")
        blocks = dict(zip(names, (self.w1, p["w1"], self.w2, p["w2"]))) if self.nb else dict.fromkeys(names, dummy)
        kmaj = consts["W_KMAJOR"]
        # w3k comes with the forward's tf32 pack; a config asking for K-major elsewhere (a sweep) transposes here
        w3k = p["w3k"] if "w3k" in p else p["w3"].transpose(1, 2).contiguous() if kmaj else None
        return main_weight_args(kmaj, w3=p["w3"], w3k=w3k, wout_ch=self.wout, wout_hc=p["wout"], **blocks)

    @property
    def slot(self) -> int:
        """fp32 elements of one split's weight-gradient partials (see the post kernel's ``acc_ptr``)."""
        c, hp, nb = self.c, self.hp, self.nb
        return 9 * hp * c + hp + c * hp + c + 2 * nb * (hp * hp + hp)

    def post_constexprs(self, *, double: bool, cfg: BwdConfig) -> dict[str, Any]:
        return _post_constexprs(self.c, self.hp, self.nb, double=double, input_precision=self.input_precision,
                                interp_bf16=self.upcast, cfg=cfg)

    def unpack_grads(self, acc: Tensor) -> list[Tensor | None]:
        """Weight gradients in ``weights.flat()`` order from the fp32 ``(SLOT,)`` sum of the accumulator."""
        c, h, hp, nb, w = self.c, self.h, self.hp, self.nb, self.weights
        parts, o = {}, 0
        for name, n in (("wp", 9 * hp * c), ("bp", hp), ("wo", c * hp), ("bo", c), ("w1", nb * hp * hp),
                        ("b1", nb * hp), ("w2", nb * hp * hp), ("b2", nb * hp)):
            parts[name] = acc[o:o + n]
            o += n

        def like(g: Tensor, t: Tensor | None) -> Tensor | None:
            return None if t is None else g.reshape(t.shape).to(t.dtype)

        dwp = parts["wp"].view(9, hp, c)[:, :h].permute(1, 2, 0).reshape(h, c, 3, 3)  # [3 ky + kx, o, c]
        grads: list[Tensor | None] = [like(dwp, w.w_perceive), like(parts["bp"][:h], w.b_perceive)]
        dw1, dw2 = parts["w1"].view(nb, hp, hp), parts["w2"].view(nb, hp, hp)
        db1, db2 = parts["b1"].view(nb, hp), parts["b2"].view(nb, hp)
        for i, (w1_i, b1_i, w2_i, b2_i) in enumerate(w.blocks):
            grads += [like(dw1[i, :h, :h], w1_i), like(db1[i, :h], b1_i)]
            grads += [like(dw2[i, :h, :h], w2_i), like(db2[i, :h], b2_i)]
        grads += [like(parts["wo"].view(c, hp)[:, :h], w.w_out), like(parts["bo"], w.b_out)]
        return grads


# ------------------------------------------------------------------------------------------------- launches
def _launch_fwd(sp: StepPlan, src: Tensor, dst: Tensor, mask: Tensor | None, double: bool, grid_hw: tuple[int, int],
                batch: int, acts: Tensor | None = None) -> None:
    """One forward step ``src (B, H_in, W_in, C) -> dst (B, H, W, C)``, both channels-last buffers; ``acts``: where
    to keep its activations (``_Layout``), or None."""
    h, w = grid_hw
    m = batch * h * w
    store = acts is not None
    cfg = sp.step_config(m, store_acts=store)
    p = sp.fwd

    def launch(cfg: StepConfig) -> None:
        consts = sp.fwd_constexprs(double=double, has_mask=mask is not None, cfg=cfg, store_acts=store)
        fwd_kernel[(triton.cdiv(m, cfg.block_m),)](
            z_ptr=src, out_ptr=dst, mask_ptr=p["w3"] if mask is None else mask,
            **fwd_weight_args(p, consts["W_KMAJOR"]), acts_ptr=acts if store else dst, M=m, H=h, W=w, **consts,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    launch_fitting(("fwd", cfg, *sp.key, double, mask is not None, store, src.device), cfg, fwd_candidates, launch)


class _Workspace:
    """The backward's buffers, allocated once per backward and sized for its largest step."""

    def __init__(self, sp: StepPlan, m_max: int, state_max: int, n_recompute: int, device: torch.device,
                 recompute: bool = True) -> None:
        dt, hp, nb, c = sp.dtype, sp.hp, sp.nb, sp.c
        m_ya = m_max if recompute else 0  # y and a: only for steps whose main kernel recomputes the forward
        self.y = torch.empty((nb + 1) * m_ya * hp, dtype=dt, device=device)
        self.a = torch.empty(max(nb, 1) * m_ya * hp, dtype=dt, device=device)
        self.da = torch.empty(max(nb, 1) * m_max * hp, dtype=dt, device=device)
        self.dy = torch.empty(max(nb, 1) * m_max * hp, dtype=dt, device=device)
        self.g = torch.empty(m_max * c, dtype=dt, device=device)
        self.dpre = torch.empty(m_max * hp, dtype=dt, device=device)
        self.dz = [torch.empty(state_max, dtype=dt, device=device) for _ in range(2)]
        self.states = torch.empty(max(n_recompute, 0) * state_max, dtype=dt, device=device)
        self.acc = torch.zeros((MAX_SPLITS, sp.slot), dtype=torch.float32, device=device)  # the one fill
        self.state_max = state_max
        self.dtype, self.device = dt, device


def _launch_bwd_step(sp: StepPlan, ws: _Workspace, z: Tensor, gout: Tensor, dz: Tensor, mask: Tensor | None,
                     double: bool, batch: int, grid_hw: tuple[int, int], acts: Tensor | None = None) -> None:
    """The backward of one step: the main kernel, then the post kernel (state gradient + weight-gradient GEMMs
    accumulated into ``ws.acc``). ``z``, ``gout``, ``dz``: channels-last ``(B, H, W, C)`` views of workspaces;
    ``acts``: the step's activations as the forward kept them (the main kernel then recomputes nothing), or None."""
    hh, ww = grid_hw
    m = batch * hh * ww
    hp, nb, c = sp.hp, sp.nb, sp.c
    if acts is None:
        y, a = ws.y[: (nb + 1) * m * hp], ws.a[: max(nb, 1) * m * hp]
    else:  # the forward's planes: y_0 .. y_nb, then u_0 .. u_{nb-1} (none without blocks: a is then not read)
        y, a = acts[: (nb + 1) * m * hp], acts[(nb + 1) * m * hp if nb else 0:]
    bufs = _StepBuffers(y, a, ws.da[: max(nb, 1) * m * hp], ws.dy[: max(nb, 1) * m * hp], ws.g[: m * c],
                        ws.dpre[: m * hp])
    _launch_main(sp, z, gout, mask, double, batch, grid_hw, bufs, recompute=acts is None)
    _launch_post(sp, z, gout, dz, double, batch, grid_hw, bufs, ws.acc)


@dataclass
class _StepBuffers:
    """One step's per-cell buffers (flat views): y_0 .. y_nb, u_i, da_i, dy_{i+1} as (planes, m, hp), g, dpre."""

    y: Tensor
    a: Tensor
    da: Tensor
    dy: Tensor
    g: Tensor
    dpre: Tensor


def _launch_main(sp: StepPlan, z: Tensor, gout: Tensor, mask: Tensor | None, double: bool, batch: int,
                 grid_hw: tuple[int, int], bufs: _StepBuffers, *, recompute: bool) -> None:
    """The backward main kernel of one step: backprop from ``gout`` to the step's per-cell buffers ``bufs``
    (recomputing y and a into them, or reading the forward's there)."""
    cfg = sp.main_config(recompute=recompute)
    hh, ww = grid_hw
    m = batch * hh * ww
    p = sp.fwd
    zf = sp.zeros_f32
    has_mask = mask is not None

    def main(cfg: BwdConfig) -> None:
        mconsts = sp.main_constexprs(double=double, has_mask=has_mask, cfg=cfg, m=m, recompute=recompute)
        main_kernel[(triton.cdiv(m, cfg.block_m),)](
            z_ptr=z, gout_ptr=gout, mask_ptr=z if mask is None else mask,
            **sp.main_weights(mconsts), b3_ptr=p["b3"] if p["b3"] is not None else zf,
            b1_ptr=p["b1"] if p["b1"] is not None else zf, b2_ptr=p["b2"] if p["b2"] is not None else zf,
            y_ptr=bufs.y, a_ptr=bufs.a, da_ptr=bufs.da, dy_ptr=bufs.dy, g_ptr=bufs.g, dpre_ptr=bufs.dpre, M=m, H=hh,
            W=ww, **mconsts, num_warps=cfg.warps, num_stages=cfg.stages,
        )

    launch_fitting(("main", cfg, *sp.key, double, has_mask, recompute, z.device), cfg, main_candidates, main)


def _launch_post(sp: StepPlan, z: Tensor, gout: Tensor, dz: Tensor, double: bool, batch: int,
                 grid_hw: tuple[int, int], bufs: _StepBuffers, acc: Tensor, *, wgrad: bool = True) -> None:
    """The post kernel of one step: its state-gradient tiles (``gout`` and ``bufs.dpre`` to ``dz``) and, with
    ``wgrad``, every weight-gradient GEMM tile of the step, accumulated into ``acc`` (without: the batched designs'
    state-gradient-only launch, the same compiled kernel on a grid of its state-gradient programs)."""
    hh, ww = grid_hw
    m = batch * hh * ww
    h_in, w_in = (hh // 2, ww // 2) if double else (hh, ww)
    m_in = batch * h_in * w_in
    hp, nb, c = sp.hp, sp.nb, sp.c

    def post(pcfg: BwdConfig) -> None:
        consts = sp.post_constexprs(double=double, cfg=pcfg)
        per_split, n_splits = splits(m, pcfg.wg_block_cells, split_cells().post)
        n_ds = triton.cdiv(m_in, consts["DS_BLOCK_M"]) * (consts["C_PAD"] // consts["DS_BLOCK_N"])
        n_wp = (hp // consts["BA_P"]) * 9 * (c // consts["BB_P"]) * n_splits if wgrad else 0
        n_wo = (c // consts["BA_O"]) * (hp // consts["BB_O"]) * n_splits if wgrad else 0
        n_w1 = (hp // consts["BA_H"]) ** 2 * nb * n_splits if wgrad else 0
        _rollout_bwd_post_kernel[(n_ds + n_wp + n_wo + 2 * n_w1,)](
            dpre_ptr=bufs.dpre, wb_ptr=sp.wb[double], gout_ptr=gout, dz_ptr=dz, z_ptr=z, y_ptr=bufs.y, a_ptr=bufs.a,
            da_ptr=bufs.da, dy_ptr=bufs.dy, g_ptr=bufs.g, acc_ptr=acc, M=m, M_in=m_in, H=hh, W=ww,
            cells_per_split=per_split, S=n_splits, SLOT=sp.slot, n_ds=n_ds, n_wp=n_wp, n_wo=n_wo, n_w1=n_w1,
            **consts, num_warps=pcfg.wg_warps, num_stages=pcfg.wg_stages,
        )

    pcfg = sp.post_config
    launch_fitting(("post", pcfg, *sp.key, double, z.device), pcfg, fewer_stages("wg_stages"), post)


# ------------------------------------------------------------------------------------------------- autograd
def _as_u8(mask: Tensor | None, shape: tuple[int, ...]) -> Tensor | None:
    """A ``(B, 1, H, W)`` mask as one byte per cell; a contiguous bool mask is reinterpreted without a copy."""
    if mask is None:
        return None
    if tuple(mask.shape) != shape:
        raise ValueError(f"masks: expected shape {shape}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool and mask.is_contiguous():
        return mask.view(torch.uint8)
    return (mask != 0).to(torch.uint8).contiguous()


def _small_steps(sp: StepPlan, plan: RolloutPlan, height: int, width: int, masks: list[Tensor | None]) -> int:
    """How many leading steps the small-grid kernel runs (0: none): the plan must store every step's input (its
    outputs go straight to the stored states), a tile must fit for these shapes, and the masks be all or none."""
    if plan.stride != 1:
        return 0
    n = small_grid_steps(plan.flags, height, width)
    if not n or small_config(sp.c, sp.h, sp.dtype, input_precision=sp.input_precision,
                             store_acts=plan.keeps_activations) is None:
        return 0
    if len({m is None for m in masks[:n]}) > 1:
        return 0
    return n


def _flat_masks(masks: list[Tensor | None]) -> Tensor | None:
    """Steps' uint8 masks as one flat buffer in step order: the masks themselves when they already lie back to back
    (``schedule.draw_masks`` draws them so), else one concatenation."""
    if masks[0] is None:
        return None
    first = masks[0]
    ptr, total = first.data_ptr(), 0
    for m in masks:
        if m.dtype != first.dtype or not m.is_contiguous() or m.data_ptr() != ptr + total * m.element_size():
            return torch.cat([m.reshape(-1) for m in masks])
        total += m.numel()
    return first.as_strided((total,), (1,), first.storage_offset())  # a view: the masks share one storage


@dataclass
class _Layout:
    """Where the forward keeps what the backward reads, in one flat buffer (``keep``): the inputs of the plan's
    ``stored_inputs`` steps (the seed excepted: the caller owns it), then, where the plan keeps activations
    (``RolloutPlan.keeps_activations``), every step's activation planes in step order: (2 nb + 1) planes of
    (B H_i W_i, hp) per step, y_0 .. y_nb then u_0 .. u_{nb-1}, as ``stages.step_cells`` writes them."""

    sizes: list[int]  # elements of step i's input state (sizes[t]: the output's)
    grids: list[tuple[int, int]]  # the input grid, then every step's output grid
    states: dict[int, int]  # step -> offset of its stored input
    acts: list[int] | None  # step -> offset of its activations (None: the backward recomputes them)
    total: int  # elements of keep

    def state(self, keep: Tensor, i: int, b: int, c: int) -> Tensor:
        """Step ``i``'s stored input, ``(B, H, W, C)``."""
        h, w = self.grids[i]
        return keep[self.states[i]: self.states[i] + self.sizes[i]].view(b, h, w, c)

    def act(self, keep: Tensor, i: int) -> Tensor | None:
        """Step ``i``'s activation planes (flat), or None."""
        if self.acts is None:
            return None
        end = self.acts[i + 1] if i + 1 < len(self.acts) else self.total
        return keep[self.acts[i]: end]


def _layout(plan: RolloutPlan, b: int, c: int, h0: int, w0: int, hp: int, nb: int) -> _Layout:
    """The forward's buffer layout for a ``(B, C, H0, W0)`` seed (one function for the forward, the backward op and
    the fake op, so the three agree)."""
    grids = [(h0, w0)] + plan.grids(h0, w0)
    sizes = [b * h * w * c for h, w in grids]
    states, total = {}, 0
    for i in plan.stored_inputs[1:]:
        states[i] = total
        total += sizes[i]
    acts = None
    if plan.keeps_activations:
        acts = []
        for h, w in grids[1:]:
            acts.append(total)
            total += (2 * nb + 1) * b * h * w * hp
    return _Layout(sizes, grids, states, acts, total)


@dataclass
class _Saved:
    """What the forward leaves to the backward besides the state, ``keep`` and the weights."""

    sp: StepPlan
    layout: _Layout


@on_input_device
def _rollout_forward(state: Tensor, weights: UpdateWeights, plan: RolloutPlan, masks: list[Tensor | None],
                     input_precision: str, small_grid: bool) -> tuple[Tensor, Tensor, _Saved]:
    """The forward of every step: the final state ``(B, H', W', C)`` (channels-last storage), what it keeps for the
    backward (one flat buffer, ``_Layout``) and the rest the backward needs."""
    sp = StepPlan(weights, state.dtype, input_precision)
    b, c, h0, w0 = state.shape
    lay = _layout(plan, b, c, h0, w0, sp.hp, sp.nb)
    grids, sizes = lay.grids[1:], lay.sizes
    z0 = state.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)  # (B, H, W, C) view
    keep = torch.empty(lay.total, dtype=state.dtype, device=state.device)
    state_max = max(sizes)
    ping = [torch.empty(state_max, dtype=state.dtype, device=state.device) for _ in range(2)]
    t = plan.num_steps
    out = torch.empty((b, *grids[-1], c), dtype=state.dtype, device=state.device) if t else z0
    src, which = z0, 0
    store = lay.acts is not None
    n_small = _small_steps(sp, plan, h0, w0, masks) if small_grid else 0
    if n_small:
        # the leading small-grid steps in one launch; their outputs land in keep in step order (every step's
        # input is stored under the plans that take this path), the last one where the next step reads it
        hh, ww = grids[n_small - 1]
        last = out if n_small == t else lay.state(keep, n_small, b, c)
        cfg = small_config(c, sp.h, sp.dtype, input_precision=sp.input_precision, store_acts=store)
        spp = samples_per_program(b, hh * ww, cfg.block_m)
        if interpreting():  # tiles sized to one program's cells at the largest small step
            cfg = small_config(c, sp.h, sp.dtype, input_precision=sp.input_precision, num_cells=spp * hh * ww,
                               store_acts=store)
        flat_masks = _flat_masks(masks[:n_small])

        def launch(cfg: StepConfig) -> None:
            launch_small_fwd(sp.fwd, sp.fwd_constexprs(double=False, has_mask=masks[0] is not None, cfg=cfg,
                                                       store_acts=store), cfg,
                             z0, keep, last, flat_masks, plan.flags[:n_small], b, h0, w0, spp, acts=lay.act(keep, 0))

        # the programs own whole samples (spp): the candidates keep the cells per program
        launch_fitting(("small-fwd", cfg, *sp.key, masks[0] is not None, store, state.device), cfg,
                       lambda k: fwd_candidates(k, keep_cells=True), launch)
        src = last
    for i in range(n_small, t):
        hh, ww = grids[i]
        if i == t - 1:
            dst = out
        elif i + 1 in lay.states:
            dst = lay.state(keep, i + 1, b, c)
        else:
            which = 1 - which if src.data_ptr() == ping[which].data_ptr() else which
            dst = ping[which][: sizes[i + 1]].view(b, hh, ww, c)
        _launch_fwd(sp, src, dst, masks[i], plan.flags[i], (hh, ww), b, lay.act(keep, i))
        src = dst
    return out, keep, _Saved(sp, lay)


@on_input_device
def _rollout_backward(state: Tensor, keep: Tensor, weights: UpdateWeights, plan: RolloutPlan,
                      masks: list[Tensor | None], saved: _Saved,
                      grad_out: Tensor) -> tuple[Tensor, list[Tensor | None]]:
    """The gradients of the state ``(B, C, H, W)`` and of every entry of ``weights.flat()``."""
    sp = saved.sp
    sp.weights = weights
    sp.pack_backward({bool(f) for f in plan.flags})
    b, c = state.shape[:2]
    lay = saved.layout
    grids, sizes = lay.grids, lay.sizes
    z0 = state.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    gout = grad_out.to(state.dtype).permute(0, 2, 3, 1).contiguous()  # (B, H, W, C); no copy if channels-last
    if plan.batched_wgrad:  # its own batch buffers instead of the per-step workspace below
        gout, acc = _backward_batched(sp, plan, masks, lay, z0, keep, gout)
        return gout.permute(0, 3, 1, 2), sp.unpack_grads(acc.sum(0))
    m_max = max(b * h * w for h, w in grids[1:])
    ws = _Workspace(sp, m_max, max(sizes), plan.stride - 1, state.device, recompute=lay.acts is None)
    which = 0
    for start, end in reversed(plan.segments()):
        # the segment's inputs: the stored one, then recomputed ones in the workspace
        inputs = [z0 if start == 0 else lay.state(keep, start, b, c)]
        for j, i in enumerate(range(start, end - 1)):
            hh, ww = grids[i + 1]
            dst = ws.states[j * ws.state_max: j * ws.state_max + sizes[i + 1]].view(b, hh, ww, c)
            _launch_fwd(sp, inputs[-1], dst, masks[i], plan.flags[i], (hh, ww), b)
            inputs.append(dst)
        for i in reversed(range(start, end)):
            h_in, w_in = grids[i]
            dz = ws.dz[which][: sizes[i]].view(b, h_in, w_in, c)
            _launch_bwd_step(sp, ws, inputs[i - start], gout, dz, masks[i], plan.flags[i], b, grids[i + 1],
                             lay.act(keep, i))
            gout, which = dz, 1 - which
    grads = sp.unpack_grads(ws.acc.sum(0))
    return gout.permute(0, 3, 1, 2), grads


def _backward_batched(sp: StepPlan, plan: RolloutPlan, masks: list[Tensor | None], lay: _Layout, z0: Tensor,
                      keep: Tensor, gout: Tensor) -> tuple[Tensor, Tensor]:
    """The 'batched*' designs' backward (``kernels/wgrad.py``): per batch of steps (``plan.wgrad_batches``, last
    first), per step (last first) the main kernel and the post kernel's state-gradient programs, each step's per-cell
    buffers in its region of the batch buffers; then the batch's weight gradients in one launch (or, 'batched-cublas',
    the perception's in one launch and the 1x1 weights' in cuBLAS). Under segment policies a segment's inputs are
    recomputed when its first (last-walked) batch is reached. Returns the gradient of the rollout's input
    ``(B, H0, W0, C)`` and the fp32 accumulator ``(S_MAX, SLOT)``."""
    b, c, hp, nb = z0.shape[0], sp.c, sp.hp, sp.nb
    grids, sizes = lay.grids, lay.sizes
    cells = [b * h * w for h, w in grids[1:]]
    recompute = lay.acts is None
    elems = batch_cell_elems(c, hp, nb, recompute=recompute)
    batches = plan.wgrad_batches([m * elems * sp.dtype.itemsize for m in cells])
    rows = max(sum(cells[a:e]) for a, e in batches)
    ws = _Workspace(sp, 0, max(sizes), plan.stride - 1, z0.device, recompute=False)  # dz, states, acc
    dt, dev = sp.dtype, z0.device
    nbp = max(nb, 1)
    da, dy = (torch.empty(nbp * rows * hp, dtype=dt, device=dev) for _ in range(2))
    g, dpre = torch.empty(rows * c, dtype=dt, device=dev), torch.empty(rows * hp, dtype=dt, device=dev)
    ya = torch.empty((2 * nb + 1) * rows * hp, dtype=dt, device=dev) if recompute else None
    seg_of = {i: (a, e) for a, e in plan.segments() for i in range(a, e)}
    inputs: dict[int, Tensor] = {}  # step -> its input, (B, H, W, C)

    def input_of(i: int) -> Tensor:
        if i == 0:
            return z0
        return lay.state(keep, i, b, c) if i in lay.states else inputs[i]

    which = 0
    for g0, g1 in batches:
        start, end = seg_of[g1 - 1]
        if plan.stride > 1 and g1 == end:  # the segment's recomputed inputs, before its last batch
            inputs.clear()
            for j, i in enumerate(range(start, end - 1)):
                hh, ww = grids[i + 1]
                dst = ws.states[j * ws.state_max: j * ws.state_max + sizes[i + 1]].view(b, hh, ww, c)
                _launch_fwd(sp, input_of(i), dst, masks[i], plan.flags[i], (hh, ww), b)
                inputs[i + 1] = dst
        offs = [sum(cells[g0:i]) for i in range(g0, g1)]
        for i in reversed(range(g0, g1)):
            m, o = cells[i], offs[i - g0]
            if recompute:
                y, a = ya[(2 * nb + 1) * o * hp:], ya[((2 * nb + 1) * o + (nb + 1) * m) * hp:]
            else:
                acts = lay.act(keep, i)
                y, a = acts, acts[(nb + 1) * m * hp if nb else 0:]
            bufs = _StepBuffers(y, a, da[nbp * o * hp:], dy[nbp * o * hp:], g[o * c:], dpre[o * hp:])
            h_in, w_in = grids[i]
            dz = ws.dz[which][: sizes[i]].view(b, h_in, w_in, c)
            _launch_main(sp, input_of(i), gout, masks[i], plan.flags[i], b, grids[i + 1], bufs, recompute=recompute)
            _launch_post(sp, input_of(i), gout, dz, plan.flags[i], b, grids[i + 1], bufs, ws.acc, wgrad=False)
            gout, which = dz, 1 - which
        if g1 - g0 == 1:
            zs, zstride = z0, 0
        elif plan.stride > 1:  # the later inputs are recomputed ones, ws.state_max apart
            zs, zstride = ws.states[(g0 - start) * ws.state_max:], ws.state_max
        else:  # every input stored, back to back in keep
            zs, zstride = keep[lay.states[g0 + 1]:], 0
        bt = Batch(b, grids[g0], plan.flags[g0:g1], cells[g0:g1], input_of(g0), zs, zstride, dpre, g,
                   ya if recompute else keep[lay.acts[g0]:], da, dy)
        launch_batched_wgrad(sp, bt, ws.acc, cublas=plan.wgrad == "batched-cublas")
    return gout, ws.acc


class _RolloutFunction(torch.autograd.Function):
    """``apply(state, plan, masks, input_precision, small_grid, *weights.flat())``; see the module docstring."""

    @staticmethod
    def forward(ctx, state: Tensor, plan: RolloutPlan, masks: list[Tensor | None], input_precision: str,
                small_grid: bool, *flat: Tensor | None) -> Tensor:
        out, keep, saved = _rollout_forward(state, UpdateWeights.from_flat(flat), plan, masks, input_precision,
                                            small_grid)
        ctx.save_for_backward(state, keep, *flat)
        ctx.plan, ctx.masks, ctx.saved = plan, masks, saved  # saved.sp: the packed weights, packed once per call
        return out.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        state, keep, *flat = ctx.saved_tensors
        grad_state, grads = _rollout_backward(state, keep, UpdateWeights.from_flat(flat), ctx.plan, ctx.masks,
                                              ctx.saved, grad_out)
        return (grad_state, None, None, None, None, *grads)


# ------------------------------------------------------------------------------------------- custom op
# ``fastnca::nca_rollout``: the same rollout as an op torch.compile treats as opaque (``fullgraph=True`` traces
# through it; the autograd Function above is what eager code runs). Weights cross the boundary as the present tensors
# of ``UpdateWeights.flat()`` plus a ``bool[]`` of which are present (as ``fastnca::nca_step``); the plan as its
# flags, segment length and policy; masks as a list with one tensor per step, or empty. The forward also returns the
# stored states, which the backward op takes back (a custom op's outputs are its only saved state).
def _op_plan(flags: list[bool], segment: int, policy: str, wgrad: str, wgrad_batch_bytes: int) -> RolloutPlan:
    return RolloutPlan(tuple(bool(f) for f in flags), segment, policy, wgrad, wgrad_batch_bytes)


def _op_weights(tensors: list[Tensor], present: list[bool]) -> UpdateWeights:
    it = iter(tensors)
    return UpdateWeights.from_flat([next(it) if p else None for p in present])


@torch.library.custom_op("fastnca::nca_rollout", mutates_args=())
def _nca_rollout_op(state: Tensor, tensors: list[Tensor], present: list[bool], masks: list[Tensor],
                    flags: list[bool], segment: int, policy: str, wgrad: str, wgrad_batch_bytes: int,
                    input_precision: str, small_grid: bool) -> tuple[Tensor, Tensor]:
    """The rollout's final state (channels-last ``(B, C, H', W')``) and its stored states (flat)."""
    plan = _op_plan(flags, segment, policy, wgrad, wgrad_batch_bytes)
    out, keep, _ = _rollout_forward(state, _op_weights(tensors, present), plan, list(masks) or [None] * len(flags),
                                    input_precision, small_grid)
    out = out.permute(0, 3, 1, 2)
    return (out.clone() if not flags else out), keep  # no steps: a copy, an op's output may not alias its input


@_nca_rollout_op.register_fake
def _nca_rollout_fake(state, tensors, present, masks, flags, segment, policy, wgrad, wgrad_batch_bytes,
                      input_precision, small_grid):
    b, c, h0, w0 = state.shape
    plan = _op_plan(flags, segment, policy, wgrad, wgrad_batch_bytes)
    weights = _op_weights(tensors, present)
    lay = _layout(plan, b, c, h0, w0, triton.next_power_of_2(weights.hidden_channels), weights.n_blocks)
    h, w = lay.grids[-1]
    keep = state.new_empty(lay.total)
    return state.new_empty((b, h, w, c)).permute(0, 3, 1, 2), keep


@torch.library.custom_op("fastnca::nca_rollout_backward", mutates_args=())
def _nca_rollout_bwd_op(state: Tensor, keep: Tensor, tensors: list[Tensor], present: list[bool], masks: list[Tensor],
                        flags: list[bool], segment: int, policy: str, wgrad: str, wgrad_batch_bytes: int,
                        input_precision: str, small_grid: bool, grad_out: Tensor) -> list[Tensor]:
    """``[grad_state, *gradients of the present weights]``."""
    plan = _op_plan(flags, segment, policy, wgrad, wgrad_batch_bytes)
    weights = _op_weights(tensors, present)
    ms = list(masks) or [None] * len(flags)
    # the forward's decisions and packed weights, rebuilt (an op keeps nothing between calls)
    b, c, h0, w0 = state.shape
    sp = StepPlan(weights, state.dtype, input_precision)
    saved = _Saved(sp, _layout(plan, b, c, h0, w0, sp.hp, sp.nb))
    grad_state, grads = _rollout_backward(state, keep, weights, plan, ms, saved, grad_out)
    outs = [grad_state.contiguous(memory_format=torch.channels_last)] + [g for g in grads if g is not None]
    # an op's outputs may not share storage with its inputs or each other: the weight gradients are views of one
    # fp32 sum where a weight is fp32, so those are copied (small: one per weight tensor)
    seen = {t.untyped_storage().data_ptr() for t in (state, keep, grad_out, *tensors, *masks)}
    for i, g in enumerate(outs):
        if g.untyped_storage().data_ptr() in seen:
            outs[i] = g = g.clone()
        seen.add(g.untyped_storage().data_ptr())
    return outs


@_nca_rollout_bwd_op.register_fake
def _nca_rollout_bwd_fake(state, keep, tensors, present, masks, flags, segment, policy, wgrad, wgrad_batch_bytes,
                          input_precision, small_grid, grad_out):
    return [torch.empty_like(state)] + [torch.empty_like(t) for t in tensors]


def _nca_rollout_setup_context(ctx, inputs, output) -> None:
    state, tensors, present, masks, *args = inputs
    ctx.save_for_backward(state, output[1], *tensors, *masks)
    ctx.n_tensors = len(tensors)
    ctx.args = (present, *args)  # flags, segment, policy, wgrad, wgrad_batch_bytes, input_precision, small_grid


def _nca_rollout_backward(ctx, grad_out, grad_keep):
    state, keep, *rest = ctx.saved_tensors
    tensors, masks = rest[: ctx.n_tensors], rest[ctx.n_tensors:]
    present, *args = ctx.args
    grads = _nca_rollout_bwd_op(state, keep, list(tensors), present, list(masks), *args, grad_out)
    return grads[0], list(grads[1:]), None, [None] * len(masks), *[None] * len(args)


_nca_rollout_op.register_autograd(_nca_rollout_backward, setup_context=_nca_rollout_setup_context)


def nca_rollout(
    state: Tensor,
    weights: UpdateWeights,
    plan: RolloutPlan,
    masks: list[Tensor | None] | None = None,
    *,
    input_precision: str = "ieee",
    small_grid: bool = True,
) -> Tensor:
    """Run every step of ``plan`` with the fused kernels, as one autograd node.

    Args:
        state: ``(B, |z|, H, W)`` fp32 or bf16 (channels-last avoids a copy), the rollout's input.
        weights: the update network (fp32 or bf16, cast to the state's dtype); |z| and h multiples of 16 up to 256.
        plan: the schedule and checkpoint policy (``schedule.plan_rollout``).
        masks: per step, ``(B, 1, H', W')`` 0/1 per cell of the step's output grid (bool avoids a copy) or None;
            None for all: every cell updates at every step.
        input_precision: "ieee" or "tf32", for fp32 dots.
        small_grid: run the leading steps on grids of at most ``small_grid.SMALL_GRID_CELLS`` cells per sample in
            one launch (``kernels/small_grid.py``) where the plan stores every step's input; False: one launch per
            step (the fallback, kept for comparison). The backward runs those steps one launch each.

    Returns:
        The final state ``(B, |z|, H', W')`` in the state's dtype, channels-last. Its backward yields the gradients
        of the state and of every weight (fp32 accumulation over all steps, bitwise deterministic).
    """
    masks = [None] * plan.num_steps if masks is None else list(masks)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (state, *weights.flat()))
    if plan.keeps_activations and not needs_grad:  # nothing to backpropagate (IWAE, sampling): keep no activations
        plan = dataclasses.replace(plan, segment=1)
    if len(masks) != plan.num_steps:
        raise ValueError(f"masks: expected {plan.num_steps} (one per step), got {len(masks)}")
    b = state.shape[0]
    grids = plan.grids(state.shape[2], state.shape[3]) if state.dim() == 4 else []
    check_inputs(state, weights, masks[0] if masks else None, plan.flags[0] if plan.flags else False,
                  input_precision)
    masks = [_as_u8(m, (b, 1, h, w)) for m, (h, w) in zip(masks, grids)]
    if torch.compiler.is_compiling():  # the custom op: opaque to torch.compile, so fullgraph=True traces through
        if len({m is None for m in masks}) > 1:
            raise ValueError("masks: under torch.compile, give every step a mask or none (None for all)")
        flat = weights.flat()
        return _nca_rollout_op(state, [t for t in flat if t is not None], [t is not None for t in flat],
                               [m for m in masks if m is not None], list(plan.flags), plan.segment, plan.policy,
                               plan.wgrad, plan.wgrad_batch_bytes, input_precision, bool(small_grid))[0]
    return _RolloutFunction.apply(state, plan, masks, input_precision, bool(small_grid), *weights.flat())


# ------------------------------------------------------------------------------------------------------ fit
def post_kernel_spec(state_channels: int, hidden_channels: int, n_blocks: int, dtype: torch.dtype, *,
                     double: bool = False, input_precision: str = "ieee", cfg: BwdConfig | None = None) -> KernelSpec:
    """The post kernel as ``nca_rollout``'s backward launches it on the GPU (for the sm_90 fit; ``cfg`` overrides
    the shipped tiles)."""
    hp = triton.next_power_of_2(hidden_channels)
    cfg = cfg or post_config(state_channels, hp, dtype, input_precision, n_blocks=n_blocks, interpret=False)
    consts = _post_constexprs(state_channels, hp, n_blocks, double=double, input_precision=input_precision,
                              interp_bf16=False, cfg=cfg)
    ty = TL_DTYPE[dtype]
    ptrs = {n: f"*{ty}" for n in ("dpre_ptr", "wb_ptr", "gout_ptr", "dz_ptr", "z_ptr", "y_ptr", "a_ptr", "da_ptr",
                                   "dy_ptr", "g_ptr")}
    ptrs["acc_ptr"] = "*fp32"
    fn = _rollout_bwd_post_kernel
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in fn.arg_names}
    return KernelSpec("post", fn, sig, consts, cfg.wg_warps, cfg.wg_stages)


def rollout_kernel_specs(state_channels: int, hidden_channels: int, n_blocks: int, dtype: torch.dtype, *,
                         input_precision: str = "ieee") -> list[KernelSpec]:
    """The kernels the rollout adds to the per-step ones: the post kernel, with and without doubling; the forward
    that keeps the activations and the backward main kernel that reads them (the 'none' policy, with doubling and
    masks); the batched designs' weight-gradient kernel (``kernels/wgrad.py``); and the small-grid forward (both ways,
    ``kernels/small_grid.py``) where tiles are known to fit these shapes."""
    specs = [post_kernel_spec(state_channels, hidden_channels, n_blocks, dtype, double=d,
                              input_precision=input_precision)._replace(name=f"post{'-double' if d else ''}")
             for d in (False, True)]
    specs.append(fwd_kernel_spec(state_channels, hidden_channels, n_blocks, dtype, input_precision=input_precision,
                                 double=True, mask=True, store_acts=True))
    specs.append(bwd_kernel_specs(state_channels, hidden_channels, n_blocks, dtype, double=True, mask=True,
                                  input_precision=input_precision, recompute=False)[0]._replace(name="main-stored"))
    specs.append(wgrad_kernel_spec(state_channels, hidden_channels, n_blocks, dtype, input_precision=input_precision))
    if small_config(state_channels, hidden_channels, dtype, input_precision=input_precision, interpret=False):
        specs += [small_fwd_kernel_spec(state_channels, hidden_channels, n_blocks, dtype,
                                        input_precision=input_precision, mask=True, store_acts=st)
                  for st in (False, True)]
    return specs
