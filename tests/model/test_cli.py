"""The fastnca CLI end to end on the `small` preset (a few iterations), and its errors for bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from fastnca.cli import main

needs_data = pytest.mark.data("mnist")  # the embedded copy when no data directory is set (tests/conftest.py)

TINY = [
    "--set",
    "iterations=3",
    "--set",
    "batch_size=8",
    "--set",
    "eval_batches=1",
    "--set",
    "eval_samples=2",
    "--set",
    "log_every=1",
    "--no-progress",
    "--threads",
    "1",
]


@pytest.fixture(autouse=True)
def _restore_threads():
    """``--threads`` sets torch's global thread count; give the next tests back what they had."""
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One small training run shared by the eval / sample / damage tests."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--preset", "small", "--out", str(out), *TINY]) == 0
    return out


@needs_data
def test_train_writes_its_files(run_dir):
    for name in ("checkpoint.pt", "metrics.jsonl", "config.json", "summary.json", "samples.png", "growth.png"):
        assert (run_dir / name).is_file(), name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for key in ("loss", "recon", "kl", "elbo", "it_per_s", "elapsed_s"):
        assert key in train_rows[0], key
    test_rows = [r for r in rows if r["split"] == "test"]
    assert test_rows and test_rows[-1]["step"] == 3 and "iwae" in test_rows[-1] and "bpd" in test_rows[-1]
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["config"]["batch_size"] == 8


@needs_data
def test_resume_and_refuse_to_overwrite(run_dir, tmp_path, capsys):
    assert main(["train", "--preset", "small", "--out", str(run_dir), *TINY]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    resumed = tmp_path / "resumed"
    assert main(["train", "--preset", "small", "--out", str(resumed), *TINY, "--set", "iterations=2"]) == 0
    assert main(["train", "--resume", "--out", str(resumed), "--set", "iterations=3", "--no-progress"]) == 0
    assert torch.load(resumed / "checkpoint.pt", weights_only=True)["step"] == 3
    assert main(["train", "--resume", "--out", str(tmp_path / "none")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@needs_data
def test_eval_sample_damage(run_dir, tmp_path, capsys):
    out_json = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(run_dir),
                "--k",
                "2",
                "--batches",
                "1",
                "--units",
                "bpd",
                "--json",
                str(out_json),
                "--threads",
                "1",
            ]
        )
        == 0
    )
    assert "bits/dim" in capsys.readouterr().out
    res = json.loads(out_json.read_text())
    assert res["k"] == 2 and res["n_images"] == 8 and res["iwae"] < 0 < res["bpd"]
    figs = tmp_path / "figs"
    assert (
        main(["sample", "--checkpoint", str(run_dir / "checkpoint.pt"), "--out", str(figs), "--n", "4", "--gif"]) == 0
    )
    assert main(["damage", "--checkpoint", str(run_dir / "checkpoint.pt"), "--out", str(figs), "--n", "2"]) == 0
    for name in ("samples.png", "growth.png", "growth.gif", "damage_half.png", "damage_square.png"):
        assert (figs / name).stat().st_size > 0, name


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--preset", "nope"], r"unknown preset 'nope'.*mnist-doubling"),
        (["train", "--preset", "small", "--set", "bogus=1"], r"bogus.*valid keys"),
        (["train", "--preset", "small", "--set", "batch_size=lots"], r"batch_size: expected a value of type int"),
        (["train", "--preset", "small", "--set", "p_update=2"], r"p_update: expected a probability"),
        (["train", "--preset", "small", "--set", "iterations"], r"expected key=value"),
        (
            ["train", "--preset", "small", "--data-dir", "/nonexistent/fastnca-data"],
            r"/nonexistent/fastnca-data.*does not exist",
        ),
        (["eval", "--checkpoint", "/nonexistent/ckpt.pt"], r"/nonexistent/ckpt.pt.*not found"),
    ],
    ids=["unknown-preset", "bad-key", "bad-value", "invalid-value", "no-equals", "missing-data-dir", "no-ckpt"],
)
def test_bad_input_exits_nonzero_with_a_message(argv, expected, tmp_path, capsys):
    if argv[0] == "train":
        argv = [*argv, "--out", str(tmp_path / "out")]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert re.search(expected, err, flags=re.DOTALL), err


def test_missing_dataset_names_the_file(tmp_path, capsys):
    assert main(["train", "--preset", "small", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "binarized_mnist.npz" in err and "--download" in err


def test_python_m_fastnca_subprocess(tmp_path):
    env = dict(os.environ)
    ok = subprocess.run(
        [sys.executable, "-m", "fastnca", "presets"], capture_output=True, text=True, env=env, timeout=120
    )
    assert ok.returncode == 0 and "celeba-nondoubling-256" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "fastnca", "train", "--preset", "nope", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode == 2 and "unknown preset 'nope'" in bad.stderr


@pytest.mark.data("mnist", "emoji", "celeba")
def test_data_lists_datasets(capsys):
    assert main(["data"]) == 0
    out = capsys.readouterr().out
    assert "mnist   ok" in out and "emoji   ok" in out and "celeba  ok" in out


@needs_data
def test_time_limited_run_without_final_eval(tmp_path):
    out = tmp_path / "timed"
    argv = ["train", "--preset", "small", "--out", str(out), "--time-limit", "0.001", "--no-final-eval", *TINY]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "time_limit" and summary["step"] == 1 and summary["eval"] is None
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["split"] == "train" for r in rows)
    assert (out / "checkpoint.pt").is_file() and (out / "samples.png").is_file()
