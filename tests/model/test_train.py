"""Trainer bookkeeping: pool and damage, atomic checkpoints, exact resume, non-finite loss, time limit (CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from fastnca import train as train_mod
from fastnca.config import get_preset
from fastnca.data import Splits, load_mnist
from fastnca.train import NonFiniteLossError, Pool, Trainer, damage, damage_masks, save_checkpoint

needs_data = pytest.mark.data("mnist")  # the embedded copy when no data directory is set (tests/conftest.py)


@pytest.fixture(autouse=True)
def _one_thread():
    """Bitwise comparisons and speed: one intra-op thread (2 shared cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def mnist_small() -> dict[int, Splits]:
    """A slice of the real binarized MNIST at 28 and 32 px (256 train, 32 test images)."""
    out = {}
    for size in (28, 32):
        m = load_mnist(image_size=size)
        out[size] = Splits("mnist", m.train[:256].clone(), m.test[:32].clone(), m.source)
    return out


def pool_config(**kw):
    """A tiny non-doubling MNIST model with pool and damage training and a stochastic update mask."""
    base = dict(
        state_channels=8,
        hidden_channels=8,
        enc_channels=4,
        batch_size=8,
        min_steps=2,
        max_steps=3,
        pool_size=16,
        damage_size=14,
        p_update=0.5,
        iterations=4,
        log_every=1,
        ckpt_every=1000,
        eval_every=0,
        eval_samples=2,
        eval_batches=1,
    )
    base.update(kw)
    return get_preset("mnist-nondoubling", **base)


def doubling_config(**kw):
    base = dict(
        state_channels=8,
        hidden_channels=8,
        enc_channels=4,
        steps_per_stage=2,
        batch_size=8,
        iterations=4,
        log_every=1,
        ckpt_every=1000,
        eval_every=0,
        eval_samples=2,
        eval_batches=1,
    )
    base.update(kw)
    return get_preset("small", **base)


def make_trainer(cfg, out, splits, **kw) -> Trainer:
    return Trainer(
        cfg, out, splits=splits[cfg.image_size], progress=False, final_outputs=False, log=lambda msg: None, **kw
    )


# ---------------------------------------------------------------------------------------------- damage and pool
def test_damage_zeroes_one_square_per_example():
    gen = torch.Generator().manual_seed(0)
    states = torch.rand(6, 5, 12, 10) + 0.5  # no zeros before damage
    out = damage(states, 4, generator=gen)
    zero = (out == 0).all(1)  # (6, 12, 10): cells with every channel zeroed
    assert ((out == 0) == zero[:, None]).all(), "a damaged cell has every channel zero"
    for i in range(6):
        rows, cols = zero[i].nonzero(as_tuple=True)
        assert zero[i].sum() == 16 and rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3
    assert torch.equal(out[~zero[:, None].expand_as(out)], states[~zero[:, None].expand_as(out)])
    assert damage_masks(3, 8, 8, 20).sum() == 0, "a square larger than the grid covers all of it"


def test_pool_add_shuffles_and_cuts_to_capacity():
    pool = Pool(5)
    gen = torch.Generator().manual_seed(0)
    for i in range(3):
        imgs = torch.full((3, 1, 4, 4), float(i))
        pool.add(imgs, torch.full((3, 2, 4, 4), float(i), requires_grad=True) * 1, generator=gen)
    assert len(pool) == 5 and pool.images.shape == (5, 1, 4, 4)
    assert not pool.states.requires_grad and pool.states.grad_fn is None
    assert torch.equal(pool.images[:, 0, 0, 0], pool.states[:, 0, 0, 0]), "images stay paired with their states"
    taken_x, taken_s = pool.take(2)
    assert len(pool) == 3 and taken_x.shape[0] == 2 and taken_s.shape[0] == 2


@needs_data
def test_pool_batch_layout_and_damage(tmp_path, mnist_small):
    cfg = pool_config()
    tr = make_trainer(cfg, tmp_path, mnist_small)
    b, n_pool, n_dmg = cfg.batch_size, cfg.batch_size // 2, cfg.batch_size // 4
    x = torch.zeros(b, 1, 28, 28)
    same, states, _ = tr.pool_batch(x)
    assert states is None and same is x, "an empty pool leaves the batch alone"
    # fill the pool with marked entries: image value k, every state cell k + 1 (never zero)
    marks = torch.arange(1, 13, dtype=torch.float32)
    tr.pool.images = marks[:, None, None, None].expand(12, 1, 28, 28).clone()
    tr.pool.states = (marks + 1)[:, None, None, None].expand(12, 8, 28, 28).clone().requires_grad_(True)
    x_out, pool_states, n_damaged = tr.pool_batch(x)
    assert n_damaged == n_dmg and pool_states.shape == (n_pool, 8, 28, 28)
    assert len(tr.pool) == 12 - n_pool, "pool entries are taken out, and come back after the step"
    assert torch.equal(x_out[: b - n_pool], x[: b - n_pool]), "the fresh half comes first"
    assert torch.equal(x_out[b - n_pool :, 0, 0, 0], marks[:n_pool]), "the pool's images form the last half"
    assert not pool_states.requires_grad and pool_states.grad_fn is None, "pool states are detached"
    for i in range(n_pool):
        zero = (pool_states[i] == 0).all(0)
        expected = (marks[i] + 1).expand(8, 28, 28)
        if i < n_dmg:  # the first half of the pool rows is damaged: one 14x14 square, every channel
            assert zero.sum() == cfg.damage_size**2
            assert torch.equal(pool_states[i][:, ~zero], expected[:, ~zero]), "the rest is unchanged"
        else:
            assert torch.equal(pool_states[i], expected), "the second half of the pool rows is undamaged"


@needs_data
def test_train_step_puts_detached_final_states_in_pool(tmp_path, mnist_small):
    cfg = pool_config(iterations=3)
    tr = make_trainer(cfg, tmp_path, mnist_small)
    sizes = []
    for _ in range(3):
        tr.train_step()
        sizes.append(len(tr.pool))
        assert tr.pool.states.grad_fn is None and not tr.pool.states.requires_grad
    # 8, then 8 - 4 taken + 8 = 12, then 12 - 4 + 8 = 16 (the capacity)
    assert sizes == [8, 12, 16]
    assert tr.pool.states.shape == (16, 8, 28, 28) and tr.pool.images.shape == (16, 1, 28, 28)


def test_pool_needs_a_nondoubling_model(tmp_path, mnist_small):
    with pytest.raises(ValueError, match="pool_size.*non-doubling"):
        make_trainer(doubling_config(pool_size=8), tmp_path, mnist_small)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_interrupted_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    good = {"step": 1, "model": {"w": torch.arange(4.0)}, "config": {"lr": 1e-4}}
    save_checkpoint(good, path)
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")  # some bytes reach the temp file, then the writer dies
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(train_mod.torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint({"step": 2, "model": {"w": torch.zeros(4)}}, path)
    monkeypatch.setattr(train_mod.torch, "save", real_save)
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 1 and torch.equal(loaded["model"]["w"], good["model"]["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"], "no temp file is left behind"


def _params(tr: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tr.model.state_dict().items()}


@needs_data
@pytest.mark.parametrize("make_cfg", [pool_config, doubling_config], ids=["nondoubling-pool-damage", "doubling"])
def test_resume_is_bitwise_exact(tmp_path, mnist_small, make_cfg):
    cfg = make_cfg(iterations=4)
    straight = make_trainer(cfg, tmp_path / "straight", mnist_small)
    straight.fit()
    half = make_trainer(cfg.replace(iterations=2), tmp_path / "split", mnist_small)
    half.fit()
    ckpt = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["config"]["iterations"] == 2
    resumed = Trainer.resume(
        tmp_path / "split",
        overrides={"iterations": 4},
        splits=mnist_small[cfg.image_size],
        progress=False,
        final_outputs=False,
        log=lambda msg: None,
    )
    assert resumed.step == 2
    resumed.fit()
    a, b = _params(straight), _params(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), f"parameter {k} differs after resume"
    if cfg.pool_size:
        assert torch.equal(straight.pool.states, resumed.pool.states)
    rows = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    straight_rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight_rows]


@needs_data
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, mnist_small):
    cfg = doubling_config(iterations=6, ckpt_every=2)
    tr = make_trainer(cfg, tmp_path, mnist_small)
    real = tr.model.log_likelihood

    def poisoned(x, state):
        out = real(x, state)
        return out * float("nan") if tr.step >= 2 else out  # the third step's loss is NaN

    tr.model.log_likelihood = poisoned
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 3.*last good checkpoint") as err:
        tr.fit()
    assert err.value.step == 3
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


@needs_data
def test_time_limit_stops_cleanly(tmp_path, mnist_small):
    tr = make_trainer(doubling_config(iterations=1000), tmp_path, mnist_small, time_limit=1e-6)
    summary = tr.fit()
    assert summary["stopped"] == "time_limit" and summary["step"] == 1
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 1 and ckpt["format"] == train_mod.CHECKPOINT_FORMAT
    assert set(ckpt["rng"]) >= {"torch", "numpy", "python", "generators"}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 1 and rows[-1]["split"] == "train"


def test_partial_evaluation_uses_a_fixed_spread_subset():
    """MNIST's test split is sorted by class: a partial evaluation must not just take its first images."""
    from types import SimpleNamespace

    from fastnca.evaluate import evaluate_iwae

    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.config = SimpleNamespace(likelihood="bernoulli")
            self.seen: list[torch.Tensor] = []

        def iwae(self, x, k, generator=None):
            self.seen.append(x[:, 0, 0, 0].clone())
            return -x[:, 0, 0, 0]

        def bits_per_dim(self, nats):
            return -nats

    images = torch.arange(100, dtype=torch.uint8)[:, None, None, None]  # image i holds the value i
    model = Recorder()
    res = evaluate_iwae(model, images, k=1, batch_size=10, batches=2)
    first = torch.cat(model.seen)
    assert res["n_images"] == 20 and len(first.unique()) == 20 and first.max() >= 50, "spread over the split"
    model.seen.clear()
    evaluate_iwae(model, images, k=1, batch_size=10, batches=2)
    assert torch.equal(torch.cat(model.seen), first), "the same subset every time"
    model.seen.clear()
    assert evaluate_iwae(model, images, k=1, batch_size=10)["n_images"] == 100
