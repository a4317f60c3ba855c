"""The model on the fused Triton backend (through the interpreter on the CPU): parity with the reference
backend for a whole training step, and end-to-end training of the small and the headline presets."""

import pytest
import torch

import fastnca
from fastnca.config import get_preset
from fastnca.data import load_for_config
from fastnca.train import Trainer
from tests.utils import assert_close

pytest.importorskip("triton")


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["small", "mnist-nondoubling"])
def test_training_step_matches_the_reference_backend(preset):
    # 16 px images keep the interpreter quick: the fused path at a quarter of the presets' cells
    overrides = dict(state_channels=32, hidden_channels=32, enc_channels=8, p_update=0.5, image_size=16)
    if preset == "small":
        overrides.update(n_doublings=3, steps_per_stage=2)  # 8 steps from 2x2 to 16x16
    else:
        overrides.update(grid_size=16, min_steps=3, max_steps=3)
    ref = fastnca.build_model(preset, backend="torch", **overrides)
    with torch.no_grad():
        ref.nca.update_net.out.weight.normal_(0, 0.05)
    tri = fastnca.build_model(preset, backend="triton", **overrides)
    tri.load_state_dict(ref.state_dict())
    size = ref.config.image_size
    x = (torch.rand(3, 1, size, size) < 0.3).float()
    outs = {}
    for name, model in (("ref", ref), ("tri", tri)):
        out = model(x, generator=torch.Generator().manual_seed(4))
        out["loss"].backward()
        outs[name] = out
    assert_close("loss", outs["ref"]["loss"], outs["tri"]["loss"], rtol=1e-5)
    assert_close("final state", outs["ref"]["state"], outs["tri"]["state"], rtol=1e-5)
    for (name, p_ref), p_tri in zip(ref.named_parameters(), tri.parameters()):
        assert_close(f"grad {name}", p_ref.grad, p_tri.grad, rtol=1e-4)


@pytest.mark.data("mnist")
@pytest.mark.slow
def test_small_preset_trains_on_the_fused_backend(tmp_path):
    cfg = get_preset("small", backend="triton", batch_size=2, steps_per_stage=1, iterations=2)
    trainer = Trainer(cfg, tmp_path, splits=load_for_config(cfg), progress=False, final_outputs=False)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    stats = [trainer.train_step() for _ in range(2)]
    assert all(torch.isfinite(s).all() for s in stats)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


@pytest.mark.data("celeba")
@pytest.mark.slow
def test_headline_preset_trains_with_pool_and_damage_on_the_fused_path_at_reduced_size(tmp_path):
    # celeba-nondoubling-256 (bf16 state, 4 blocks, pool and damage, T ~ U{64..128}) shrunk to fit the interpreter
    cfg = get_preset("celeba-nondoubling-256", backend="triton", state_channels=32, hidden_channels=32,
                     enc_channels=8, image_size=8, grid_size=8, min_steps=2, max_steps=3, batch_size=4,
                     pool_size=6, damage_size=3)
    assert cfg.precision == "bf16" and cfg.n_blocks == 4
    trainer = Trainer(cfg, tmp_path, splits=load_for_config(cfg), progress=False, final_outputs=False)
    assert trainer.model.nca.state_dtype == torch.bfloat16
    stats = [trainer.train_step() for _ in range(3)]
    assert all(torch.isfinite(s).all() for s in stats), f"expected finite training statistics, got {stats}"
    assert len(trainer.pool) == 6, "expected the pool to be full after 3 steps of 4 states"
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainer.model.parameters())


def test_dml_model_on_the_triton_backend_uses_the_fused_likelihood_and_matches_the_reference(monkeypatch):
    import fastnca.kernels.likelihood as fused

    overrides = dict(state_channels=32, hidden_channels=32, n_blocks=1, enc_channels=4, n_doublings=2, image_size=8,
                     steps_per_stage=1, n_mix=2)
    ref = fastnca.build_model("celeba-doubling", backend="torch", **overrides)
    tri = fastnca.build_model("celeba-doubling", backend="triton", **overrides)
    tri.load_state_dict(ref.state_dict())
    calls = []
    real = fused.dml_log_prob_fused
    monkeypatch.setattr(fused, "dml_log_prob_fused", lambda *a: calls.append(1) or real(*a))
    x = torch.randint(0, 256, (2, 3, 8, 8)).float() * 2 / 255 - 1
    x[0, :, 0, 0], x[1, :, -1, -1] = -1.0, 1.0
    outs = {}
    for name, model in (("ref", ref), ("tri", tri)):
        out = model(x, generator=torch.Generator().manual_seed(3))
        out["loss"].backward()
        outs[name] = out
    assert len(calls) == 1, f"expected the triton model alone to call the fused likelihood once, got {len(calls)}"
    assert_close("recon", outs["ref"]["recon"], outs["tri"]["recon"], rtol=1e-5)
    for (name, p_ref), p_tri in zip(ref.named_parameters(), tri.parameters()):
        assert_close(f"grad {name}", p_ref.grad, p_tri.grad, rtol=1e-4)
    state = outs["ref"]["state"].detach()
    assert torch.equal(ref.log_likelihood(x, state), fastnca.likelihoods.dml_log_prob(x, state, 2)), (
        "expected the torch backend to use the reference likelihood unchanged")
    bounds = [m.iwae(x, k=3, generator=torch.Generator().manual_seed(5)) for m in (ref, tri)]
    assert len(calls) == 2, f"expected the IWAE (one chunk) to call the fused likelihood once more, got {len(calls)}"
    assert_close("iwae", bounds[0], bounds[1], rtol=1e-5)
