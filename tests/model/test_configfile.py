"""`fastnca train --config FILE.toml|FILE.json`: a preset and overrides from a file, --set on top, a run's
config.json fed back, and clear errors."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from fastnca.cli import main
from fastnca.config import Config, get_preset
from fastnca.configfile import load_config_file

needs_data = pytest.mark.skipif(not os.environ.get("FASTNCA_DATA"), reason="FASTNCA_DATA not set")


@pytest.fixture(autouse=True)
def _restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def test_toml_and_json_give_the_same_settings(tmp_path):
    (tmp_path / "a.toml").write_text('preset = "small"\niterations = 7\nlr = 1\nout_bias = false\n')
    (tmp_path / "a.json").write_text(json.dumps({"preset": "small", "iterations": 7, "lr": 1, "out_bias": False}))
    for name in ("a.toml", "a.json"):
        preset, overrides = load_config_file(tmp_path / name)
        assert preset == "small" and overrides == {"iterations": 7, "lr": 1.0, "out_bias": False}, name
        assert isinstance(overrides["lr"], float), "an integer for a float field is read as a float"


def test_a_runs_config_json_round_trips(tmp_path):
    cfg = get_preset("celeba-nondoubling", iterations=12, lr=3e-4)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))  # as the trainer writes it
    preset, overrides = load_config_file(tmp_path / "config.json")
    assert preset is None and Config().replace(**overrides) == cfg


def test_a_config_of_an_earlier_release_with_a_retired_key_loads(tmp_path):
    """``small_grid_backward`` (the removed small-grid backward kernels) in a run's config.json or a checkpoint's
    config is ignored: the run loads with every other setting as saved."""
    cfg = get_preset("mnist-doubling", iterations=12)
    old = {**cfg.to_dict(), "small_grid_backward": True}
    (tmp_path / "config.json").write_text(json.dumps(old))
    preset, overrides = load_config_file(tmp_path / "config.json")
    assert "small_grid_backward" not in overrides, f"the retired key was kept: {sorted(overrides)}"
    assert preset is None and Config().replace(**overrides) == cfg
    assert Config.from_dict(old) == cfg, "a checkpoint's config with the retired key loads as saved"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("iterationz = 3\n", "unknown config key 'iterationz'"),
        ('iterations = "3"\n', "iterations: expected a value of type int"),
        ("iterations = true\n", "iterations: expected a value of type int"),
        ("doubling = 1\n", "doubling: expected a value of type bool"),
        ("preset = 3\n", "preset: expected a preset name"),
        ("iterations = \n", "not valid TOML"),
    ],
)
def test_bad_files_are_named_with_the_problem(tmp_path, text, message):
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        load_config_file(tmp_path / "bad.toml")
    assert "bad.toml" in str(err.value)


def test_toml_without_a_parser_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "a.toml").write_text("iterations = 3\n")
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python 3.10
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(ValueError, match="Python >= 3.11 or the tomli package"):
        load_config_file(tmp_path / "a.toml")
    (tmp_path / "a.yaml").write_text("iterations: 3\n")
    with pytest.raises(ValueError, match=r"expected a \.toml or \.json file"):
        load_config_file(tmp_path / "a.yaml")


@needs_data
def test_train_with_a_config_file_and_set_on_top(tmp_path):
    (tmp_path / "run.toml").write_text(
        'preset = "small"\niterations = 5\nbatch_size = 8\neval_batches = 1\neval_samples = 2\nlog_every = 1\n'
        "eval_every = 0\n"
    )
    out = tmp_path / "run"
    common = ["--no-progress", "--threads", "1", "--no-final-eval"]
    assert (
        main(["train", "--config", str(tmp_path / "run.toml"), "--set", "iterations=2", "--out", str(out), *common])
        == 0
    )
    saved = json.loads((out / "config.json").read_text())
    assert saved.pop("resolved")["backend"] == "torch", "config.json records how the run resolved its backend"
    assert (
        saved
        == get_preset(
            "small", iterations=2, batch_size=8, eval_batches=1, eval_samples=2, log_every=1, eval_every=0
        ).to_dict()
    ), "expected the file's preset and fields, --set on top"
    again = tmp_path / "again"
    assert main(["train", "--config", str(out / "config.json"), "--out", str(again), *common]) == 0
    again_saved = json.loads((again / "config.json").read_text())
    again_saved.pop("resolved")
    assert again_saved == saved, "a run's config.json repeats its settings"
    assert main(["train", "--config", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_a_config_file_that_is_not_utf8_is_named(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    path.write_bytes(b'preset = "small"\n# \xff\xfe\n' if suffix == ".toml" else b'{"preset": "sm\xffall"}')
    with pytest.raises(ValueError, match=rf"--config '.*run\{suffix}': not UTF-8 text .*save it as UTF-8"):
        load_config_file(path)


def test_an_unknown_key_suggests_the_closest_one(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"iteration": 10}')
    with pytest.raises(ValueError, match=r"unknown config key 'iteration'; did you mean 'iterations'\?"):
        load_config_file(path)
