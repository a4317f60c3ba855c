"""Data-parallel training and evaluation under torchrun (fastnca/distributed.py).

Fast checks run in this process (shards, the global-batch random draws, config refusals, the pool re-split).
The ``slow`` ones launch ``torchrun`` (``python -m torch.distributed.run``) with 2 gloo processes on 127.0.0.1,
each bounded by a timeout; torchrun start-up alone takes ~15 s on a busy 2-core machine, so they are few.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastnca.checkpoints import load_checkpoint
from fastnca.config import get_preset
from fastnca.distributed import DistContext, GlobalBatchDraws, check_config, restore_rank_state, shard_bounds
from fastnca.evaluate import evaluate_iwae
from fastnca.train import Pool, Trainer

needs_data = pytest.mark.data("mnist")  # the embedded copy when no data directory is set
LAUNCH_TIMEOUT_S = 420  # one torchrun launch; a hang fails the test instead of blocking the suite

# 10 iterations of the small preset (global batch 32), nothing but the training loop and the checkpoint
SMALL_SETS = ["iterations=10", "eval_every=0", "eval_batches=1", "log_every=5", "ckpt_every=1000"]
# a tiny non-doubling model with pool, damage and stochastic update masks (global batch 8, pool 16)
POOL_SETS = [
    "state_channels=8", "hidden_channels=8", "enc_channels=4", "batch_size=8", "min_steps=2", "max_steps=3",
    "pool_size=16", "damage_size=14", "p_update=0.5", "log_every=1", "ckpt_every=1000", "eval_every=0",
    "eval_batches=1", "eval_samples=2",
]


def ctx(rank: int, world: int) -> DistContext:
    return DistContext(rank=rank, world_size=world, local_rank=rank, backend="gloo")


# ---------------------------------------------------------------------------------------------- in-process
def test_shard_bounds_cover_the_batch_once_with_sizes_within_one():
    for n, w in [(32, 2), (7, 2), (10, 4), (1, 2), (0, 3)]:
        bounds = [shard_bounds(n, ctx(r, w)) for r in range(w)]
        rows = [i for a, b in bounds for i in range(a, b)]
        assert rows == list(range(n)), f"n={n} W={w}: expected every row once in order, got bounds {bounds}"
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1, f"n={n} W={w}: shard sizes {sizes} differ by more than 1"


@pytest.mark.parametrize("blocks", [1, 3], ids=["train-rows", "iwae-3-repeats"])
def test_global_batch_draws_give_each_rank_its_rows_of_one_process_draw(blocks):
    global_rows, world = 7, 2
    one = torch.Generator().manual_seed(5)
    ref_n = torch.randn((blocks * global_rows, 4), generator=one).view(blocks, global_rows, 4)
    ref_u = torch.rand((blocks * global_rows, 1, 3, 3), generator=one).view(blocks, global_rows, 1, 3, 3)
    ref_t = torch.randint(0, 100, (1,), generator=one)
    for rank in range(world):
        start, stop = shard_bounds(global_rows, ctx(rank, world))
        local = stop - start
        gen = torch.Generator().manual_seed(5)
        with GlobalBatchDraws(gen, start, stop, global_rows):
            tri_n = torch.randn((blocks * local, 4), generator=gen)
            tri_u = torch.rand((blocks * local, 1, 3, 3), generator=gen)
            tri_t = torch.randint(0, 100, (1,), generator=gen)  # not batch-shaped: passes through
        assert torch.equal(tri_n.view(blocks, local, 4), ref_n[:, start:stop]), f"rank {rank}: randn rows differ"
        assert torch.equal(tri_u.view(blocks, local, 1, 3, 3), ref_u[:, start:stop]), f"rank {rank}: rand rows differ"
        assert torch.equal(tri_t, ref_t), f"rank {rank}: expected the generator to advance as one process's did"
        assert torch.equal(gen.get_state(), one.get_state()), f"rank {rank}: generator state differs from one process"


def test_update_masks_of_a_rank_are_its_rows_of_one_process_masks():
    """The rollout draws every step's update mask up front, several steps per draw: each rank's masks must be its
    rows of one process's masks (a step-major draw would give every rank different cells than one process)."""
    from fastnca.kernels.schedule import draw_masks, plan_rollout

    plan = plan_rollout([False] * 3 + [True] + [False] * 2, "none", doubling=True)
    global_rows, world = 5, 2
    ref = draw_masks(plan, global_rows, 2, 2, 0.5, generator=torch.Generator().manual_seed(3))
    for rank in range(world):
        start, stop = shard_bounds(global_rows, ctx(rank, world))
        gen = torch.Generator().manual_seed(3)
        with GlobalBatchDraws(gen, start, stop, global_rows):
            tri = draw_masks(plan, stop - start, 2, 2, 0.5, generator=gen)
        for step, (r, t) in enumerate(zip(ref, tri)):
            assert torch.equal(t, r[start:stop]), f"rank {rank}, step {step}: expected its rows of one process's mask"
            assert t.is_contiguous(), f"rank {rank}, step {step}: expected a contiguous mask (read as bytes, no copy)"


def test_global_batch_draws_leave_other_generators_alone():
    mine, other = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    ref = torch.randn((3, 2), generator=torch.Generator().manual_seed(2))
    with GlobalBatchDraws(mine, 0, 3, 6):
        tri = torch.randn((3, 2), generator=other)
    assert torch.equal(tri, ref), "a draw from another generator was changed by the mode"


def test_batch_and_pool_not_divisible_by_the_world_size_are_refused():
    with pytest.raises(ValueError, match="batch_size: the global batch 32 is not divisible by the world size 3"):
        check_config(get_preset("small"), ctx(0, 3))
    with pytest.raises(ValueError, match="pool_size: 1024 is not divisible by the world size 3"):
        check_config(get_preset("mnist-nondoubling", batch_size=33), ctx(0, 3))
    check_config(get_preset("small"), ctx(1, 4))  # 32 / 4: accepted
    check_config(get_preset("small", batch_size=33), None)  # one process: anything


class _PoolHolder:
    """What restore_rank_state reads from a trainer."""

    def __init__(self, cfg, pool):
        self.cfg, self.pool = cfg, pool
        self.gen = self.dev_gen = torch.Generator()


def test_resume_on_another_world_size_warns_and_resplits_the_pool():
    cfg = get_preset("mnist-nondoubling", pool_size=8, batch_size=8)
    merged = {"capacity": 8, "images": torch.arange(8.0).view(8, 1, 1, 1), "states": torch.arange(8.0).view(8, 1, 1, 1)}
    ckpt = {"distributed": {"world_size": 2, "rng": [None, None], "pool_lengths": [4, 4]}}
    messages: list[str] = []
    shards = []
    for rank in range(4):
        pool = Pool(8)
        pool.load_state_dict(merged)
        holder = _PoolHolder(cfg, pool)
        restore_rank_state(holder, ckpt, ctx(rank, 4), messages.append)
        assert pool.capacity == 2, f"rank {rank}: expected pool_size / 4 = 2 entries, got capacity {pool.capacity}"
        shards.append(pool.states.flatten().tolist())
    assert shards == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]], f"expected an even re-split, got {shards}"
    assert len(messages) == 1 and "written by 2 process(es), resuming on 4: the trajectory changes" in messages[0], (
        f"expected one warning from rank 0, got {messages}"
    )


# ---------------------------------------------------------------------------------------------- torchrun
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data_dir() -> list[str]:
    """``--data-dir DIR`` when a data directory is set, else nothing (MNIST then comes from the package)."""
    return ["--data-dir", os.environ["FASTNCA_DATA"]] if os.environ.get("FASTNCA_DATA") else []


def torchrun(args: list[str], cwd: Path, nproc: int = 2, timeout: float = LAUNCH_TIMEOUT_S):
    """Run ``torchrun --nproc-per-node nproc ARGS`` on 127.0.0.1 in ``cwd``; returns the CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def fastnca_train(out: Path, sets: list[str], *extra: str, preset: str | None = "small") -> list[str]:
    args = ["-m", "fastnca", "train", "--out", str(out), "--threads", "1", "--no-progress", "--no-final-eval",
            *_data_dir()]
    if preset:
        args += ["--preset", preset]
    for s in sets:
        args += ["--set", s]
    return args + list(extra)


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode == 0, (
        f"{what}: torchrun exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )


@pytest.fixture(scope="module")
def ddp_small_run(tmp_path_factory) -> Path:
    """10 iterations of the small preset on 2 gloo ranks (global batch 32): the run directory."""
    root = tmp_path_factory.mktemp("ddp")
    out = root / "ddp"
    _check(torchrun(fastnca_train(out, SMALL_SETS), cwd=root), "torchrun train")
    return out


@pytest.mark.slow
@needs_data
def test_ddp_training_matches_one_process_with_the_same_global_batch(ddp_small_run, tmp_path):
    """2 ranks x 16 rows vs 1 process x 32 rows, 10 Adam steps: the same parameters within 2e-5.

    The bound: both runs draw the same data order and the same random numbers (GlobalBatchDraws), so they
    differ only by fp32 reassociation: conv weight gradients summed over 16 + 16 rows instead of 32, then
    averaged by gloo (relative error ~1e-6 per gradient). Adam's step is about lr = 1e-3 in size whatever the
    gradient's scale, and carries the gradient's relative error, so 10 steps move a parameter by <= 1e-2 and
    the runs differ by ~1e-2 x 1e-4 (the error grown through a 16-step rollout) ~ 1e-6: measured 1.6e-6 max.
    2e-5 leaves room for other CPUs' summation orders; a rank using its own noise or a sum instead of a mean
    of the shard losses differs by >= 1e-4.
    """
    torch.set_num_threads(1)
    cfg = get_preset("small", iterations=10, eval_every=0, eval_batches=1, log_every=5, ckpt_every=1000)
    one = Trainer(cfg, tmp_path / "one", progress=False, final_outputs=False)
    one.fit()
    ddp = torch.load(ddp_small_run / "checkpoint.pt", weights_only=True)
    assert ddp["step"] == 10 and ddp["distributed"]["world_size"] == 2
    worst = max((v - ddp["model"][k]).abs().max().item() for k, v in one.model.state_dict().items())
    assert worst <= 2e-5, f"expected parameters within 2e-5 of one process's, max |difference| {worst:.3e}"
    rows = [json.loads(line) for line in (ddp_small_run / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == [5, 10], "expected one row per log window"
    for r, f in zip(rows, ref):
        assert abs(r["loss"] - f["loss"]) <= 1e-4 * abs(f["loss"]), f"logged global loss {r['loss']} vs {f['loss']}"


@pytest.mark.slow
@needs_data
def test_ddp_eval_matches_one_process(ddp_small_run, tmp_path):
    """IWAE(8) over 3 batches of 7 test images (shards of 4 and 3 rows): one process's number within 1e-4 nats.

    The same random draws reach every image (GlobalBatchDraws, one process's chunking), so the ranks differ from
    one process only in fp32 summation order within smaller batches and in the float64 all-reduce of the sums:
    measured 6.5e-6 nats on a mean of -364 nats.
    """
    out = tmp_path / "eval.json"
    proc = torchrun(["-m", "fastnca", "eval", "--checkpoint", str(ddp_small_run), "--k", "8", "--batches", "3",
                     "--batch-size", "7", "--threads", "1", "--json", str(out),
                     *_data_dir()], cwd=tmp_path)
    _check(proc, "torchrun eval")
    assert proc.stdout.count("test log p(x) >=") == 1, f"expected one result line (rank 0), got:\n{proc.stdout}"
    ddp = json.loads(out.read_text())
    torch.set_num_threads(1)
    model, _ = load_checkpoint(ddp_small_run, "cpu")
    from fastnca.data import load_for_config

    test = load_for_config(model.config).test
    ref = evaluate_iwae(model, test, k=8, batch_size=7, batches=3, seed=0)
    assert ddp["n_images"] == ref["n_images"] == 21
    assert abs(ddp["iwae"] - ref["iwae"]) <= 1e-4, f"IWAE under torchrun {ddp['iwae']} vs one process {ref['iwae']}"


@pytest.mark.slow
@needs_data
def test_ddp_resume_with_the_same_world_size_is_exact(tmp_path):
    """Pool, damage and update masks on 2 ranks: 3 steps + resume to 6 == 6 steps straight, bitwise."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    _check(torchrun(fastnca_train(straight, [*POOL_SETS, "iterations=6"], preset="mnist-nondoubling"),
                    cwd=tmp_path), "straight run")
    _check(torchrun(fastnca_train(split, [*POOL_SETS, "iterations=3"], preset="mnist-nondoubling"),
                    cwd=tmp_path), "first half")
    _check(torchrun(fastnca_train(split, ["iterations=6"], "--resume", preset=None), cwd=tmp_path), "resume")
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), f"parameter {k} differs after the resume"
    assert a["distributed"]["pool_lengths"] == b["distributed"]["pool_lengths"] == [8, 8]
    assert torch.equal(a["pool"]["states"], b["pool"]["states"]), "the gathered pools differ after the resume"
    for r in range(2):
        ga, gb = a["distributed"]["rng"][r]["generators"], b["distributed"]["rng"][r]["generators"]
        assert all(torch.equal(ga[k], gb[k]) for k in ga), f"rank {r}: generator states differ after the resume"


@pytest.mark.slow
@needs_data
def test_a_ddp_checkpoint_resumes_in_one_process_with_a_warning(ddp_small_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ddp_small_run, run)
    messages: list[str] = []
    torch.set_num_threads(1)
    trainer = Trainer.resume(run, overrides={"iterations": 12}, progress=False, final_outputs=False,
                             log=messages.append)
    assert any("written by 2 process(es), resuming on 1: the trajectory changes" in m for m in messages), (
        f"expected the world-size warning, got {messages}"
    )
    assert trainer.fit()["step"] == 12, "expected the one-process resume to continue to step 12"


FAILING_SCRIPT = """
import sys, time, torch, torch.distributed as dist
from fastnca import distributed
ctx, _ = distributed.setup("cpu")
if ctx.rank == 1:
    time.sleep(1)
    raise RuntimeError("rank 1 failed on purpose")
dist.all_reduce(torch.ones(1))  # rank 0 waits here for a rank that never comes
"""


@pytest.mark.slow
def test_a_failure_on_one_rank_ends_every_rank_with_its_message(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(FAILING_SCRIPT)
    t0 = time.perf_counter()
    proc = torchrun([str(script)], cwd=tmp_path, timeout=180)
    took = time.perf_counter() - t0
    assert proc.returncode != 0, "expected torchrun to fail when a rank raises"
    assert "rank 1 failed on purpose" in proc.stderr, f"expected the rank's message, got:\n{proc.stderr[-3000:]}"
    assert took < 120, f"expected the blocked rank to be stopped promptly, torchrun took {took:.0f} s"


@pytest.mark.gpu
@pytest.mark.slow
@needs_data
def test_nccl_training_on_two_gpus_matches_one_process(tmp_path):
    """NCCL, the fused backend: 2 GPUs x 16 rows vs 1 GPU x 32 rows (graphs off in both), within 1e-4."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    out = tmp_path / "nccl"
    _check(torchrun(fastnca_train(out, [*SMALL_SETS, "backend=triton"]), cwd=tmp_path), "torchrun NCCL train")
    cfg = get_preset("small", iterations=10, eval_every=0, eval_batches=1, log_every=5, ckpt_every=1000,
                     backend="triton", cuda_graphs=False)
    one = Trainer(cfg, tmp_path / "one", device="cuda:0", progress=False, final_outputs=False)
    one.fit()
    ddp = torch.load(out / "checkpoint.pt", weights_only=True)
    worst = max((v.cpu() - ddp["model"][k]).abs().max().item() for k, v in one.model.state_dict().items())
    assert worst <= 1e-4, f"expected parameters within 1e-4 of one GPU's, max |difference| {worst:.3e}"
