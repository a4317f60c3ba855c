"""backend='auto' decided by measurement (fastnca/autobackend.py), with stand-in timers and devices on the CPU."""

import json
from types import SimpleNamespace

import pytest
import torch

from fastnca import autobackend, train
from fastnca.autobackend import DecisionCache, choose_backend, job_key
from fastnca.config import get_preset
from fastnca.run import resolve_run
from fastnca.train import Trainer

KEY = {"gpu": "Stand-in GPU", "driver": "1.0", "torch": "t", "triton": "3", "fastnca": "0", "job": "train"}


class FakeJob:
    """measure(): each backend's iterations take fixed seconds on a fake clock; warm-up costs time too."""

    def __init__(self, seconds: dict[str, float], warmup_s: float = 5.0) -> None:
        self.seconds, self.warmup_s = seconds, warmup_s
        self.now = 0.0
        self.calls: list[str] = []
        self.timed: dict[str, int] = {}

    def clock(self) -> float:
        return self.now

    def __call__(self, backend, out_of_time):
        self.calls.append(backend)
        self.now += self.warmup_s  # compiles, graph capture: not counted
        times = []
        while len(times) < autobackend.TIMED_ITERATIONS and not out_of_time():
            self.now += self.seconds[backend]
            times.append(self.seconds[backend])
        self.timed[backend] = len(times)
        return times


def test_the_faster_backend_is_taken_printed_and_cached(tmp_path):
    cache = DecisionCache(tmp_path / "c.json")
    job = FakeJob({"triton": 0.030, "torch": 0.020})
    d = choose_backend(KEY, ["triton", "torch"], job, planned_iterations=100_000, cache=cache, clock=job.clock,
                       gpu="Stand-in GPU")
    assert (d.backend, d.source) == ("torch", "measured"), f"expected the faster backend (torch), got {d}"
    assert d.ms == {"triton": 30.0, "torch": 20.0}
    assert d.line() == ("backend auto: triton 30.00 ms/it, torch 20.00 ms/it -> torch (measured on Stand-in GPU)")
    again = FakeJob({"triton": 0.001, "torch": 1.0})
    d2 = choose_backend(KEY, ["triton", "torch"], again, planned_iterations=100_000, cache=cache, clock=again.clock)
    assert again.calls == [], "a cached decision measures nothing"
    assert (d2.backend, d2.source) == ("torch", "cached") and "cached measurement" in d2.line()


@pytest.mark.parametrize("field", ["gpu", "driver", "torch", "triton", "fastnca"], ids=lambda f: f"new-{f}")
def test_another_machine_or_release_measures_again(tmp_path, field):
    cache = DecisionCache(tmp_path / "c.json")
    job = FakeJob({"triton": 0.010, "torch": 0.020})
    choose_backend(KEY, ["triton", "torch"], job, planned_iterations=100_000, cache=cache, clock=job.clock)
    other = FakeJob({"triton": 0.030, "torch": 0.020})
    d = choose_backend({**KEY, field: "other"}, ["triton", "torch"], other, planned_iterations=100_000, cache=cache,
                       clock=other.clock)
    assert other.calls == ["triton", "torch"] and d.backend == "torch", f"a new {field} must not hit the cache"


def test_the_job_key_holds_the_shapes_precision_batch_and_graphs():
    cfg = get_preset("mnist-doubling")
    base = job_key(cfg, "train")
    for change in ({"precision": "bf16"}, {"batch_size": 64}, {"cuda_graphs": False}, {"hidden_channels": 128}):
        assert job_key(cfg.replace(**change), "train") != base, f"{change} must change the key"
    assert job_key(cfg, "iwae") != base and job_key(cfg.replace(lr=1.0), "train") == base, "lr changes no shape"


def test_a_damaged_cache_is_ignored_with_a_warning_and_rewritten(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{not json")
    warnings = []
    cache = DecisionCache(path, warn=warnings.append)
    job = FakeJob({"triton": 0.010, "torch": 0.020})
    d = choose_backend(KEY, ["triton", "torch"], job, planned_iterations=100_000, cache=cache, clock=job.clock)
    assert d.backend == "triton" and d.source == "measured"
    assert warnings and "damaged" in warnings[0] and str(path) in warnings[0], warnings
    assert json.loads(path.read_text())["version"] == 1, "the damaged file is replaced by a valid one"


def test_the_cache_lives_under_fastnca_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(autobackend.CACHE_ENV, str(tmp_path / "cachedir"))
    assert autobackend.cache_path() == tmp_path / "cachedir" / "backend-choices.json"
    monkeypatch.delenv(autobackend.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if autobackend.platform.system() == "Linux":
        assert autobackend.cache_path() == tmp_path / "xdg" / "fastnca" / "backend-choices.json"


def test_the_measurement_stops_at_its_budget_not_counting_warm_up():
    # 1 % of 10,000 iterations at 0.1 s = 10 s: a share of 5 s per backend, i.e. at most ~50 timed iterations of
    # 0.1 s; TIMED_ITERATIONS caps it first. Slow iterations (2 s) stop after the share: 3 of them (0, 2, 4 s).
    job = FakeJob({"triton": 0.1, "torch": 2.0}, warmup_s=100.0)
    d = choose_backend(KEY, ["triton", "torch"], job, planned_iterations=10_000, clock=job.clock)
    assert job.timed == {"triton": autobackend.TIMED_ITERATIONS, "torch": 3}, job.timed
    assert d.backend == "triton"


def test_a_run_too_short_to_measure_keeps_the_rule():
    job = FakeJob({"triton": 0.1, "torch": 0.01})
    d = choose_backend(KEY, ["triton", "torch"], job, planned_iterations=500, clock=job.clock)
    assert (d.backend, d.source) == ("triton", "rule") and job.calls == [], d
    assert "too few" in d.line()
    one = choose_backend(KEY, ["torch"], job, planned_iterations=10**6, clock=job.clock)
    assert (one.backend, one.source) == ("torch", "rule") and job.calls == []


def test_a_time_limit_is_the_planned_run():
    job = FakeJob({"triton": 0.2, "torch": 0.1})
    # 1 % of 100 s = 1 s, 0.5 s per backend: 3 iterations of 0.2 s (at 0, 0.2, 0.4 s) and 5 of 0.1 s
    choose_backend(KEY, ["triton", "torch"], job, planned_seconds=100, clock=job.clock)
    assert job.timed == {"triton": 3, "torch": 5}, job.timed


# ---------------------------------------------------------------------------------------------- the trainer
def _stub_trainer(cfg, log, **kw):
    """What Trainer._resolve_settings reads, on a CUDA device that exists only by name."""
    cuda = torch.device("cuda", 0)
    return SimpleNamespace(cfg=cfg, device=cuda, settings=resolve_run(cfg, cuda, backend="triton",
                                                                      backend_source="capability"),
                           dist=None, time_limit=None, splits=None, log=log, backend_decision=None, **kw)


@pytest.fixture
def stand_in_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv(autobackend.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(autobackend, "machine_key", lambda device: dict(KEY))
    job = FakeJob({"triton": 0.050, "torch": 0.010}, warmup_s=0.0)
    monkeypatch.setattr(train, "training_measure", lambda cfg, device, splits: job)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    return job


def test_the_trainer_measures_auto_and_prints_one_line(stand_in_gpu):
    lines = []
    stub = _stub_trainer(get_preset("mnist-doubling"), lines.append)
    got = Trainer._resolve_settings(stub, None, True)
    assert (got.backend, got.backend_source) == ("torch", "measured"), got
    assert stand_in_gpu.calls == ["triton", "torch"]
    assert lines[-1].startswith("backend auto: triton 50.00 ms/it, torch 10.00 ms/it -> torch"), lines
    assert Trainer.run_record(SimpleNamespace(settings=got, backend_decision=stub.backend_decision))[
        "auto_ms_per_iteration"] == {"triton": 50.0, "torch": 10.0}


def test_an_explicit_backend_is_not_measured(stand_in_gpu):
    for backend in ("triton", "torch"):
        cfg = get_preset("mnist-doubling", backend=backend)
        stub = _stub_trainer(cfg, print)
        stub.settings = resolve_run(cfg, stub.device)
        assert Trainer._resolve_settings(stub, None, True).backend == backend
    assert stand_in_gpu.calls == [], "--backend triton|torch skips the measurement"


def test_a_resumed_run_keeps_its_recorded_backend_and_arithmetic(stand_in_gpu):
    stub = _stub_trainer(get_preset("mnist-doubling"), print)
    recorded = {"device": "cuda:0", "backend": "triton", "arithmetic": "fp32-ieee"}
    got = Trainer._resolve_settings(stub, recorded, True)
    assert (got.backend, got.backend_source, got.arithmetic) == ("triton", "checkpoint", "fp32-ieee"), got
    assert stand_in_gpu.calls == [], "a resume measures nothing: its numerics must not change"
    legacy = {"device": "cuda", "arithmetic": "fp32-ieee"}  # what Trainer.resume passes for an older checkpoint
    old = Trainer._resolve_settings(stub, legacy, True)
    assert (old.backend, old.arithmetic) == ("triton", "fp32-ieee"), "a checkpoint from before: its IEEE fp32 kept"
