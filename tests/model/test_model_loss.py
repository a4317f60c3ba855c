"""The trainer trains on the model's own loss: VNCA.forward with the pool hook gives the numbers of the old
trainer-side ELBO bitwise (CPU), and the start_states hook does what it says."""

from __future__ import annotations

import pytest
import torch

from fastnca.config import get_preset
from fastnca.data import Splits
from fastnca.train import Trainer
from fastnca.vae import VNCA
from tests.utils import mnist_slices

pytestmark = pytest.mark.usefixtures("one_thread")  # bitwise comparisons, 2 shared cores

needs_data = pytest.mark.data("mnist")  # the embedded copy when no data directory is set


@pytest.fixture(scope="module")
def mnist_small() -> dict[int, Splits]:
    return mnist_slices(128, 16)


TINY = dict(state_channels=8, hidden_channels=8, enc_channels=4, batch_size=8, iterations=5, log_every=1,
            ckpt_every=1000, eval_every=0, eval_samples=2, eval_batches=1)


def pool_config(**kw):
    """Non-doubling, pool and damage training, a stochastic update mask (every RNG stream in play)."""
    return get_preset("mnist-nondoubling", **{**TINY, "min_steps": 2, "max_steps": 4, "pool_size": 16,
                                              "damage_size": 14, "p_update": 0.5, **kw})


def nondoubling_config(**kw):
    return get_preset("mnist-nondoubling", **{**TINY, "min_steps": 2, "max_steps": 4, "pool_size": 0, **kw})


def doubling_config(**kw):
    return get_preset("small", **{**TINY, "steps_per_stage": 2, "p_update": 0.5, **kw})


def make_trainer(cfg, out, splits) -> Trainer:
    return Trainer(cfg, out, splits=splits[cfg.image_size], progress=False, final_outputs=False,
                   log=lambda msg: None)


def old_loss_terms(tr: Trainer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Trainer.loss_terms as it was before the model's loss got its pool hook (commit a6c9989), verbatim."""
    cfg, model = tr.cfg, tr.model
    x, pool_states, _ = tr.pool_batch(x)
    mu, log_sigma = model.encode(x)
    z = model.sample_posterior(mu, log_sigma, tr.dev_gen)
    num_steps = None if cfg.doubling else model.nca.sample_num_steps(tr.gen)
    if pool_states is None:
        state = model.decode(z, num_steps=num_steps, generator=tr.dev_gen)
    else:
        n_fresh = x.shape[0] - pool_states.shape[0]
        seeds = model.nca.seed(z[:n_fresh])
        start = torch.cat([seeds, pool_states.to(seeds.dtype)])
        state = model.nca.run(start, num_steps, generator=tr.dev_gen)
    recon = model.log_likelihood(x, state)
    kl = model.kl(mu, log_sigma)
    elbo = recon - cfg.beta * kl
    return {"loss": -elbo.mean(), "recon": recon, "kl": kl, "elbo": elbo, "state": state, "x": x}


@needs_data
@pytest.mark.parametrize("make_cfg", [pool_config, nondoubling_config, doubling_config],
                         ids=["nondoubling-pool-damage", "nondoubling", "doubling"])
def test_training_on_the_models_loss_is_bitwise_the_old_trainer_loss(tmp_path, mnist_small, make_cfg):
    cfg = make_cfg()
    new = make_trainer(cfg, tmp_path / "new", mnist_small)
    old = make_trainer(cfg, tmp_path / "old", mnist_small)
    old.loss_terms = lambda x: old_loss_terms(old, x)
    pool_steps = 0
    real_pool_batch = new.pool_batch

    def counting_pool_batch(x):
        nonlocal pool_steps
        out = real_pool_batch(x)
        pool_steps += out[1] is not None
        return out

    new.pool_batch = counting_pool_batch
    for step in range(cfg.iterations):
        s_new, s_old = new.train_step(), old.train_step()
        assert torch.equal(s_new, s_old), f"step {step}: stats {s_new.tolist()} != old trainer's {s_old.tolist()}"
    for (name, p_new), p_old in zip(new.model.named_parameters(), old.model.parameters()):
        assert torch.equal(p_new, p_old), f"{name} differs from the old trainer's after {cfg.iterations} steps"
    assert new.gen.get_state().equal(old.gen.get_state()), "the generators must have drawn the same numbers"
    if cfg.pool_size:
        assert pool_steps >= cfg.iterations - 2, f"expected the pool in use from step 2, used in {pool_steps}"
        assert torch.equal(new.pool.states, old.pool.states) and torch.equal(new.pool.images, old.pool.images)


def test_start_states_continue_the_last_rows_and_seed_the_rest():
    model = VNCA(nondoubling_config(p_update=1.0))  # no update mask: each row's rollout is independent
    model.nca.update_net.out.weight.data.normal_(0, 0.1)  # a non-identity update
    z = torch.randn(5, 8)
    start = torch.randn(2, 8, 28, 28)
    with torch.no_grad():
        out = model.decode(z, num_steps=3, start_states=start)
        fresh = model.decode(z[:3], num_steps=3)
        pooled = model.nca.run(start, 3)
        other_z = model.decode(torch.cat([z[:3], torch.randn(2, 8)]), num_steps=3, start_states=start)
    assert out.shape == (5, 8, 28, 28)
    torch.testing.assert_close(out[:3], fresh, rtol=0, atol=1e-6, msg="the first rows grow from their seeds")
    torch.testing.assert_close(out[3:], pooled, rtol=0, atol=1e-6, msg="the last rows continue from start_states")
    assert torch.equal(out, other_z), "the z of rows with a start state must not reach the decoder"


def test_steps_generator_draws_t_after_the_posterior_sample():
    model = VNCA(nondoubling_config(min_steps=1, max_steps=40))
    x = (torch.rand(2, 1, 28, 28) < 0.5).float()
    seen = []
    real_run = model.nca.run
    model.nca.run = lambda state, schedule, **kw: seen.append(len(schedule)) or real_run(state, schedule, **kw)
    gen = torch.Generator().manual_seed(3)
    model(x, generator=torch.Generator().manual_seed(1), steps_generator=gen)
    expected = int(torch.randint(1, 41, (1,), generator=torch.Generator().manual_seed(3)).item())
    assert seen == [expected], f"expected T={expected} drawn on steps_generator, the rollout ran {seen}"


def test_start_states_are_checked():
    doubling = VNCA(doubling_config())
    with pytest.raises(ValueError, match="start_states.*non-doubling"):
        doubling(torch.zeros(4, 1, 32, 32), start_states=torch.zeros(2, 8, 32, 32))
    model = VNCA(nondoubling_config())
    with pytest.raises(ValueError, match=r"start_states: expected shape \(n <= 4, 8, 28, 28\)"):
        model(torch.zeros(4, 1, 28, 28), start_states=torch.zeros(2, 8, 14, 14))
    with pytest.raises(ValueError, match="start_states: expected shape"):
        model(torch.zeros(4, 1, 28, 28), start_states=torch.zeros(5, 8, 28, 28))


@needs_data
def test_trainer_skips_the_per_step_value_check_that_would_read_back_from_the_device(tmp_path, mnist_small):
    """The model's loss checks image values (one device read-back) unless told not to; the trainer's batches come
    from to_model, so it turns the check off: no host sync per step, and a CUDA graph can capture the step."""
    tr = make_trainer(doubling_config(), tmp_path, mnist_small)
    seen = []
    real = tr.model.check_images

    def recording(x, name="x", *, values=True):
        seen.append(values)
        return real(x, name, values=values)

    tr.model.check_images = recording
    tr.train_step()
    assert seen == [False], f"expected one check_images call without the value check, got values={seen}"
    bad = torch.full((2, 1, 32, 32), 0.5)
    with pytest.raises(ValueError, match=r"\{0, 1\}"):
        tr.model(bad)
    tr.model(bad, check_values=False)  # the caller vouches for the values
