"""The memory model: the policies' ordering, sub-linear growth in T, and the headline goals' predictions."""

import pytest
import torch

import fastnca
from fastnca.config import get_preset
from fastnca.memory import GIB, live_at_peak, predict_peak_memory


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
    per_step = predict_peak_memory(cfg)
    batched = predict_peak_memory(cfg, wgrad="batched")
    cells = 32 * 8 * (2**2 + 4**2 + 8**2 + 16**2 + 32**2)
    assert cells == 349_184
    acc = 32 * 4 * (9 * 256 * 256 + 256 + 256 * 256 + 256 + 8 * (256 * 256 + 256))
    assert batched["step_working_set"] == cells * (2 * 4 * 256 + 256 + 256) * 2 + 2 * 32 * 32 * 32 * 256 * 2 + acc
    assert batched["total"] - per_step["total"] == batched["step_working_set"] - per_step["step_working_set"]
    cublas = predict_peak_memory(cfg, wgrad="batched-cublas")
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
    predicted = predict_peak_memory(cfg, num_steps=kwargs.get("num_steps"), batch_size=batch)
    ratio = predicted["total"] / measured
    if not 0.9 < ratio < 1.1:
        _, where = live_at_peak(trace)
        parts = "\n".join(f"  {b / 2**20:9.1f} MiB  {w}" for b, w in where)
        model_parts = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in predicted.items()
                                if isinstance(v, int | float) and k not in ("total_gib", "pool_gib", "num_steps"))
        pytest.fail(f"predicted {predicted['total'] / GIB:.2f} GiB, measured {measured / GIB:.2f} GiB\n"
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
