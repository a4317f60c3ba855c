"""`fastnca train --tensorboard`: the event file holds the scalars of metrics.jsonl and growth images."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from fastnca.cli import main

needs_data = pytest.mark.skipif(not os.environ.get("FASTNCA_DATA"), reason="FASTNCA_DATA not set")

TINY = ["--set", "iterations=3", "--set", "batch_size=8", "--set", "eval_batches=1", "--set", "eval_samples=2",
        "--set", "log_every=1", "--set", "eval_every=2", "--no-final-eval",
        "--no-progress", "--threads", "1"]  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


@needs_data
def test_tensorboard_run_logs_the_expected_scalar_tags(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (an optional extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["train", "--preset", "small", "--out", str(out), "--tensorboard", *TINY]) == 0
    folder = out / "tensorboard"
    assert any(p.name.startswith("events.out.tfevents") for p in folder.iterdir()), "expected an event file"
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {f"train/{k}" for k in ("loss", "recon", "kl", "elbo", "grad_norm", "it_per_s")} | {
        "test/iwae",
        "test/bpd",
    }
    assert expected <= tags, f"missing scalar tags {sorted(expected - tags)}; found {sorted(tags)}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [r["step"] for r in train], "one train/loss point per JSONL train row"
    assert [e.value for e in logged] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    test_steps = [r["step"] for r in rows if r["split"] == "test"]
    assert [e.step for e in events.Scalars("test/iwae")] == test_steps == [2]
    growth = events.Images("growth")
    assert [e.step for e in growth] == test_steps, "a growth image with every evaluation"
    # small preset: 21 frames of 32 px (columns) by 8 samples (rows)
    assert (growth[0].width, growth[0].height) == (21 * 32, 8 * 32)


def test_missing_tensorboard_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    from fastnca.tracking import TensorBoardTracker

    with pytest.raises(ImportError, match="pip install tensorboard"):
        TensorBoardTracker(tmp_path / "tb")
