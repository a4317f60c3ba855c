"""Trainer bookkeeping: pool and damage, atomic checkpoints, exact resume, non-finite loss, time limit (CPU)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fastnca import train as train_mod
from fastnca.checkpoints import CHECKPOINT_FORMAT, save_checkpoint
from fastnca.config import get_preset
from fastnca.data import Splits
from fastnca.run import resolve_run
from fastnca.train import NonFiniteLossError, Pool, Trainer, damage, damage_masks
from tests.utils import mnist_slices

pytestmark = pytest.mark.usefixtures("one_thread")  # bitwise comparisons, 2 shared cores

needs_data = pytest.mark.data("mnist")  # the embedded copy when no data directory is set (tests/conftest.py)


@pytest.fixture(scope="module")
def mnist_small() -> dict[int, Splits]:
    return mnist_slices(256, 32)


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
def test_precision_note_names_the_fused_ieee_fp32_path_on_cuda_only():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # devices as names: nothing is allocated
    cfg = get_preset("mnist-doubling", backend="triton", precision="fp32-ieee")
    note = train_mod.precision_note(resolve_run(cfg, cuda))
    assert note is not None and "precision=bf16" in note, f"expected a pointer to bf16 on CUDA, got {note!r}"
    assert train_mod.precision_note(resolve_run(cfg, cpu)) is None, "expected no note on the CPU"
    assert train_mod.precision_note(resolve_run(cfg.replace(precision="bf16"), cuda)) is None
    assert train_mod.precision_note(resolve_run(cfg.replace(backend="torch"), cuda)) is None


def test_an_explicit_cuda_device_becomes_the_current_one(monkeypatch):
    """--device cuda:1: CUDA graphs and Triton launch on the current device, which resolve_device makes cuda:1."""
    from fastnca.run import resolve_device

    current = [0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.__setitem__(0, torch.device(d).index))
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert current == [1], f"expected cuda:1 made current, current device is {current[0]}"
    assert resolve_device("cuda") == torch.device("cuda", 1), "'cuda' is the current device, with its index"
    assert resolve_device("cpu") == torch.device("cpu") and current == [1]


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
        # the third step's loss is NaN (training steps only: the parameters themselves stay good)
        return out * float("nan") if tr.step >= 2 and torch.is_grad_enabled() else out

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
    assert ckpt["step"] == 1 and ckpt["format"] == CHECKPOINT_FORMAT
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


# ---------------------------------------------------------------------------------------------- interrupts
def _interrupt_during_step(tr: Trainer, step: int, signum: int) -> None:
    """Send ``signum`` to this process in the middle of training step ``step`` (inside its forward pass)."""
    real = tr.model.log_likelihood

    def interrupting(x, state):
        if tr.step == step - 1:
            os.kill(os.getpid(), signum)
        return real(x, state)

    tr.model.log_likelihood = interrupting


@needs_data
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_resume_after_an_interrupt_mid_step_is_bitwise_exact(tmp_path, mnist_small, signame):
    import signal

    signum = getattr(signal, signame)
    cfg = pool_config(iterations=6, log_every=2)
    straight = make_trainer(cfg, tmp_path / "straight", mnist_small)
    straight.fit()
    run = make_trainer(cfg, tmp_path / "split", mnist_small)
    _interrupt_during_step(run, 3, signum)
    with pytest.raises(train_mod.TrainingInterrupted) as err:
        run.fit()
    assert err.value.step == 3 and err.value.signum == signum, "the step in flight finishes, then training stops"
    ckpt = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3, f"expected the interrupt checkpoint at step 3, got step {ckpt['step']}"
    resumed = Trainer.resume(
        tmp_path / "split", splits=mnist_small[cfg.image_size], progress=False, final_outputs=False, log=lambda m: None
    )
    resumed.fit()
    a, b = _params(straight), _params(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), f"parameter {k} differs between the straight and the interrupted run"
    assert torch.equal(straight.pool.states, resumed.pool.states), "pool states differ after the interrupt"
    rows = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    straight_rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(r["step"], r["loss"]) for r in straight_rows], (
        "the metrics log of the interrupted and resumed run should equal the straight run's"
    )


# ---------------------------------------------------------------------------------------------- resume overrides
@needs_data
def test_resume_applies_a_new_learning_rate_to_the_optimiser(tmp_path, mnist_small):
    cfg = doubling_config(iterations=2, lr=1e-3)
    make_trainer(cfg, tmp_path, mnist_small).fit()
    resumed = Trainer.resume(
        tmp_path,
        overrides={"iterations": 3, "lr": 2e-4},
        splits=mnist_small[cfg.image_size],
        progress=False,
        final_outputs=False,
        log=lambda m: None,
    )
    lrs = [g["lr"] for g in resumed.optimizer.param_groups]
    assert lrs == [2e-4] * len(lrs), f"expected the optimiser to use the new lr 2e-4 after resume, got {lrs}"
    resumed.fit()
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    saved = [g["lr"] for g in ckpt["optimizer"]["param_groups"]]
    assert saved == [2e-4] * len(saved) and ckpt["config"]["lr"] == 2e-4, f"checkpoint records lr {saved}"


@needs_data
@pytest.mark.parametrize("key, value", [("state_channels", 16), ("dataset", "emoji"), ("seed", 5)])
def test_resume_refuses_overrides_that_cannot_change(tmp_path, mnist_small, key, value):
    cfg = doubling_config(iterations=1)
    make_trainer(cfg, tmp_path, mnist_small).fit()
    with pytest.raises(ValueError, match=rf"--set {key}={value}: {key} cannot change on --resume"):
        Trainer.resume(tmp_path, overrides={key: value}, splits=mnist_small[cfg.image_size], progress=False)
    resumed = Trainer.resume(
        tmp_path, overrides={key: getattr(cfg, key)}, splits=mnist_small[cfg.image_size], progress=False
    )
    assert resumed.step == 1, "an override equal to the checkpoint's value is accepted"


@needs_data
def test_checkpoint_kept_after_a_divergence_continues_with_a_finite_loss(tmp_path, mnist_small):
    """lr=1e3 diverges: the checkpoint left behind must hold parameters whose next step is finite."""
    cfg = doubling_config(iterations=2, ckpt_every=1)
    make_trainer(cfg, tmp_path, mnist_small).fit()
    diverging = Trainer.resume(
        tmp_path,
        overrides={"lr": 1e3, "iterations": 30},
        splits=mnist_small[cfg.image_size],
        progress=False,
        final_outputs=False,
        log=lambda m: None,
    )
    with pytest.raises(NonFiniteLossError, match="last good checkpoint is"):
        diverging.fit()
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    resumed = Trainer.resume(tmp_path, splits=mnist_small[cfg.image_size], progress=False, log=lambda m: None)
    stats = resumed.sync_stats([resumed.train_step()], ckpt["step"] + 1)  # raises NonFiniteLossError if not finite
    assert all(torch.isfinite(torch.tensor(list(stats[0].values())))), f"step after the checkpoint: {stats}"


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(batch_size=-5), "batch_size: expected an integer >= 1"),
        (dict(batch_size=0), "batch_size: expected an integer >= 1"),
        (dict(batch_size=4, batches=-1), "batches: expected an integer >= 0"),
        (dict(batch_size=4, n_images=0), "holds no images"),
    ],
    ids=["negative-batch", "zero-batch", "negative-batches", "empty-split"],
)
def test_evaluation_over_zero_images_is_an_error(kwargs, pattern):
    from fastnca.evaluate import evaluate_iwae
    from fastnca.vae import build_model

    model = build_model("small")
    images = torch.zeros(kwargs.pop("n_images", 8), 1, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match=pattern):
        evaluate_iwae(model, images, k=1, **kwargs)


# ---------------------------------------------------------------------------------------------- metrics file
def _resume_quietly(out, splits, messages=None, **kw) -> Trainer:
    log = messages.append if messages is not None else (lambda m: None)
    return Trainer.resume(out, splits=splits, progress=False, final_outputs=False, log=log, **kw)


@needs_data
def test_resume_drops_a_damaged_last_metrics_line_with_a_warning(tmp_path, mnist_small):
    cfg = doubling_config(iterations=2)
    make_trainer(cfg, tmp_path, mnist_small).fit()
    metrics = tmp_path / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"step": 3, "split": "tra')  # a crash in the middle of writing a row
    messages: list[str] = []
    resumed = _resume_quietly(tmp_path, mnist_small[32], messages, overrides={"iterations": 3})
    assert metrics.read_text() == good, "expected the damaged last line dropped and the good rows kept"
    assert any("metrics.jsonl" in m and "damaged last line 3" in m for m in messages), messages
    resumed.fit()
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]


@needs_data
def test_a_damaged_metrics_line_before_the_last_names_the_file(tmp_path, mnist_small):
    cfg = doubling_config(iterations=2)
    make_trainer(cfg, tmp_path, mnist_small).fit()
    metrics = tmp_path / "metrics.jsonl"
    rows = metrics.read_text().splitlines()
    metrics.write_text("\n".join([rows[0], "{not json", *rows[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a metrics row"):
        _resume_quietly(tmp_path, mnist_small[32])


@needs_data
def test_a_fresh_trainer_starts_a_fresh_metrics_file(tmp_path, mnist_small):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n{"step": 7}\n')
    make_trainer(doubling_config(iterations=2), tmp_path, mnist_small).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] != 1.0, f"expected only this run's rows: {rows}"


@needs_data
def test_start_up_removes_orphan_temporary_checkpoints(tmp_path, mnist_small):
    cfg = doubling_config(iterations=1)
    make_trainer(cfg, tmp_path, mnist_small).fit()
    orphans = [tmp_path / ".checkpoint.pt.k2j4_x.tmp", tmp_path / ".metrics.jsonl.abc.tmp"]
    for p in orphans:
        p.write_bytes(b"half a file")  # what a crash in the middle of an atomic write leaves
    unrelated = tmp_path / ".notes.tmp"
    unrelated.write_text("not ours")
    messages: list[str] = []
    _resume_quietly(tmp_path, mnist_small[32], messages, overrides={"iterations": 2}).fit()
    assert not any(p.exists() for p in orphans), f"expected the orphan temps removed: {sorted(tmp_path.iterdir())}"
    assert unrelated.exists(), "files that are not the run's own temps are left alone"
    assert any("removed 2 temporary file(s)" in m for m in messages), messages


# ---------------------------------------------------------------------------------------------- file modes
@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def test_atomic_write_respects_the_umask(tmp_path, umask_027):
    from fastnca.utils import atomic_write

    path = atomic_write(tmp_path / "f.txt", lambda f: f.write("x"), binary=False)
    mode = path.stat().st_mode & 0o777
    assert mode == umask_027, f"expected mode {umask_027:o} (0666 under umask 027), got {mode:o}"


@needs_data
def test_run_files_respect_the_umask_also_after_resume(tmp_path, mnist_small, umask_027):
    cfg = doubling_config(iterations=1)
    tr = Trainer(cfg, tmp_path, splits=mnist_small[32], progress=False, final_outputs=False, log=lambda m: None)
    tr.fit()
    _resume_quietly(tmp_path, mnist_small[32], overrides={"iterations": 2}).fit()
    for name in ("checkpoint.pt", "config.json", "summary.json", "metrics.jsonl"):
        mode = (tmp_path / name).stat().st_mode & 0o777
        assert mode == umask_027, f"{name}: expected mode {umask_027:o} under umask 027, got {mode:o}"


@needs_data
def test_log_every_zero_logs_only_the_last_step(tmp_path, mnist_small):
    tr = make_trainer(doubling_config(iterations=3), tmp_path, mnist_small)
    tr.cfg.log_every = 0  # set after validation: the trainer itself must not divide by it
    tr.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3], f"expected one train row at the last step, got {rows}"


@needs_data
def test_run_files_record_the_backend_and_arithmetic_that_ran(tmp_path, mnist_small):
    from fastnca.configfile import load_config_file

    trainer = make_trainer(doubling_config(iterations=2, log_every=1), tmp_path, mnist_small)
    trainer.fit()
    want = {"device": "cpu", "backend": "torch", "backend_source": "capability", "precision": "fp32",
            "arithmetic": "fp32-ieee", "checkpoint": "auto", "wgrad": "per-step"}
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["resolved"] == want, f"config.json: expected the resolved settings {want}, got {conf.get('resolved')}"
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["run"] == want, "the checkpoint records the same settings"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert train_rows and all((r["backend"], r["arithmetic"]) == ("torch", "fp32-ieee") for r in train_rows)
    _, overrides = load_config_file(tmp_path / "config.json")
    assert "resolved" not in overrides and overrides["precision"] == "fp32", "config.json reads back as a config"


@needs_data
def test_precompile_records_the_training_evaluation_and_sampling_kernels(tmp_path, mnist_small, monkeypatch):
    """The trainer's warm-up job, recorded in the interpreter: the fused kernels of one training iteration (the
    forward keeping activations, the backward), of the IWAE (a forward that keeps none) and of the samples."""
    from fastnca.kernels import warmup

    seen = []

    def stand_in(job, target, *, workers, progress):
        with warmup.record_launches() as launches:
            job()
        seen.extend(launches)
        progress(1, 1)
        return warmup.Report(kernels=1, compiled=1, workers=workers, launches=len(launches))

    monkeypatch.setattr(warmup, "precompile", stand_in)
    monkeypatch.setattr(warmup, "target_of", lambda device: {"backend": "cuda", "arch": 90, "warp_size": 32})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Stand-in GPU")
    lines = []
    cfg = doubling_config(backend="triton", iterations=1, state_channels=16, hidden_channels=16)
    trainer = make_trainer(cfg, tmp_path, mnist_small)
    trainer.log = lines.append
    report = trainer._precompile()
    assert report.launches == len(seen) > 0 and "Stand-in GPU" in lines[-1], lines
    fwd = [launch for launch in seen if launch.kernel.endswith("_nca_step_fwd_kernel")]
    stores = {dict(launch.kwargs).get("STORE_ACTS") for launch in fwd}
    assert stores == {True, False}, f"expected the training forward (keeps activations) and the IWAE's, got {stores}"
    assert any(launch.kernel.endswith("_rollout_bwd_post_kernel") for launch in seen), "the backward is recorded"


# ---------------------------------------------------------------------------------------------- one run per folder
_HOLD_A_TRAINER = """
import sys
from fastnca.config import get_preset
from fastnca.data import Splits, load_mnist
from fastnca.train import Trainer
m = load_mnist(image_size=32)
splits = Splits("mnist", m.train[:64].clone(), m.test[:8].clone(), m.source)
cfg = get_preset("small", batch_size=8, iterations=4, eval_every=0)
trainer = Trainer(cfg, sys.argv[1], splits=splits, progress=False, final_outputs=False)
print("holding", flush=True)
sys.stdin.read()
"""


@needs_data
def test_a_second_process_cannot_train_into_a_folder_in_use_and_a_killed_one_leaves_it_free(tmp_path, capsys):
    """Two trainings on one --out would interleave their metrics and overwrite each other's checkpoints: the second
    is refused (exit 2, naming the holder); a run killed with SIGKILL leaves no stale lock behind."""
    import subprocess
    import sys

    from fastnca.cli import main
    from fastnca.utils import FolderLock

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_A_TRAINER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding", "expected the child to hold a trainer"
        for argv in (["--preset", "small"], ["--resume"]):
            assert main(["train", *argv, "--out", str(out), "--no-progress"]) == 2, argv
            err = capsys.readouterr().err
            assert "another fastnca train is running in this folder" in err and f"pid {holder.pid}" in err, err
        assert sorted(p.name for p in out.iterdir()) == [".fastnca.lock"], "expected nothing written by the refused"
    finally:
        holder.kill()
        holder.wait()
    FolderLock(out).acquire().release()  # the kernel dropped the dead process's lock: the folder is free


def test_the_folder_lock_is_reentrant_in_one_process_and_removed_on_release(tmp_path):
    from fastnca.utils import FolderLock

    a, b = FolderLock(tmp_path).acquire(), FolderLock(tmp_path).acquire()
    a.release()
    assert b.path.is_file(), "expected the lock kept while another holder in this process has it"
    b.release()
    assert not b.path.exists(), "expected the lock file removed with the last release"


def test_a_pool_at_most_half_a_batch_warns_that_pool_training_is_off(tmp_path, mnist_small):
    """A pool is drawn from only when it holds more than B/2 entries: pool_size=4 with batch 16 never is."""
    messages = []
    for name, cfg in (("a", pool_config(pool_size=4, batch_size=16)), ("b", pool_config(pool_size=16, batch_size=8))):
        Trainer(cfg, tmp_path / name, splits=mnist_small[28], progress=False, log=messages.append)
        if name == "a":
            assert any("pool and damage training is off" in m and "pool_size=9" in m for m in messages), messages
            messages.clear()
    assert not any("pool" in m for m in messages), messages


def test_time_limit_nan_is_refused(tmp_path, mnist_small):
    with pytest.raises(ValueError, match="time_limit: expected a positive number of seconds, got nan"):
        make_trainer(doubling_config(), tmp_path, mnist_small, time_limit=float("nan"))


def test_fit_of_a_finished_run_rewrites_nothing(tmp_path, mnist_small):
    """Fitting a run that trained all its iterations (a --resume of a finished run) keeps its summary and files."""
    cfg = doubling_config(iterations=2)
    Trainer(cfg, tmp_path, splits=mnist_small[32], progress=False, log=lambda m: None).fit()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    messages = []
    summary = _resume_quietly(tmp_path, mnist_small[32], messages).fit()
    assert summary["train"] and summary["eval"], f"expected the finished run's summary back, got {summary}"
    assert any("nothing to do" in m for m in messages), messages
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before, "expected no file of the finished run rewritten"


def test_resume_of_a_run_without_checkpoint_says_what_to_do(tmp_path, mnist_small):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="stopped before writing its first checkpoint.*start it again"):
        Trainer.resume(tmp_path, splits=mnist_small[32], progress=False, log=lambda m: None)
