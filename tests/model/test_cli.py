"""The fastnca CLI end to end on the `small` preset (a few iterations), and its errors for bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
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


def _wait_for(predicate, proc, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended early (status {proc.returncode}): {proc.stderr.read()}"
        assert time.monotonic() < deadline, "the run did not reach its first logged step in time"
        time.sleep(0.1)


@needs_data
@pytest.mark.parametrize(
    "signame, status, background",
    [("SIGTERM", 143, False), ("SIGINT", 130, True)],
    ids=["sigterm", "sigint-background"],
)
def test_signal_checkpoints_at_a_step_boundary_and_exits_with_its_status(tmp_path, signame, status, background):
    """SIGTERM (schedulers, kill) and SIGINT, also for a background run whose shell set SIGINT to be ignored."""
    import signal

    signum = getattr(signal, signame)
    out = tmp_path / "run"
    argv = ["train", "--preset", "small", "--out", str(out), *TINY, "--set", "iterations=100000"]
    argv += ["--set", "eval_every=0", "--no-final-eval"]
    ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if background else None
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastnca", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ignore_sigint,
    )
    try:
        metrics = out / "metrics.jsonl"
        _wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 2, proc, timeout=120)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == status, f"expected exit status {status} after {signame}, got {proc.returncode}: {err}"
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    last_logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert ckpt["step"] >= last_logged >= 2, f"checkpoint at step {ckpt['step']}, last logged step {last_logged}"
    assert f"{signame} at step {ckpt['step']}: checkpoint written" in err and "--resume" in err, err


def _fastnca(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m fastnca ARGV`` in a child process (exit status and messages as a user sees them)."""
    return subprocess.run(
        [sys.executable, "-m", "fastnca", *argv], capture_output=True, text=True, env=dict(os.environ), timeout=timeout
    )


def _one_line_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode == 2, f"expected exit status 2, got {proc.returncode}: {proc.stderr}"
    assert "Traceback" not in proc.stderr, f"expected a one-line message, got a traceback: {proc.stderr}"
    assert re.search(pattern, proc.stderr), f"expected a message matching {pattern!r}, got: {proc.stderr}"


@needs_data
@pytest.mark.parametrize(
    "change, pattern",
    [
        ("state_channels=16", r"state_channels cannot change on --resume"),
        ("dataset=emoji", r"dataset cannot change on --resume"),
    ],
    ids=["model-shape", "dataset"],
)
def test_resume_with_a_changed_model_or_dataset_is_refused(run_dir, tmp_path, change, pattern):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    _one_line_error(_fastnca("train", "--resume", "--out", str(out), "--set", change, "--no-progress"), pattern)


@needs_data
@pytest.mark.parametrize(
    "config, pattern",
    [
        ("not a config", r"checkpoint '.*checkpoint.pt': its config is not a dict"),
        ({"state_channels": "lots"}, r"checkpoint '.*checkpoint.pt': its config is not a valid fastnca config"),
        ("mnist-doubling", r"checkpoint '.*checkpoint.pt': its \w+ state does not fit the model its config describes"),
    ],
    ids=["not-a-dict", "malformed", "another-preset"],
)
def test_a_checkpoint_with_a_bad_config_is_refused_with_a_message(run_dir, tmp_path, config, pattern):
    import shutil

    from fastnca.config import get_preset

    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["config"] = get_preset(config).to_dict() if config == "mnist-doubling" else config
    torch.save(ckpt, out / "checkpoint.pt")
    _one_line_error(_fastnca("eval", "--checkpoint", str(out), "--k", "1", "--batches", "1"), pattern)
    _one_line_error(_fastnca("train", "--resume", "--out", str(out), "--no-progress"), pattern)


@needs_data
@pytest.mark.parametrize("size", ["-5", "0"])
def test_eval_over_zero_images_is_an_error(run_dir, size):
    proc = _fastnca("eval", "--checkpoint", str(run_dir), "--k", "1", "--batch-size", size, "--threads", "1")
    _one_line_error(proc, rf"--batch-size: expected an integer >= 1, got {size}")
    assert "nats" not in proc.stdout, f"no bound may be printed for zero images: {proc.stdout}"


@needs_data
def test_a_new_run_in_a_non_empty_folder_is_refused(tmp_path):
    out = tmp_path / "crashed"  # a run that crashed before its first checkpoint
    out.mkdir()
    (out / "config.json").write_text("{}\n")
    (out / "metrics.jsonl").write_text('{"step": 10, "split": "train"}\n')
    proc = _fastnca("train", "--preset", "small", "--out", str(out), *TINY)
    _one_line_error(proc, r"--out '.*crashed' holds a run that stopped before writing its first checkpoint \(it has "
                          r"config.json and metrics.jsonl, no checkpoint.pt\), so --resume cannot continue it: remove")
    (out / "notes.txt").write_text("")
    (out / "config.json").unlink()
    (out / "metrics.jsonl").rename(out / "log.jsonl")
    proc = _fastnca("train", "--preset", "small", "--out", str(out), *TINY)
    _one_line_error(proc, r"--out '.*crashed' is not empty \(it holds log.jsonl, notes.txt\).*--resume")
    assert (out / "log.jsonl").read_text() == '{"step": 10, "split": "train"}\n', "the old files are untouched"


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["train", "--preset", "small", "--threads", "-1"], r"--threads: expected an integer >= 1, got -1"),
        (["train", "--preset", "small", "--device", "tpu"], r"device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["damage", "--checkpoint", "CKPT", "--out", "FIGS", "--n", "-2"], r"--n: expected an integer >= 1, got -2"),
    ],
    ids=["threads", "device", "damage-n"],
)
def test_bad_flags_exit_2_with_one_line(tmp_path, argv, pattern):
    argv = [a.replace("CKPT", str(tmp_path / "none.pt")).replace("FIGS", str(tmp_path / "figs")) for a in argv]
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "out"), "--no-progress"]
    _one_line_error(_fastnca(*argv), pattern)


@needs_data
def test_an_out_path_under_a_regular_file_is_refused(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = _fastnca("train", "--preset", "small", "--out", str(blocker / "run"), *TINY)
    _one_line_error(proc, r"--out '.*a-file/run': cannot write there \(Not a directory\)")


def _fastnca_patched(patch: str, *argv: str) -> subprocess.CompletedProcess:
    """The CLI in a child process after ``patch`` (Python source) ran there: failures a test cannot cause for real."""
    code = f"import sys\n{patch}\nfrom fastnca.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=dict(os.environ), timeout=300
    )


@needs_data
def test_a_read_only_out_folder_is_refused_before_training(tmp_path):
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o555)
    # root ignores the mode bits: make the child see what any other user sees there
    patch = (
        "import errno, os, tempfile\n"
        f"READ_ONLY = {str(out)!r}\n"
        "real = tempfile.mkstemp\n"
        "def mkstemp(*a, dir=None, **k):\n"
        "    if dir is not None and os.path.abspath(dir).startswith(READ_ONLY):\n"
        "        raise PermissionError(errno.EACCES, 'Permission denied', dir)\n"
        "    return real(*a, dir=dir, **k)\n"
        "tempfile.mkstemp = mkstemp\n"
    )
    proc = _fastnca_patched(patch, "train", "--preset", "small", "--out", str(out), *TINY)
    _one_line_error(proc, r"--out '.*read-only': cannot write there \(Permission denied\)")
    assert "%|" not in proc.stderr, "expected the refusal before the progress bar"


@needs_data
def test_a_full_disk_while_saving_a_checkpoint_exits_2_with_a_message(tmp_path):
    out = tmp_path / "run"
    patch = (
        "import errno, torch\n"
        "def save(obj, f, *a, **k):\n"
        "    f.write(b'part of a checkpoint')\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "torch.save = save\n"
    )
    proc = _fastnca_patched(patch, "train", "--preset", "small", "--out", str(out), *TINY)
    _one_line_error(proc, r"checkpoint .*checkpoint.pt could not be written \(No space left on device\); none")
    assert not list(out.glob(".checkpoint.pt.*")), "expected no temp file left behind"


@needs_data
def test_the_triton_backend_without_a_gpu_or_the_interpreter_fails_before_training(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fastnca", "train", "--preset", "small", "--out", str(out), "--set", "backend=triton"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    _one_line_error(proc, r"backend: 'triton' needs a CUDA device.*TRITON_INTERPRET=1.*backend=auto")
    assert "%|" not in proc.stderr and not (out / "metrics.jsonl").exists(), "expected no training to start"


@needs_data
def test_results_go_to_stdout_and_the_outputs_line_lists_every_file(tmp_path):
    out = tmp_path / "run"
    proc = _fastnca("train", "--preset", "small", "--out", str(out), *TINY)
    assert proc.returncode == 0, proc.stderr
    final = re.search(r"step 3: test IWAE\(2, 8 images\) -?\d+\.\d+ nats", proc.stdout)
    assert final, f"expected the final test-IWAE line on stdout, got stdout={proc.stdout!r} stderr={proc.stderr!r}"
    assert "test IWAE(2, 8 images)" not in proc.stderr, "the final result should not go to stderr"
    listed = re.search(r"outputs in .*: (.*)", proc.stdout)
    assert listed, proc.stdout
    names = listed.group(1).split()
    assert "summary.json" in names, f"expected summary.json in the outputs line, got {names}"
    assert sorted(names) == sorted(p.name for p in out.iterdir()), f"the outputs line lists {names}"


@needs_data
def test_a_long_cpu_evaluation_warns_with_its_estimate_and_the_batches_alternative(run_dir):
    import threading
    import time

    argv = ["eval", "--checkpoint", str(run_dir), "--k", "128", "--batch-size", "2", "--threads", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastnca", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 180
    try:
        while "(or use a smaller --k" not in "".join(err) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    text = "".join(err)
    # 10,000 test images (in batches of 2, so the first one is quick) with k=128 on the small model: hours on a CPU
    pattern = r"warning: on the CPU this evaluation takes about \d+ (min|h)\b.*\(5000 batches .*--batches \d+ estimates"
    assert re.search(pattern, text), f"expected a warning matching {pattern!r} early on, got: {text[-2000:]}"


def test_a_new_run_folder_may_hold_another_ranks_write_probe_but_no_other_file(tmp_path):
    """Under torchrun every rank checks --out and probes it at once (CI saw rank 0 refuse rank 1's probe file)."""
    from fastnca import cli

    out = tmp_path / "run"
    out.mkdir()
    (out / f"{cli._WRITE_PROBE}abc123.tmp").touch()  # another rank's probe, caught between create and unlink
    cli._check_new_run_folder(out, "checkpoint.pt")
    (out / "notes.txt").touch()
    with pytest.raises(cli.CLIError, match=r"is not empty \(it holds notes.txt\)"):
        cli._check_new_run_folder(out, "checkpoint.pt")


# ---------------------------------------------------------------------------------------------- nothing lost
@needs_data
def test_resume_of_a_finished_run_says_nothing_to_do_and_keeps_its_summary(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "small", "--out", str(out), *TINY]) == 0
    done = capsys.readouterr().out
    assert re.search(r"done: step 3 .*test IWAE\(2, 8 images\)", done), f"expected the image count, got {done!r}"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before, "expected no file rewritten"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"] and summary["eval"], f"expected the summary's train and eval rows kept, got {summary}"


@needs_data
@pytest.mark.parametrize("name", ["checkpoint.pt", "metrics.jsonl", "summary.json", "config.json"])
def test_eval_json_never_overwrites_the_runs_own_files(run_dir, name, monkeypatch, capsys):
    import fastnca.evaluate

    monkeypatch.setattr(fastnca.evaluate, "evaluate_iwae", lambda *a, **k: pytest.fail("evaluated before refusing"))
    before = (run_dir / name).read_bytes()
    for checkpoint in (run_dir, run_dir / "checkpoint.pt"):
        assert main(["eval", "--checkpoint", str(checkpoint), "--json", str(run_dir / name)]) == 2
        err = capsys.readouterr().err
        assert "would overwrite" in err and "eval.json" in err, err
    assert (run_dir / name).read_bytes() == before


@needs_data
def test_eval_json_path_problems_are_named_before_the_evaluation(run_dir, tmp_path, monkeypatch, capsys):
    import fastnca.evaluate

    monkeypatch.setattr(fastnca.evaluate, "evaluate_iwae", lambda *a, **k: pytest.fail("evaluated before refusing"))
    assert main(["eval", "--checkpoint", str(run_dir), "--json", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--json {str(tmp_path)!r} is a folder" in err and ".tmp" not in err, err
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert main(["eval", "--checkpoint", str(run_dir), "--json", str(blocked / "eval.json")]) == 2
    assert "--json" in capsys.readouterr().err


def _nan_checkpoint(run_dir, tmp_path):
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = torch.full_like(ckpt["model"][name], float("nan"))
    path = tmp_path / "nan.pt"
    torch.save(ckpt, path)
    return path, name


@needs_data
def test_a_checkpoint_with_nan_weights_is_refused_by_eval_sample_and_damage(run_dir, tmp_path, capsys):
    path, name = _nan_checkpoint(run_dir, tmp_path)
    out = tmp_path / "figs"
    quick_eval = ["eval", "--json", str(tmp_path / "e.json"), "--k", "2", "--batches", "1"]
    for argv in (quick_eval, ["sample", "--out", str(out)], ["damage", "--out", str(out)]):
        assert main([argv[0], "--checkpoint", str(path), *argv[1:]]) == 2, argv
        err = capsys.readouterr().err
        assert f"parameter {name} holds NaN or inf" in err, err
    assert not out.exists() and not (tmp_path / "e.json").exists(), "expected no output of a refused checkpoint"


@needs_data
def test_a_non_finite_bound_is_written_as_strict_json_and_exits_1(run_dir, tmp_path, monkeypatch, capsys):
    import fastnca.evaluate

    fake = {"iwae": float("nan"), "bpd": float("nan"), "k": 2, "n_images": 8}
    monkeypatch.setattr(fastnca.evaluate, "evaluate_iwae", lambda *a, **k: dict(fake))
    out = tmp_path / "e.json"
    assert main(["eval", "--checkpoint", str(run_dir), "--json", str(out)]) == 1
    assert "non-finite" in capsys.readouterr().err
    assert json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))["iwae"] is None


@needs_data
def test_a_run_that_stopped_before_its_first_checkpoint_says_what_to_do(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text("")
    assert main(["train", "--resume", "--out", str(out)]) == 2
    assert "stopped before writing its first checkpoint" in capsys.readouterr().err
    assert main(["train", "--preset", "small", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "stopped before writing its first checkpoint" in err and "remove the folder's files" in err, err


def test_a_failed_start_leaves_no_empty_run_folder(tmp_path, capsys):
    out = tmp_path / "runs" / "emoji"
    empty = tmp_path / "no-data"
    empty.mkdir()
    assert main(["train", "--preset", "emoji-doubling", "--out", str(out), "--data-dir", str(empty)]) == 2
    assert "Noto Emoji not found" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists(), "expected the folders made for the failed run removed"


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["train", "--preset", "small", "--time-limit", "nan"], r"--time-limit: expected a positive number.*nan"),
        (["train", "--preset", "small", "--set", f"seed={2**70}"], r"seed: expected an integer in 0\.\.4294967295"),
        (["sample", "--checkpoint", "x", "--out", "y", "--seed", str(10**23)], r"--seed: expected an integer in 0"),
        (["train", "--preset", "small", "--set", "iteration=10"], r"did you mean 'iterations'\?"),
    ],
)
def test_bad_numbers_and_keys_are_named(argv, pattern, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "r")] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), f"expected {pattern!r} in {err!r}"
    assert "Overflow" not in err and "valid keys" not in err, err


def test_eval_help_shows_the_defaults_of_k_and_batches(capsys):
    assert main(["eval", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 128, as in the paper)" in text and "(default: 0, the whole split)" in text, text


def test_damage_help_documents_the_image_pixel_limit(capsys):
    from fastnca import cli, data

    assert cli.IMAGE_PIXEL_LIMIT == data.IMAGE_PIXEL_LIMIT, "the CLI's copy of the limit must match the library's"
    assert main(["damage", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"FASTNCA_MAX_IMAGE_PIXELS pixels, default {data.IMAGE_PIXEL_LIMIT // 10**6} Mpx" in text, text


@needs_data
def test_inpainting_a_16_bit_png_reads_its_grey_levels(run_dir, tmp_path):
    """PIL's convert clips 16-bit pixels to 255 (all white): the image is scaled to 8 bits instead."""
    from PIL import Image

    from fastnca.figures import image_from_file
    from fastnca.vae import build_model

    cfg = build_model("small").config
    a = np.full((32, 32), 20000, np.uint16)  # dark grey (31 %): clipped to 8 bits it would read as white
    a[8:24, 8:24] = 65535  # a white square, 16-bit
    path = tmp_path / "digit16.png"
    Image.fromarray(a).save(path)
    assert Image.open(path).mode.startswith("I"), "expected PIL to read the file as a 16-bit mode"
    x = image_from_file(path, cfg)[0, 0]
    assert x[16, 16] == 1 and x[0, 0] == 0, f"expected the square white and the border black, got {x.sum()} white"
    assert main(["damage", "--checkpoint", str(run_dir), "--out", str(tmp_path / "o"), "--image", str(path)]) == 0
