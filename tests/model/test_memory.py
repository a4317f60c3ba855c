"""The memory model: the policies' ordering, sub-linear growth in T, the headline goals' predictions, and the
reference backend's prediction against the peak :class:`fastnca.memory.LiveStorage` measures on the CPU."""

import pytest
import torch

import fastnca
from fastnca.config import get_preset
from fastnca.memory import (
    GIB,
    LiveStorage,
    cublas_workspace_bytes,
    cuda_block_bytes,
    live_at_peak,
    predict_peak_memory,
)


def test_parameter_bytes_match_the_built_model():
    for preset in ("mnist-doubling", "mnist-nondoubling", "celeba-nondoubling-256"):
        n = sum(p.numel() for p in fastnca.build_model(preset).parameters())
        assert predict_peak_memory(preset)["params"] == 4 * n, preset


def test_checkpointing_keeps_fewer_states_than_keeping_everything():
    kw = dict(num_steps=128)
    none = predict_peak_memory("celeba-nondoubling-256", checkpoint="none", backend="torch", **kw)
    step = predict_peak_memory("celeba-nondoubling-256", checkpoint="step", backend="torch", **kw)
    seg = predict_peak_memory("celeba-nondoubling-256", checkpoint="segments=11", **kw)
    assert none["total"] > step["total"] > seg["total"]
    assert none["total"] > 50 * GIB, "the reference without checkpointing needs on the order of 100s of GB here"
    assert seg["stored_states"] == 12 + 10, "expected 12 stored segment inputs and 10 recomputed ones (fused backend)"


def test_memory_grows_sublinearly_with_T_under_the_default_policy():
    small = predict_peak_memory("celeba-nondoubling-256", num_steps=128)
    big = predict_peak_memory("celeba-nondoubling-256", num_steps=1024)
    assert big["rollout_states"] < 4 * small["rollout_states"], "expected ~sqrt(T) growth: 8x steps, < 4x states"
    assert big["total"] <= 8 * GIB and small["total"] <= 6 * GIB
    assert small["pool_gib"] == pytest.approx(1024 * 256 * 62 * 62 * 2 / GIB, rel=0.01)


def test_kept_activations_are_modelled_on_the_fused_backend():
    """'none' on the fused backend: on top of what 'step' keeps (every step's input), 2 nb + 1 planes of the padded h
    per cell of every step, and no y / a buffers in the backward's working set; 'auto' is 'none' for the doubling
    presets."""
    keep = predict_peak_memory("mnist-doubling", checkpoint="none")
    step = predict_peak_memory("mnist-doubling", checkpoint="step")
    cells = 32 * 8 * (2**2 + 4**2 + 8**2 + 16**2 + 32**2)  # B x steps per stage x the five stages' cells
    assert keep["rollout_states"] - step["rollout_states"] == cells * 9 * 256 * 4, "expected 9 fp32 planes of 256"
    biggest = 32 * 32 * 32
    assert step["step_working_set"] - keep["step_working_set"] == biggest * (5 + 4) * 256 * 4, \
        "expected the y (nb + 1) and a (nb) planes of the largest step out of the working set"
    assert predict_peak_memory("mnist-doubling")["total"] == keep["total"]


def test_batched_designs_hold_their_largest_batch_and_keep_celeba_under_6_gb():
    """The batched weight-gradient designs (kernels/wgrad.py): the working set is the largest batch's buffers (da,
    dy, g, dpre per cell; the activations too where the backward recomputes) instead of one step's; mnist-doubling's
    whole rollout is one batch under the 2 GiB cap; celeba-nondoubling-256 (T = 128, B = 32, bf16) takes a batch per
    step (123k cells each) and stays within its 6 GB goal."""
    cfg = get_preset("mnist-doubling", precision="bf16")
    per_step = predict_peak_memory(cfg, device="cpu")
    batched = predict_peak_memory(cfg, wgrad="batched", device="cpu")
    cells = 32 * 8 * (2**2 + 4**2 + 8**2 + 16**2 + 32**2)
    assert cells == 349_184
    acc = 32 * 4 * (9 * 256 * 256 + 256 + 256 * 256 + 256 + 8 * (256 * 256 + 256))
    assert batched["step_working_set"] == cells * (2 * 4 * 256 + 256 + 256) * 2 + 2 * 32 * 32 * 32 * 256 * 2 + acc
    assert batched["total"] - per_step["total"] == batched["step_working_set"] - per_step["step_working_set"]
    cublas = predict_peak_memory(cfg, wgrad="batched-cublas", device="cpu")
    assert cublas["step_working_set"] - batched["step_working_set"] == 2 * cells * 256 * 2, "two (K, hp) operands"
    celeba = get_preset("celeba-nondoubling-256", precision="bf16")
    for w in ("batched", "batched-cublas"):
        pred = predict_peak_memory(celeba, num_steps=128, batch_size=32, wgrad=w)
        assert pred["total"] <= 6e9, f"{w}: expected <= 6 GB, got {pred['total'] / 1e9:.2f} GB"
    assert predict_peak_memory(celeba, num_steps=128, wgrad="batched")["total"] == \
        predict_peak_memory(celeba, num_steps=128)["total"], "one step a batch: the per-step design's buffers"


@pytest.mark.gpu
@pytest.mark.parametrize("preset,batch,kwargs,over", [
    ("celeba-nondoubling-256", 8, {"num_steps": 64}, {}), ("mnist-doubling", 32, {}, {}),
    ("mnist-doubling", 32, {}, {"wgrad": "batched"}), ("celeba-nondoubling-256", 8, {"num_steps": 64},
                                                       {"wgrad": "batched-cublas"})],
    ids=["celeba-nd-256", "mnist-doubling", "mnist-doubling-batched", "celeba-nd-256-batched-cublas"])
def test_prediction_is_within_10_percent_of_the_measured_peak(preset, batch, kwargs, over):
    """The fused rollout op's buffers as modelled, against torch.cuda.max_memory_allocated over training steps
    (Adam and gradient clipping as the Trainer runs them): segments of sqrt(T) steps (non-doubling), and every
    step's activations kept (doubling, 'auto' = 'none'); per-step and batched weight gradients."""
    model = fastnca.build_model(preset, backend="triton", batch_size=batch, **over).cuda()
    cfg = model.config
    opt = torch.optim.Adam(model.parameters(), fused=True)
    x = torch.rand(batch, cfg.image_channels, cfg.image_size, cfg.image_size, device="cuda")
    x = x * 2 - 1 if cfg.likelihood == "dml" else (x < 0.5).float()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    try:
        for _ in range(2):
            model(x, **kwargs)["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
        measured = torch.cuda.max_memory_allocated()
        trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    predicted = predict_peak_memory(cfg, num_steps=kwargs.get("num_steps"), batch_size=batch, device="cuda",
                                    optimizer="fused", capability=torch.cuda.get_device_capability())
    ratio = predicted["total"] / measured
    moments = ", ".join(f"{k} {v / GIB:.3f}" for k, v in predicted["moments"].items())
    print(f"memory {preset} B={batch} {over}: predicted {predicted['total'] / GIB:.3f} GiB ({moments} GiB), "
          f"measured {measured / GIB:.3f} GiB, predicted / measured {ratio:.3f}")
    if not 0.9 < ratio < 1.1:
        _, where = live_at_peak(trace)
        parts = "\n".join(f"  {b / 2**20:9.1f} MiB  {w}" for b, w in where)
        model_parts = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in predicted.items()
                                if isinstance(v, int | float) and k not in ("total_gib", "pool_gib", "num_steps"))
        pytest.fail(f"predicted {predicted['total'] / GIB:.2f} GiB ({moments} GiB), measured {measured / GIB:.2f} GiB\n"
                    f"model: {model_parts}\nlive at the measured peak (recorded trace):\n{parts}")


def test_live_at_peak_replays_an_allocator_trace():
    """The peak of a (synthetic) allocator trace and what is alive at it, grouped by the innermost fastnca frame."""
    def ev(action, addr, size, where):
        return {"action": action, "addr": addr, "size": size,
                "frames": [{"filename": "/x/torch/nn/functional.py", "line": 1, "name": "conv2d"},
                           {"filename": f"/x/fastnca/{where}.py", "line": 7, "name": "f"}]}
    trace = [ev("alloc", 1, 100, "vae"), ev("alloc", 2, 300, "nca"), ev("free_completed", 2, 300, "nca"),
             ev("alloc", 3, 250, "nca"), ev("alloc", 4, 50, "vae"), ev("free_completed", 1, 100, "vae"),
             ev("alloc", 5, 10, "nca")]
    peak, where = live_at_peak(trace)
    assert peak == 400, f"expected the peak of 400 bytes (100 + 300, then 100 + 250 + 50), got {peak}"
    assert where == [(300, "/x/fastnca/nca.py:7 f"), (100, "/x/fastnca/vae.py:7 f")], where


# ------------------------------------------------------------------ the reference backend measured on the CPU
def _measure(overrides: dict, *, iterations: int = 2, autocast: bool = False, optimizer: str = "fused"):
    """Train ``iterations`` iterations of the reference backend on the 'small' preset's shapes (|z| = h = 32, one
    block, B = 2, 32 px) under :class:`LiveStorage`: the peak of each moment and of all, and the model's config."""
    torch.manual_seed(0)
    model = fastnca.build_model("small", backend="torch", batch_size=2, **overrides)
    opt = torch.optim.Adam(model.parameters(), fused=optimizer == "fused", foreach=optimizer == "foreach")
    x = (torch.rand(2, 1, 32, 32) < 0.5).float()
    with LiveStorage() as live:
        live.track(list(model.parameters()), x)
        for _ in range(iterations):  # the second iteration has Adam's state: the steady state
            live.mark("forward")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(x, check_values=False)["loss"]
            live.mark("backward")
            loss.backward()
            del loss
            live.mark("step")
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return live, model.config


# What the model leaves out on the reference backend: the loss's, the KL's and the posterior's (B, |z|) and scalar
# temporaries and clipping's per-tensor norms, a few KiB here against ~5-12 MB in all; 0.5 % is ~25 KB.
REL = 0.005
NONDOUBLING = dict(doubling=False, grid_size=32, min_steps=6, max_steps=6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("policy,overrides", [
    ("none", {}), ("step", {}), ("segments=3", {}),
    ("none", NONDOUBLING), ("step", NONDOUBLING), ("segments=2", dict(NONDOUBLING, p_update=0.5)),
], ids=["doubling-none", "doubling-step", "doubling-segments3", "nondoubling-none", "nondoubling-step",
        "nondoubling-segments2-masked"])
def test_the_cpu_measured_peak_of_a_training_iteration_is_the_models(precision, policy, overrides):
    """Forward, backward, clipping and Adam: the model's peak and each of its moments within 0.5 % of what
    LiveStorage measures (the reference backend keeps what autograd keeps; each term of the model is > 0.5 % of the
    peak in at least one of these cases: kept activations, stored segment inputs and the seed, the recomputed
    segment, the bf16 weight copies per step, the masks, the last step's transients, the gradients)."""
    live, cfg = _measure(dict(overrides, precision=precision, checkpoint=policy))
    pred = predict_peak_memory(cfg, backend="torch", device="cpu")
    for moment in ("forward", "backward", "step"):
        got, want = live.phases[moment], pred["moments"][moment]
        assert want == pytest.approx(got, rel=REL), f"{moment}: predicted {want} bytes, measured {got}"
    assert pred["total"] == pytest.approx(live.peak, rel=REL), \
        f"peak ({pred['peak_moment']}): predicted {pred['total']} bytes, measured {live.peak}"


def test_the_cpu_measured_peak_under_bf16_autocast_is_the_models():
    """The benchmarks' torch-bf16-cl: an fp32 state under torch.autocast; the convolutions keep bf16 copies of their
    inputs and of every weight (autocast's cache). Within 3 %: the backward's casts of the gradients to bf16 are
    modelled for the update only (under 'step' the peak is 1.8 % above the model here)."""
    for policy in ("none", "step"):
        live, cfg = _measure(dict(precision="fp32", checkpoint=policy), autocast=True)
        pred = predict_peak_memory(cfg, backend="torch", device="cpu", autocast=True)
        assert pred["total"] == pytest.approx(live.peak, rel=0.03), (policy, pred["total"], live.peak)
        if policy == "none":  # every step's bf16 copies kept: the fp32 model is 10 % off
            without = predict_peak_memory(cfg, backend="torch", device="cpu")
            assert without["total"] != pytest.approx(live.peak, rel=0.03), "expected autocast's terms to matter"


def test_adam_and_gradients_are_the_step_moment():
    """The step moment is parameters, gradients, Adam's moments and its step counts (fused Adam keeps one fp32
    scalar per parameter on the parameter's device), the batch and the encoder's gradients: measured exactly, up to
    clipping's norms (4 bytes per tensor, and a few scalars: the total norm, the clip coefficient)."""
    live, cfg = _measure(dict(precision="fp32", checkpoint="step"))
    pred = predict_peak_memory(cfg, backend="torch", device="cpu")
    n_tensors = len(list(fastnca.build_model(cfg).parameters()))
    assert pred["adam_steps"] == 4 * n_tensors
    assert 0 <= live.phases["step"] - pred["moments"]["step"] <= 4 * n_tensors + 128, (live.phases["step"], pred)


def test_live_storage_counts_a_storage_once_and_frees_it_with_its_last_view():
    with LiveStorage() as live:
        a = torch.empty(1000)
        v = a[10:]  # a view: the same storage
        b = torch.empty(10, dtype=torch.bfloat16)
        assert live.current == 4000 + 20
        del a
        assert live.current == 4020, "the view keeps the storage"
        del v
        assert live.current == 20
        del b
    assert live.current == 0 and live.peak == 4020


# ------------------------------------------------------------------------------- what only a GPU counts
def test_the_caching_allocators_block_rule():
    """c10/cuda/CUDACachingAllocator.cpp: 512-byte rounding; the large pool gives the whole segment when splitting
    would leave 1 MiB or less (20 MiB segments under 10 MiB, else the request rounded up to 2 MiB)."""
    mib = 1 << 20
    assert [cuda_block_bytes(n) for n in (0, 1, 512, 513, mib)] == [0, 512, 512, 1024, mib]
    assert cuda_block_bytes(mib + 1) == mib + 512, "large pool, split from a 20 MiB segment"
    assert cuda_block_bytes(11 * mib) == 12 * mib, "1 MiB would remain of its 12 MiB segment: not split"
    assert cuda_block_bytes(11 * mib - 512) == 11 * mib - 512, "1 MiB + 512 B would remain: split"
    assert cuda_block_bytes(19 * mib) == 20 * mib


def test_cuda_adds_the_block_rounding_the_cublas_workspace_and_the_graphs_buffers():
    cfg = get_preset("small", backend="triton")
    cpu = predict_peak_memory(cfg, device="cpu")
    cuda = predict_peak_memory(cfg, device="cuda")
    assert cublas_workspace_bytes((9, 0)) == 32 * 2**20 and cublas_workspace_bytes((8, 0)) == 8 * 2**20 + 128 * 1024
    assert cpu["cublas_workspace"] == 0 and cuda["cublas_workspace"] == 32 * 2**20
    assert cuda["peak_moment"] == cpu["peak_moment"]
    assert cuda["allocator_rounding"] > 0 and cpu["allocator_rounding"] == 0
    assert cuda["total"] == cpu["total"] + cuda["allocator_rounding"] + 32 * 2**20
    graphs = predict_peak_memory(cfg, device="cuda", graphs=True, warmup_calls=1)
    # the warm-up's side stream and the capture's stream each get a workspace; the static input copy and outputs
    assert graphs["cublas_workspace"] == 3 * 32 * 2**20
    assert graphs["graph_buffers"] == cuda_block_bytes(32 * 32 * 32 * 4) + 4 * 512
    assert graphs["total"] - cuda["total"] == 2 * 32 * 2**20 + graphs["graph_buffers"]


def test_the_fused_backends_packed_weights_and_gradient_copy_are_in_its_backward():
    """nca_rollout keeps its packed weights (pack_weights) from the forward into the backward, which adds their
    transposes and the transposed-conv weights; the Bernoulli slice's gradient is not channels-last, so the fused
    backward makes a channels-last copy; the foreach Adam's temporaries are in the step moment."""
    cfg = get_preset("mnist-doubling", precision="bf16")
    pred = predict_peak_memory(cfg, device="cpu")
    hp = c = 256
    fwd = (9 * c * hp + hp * c + 2 * 4 * hp * hp) * 2 + 4 * (hp + 2 * 4 * hp + c)
    bwd = (2 * 4 * hp * hp + c * hp) * 2 + (9 + 16) * hp * c * 2 + 4 * hp
    assert pred["weight_copies"] == fwd + bwd
    assert pred["final_grad"] == 2 * 32 * 32 * 32 * c * 2
    foreach = predict_peak_memory(cfg, device="cpu", optimizer="foreach")
    assert foreach["optimizer_temporaries"] == foreach["params"] and foreach["adam_steps"] == 0
    assert foreach["moments"]["step"] - pred["moments"]["step"] == pred["params"] - pred["adam_steps"]


def test_the_peak_is_the_largest_moment_not_the_sum():
    pred = predict_peak_memory("mnist-doubling", device="cpu")
    assert pred["total"] == max(pred["moments"].values()) == pred["moments"][pred["peak_moment"]]
    assert pred["total"] < sum(pred["moments"].values())
