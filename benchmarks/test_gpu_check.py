"""The one-command GPU check on the CPU: the whole script as a dry run (every stage at tiny sizes, the summary and
the recording step), and the pieces it relies on (profile tables, ncu CSV parsing, fit note, time to quality,
recording) on synthetic inputs. No speed claims: code paths and output limits only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import profiling, record, summarize

ROOT = Path(__file__).resolve().parents[1]
EXPECTED_FILES = {"summary.md", "check.json", "details.md", "bench.json", "bench.md", "tests.txt", "gpu_check.log"}
MAX_FILES, MAX_BYTES, MAX_DEPTH = 8, 16 * 2**20, 2  # what a GPU run may hand back: files, bytes each, folders deep
STAGES = ["env", "compile", "train_auto", "train_torch", "bench", "tests", "launches", "profile", "ncu", "fit"]


# ------------------------------------------------------------------------------------------- the dry run
@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """`bash benchmarks/gpu_check.sh OUT --tiny` with this interpreter (no GPU, no ncu on the PATH)."""
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="",
               PATH=os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                    if not (Path(p) / "ncu").exists()))
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--tiny"]
    if env.get("FASTNCA_DATA"):
        cmd += ["--data-dir", env["FASTNCA_DATA"]]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1650)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow
def test_dry_run_output_fits_the_return_limits(dry_run) -> None:
    out, _ = dry_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= MAX_FILES, f"expected <= {MAX_FILES} files, got {sorted(map(str, files))}"
    assert {p.name for p in files} == EXPECTED_FILES, sorted(p.name for p in files)
    for p in files:
        assert p.stat().st_size <= MAX_BYTES, f"{p} is {p.stat().st_size} bytes, expected <= {MAX_BYTES}"
        assert len(p.relative_to(out).parts) - 1 <= MAX_DEPTH, f"{p} is more than {MAX_DEPTH} folders deep"


@pytest.mark.slow
def test_dry_run_every_stage_ran_or_left_a_one_line_note(dry_run) -> None:
    out, _ = dry_run
    check = json.loads((out / "check.json").read_text())
    stages = {s["stage"]: s for s in check["stages"]}
    assert sorted(stages) == sorted(STAGES), f"expected stages {STAGES}, got {list(stages)}"
    for name, s in stages.items():
        assert "\n" not in s["note"], (name, s["note"])
        assert s["rc"] in ("0", "note"), f"stage {name}: expected rc 0 or a note, got {s}"
        if s["rc"] == "note":
            assert s["note"], f"stage {name} was skipped without a note"
    assert check["env"]["device_type"] == "cpu" and check["env"]["triton"]
    # fit: real sm_90 compiles of the shipped forward configs (the dry run passes --only fwd)
    assert check["fit"] and all(r["pass"] == "fwd" and r["registers"] > 0 for r in check["fit"]), check["fit"][:2]
    assert "compiled for sm_90" in stages["fit"]["note"]
    assert "passed" in stages["tests"]["note"], stages["tests"]["note"]
    # the compile pass: the jobs' launches recorded, a few of them compiled for sm_90 (no GPU here)
    assert "launches" in stages["compile"]["note"] and "compiled" in stages["compile"]["note"], stages["compile"]
    rows = {(r["case"], r["backend"]): r for r in check["bench"]["rows"]}
    assert rows[("step", "triton-bf16")]["status"] == "ok" and rows[("step", "torch-fp32")]["status"] == "ok"
    assert ("step", "triton-bf16-perstep") not in rows  # the per-step backends apply to rollouts only
    early = [rows[("rollout-mnist-doubling-early", b)] for b in ("torch-fp32", "triton-bf16", "triton-bf16-perstep")]
    assert [r["status"] for r in early] == ["ok"] * 3 and [r.get("small_grid") for r in early] == [None, True, False]
    if stages["launches"]["rc"] == "0":
        assert check["launches"]["total"] > 0, check["launches"]
    else:
        assert "tools.launches" in stages["launches"]["note"]
    targets = check["profile"]["targets"]
    assert [t["label"] for t in targets] == [t[0] for t in profiling.TINY_TARGETS]
    for t in targets:
        assert "error" not in t, t
        assert t["top"] and t["top"][0]["count"] >= 1 and t["busy_share"] is None
    assert stages["ncu"]["rc"] == "note" and "ncu" in stages["ncu"]["note"]
    for b in ("auto", "torch"):
        if "no MNIST data" in stages[f"train_{b}"]["note"]:
            pytest.skip("no MNIST data here: the training stage said so in one line")
        assert check["train"][b], f"expected metrics rows from the {b} training run"
    assert "PyTorch reference on cpu" in stages["train_auto"]["note"], "the run says how it computed"
    assert check["time_to_quality"]["default"]["rows"] > 0 and check["time_to_quality"]["reference"]["rows"] > 0


@pytest.mark.slow
def test_dry_run_prints_the_summary_last(dry_run) -> None:
    out, proc = dry_run
    summary = (out / "summary.md").read_text()
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])
    for key in ("| card |", "| launches / training iteration |", "| fit on the installed Triton |",
                "| time to quality |", "| kernel tests (compiled) |", "| ncu |", "No CUDA device"):
        assert key in summary, f"expected {key!r} in summary.md"
    assert "% peak" not in summary and "speed-up" not in summary  # a CPU run claims no speed
    details = (out / "details.md").read_text()
    assert "## Fit on the installed Triton" in details and "torch.profiler on the CPU" in details


@pytest.mark.slow
def test_dry_run_is_recorded_into_a_copy_of_results(dry_run, tmp_path: Path) -> None:
    out, _ = dry_run
    results = tmp_path / "RESULTS.md"
    shutil.copy(ROOT / "benchmarks" / "RESULTS.md", results)
    before = results.read_text()
    cmd = [sys.executable, "-m", "benchmarks.record", str(out), "--results", str(results)]
    refused = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "no CUDA device" in refused.stderr and results.read_text() == before
    ok = subprocess.run(cmd + ["--allow-cpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    after = results.read_text()
    env = json.loads((out / "check.json").read_text())["env"]
    head = after[after.index(record.MARKER):]
    assert f"### {env['date_utc'][:10]}: CPU, commit {env['commit'][:12]} (CPU dry run" in head
    assert f"torch {env['torch']}, triton {env['triton']}" in head and env["date_utc"] in head
    assert after.rstrip().splitlines()[-1].startswith(f"- {env['date_utc'][:10]}: gpu_check on CPU")
    # a CPU run does not count as a GPU measurement (RESULTS.md may already hold one)
    assert ("**No GPU measurement yet.**" in after) == ("**No GPU measurement yet.**" in before)
    again = subprocess.run(cmd + ["--allow-cpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "already" in again.stderr and results.read_text() == after


# ------------------------------------------------------------------------------------------- the pieces
def test_busy_time_counts_overlaps_once() -> None:
    assert profiling.busy_time_us([(0, 10), (5, 15), (20, 30), (29, 31)]) == 26
    assert profiling.busy_time_us([]) == 0


NCU_CSV = '''==PROF== Connected to process 123
"ID","Process ID","Kernel Name","gpu__time_duration.sum","launch__registers_per_thread",\
"sm__warps_active.avg.pct_of_peak_sustained_active","sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",\
"lts__throughput.avg.pct_of_peak_sustained_elapsed","gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"
"","","","nsecond","register/thread","%","%","%","%"
"0","123","_nca_step_fwd_kernel","1,250","254","12.5","61.3","20.1","8.4"
"1","123","_nca_step_bwd_kernel","2500","","10","","30","n/a"
'''


def test_parse_ncu_csv_reads_metrics_units_and_missing_values() -> None:
    rows = profiling.parse_ncu_csv(NCU_CSV)
    assert [r["kernel"] for r in rows] == ["_nca_step_fwd_kernel", "_nca_step_bwd_kernel"]
    fwd, bwd = rows
    assert fwd["duration_us"] == pytest.approx(1.25) and fwd["registers"] == 254
    assert fwd["tensor_pipe_pct"] == pytest.approx(61.3) and fwd["achieved_occupancy_pct"] == 12.5
    assert fwd["l2_throughput_pct"] == pytest.approx(20.1) and fwd["dram_throughput_pct"] == pytest.approx(8.4)
    assert bwd["registers"] is None and bwd["tensor_pipe_pct"] is None and bwd["dram_throughput_pct"] is None
    assert bwd["duration_us"] == pytest.approx(2.5)
    assert profiling.parse_ncu_csv("==ERROR== ERR_NVGPUCTRPERM") == []
    assert "| `_nca_step_fwd_kernel` | 1.25 | 254 |" in profiling.ncu_markdown(rows)


def test_fit_note_shouts_spills(tmp_path: Path) -> None:
    rows = [{"pass": "fwd", "name": "a", "registers": 254, "spills": 0, "spill_ops": 0, "shared": 10},
            {"pass": "bwd", "config": "b", "kernel": "main", "registers": 255, "spills": 16, "spill_ops": 4,
             "shared": 20}]
    (tmp_path / "fit.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    note = summarize.fit_note(tmp_path)
    assert "1 fwd configs + 1 bwd kernels" in note and "max 255 registers (b/main)" in note
    assert "SPILLS in b/main (16 B, 4 STL/LDL)" in note
    (tmp_path / "fit.jsonl").write_text(json.dumps(rows[0]))
    assert summarize.fit_note(tmp_path).endswith("no spills")
    summarize.summarize(tmp_path / "o", tmp_path)
    (tmp_path / "fit.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    text = summarize.summarize(tmp_path / "o", tmp_path)
    assert text.splitlines()[2].startswith("**WARNING: REGISTER SPILLS"), text[:300]


def _rows(rate: float, loss0: float, n: int) -> list[dict]:
    return [{"step": 5 * i, "split": "train", "loss": loss0 - i, "elapsed_s": 5 * i / rate, "it_per_s": rate}
            for i in range(1, n + 1)]


def test_the_plan_fits_in_eight_minutes() -> None:
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "unused", "--plan"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    stages = [line.split()[0] for line in lines[:-1]]
    assert stages == ["env", "compile", "train", "bench", "tests", "launches", "profile", "ncu", "fit"], stages
    total = int(lines[-1].split()[1].rstrip("s"))
    assert total <= 480, f"the GPU stages' caps add up to {total} s, more than 8 minutes: {proc.stdout}"
    assert "train 102s x 2" in proc.stdout, "two training runs of 90 s after set-up"


def test_time_to_quality_compares_equal_wall_time_and_iterations() -> None:
    default, ref = _rows(10.0, 100.0, 20), _rows(2.5, 100.0, 5)  # both 10 s; same losses at equal steps
    t = summarize.time_to_quality(default, ref)
    assert t["it_per_s_ratio"] == pytest.approx(4.0)
    assert [x["step"] for x in t["at_iteration"]] == [5, 15, 25]
    assert all(x["default"] == x["reference"] for x in t["at_iteration"])
    # the reference's final smoothed loss (mean of its last 3: 96) is reached by the fused run at step 25, 2.5 s
    assert t["reference_final_loss"] == pytest.approx(96.0)
    assert t["default_reaches_reference_loss_s"] == pytest.approx(2.5) and t["time_to_quality_speedup"] == 4.0
    last = t["at_wall_time"][-1]
    assert last["t_s"] == 10.0 and last["default"] < last["reference"]
    line = summarize.ttq_line(t)
    assert "(4.00x)" in line and "after 2.5 s (reference: 10.0 s, 4.00x)" in line
    assert summarize.ttq_line(summarize.time_to_quality([], ref)) == "no metrics rows from the default run"


def test_profile_markdown_of_a_gpu_result() -> None:
    res = {"device": "cuda", "targets": [
        {"label": "step", "sizes": "B=32", "wall_plain_ms": 2.0, "wall_profiled_ms": 2.5, "launches": 7,
         "distinct_kernels": 3, "gpu_busy_ms": 1.5, "busy_share": 0.75, "idle_share": 0.25,
         "top": [{"name": "_nca_step_fwd_kernel", "count": 2, "total_us": 900.0, "share": 0.6}]},
        {"label": "bad", "error": "RuntimeError: x"}]}
    md = profiling.to_markdown(res)
    assert "GPU busy 1.500 ms = 75.0 % of wall (idle 25.0 %)" in md
    assert "| `_nca_step_fwd_kernel` | 2 | 900.0 | 60.0 % |" in md and "- error: RuntimeError: x" in md


def test_record_refuses_a_folder_without_check_json(tmp_path: Path) -> None:
    with pytest.raises(record.RecordError, match="check.json"):
        record.section(tmp_path)


def test_launch_count_is_read_from_the_cli_output(tmp_path: Path) -> None:
    d = {"triton": 40, "aten": 120, "total": 160, "by_op": {"nca_step": 40}}
    for text in (json.dumps(d), "counting...\n" + json.dumps(d) + "\n", "log line\n" + json.dumps(d, indent=1)):
        (tmp_path / "launches.out").write_text(text)
        assert summarize.read_launches(tmp_path) == d, text
        assert summarize.launches_note(tmp_path) == "160 kernel launches per training iteration (triton 40, aten 120)"
    (tmp_path / "launches.out").write_text("Traceback ...\nValueError: x\n")
    assert summarize.read_launches(tmp_path) is None
    assert summarize.launches_note(tmp_path) == "no launch count in tools.launches' output"


def test_record_of_a_gpu_run_is_stamped_from_its_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    env = {"date_utc": "2031-01-02T03:04:05+00:00", "device_type": "cuda", "gpu": "NVIDIA H100 80GB HBM3",
           "capability": "9.0", "sm_count": 132, "driver": "unavailable: no NVML", "cuda": "12.8",
           "torch": "2.11.0", "triton": "3.6.0", "python": "3.12.1", "commit": "abcdef1234567890", "dirty": False}
    check = {"env": env, "nvidia_smi": {"driver_version": "570.86"}, "stages": [{"stage": "bench", "rc": "0"}]}
    (out / "check.json").write_text(json.dumps(check))
    (out / "summary.md").write_text("# gpu_check summary\n\n| | |\n|---|---|\n| card | x |\n\n## stages\n")
    (out / "bench.md").write_text("## Benchmark run x (quick)\n\n| case |\n|---|\n| step |\n")
    (out / "details.md").write_text("# gpu_check details\n\n## Fit on the installed Triton\n\n| pass |\n")
    results = tmp_path / "RESULTS.md"
    shutil.copy(ROOT / "benchmarks" / "RESULTS.md", results)
    record.record(out, results)
    doc = results.read_text()
    sec = doc[doc.index(record.MARKER):]
    assert sec.split("\n")[2] == "### 2031-01-02: NVIDIA H100 80GB HBM3 (sm_90, 132 SMs), commit abcdef123456"
    assert ("- card: NVIDIA H100 80GB HBM3 (sm_90, 132 SMs); driver 570.86; CUDA 12.8, torch 2.11.0, triton 3.6.0, "
            "python 3.12.1") in sec
    assert "- run: 2031-01-02T03:04:05+00:00, commit abcdef1234567890;" in sec
    assert "##### stages" in sec and "#### Fit on the installed Triton" in sec and "| step |" in sec
    assert "**No GPU measurement yet.**" not in doc
    assert doc.rstrip().endswith("- 2031-01-02: gpu_check on NVIDIA H100 80GB HBM3 (sm_90, 132 SMs) at commit "
                                 "abcdef123456 recorded (stages: bench 0).")
    # newest first: a later run goes above this one
    env2 = {**env, "date_utc": "2031-02-01T00:00:00+00:00"}
    (out / "check.json").write_text(json.dumps({**check, "env": env2}))
    record.record(out, results)
    doc = results.read_text()
    assert doc.index("### 2031-02-01") < doc.index("### 2031-01-02")


def test_summary_of_a_gpu_run_holds_the_headline_table(tmp_path: Path) -> None:
    """The GPU rendering path on hand-made stage outputs (a CPU cannot produce them)."""
    env = {"date_utc": "2031-01-02T03:04:05+00:00", "device_type": "cuda", "gpu": "NVIDIA H100", "capability": "9.0",
           "sm_count": 132, "driver": "570.86", "cuda": "12.8", "torch": "2.11.0", "triton": "3.6.0",
           "python": "3.12.1", "commit": "abc", "dirty": False}
    (tmp_path / "env.json").write_text(json.dumps(env))
    (tmp_path / "nvidia-smi.txt").write_text("name, driver_version, clocks.current.sm [MHz], clocks.max.sm [MHz]\n"
                                             "NVIDIA H100, 570.86, 1755 MHz, 1980 MHz\n")
    (tmp_path / "stages.tsv").write_text("fit\t0\t80\t11 fwd configs + 60 bwd kernels compiled for sm_90; no spills\n"
                                         "ncu\t0\t50\t7 kernels profiled\n")
    row = {"case": "step", "backend": "triton-bf16", "impl": "triton", "checkpoint": "none", "status": "ok",
           "time_ms": {"median": 0.5, "p20": 0.49, "p80": 0.51}, "tflops_model": 600.0, "frac_peak": 0.75,
           "peak_used": "matmul_bf16", "speedup": {"vs torch-fp32": 20.0, "vs torch-bf16-cl": 5.0},
           "mem": {"torch_peak_bytes": 2**30}, "parity": {"rel_err": 1e-3, "tol": 0.03, "ok": True}}
    bench = {"meta": {"speed_claim": True, "gpu": "NVIDIA H100"}, "peaks": {"matmul_bf16": {"tflops": 800.0},
             "copy": {"tbps": 3.0}}, "rows": [row]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    (tmp_path / "launches.out").write_text(json.dumps({"triton": 80, "aten": 300, "total": 380, "by_op": {}}))
    prof = {"device": "cuda", "targets": [{"label": "train mnist-doubling fused bf16", "sizes": "B=32",
            "wall_plain_ms": 10.0, "wall_profiled_ms": 12.0, "launches": 380, "distinct_kernels": 20,
            "gpu_busy_ms": 4.0, "busy_share": 0.4, "idle_share": 0.6, "top": []}]}
    (tmp_path / "profile.json").write_text(json.dumps(prof))
    (tmp_path / "ncu.json").write_text(json.dumps({"ncu": profiling.parse_ncu_csv(NCU_CSV)}))
    (tmp_path / "train_auto.jsonl").write_text("\n".join(json.dumps(r) for r in _rows(10.0, 100.0, 20)))
    (tmp_path / "train_torch.jsonl").write_text("\n".join(json.dumps(r) for r in _rows(2.5, 100.0, 5)))
    text = summarize.summarize(tmp_path, tmp_path)
    assert "| card | NVIDIA H100, sm_90, 132 SMs, SM clock 1755 MHz (max 1980 MHz) |" in text
    assert ("| step triton-bf16 | 0.500 ms; speed-up 20.00x vs eager fp32, 5.00x vs eager bf16; 75.0 % of the "
            "run's matmul_bf16 peak |") in text
    assert "| launches / training iteration | 380 (triton 80, aten 300) |" in text
    assert "| GPU busy: train mnist-doubling fused bf16 | 40.0 % of 10.000 ms wall (idle 60.0 % = host" in text
    assert "| fit on the installed Triton | 11 fwd configs + 60 bwd kernels compiled for sm_90; no spills |" in text
    assert "_nca_step_bwd_kernel: tensor pipe - %" in text and "_nca_step_fwd_kernel: tensor pipe 61.3 %" in text
    assert "| time to quality | default settings 10.00 it/s vs --backend torch 2.50 it/s (4.00x)" in text
    assert "No CUDA device" not in text and "WARNING" not in text
    details = (tmp_path / "details.md").read_text()
    assert "## Nsight Compute" in details and "## Time to quality" in details


def test_pytest_line_reports_each_run_and_what_ran_before_a_timeout() -> None:
    text = ("### gpu_check: kernel: python -m pytest tests/kernels (timeout 110s)\n"
            + "." * 70 + "s" + "  [ 40%]\n" + "..F.s\n"
            "gpu_check: stopped by the 110s timeout (rc 124)\n"
            "### gpu_check: model: python -m pytest tests/model -m 'gpu and not slow' (timeout 40s)\n"
            ".....                                                   [100%]\n"
            "=========================== short test summary info ============================\n"
            "===== 5 passed, 300 deselected in 20.12s =====\n")
    assert summarize.pytest_line(text) == ("kernel: 73 passed, 1 failed, 2 skipped, then stopped by the 110s timeout "
                                           "(rc 124); model: 5 passed, 300 deselected in 20.12s")
    # interrupted at the timeout (SIGINT): pytest's own final line, marked as stopped
    interrupted = ("### gpu_check: kernel: python -m pytest x (timeout 90s)\n....s\n"
                   "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!! KeyboardInterrupt !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
                   "=========== 4 passed, 1 skipped in 90.02s (0:01:30) ===========\n"
                   "gpu_check: stopped by the 90s timeout (rc 124)\n")
    assert summarize.pytest_line(interrupted) == ("kernel: 4 passed, 1 skipped in 90.02s (0:01:30) (stopped by the "
                                                  "90s timeout (rc 124))")
    # one run without headers, as before; the first GPU run's note glued to the progress characters
    assert summarize.pytest_line("..s\n== 2 passed, 1 skipped in 3.10s ==\n") == "2 passed, 1 skipped in 3.10s"
    assert summarize.pytest_line("...sssgpu_check: tests stopped by the 90s timeout") == (
        "3 passed, 3 skipped, then tests stopped by the 90s timeout")


def test_time_to_quality_says_how_each_run_computed() -> None:
    stages = [{"stage": "train_auto", "rc": "0",
               "note": "fused Triton kernels on cuda:0, TF32 dots (PyTorch's cuDNN TF32 flag); backend auto: triton "
                       "20.00 ms/it, torch 40.00 ms/it -> triton (measured on X); time limit 90s; done"},
              {"stage": "train_torch", "rc": "0", "note": "PyTorch reference on cuda:0, TF32 dots; time limit 90s"},
              {"stage": "fit", "rc": "0", "note": "precision x"}]
    prec = summarize.train_precision(stages)
    assert prec == {"default": "fused Triton kernels on cuda:0, TF32 dots (PyTorch's cuDNN TF32 flag)",
                    "reference": "PyTorch reference on cuda:0, TF32 dots"}
    t = summarize.time_to_quality(_rows(10.0, 100.0, 20), _rows(2.5, 100.0, 5))
    t["precision"] = prec
    assert summarize.ttq_line(t).startswith("default settings (fused Triton kernels on cuda:0, TF32 dots (PyTorch's "
                                            "cuDNN TF32 flag)) 10.00 it/s vs --backend torch (PyTorch reference")
    assert "How each ran: default fused Triton kernels" in summarize.ttq_markdown(t)


def test_the_summary_extrapolates_iwae_and_holds_memory_against_the_model(tmp_path: Path) -> None:
    rows = [{"case": "iwae-mnist-doubling", "backend": "triton-bf16", "impl": "triton", "status": "ok",
             "time_ms": {"median": 10.0}, "samples_per_s": 1e5},  # 1.28e6 samples: 12.8 s
            {"case": "train-celeba-nondoubling-256-T128", "backend": "triton-bf16", "impl": "triton", "status": "ok",
             "time_ms": {"median": 100.0}, "predicted_memory": {"total": 3 * 2**30, "peak_moment": "backward"},
             "mem": {"torch_peak_bytes": 4 * 2**30, "torch_before_bytes": 2**29}},
            {"case": "train-mnist-doubling", "backend": "torch-bf16-cl", "impl": "torch", "status": "ok",
             "time_ms": {"median": 50.0}, "predicted_memory": {"total": 2**30, "peak_moment": "forward"},
             "mem": {"torch_peak_bytes": 2**30}},
            {"case": "train-mnist-doubling", "backend": "triton-bf16", "impl": "triton", "status": "ok",
             "time_ms": {"median": 50.0}, "predicted_memory": {"total": 2**29, "peak_moment": "backward"}}]
    (tmp_path / "bench.json").write_text(json.dumps({"meta": {"speed_claim": True}, "peaks": {}, "rows": rows}))
    text = summarize.summarize(tmp_path, tmp_path)
    assert "the 10,000-image test set at k = 128 would take 0.2 min (extrapolated)" in text, text
    assert "predicted 3.00 GiB (at the backward moment), measured peak 4.00 GiB" in text
    assert "predicted / measured 0.75" in text
    # every training row, the reference's too; a row without a CUDA measurement says so
    assert "memory: train-mnist-doubling torch-bf16-cl | predicted 1.00 GiB (at the forward moment), measured " \
        "peak 1.00 GiB" in text and "predicted / measured 1.00" in text, text
    assert "memory: train-mnist-doubling triton-bf16 | predicted 0.50 GiB (at the backward moment), not measured " \
        "(no CUDA device)" in text, text
