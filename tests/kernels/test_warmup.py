"""Compiling a job's kernels up front (kernels/warmup.py): record without running, specialise, compile in workers."""

import json
import os

import pytest
import torch

from fastnca.kernels import warmup
from fastnca.kernels.warmup import Launch, Pointer
from fastnca.nca import NCA

pytest.importorskip("triton")

SM90 = {"backend": "cuda", "arch": 90, "warp_size": 32}


def _rollout_job():
    """A tiny fused rollout, forward and backward (2x2 -> 16x16, masks, 16 channels)."""
    nca = NCA(16, 16, 1, backend="triton", seed_size=2, n_doublings=3, steps_per_stage=1, p_update=0.5)
    z = torch.randn(2, 16, requires_grad=True)

    def job():
        out = nca(z, generator=torch.Generator().manual_seed(0))
        out.float().sum().backward()
        return out, z

    return job


def test_recording_runs_no_kernel_and_names_each_launch(nan_poison):
    job = _rollout_job()
    with warmup.record_launches() as launches:
        out, z = job()
    kernels = {launch.kernel.split(":")[1] for launch in launches}
    assert {"_rollout_fwd_small_kernel", "_nca_step_fwd_kernel", "_nca_step_bwd_kernel",
            "_rollout_bwd_post_kernel"} <= kernels, kernels
    assert torch.isnan(out).all(), "no kernel ran: the output is the NaN-filled buffer the launch left unwritten"
    pointers = [a for launch in launches for _, a in launch.kwargs if isinstance(a, Pointer)]
    assert pointers and all(p.offset in range(16) for p in pointers), "tensors are recorded as dtype + alignment"
    assert all("BLOCK_M" in launch.constexprs for launch in launches if "fwd" in launch.kernel), "constexprs named"
    # outside the block, launches run again
    out2, _ = job()
    assert torch.isfinite(out2).all()


def test_launches_that_specialise_alike_are_one_kernel():
    const = frozenset({"BLOCK"})
    a = Launch("m:k", (Pointer(torch.float32, 0), 128), (("BLOCK", 64),), const)
    b = Launch("m:k", (Pointer(torch.float32, 0), 4096), (("BLOCK", 64),), const)  # another size, divisible by 16
    c = Launch("m:k", (Pointer(torch.float32, 8), 128), (("BLOCK", 64),), const)  # unaligned pointer
    d = Launch("m:k", (Pointer(torch.float32, 0), 100), (("BLOCK", 64),), const)  # not divisible by 16
    e = Launch("m:k", (Pointer(torch.float32, 0), 128), (("BLOCK", 32),), const)  # another constexpr
    assert a.dedupe_key() == b.dedupe_key()
    assert len({x.dedupe_key() for x in (a, c, d, e)}) == 4


def fake_compile(launch, target):
    """A stand-in compile (run in the worker processes): a file per kernel under $FAKE_CACHE is its cache."""
    if "broken" in launch.kernel:
        raise ValueError("this kernel does not compile")
    path = os.path.join(os.environ["FAKE_CACHE"], launch.kernel.replace(":", "_") + str(launch.dedupe_key()[1][1]))
    cached = os.path.exists(path)
    if not cached:
        with open(path, "w") as f:
            json.dump(target, f)
    return path, cached, 0.0


def test_precompile_compiles_in_workers_reports_progress_and_a_second_run_hits_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_CACHE", str(tmp_path))
    launches = [Launch(f"m:k{i % 3}", (Pointer(torch.float32, 0), 1 + 16 * i), ()) for i in range(6)]
    launches.append(Launch("m:broken", (), ()))
    seen = []
    first = warmup.precompile(launches, SM90, workers=2, progress=lambda d, t: seen.append((d, t)),
                              compile_fn=fake_compile)
    assert (first.kernels, first.compiled, first.cached, len(first.failed)) == (5, 4, 0, 1), first
    assert "does not compile" in first.failed[0] and first.launches == 7
    assert seen[-1] == (5, 5), f"expected the progress to end at 5 of 5, got {seen}"
    assert "compiled 4 of 5 kernels for NVIDIA X" in first.line("NVIDIA X") and "1 failed" in first.line()
    second = warmup.precompile(launches, SM90, workers=2, compile_fn=fake_compile)
    assert (second.compiled, second.cached) == (0, 4), f"a second run compiles nothing: {second}"


@pytest.mark.slow
def test_a_recorded_rollout_compiles_for_sm90_and_is_cached_the_second_time(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    with warmup.record_launches() as launches:
        _rollout_job()()
    first = warmup.precompile(launches, SM90, workers=2)
    assert not first.failed, first.failed
    assert first.compiled == first.kernels > 0 and first.cached == 0, first
    assert any(p.suffix == ".cubin" for p in (tmp_path / "triton").rglob("*")), "real sm_90 binaries in the cache"
    second = warmup.precompile(launches, SM90, workers=2)
    assert (second.compiled, second.cached, second.kernels) == (0, first.kernels, first.kernels), second
