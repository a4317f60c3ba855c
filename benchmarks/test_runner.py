"""The runner end to end at tiny sizes on the CPU: JSON and markdown with the expected fields, the
unavailable and time-budget paths, the summary of a gpu_check folder, and the import shim gpu_check.sh uses.

No speed claims: these check code paths only.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import cases, runner
from benchmarks.summarize import compare_losses, pytest_line, summarize
from benchmarks.utils import rel_err as runner_rel_err

ROOT = Path(__file__).resolve().parents[1]
ROW_FIELDS = {"case", "kind", "backend", "impl", "precision", "status", "checkpoint", "parity", "time_ms", "cost",
              "cell_updates_per_s", "tflops_model", "tflops_executed", "frac_peak", "floor_ms", "power", "speedup"}
META_FIELDS = {"date_utc", "torch", "triton", "commit", "gpu", "sm_count", "driver", "mode", "python"}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, subprocess.CompletedProcess]:
    """One real `python -m benchmarks` run in a subprocess (the runner chooses the interpreter itself: no GPU)."""
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "benchmarks", "--tiny", "--device", "cpu", "--out", str(out), "--cases", "step",
           "train-mnist-doubling", "--backends", "torch-fp32", "torch-bf16-cl", "triton-bf16", "torch-fp32@step"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text(), proc


def train_policy(backend: str) -> str:
    return backend.partition("@")[2] or "auto"


@pytest.mark.slow
def test_cli_writes_json_with_expected_fields(cli_run) -> None:
    result, _, _ = cli_run
    assert META_FIELDS <= set(result["meta"]), META_FIELDS - set(result["meta"])
    assert result["meta"]["speed_claim"] is False and result["meta"]["triton_interpret"] is True
    assert {"matmul_bf16", "copy"} <= set(result["peaks"])
    rows = {(r["case"], r["backend"]): r for r in result["rows"]}
    assert set(rows) == {("step", b) for b in ("torch-fp32", "torch-bf16-cl", "triton-bf16", "torch-fp32@step")} | {
        ("train-mnist-doubling", b) for b in ("torch-fp32", "torch-bf16-cl", "triton-bf16", "torch-fp32@step")}
    for key, r in rows.items():
        if cases.triton_unavailable(torch.device("cpu")) and r["impl"] == "triton":
            assert r["status"].startswith("unavailable"), (key, r["status"])
            continue
        assert r["status"] == "ok", (key, r["status"])
        assert ROW_FIELDS <= set(r), (key, ROW_FIELDS - set(r))
        assert r["parity"]["ok"] and r["parity"]["rel_err"] <= r["parity"]["tol"]
        assert r["time_ms"]["p20"] <= r["time_ms"]["median"] <= r["time_ms"]["p80"]
        assert r["cost"]["flops_model"] > 0 and r["cell_updates_per_s"] > 0
    assert rows[("step", "torch-fp32")]["speedup"]["vs torch-fp32"] == pytest.approx(1.0)
    train = rows[("train-mnist-doubling", "torch-fp32@step")]
    assert train["checkpoint"] == "step" and train["cost"]["flops_executed"] > train["cost"]["flops_model"]
    assert rows[("train-mnist-doubling", "torch-fp32")]["checkpoint"] == "auto -> none"
    # the row's prediction is made with the settings it ran: its backend, batch, device and optimizer
    for backend in ("torch-fp32", "torch-bf16-cl", "torch-fp32@step"):
        pred = rows[("train-mnist-doubling", backend)]["predicted_memory"]
        assert isinstance(pred, dict) and pred["total"] > 0, (backend, pred)
        assert (pred["backend"], pred["batch_size"], pred["device"], pred["optimizer"]) == ("torch", 2, "cpu",
                                                                                           "single"), pred
        assert pred["autocast"] is (backend == "torch-bf16-cl") and pred["policy"] == train_policy(backend), pred


@pytest.mark.slow
def test_cli_writes_markdown_and_prints_parity_first(cli_run) -> None:
    _, md, proc = cli_run
    assert "no speed claim" in md
    assert "| case | backend | sizes run | ckpt | parity rel err (tol) | median ms [p20, p80] | status |" in md
    assert md.count("\n| step |") == 4 and md.count("\n| train-mnist-doubling |") == 4
    out = proc.stdout
    assert out.index("parity torch-fp32") < out.index("time   torch-fp32")


def test_cpu_run_shows_the_sizes_it_ran_and_no_speed_columns(cli_run) -> None:
    """A tiny CPU run must not print the GPU case sizes nor peak fractions / speed-ups (issue 12)."""
    result, md, proc = cli_run
    assert "sizes run: B=2, 8x8, |z|=h=16, 1 block" in proc.stdout
    assert "| step | torch-fp32 | B=2, 8x8, \\|z\\|=h=16, 1 block |" in md
    for gpu_only in ("B=32", "64x64", "|z|=h=256", "% peak", "speed-up", "floor ms", "TFLOP/s"):
        assert gpu_only not in md, f"{gpu_only!r} in the markdown of a CPU run"
        assert gpu_only not in proc.stdout.split("## Benchmark run")[-1], f"{gpu_only!r} in the printed table"
    assert "B=32" not in proc.stdout, "the GPU case size was printed for a tiny run"
    train = next(r for r in result["rows"] if r["case"] == "train-mnist-doubling")
    assert train["sizes"].startswith("B=2, 16x16 px, |z|=h=16, 1 block"), train["sizes"]


def test_unavailable_backend_and_time_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cases, "triton_unavailable", lambda device: "no fused kernel in this test")
    res = runner.run([("step", ["triton-fp32", "compile-fp32"]), ("rollout-mnist-doubling", ["compile-fp32"])],
                     device=torch.device("cpu"), out=tmp_path, tiny=True, quick=False, peaks=False, quiet=True)
    st = [r["status"] for r in res["rows"]]
    assert st[0] == "unavailable: ModuleNotFoundError: no fused kernel in this test"
    assert st[1] == "ok"
    assert st[2].startswith("unavailable: NotImplementedError: torch.compile is benchmarked per step only")
    assert (tmp_path / "bench.md").is_file()
    monkeypatch.setattr(cases, "triton_unavailable", lambda device: None)
    res = runner.run([("train-mnist-doubling", ["triton-bf16-graph"])], device=torch.device("cpu"), out=tmp_path,
                     tiny=True, quick=False, peaks=False, quiet=True)
    assert res["rows"][0]["status"].startswith("unavailable: NotImplementedError: CUDA graphs are benchmarked on")
    res = runner.run([("step", ["torch-fp32"])], device=torch.device("cpu"), out=tmp_path, tiny=True, quick=True,
                     time_budget_s=1e-9, peaks=False, quiet=True)
    assert res["rows"][0]["status"] == "skipped: time budget spent"


def test_plan_selection() -> None:
    plan = runner._select(runner.QUICK_PLAN, ["train-mnist-doubling"], ["triton-bf16", "compile-fp32"])
    assert plan == [("train-mnist-doubling", ["triton-bf16"])]
    assert [c for c, _ in runner._select(runner.default_plan(), None, None)] == list(cases.CASES)
    with pytest.raises(SystemExit):
        runner._select(runner.QUICK_PLAN, ["nope"], None)
    with pytest.raises(ValueError, match="backend"):
        cases.parse_backend("cuda-fp64")
    b = cases.parse_backend("torch-bf16-cl@segments=4")
    assert b.autocast and b.checkpoint == "segments=4" and b.model_precision == "fp32"


@pytest.mark.slow
def test_summarize_gpu_check_folder(tmp_path: Path, cli_run) -> None:
    result, _, _ = cli_run
    (tmp_path / "bench.json").write_text(json.dumps(result))
    (tmp_path / "tests.txt").write_text("....\n==== 12 passed, 1 skipped in 41.2s ====\n")
    (tmp_path / "stages.tsv").write_text("tests\t0\t42\t12 passed, 1 skipped in 41.2s\nncu\tnote\t0\tncu not found\n")
    rows = [{"step": s, "split": "train", "loss": 500.0 - s, "it_per_s": 5.0, "elapsed_s": s / 5} for s in (10, 20)]
    (tmp_path / "train_auto.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken")
    (tmp_path / "train_torch.jsonl").write_text(json.dumps({**rows[0], "loss": 491.0, "it_per_s": 2.0,
                                                            "elapsed_s": 5.0}) + "\n")
    text = summarize(tmp_path, note="import: test")
    assert (tmp_path / "summary.md").read_text() == text
    assert "| kernel tests (compiled) | 12 passed, 1 skipped in 41.2s (rc 0) |" in text and "import: test" in text
    assert "| ncu | note | 0 | ncu not found |" in text
    assert "step 10: default 490.0000 vs torch 491.0000" in text
    assert "| step | triton-bf16 |" in text or "| step | torch-fp32 |" in text
    check = json.loads((tmp_path / "check.json").read_text())
    assert check["train"]["auto"] == rows and check["tests"] == "12 passed, 1 skipped in 41.2s"
    assert pytest_line("no summary here") == "no summary here"
    assert compare_losses([], rows) == {"common_steps": 0}
    empty = summarize(tmp_path / "nothing")
    assert "missing: bench.json" in empty and "| kernel tests (compiled) | not run |" in empty
    assert "no metrics rows from the default run" in empty


def test_import_shim_serves_fastnca_kernels(tmp_path: Path) -> None:
    """gpu_check.sh's fallback: with only PYTHONPATH (no editable install), fastnca.kernels still imports."""
    code = ("import sys; sys.path[:0] = [{shim!r}, {root!r}] + {sp!r}; import sitecustomize; "
            "import fastnca.kernels.reference as r; print(r.__file__)").format(
        shim=str(ROOT / "tools" / "_import_shim"), root=str(ROOT), sp=site.getsitepackages())
    # -S: no site-packages .pth files, so the project's own editable-install finder is not active
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(ROOT / "kernels" / "reference.py")


def test_gpu_check_script_setup_and_summary_only(tmp_path: Path) -> None:
    """The script's setup and summary on the CPU (no stages): the summary files only, summary printed last."""
    env = {**os.environ, "GPU_CHECK_STAGES": "", "GPU_CHECK_IMPORT": "shim", "CUDA_VISIBLE_DEVICES": "",
           "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["check.json", "details.md", "gpu_check.log", "summary.md"], files
    assert proc.stdout.rstrip().endswith("no step logged by both runs")
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "import: PYTHONPATH + tools/_import_shim" in log


@pytest.mark.slow
def test_first_backend_of_a_model_case_runs_on_its_backend(tmp_path: Path) -> None:
    """Regression: computing the fp32 reference must not leave the shared model on the reference backend."""
    if cases.triton_unavailable(torch.device("cpu")):
        pytest.skip("fused step not importable")
    res = runner.run([("train-mnist-doubling", ["triton-fp32"])], device=torch.device("cpu"), out=tmp_path,
                     tiny=True, quick=False, peaks=False, quiet=True)
    row = res["rows"][0]
    assert row["status"] == "ok", row["status"]
    assert 0 < row["parity"]["rel_err"] < 1e-5  # fused fp32 differs from the reference by rounding only


def test_early_cases_and_perstep_backends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The early-stage case runs exactly the small-grid steps; triton-* launches the small-grid forward and
    triton-*-perstep does not, and a per-step row never leaves the shared model in per-step mode (issue 11)."""
    from benchmarks.flops import rollout_cost
    from fastnca.config import get_preset

    assert cases.early_steps(get_preset("mnist-doubling")) == 24
    assert cases.early_steps(get_preset("mnist-doubling", **cases.tiny_overrides("mnist-doubling"))) == 6
    assert rollout_cost(get_preset("mnist-doubling"), 1, first_steps=24).cells == 8 * (4 + 16 + 64)
    b = cases.parse_backend("triton-bf16-perstep@step")
    assert not b.small_grid and b.impl == "triton" and b.precision == "bf16" and b.checkpoint == "step"
    assert cases.parse_backend("triton-bf16").small_grid
    assert runner._select(runner.QUICK_PLAN, ["step"], ["triton-bf16", "triton-bf16-perstep"]) == [
        ("step", ["triton-bf16"])]
    if cases.triton_unavailable(torch.device("cpu")):
        pytest.skip("fused step not importable")
    import fastnca.kernels.rollout as rollout
    from fastnca.kernels.small_grid import SMALL_GRID_CELLS

    assert cases.SMALL_GRID_CELLS == SMALL_GRID_CELLS
    res = runner.run([("rollout-mnist-doubling-early", ["triton-fp32", "triton-fp32-perstep"])],
                     device=torch.device("cpu"), out=tmp_path, tiny=True, quick=False, peaks=False, quiet=True)
    rows = res["rows"]
    assert [r["status"] for r in rows] == ["ok"] * 2, [r["status"] for r in rows]
    assert [r["small_grid"] for r in rows] == [True, False]
    assert all(r["num_steps"] == 6 and r["parity"]["ok"] for r in rows)
    # the small-grid forward launches with the path on only, also after a per-step row pointed the shared model
    # at the per-step path, and each timed call points the model again (rows share one model)
    calls: list[int] = []
    launch = rollout.launch_small_fwd
    monkeypatch.setattr(rollout, "launch_small_fwd", lambda *a, **k: calls.append(1) or launch(*a, **k))
    ctx = cases.CaseContext(cases.CASES["rollout-mnist-doubling-early"], torch.device("cpu"), tiny=True)
    ctx.reference()
    per = ctx.prepare(cases.parse_backend("triton-fp32-perstep"))
    per.fn()
    assert calls == []
    fused = ctx.prepare(cases.parse_backend("triton-fp32"))
    per.fn()
    assert calls == []
    fused.fn()
    assert calls == [1]
    # forward + backward (the per-step backward's parity is the train rows'; one interpreted backward costs ~10 s)
    ctx = cases.CaseContext(cases.CASES["rollout-bwd-mnist-doubling"], torch.device("cpu"), tiny=True)
    ref = ctx.reference()
    ctx.prepare(cases.parse_backend("triton-fp32-perstep"))
    assert ctx.nca.settings.small_grid is False
    prep = ctx.prepare(cases.parse_backend("triton-fp32"))
    assert ctx.nca.settings.small_grid is True
    errs = [runner_rel_err(r, o) for r, o in zip(ref, prep.parity())]
    assert len(errs) == len(ref) > 2 and max(errs) < 1e-4, errs


def test_speedup_vs_per_step_pairs_rows_of_one_case() -> None:
    def row(case: str, backend: str, ms: float) -> dict:
        return {"case": case, "backend": backend, "impl": backend.split("-")[0], "time_ms": {"median": ms}}

    rows = [row("c", "triton-bf16", 2.0), row("c", "triton-bf16-perstep", 3.0), row("c", "triton-fp32", 4.0),
            row("d", "triton-bf16", 1.0), row("c", "torch-fp32", 8.0)]
    runner._speedups(rows)
    assert rows[0]["speedup"] == {"vs torch-fp32": 4.0, "vs per-step": 1.5}
    assert "vs per-step" not in rows[1]["speedup"] and "vs per-step" not in rows[2]["speedup"]
    assert rows[3]["speedup"] == {}


def test_speedup_vs_graphs_off_pairs_the_graph_row_with_its_eager_row() -> None:
    def row(case: str, backend: str, ms: float) -> dict:
        return {"case": case, "backend": backend, "impl": backend.split("-")[0], "time_ms": {"median": ms}}

    rows = [row("c", "triton-bf16-graph", 2.0), row("c", "triton-bf16", 3.0), row("d", "triton-bf16-graph", 1.0)]
    runner._speedups(rows)
    assert rows[0]["speedup"] == {"vs graphs off": 1.5}, rows[0]["speedup"]
    assert rows[1]["speedup"] == {} and rows[2]["speedup"] == {}, "no eager row of case d to compare with"


def test_speedup_vs_per_step_wgrad_pairs_batched_rows_with_the_per_step_row() -> None:
    def row(case: str, backend: str, ms: float) -> dict:
        return {"case": case, "backend": backend, "impl": backend.split("-")[0], "time_ms": {"median": ms}}

    rows = [row("c", "triton-bf16", 3.0), row("c", "triton-bf16-batched", 2.0),
            row("c", "triton-bf16-batched-cublas", 1.5), row("c", "triton-bf16-batched@step", 1.0),
            row("c", "triton-bf16@step", 4.0), row("d", "triton-bf16-batched", 1.0)]
    runner._speedups(rows)
    assert [rows[i]["speedup"].get("vs per-step wgrad") for i in range(len(rows))] == [None, 1.5, 2.0, 4.0, None,
                                                                                         None]


@pytest.mark.slow
def test_batched_weight_gradient_backends_run_beside_the_per_step_one(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 30's A/B rows: triton-bf16 (per-step post kernels) and triton-bf16-batched* (kernels/wgrad.py) on the
    same case in one run, each passing parity and pointing the shared model at its own design; the batched rows
    launch the batched weight-gradient kernel, the per-step row does not; step cases skip them."""
    b = cases.parse_backend("triton-bf16-batched-cublas@step")
    assert (b.wgrad, b.precision, b.checkpoint, b.small_grid) == ("batched-cublas", "bf16", "step", True)
    assert cases.parse_backend("triton-bf16").wgrad == "per-step"
    assert runner._select(runner.QUICK_PLAN, ["step"], ["triton-bf16", "triton-bf16-batched"]) == [
        ("step", ["triton-bf16"])]
    quick = [(c, b) for c, bs in runner.QUICK_PLAN for b in bs]
    for case in ("rollout-bwd-mnist-doubling", "train-mnist-doubling", "rollout-bwd-celeba-nondoubling-256-T128",
                 "train-celeba-nondoubling-256-T128"):
        assert {(case, "triton-bf16"), (case, "triton-bf16-batched")} <= set(quick), case
    if cases.triton_unavailable(torch.device("cpu")):
        pytest.skip("fused step not importable")
    from triton.runtime.interpreter import InterpretedFunction

    launched: list[str] = []
    real_run = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run",
                        lambda self, *a, **k: launched.append(self.fn.__name__) or real_run(self, *a, **k))
    res = runner.run([("rollout-bwd-mnist-doubling", ["triton-bf16", "triton-bf16-batched"])],
                     device=torch.device("cpu"), out=tmp_path, tiny=True, quick=False, peaks=False, quiet=True)
    rows = res["rows"]
    assert [r["status"] for r in rows] == ["ok"] * 2, [r["status"] for r in rows]
    assert [r["wgrad"] for r in rows] == ["per-step", "batched"]
    assert all(r["parity"]["ok"] for r in rows), [r["parity"] for r in rows]
    assert "_wgrad_batched_kernel" in launched
    ctx = cases.CaseContext(cases.CASES["rollout-bwd-mnist-doubling"], torch.device("cpu"), tiny=True)
    ctx.prepare(cases.parse_backend("triton-bf16-batched"))
    assert ctx.nca.settings.wgrad == "batched"
    ctx.prepare(cases.parse_backend("triton-bf16"))
    assert ctx.nca.settings.wgrad == "per-step", "expected a per-step row to point the shared model back"
    with pytest.raises(NotImplementedError, match="batched"):
        cases.CaseContext(cases.CASES["step"], torch.device("cpu"), tiny=True).prepare(
            cases.parse_backend("triton-bf16-batched"))
