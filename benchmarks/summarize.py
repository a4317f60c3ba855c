"""Assemble a gpu_check.sh run: ``check.json`` (everything), ``details.md`` (tables) and ``summary.md`` (headline).

Usage::

    python -m benchmarks.summarize OUTDIR [--parts DIR] [--note TEXT]

Reads the stage outputs from ``--parts`` (gpu_check.sh's scratch folder; default OUTDIR): ``stages.tsv`` (one
line per stage: name, exit code, seconds, note), ``env.json``, ``nvidia-smi.txt``, ``fit.jsonl``,
``launches.out``, ``profile.json`` / ``profile.md``, ``ncu.json`` / ``ncu.md``, ``train_triton.jsonl`` and
``train_torch.jsonl``; and from OUTDIR ``tests.txt`` and ``bench.json``. Writes OUTDIR/check.json,
OUTDIR/details.md and OUTDIR/summary.md and prints the summary. Missing pieces are reported as missing, never
guessed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any

__all__ = ["summarize", "read_jsonl", "pytest_line", "train_precision", "train_summary", "compare_losses",
           "time_to_quality", "fit_note", "launches_note", "write_env", "main"]


# ------------------------------------------------------------------------------------------------ readers
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON rows of a metrics file (broken lines are skipped: a run killed mid-write)."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


_PYTEST_FINAL = re.compile(r"\b(passed|failed|error|errors|skipped|no tests ran|deselected)\b.* in [\d.]+s")
_PROGRESS = re.compile(r"^([.sFExX]+)\s*(?:\[\s*(\d+)(?:/(\d+))?%?\])?$")  # -q progress: "..sF.  [ 40%]"


def _why(note: str) -> str:
    return note.removeprefix("gpu_check:").strip()


def _pytest_one(text: str) -> str:
    """One pytest run's final '== N passed, M skipped in Xs ==' line; where there is none (killed at its timeout),
    what its -q progress characters say had run, and the timeout."""
    text = text.replace("gpu_check:", "\ngpu_check:")  # a note after progress characters of a killed run
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    final = next((ln for ln in reversed(lines) if _PYTEST_FINAL.search(ln)), None)
    stopped = next((ln for ln in lines if ln.startswith("gpu_check:") and "timeout" in ln), None)
    if final:
        s = final.strip("= ")
        return f"{s} ({_why(stopped)})" if stopped else f"{s} (interrupted)" if "KeyboardInterrupt" in text else s
    chars = "".join(m.group(1) for ln in lines if (m := _PROGRESS.match(ln)))
    if chars:
        names = {".": "passed", "F": "failed", "E": "errors", "s": "skipped", "x": "xfailed", "X": "xpassed"}
        counts = ", ".join(f"{chars.count(c)} {n}" for c, n in names.items() if chars.count(c))
        return f"{counts}, then {_why(stopped) if stopped else 'no final pytest line'}"
    if stopped:
        return f"no test finished: {_why(stopped)}"
    return lines[-1] if lines else "(no output)"


def pytest_line(text: str) -> str:
    """pytest's final '== N passed, M skipped in Xs ==' line (or how many had passed when a timeout stopped it), per
    run: tests.txt holds one section per pytest run, each under a '### gpu_check: LABEL: ...' header
    ('kernel: 40 passed in 50.1s; model: 3 passed in 20.0s'); a text without headers is one run."""
    sections = re.split(r"^### gpu_check: ([^:\n]+):.*$", text, flags=re.M)
    if len(sections) == 1:
        return _pytest_one(text)
    return "; ".join(f"{label}: {_pytest_one(body)}" for label, body in zip(sections[1::2], sections[2::2]))


def read_stages(path: Path) -> list[dict[str, Any]]:
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3:
                out.append({"stage": parts[0], "rc": parts[1], "seconds": _int(parts[2]),
                            "note": parts[3] if len(parts) > 3 else ""})
    return out


def _int(s: str) -> int | None:
    try:
        return int(s)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------------- env
def write_env(path: str | Path, device: str = "cuda") -> dict[str, Any]:
    """The environment of the run (card, capability, driver, versions, commit, optional tools) as JSON."""
    import shutil
    import subprocess

    import torch

    from benchmarks.utils import env_info

    dev = torch.device("cuda" if device == "cuda" and torch.cuda.is_available() else "cpu")
    env = env_info(dev)
    env["cuda_available"] = torch.cuda.is_available()
    ncu = shutil.which("ncu")
    env["ncu"] = None
    if ncu:
        try:
            env["ncu"] = subprocess.run([ncu, "--version"], capture_output=True, text=True,
                                        timeout=30).stdout.strip().splitlines()[-1]
        except (OSError, subprocess.SubprocessError, IndexError) as err:
            env["ncu"] = f"present, --version failed: {err}"
    try:
        import pynvml  # noqa: F401

        env["pynvml"] = True
    except ImportError:
        env["pynvml"] = False
    Path(path).write_text(json.dumps(env, indent=1, default=str))
    print(json.dumps(env, default=str))
    print(f"{env.get('gpu') or 'no CUDA device'}, driver {env.get('driver')}, torch {env.get('torch')}, "
          f"triton {env.get('triton')}, commit {str(env.get('commit'))[:12]}, ncu {env.get('ncu') or 'absent'}, "
          f"pynvml {'yes' if env['pynvml'] else 'absent'}, pytest-benchmark {env.get('pytest_benchmark') or 'absent'}")
    return env


def _nvidia_smi(path: Path) -> dict[str, str]:
    """The first GPU's row of ``nvidia-smi --query-gpu=... --format=csv`` as {column: value}."""
    if not path.is_file():
        return {}
    rows = list(csv.reader(io.StringIO(path.read_text())))
    if len(rows) < 2 or len(rows[0]) != len(rows[1]):
        return {}
    return {k.strip(): v.strip() for k, v in zip(rows[0], rows[1])}


# ---------------------------------------------------------------------------------------------------- fit
def fit_rows(parts: Path) -> list[dict[str, Any]]:
    return read_jsonl(parts / "fit.jsonl")


def fit_note(parts: str | Path) -> str:
    """One line: how many kernels compiled, the largest register count, and SPILLS in capitals if any."""
    rows = fit_rows(Path(parts))
    if not rows:
        return "no fit rows"
    fwd = [r for r in rows if r.get("pass") == "fwd"]
    bwd = [r for r in rows if r.get("pass") == "bwd"]
    more = "".join(f" + {n} {p} kernels" for p in ("rollout", "likelihood")
                   if (n := sum(r.get("pass") == p for r in rows)))
    name = lambda r: r.get("name") or f"{r.get('config')}/{r.get('kernel')}"  # noqa: E731
    top = max(rows, key=lambda r: r.get("registers", 0))
    spills = [r for r in rows if r.get("spills", 0) or r.get("spill_ops", 0)]
    s = (f"{len(fwd)} fwd configs + {len(bwd)} bwd kernels{more} compiled for sm_90; max {top.get('registers')} "
         f"registers ({name(top)}); max shared {max(r.get('shared', 0) for r in rows)} B; ")
    if spills:
        s += "SPILLS in " + ", ".join(f"{name(r)} ({r.get('spills')} B, {r.get('spill_ops')} STL/LDL)"
                                      for r in spills[:6]) + (" ..." if len(spills) > 6 else "")
    else:
        s += "no spills"
    return s


def fit_markdown(rows: list[dict[str, Any]], triton: str | None) -> str:
    lines = [f"## Fit on the installed Triton ({triton}): sm_90 compiles of every shipped config", "",
             "| pass | config | kernel | warps | stages | registers | spills (B) | STL+LDL | shared (B) | HGMMA "
             "| HMMA |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        flag = " **SPILL**" if r.get("spills") or r.get("spill_ops") else ""
        lines.append(f"| {r.get('pass')} | {r.get('name') or r.get('config')} | {r.get('kernel', 'fused step')} "
                     f"| {r.get('num_warps', r.get('warps'))} | {r.get('num_stages', r.get('stages'))} "
                     f"| {r.get('registers')} | {r.get('spills')}{flag} | {r.get('spill_ops')} | {r.get('shared')} "
                     f"| {r.get('hgmma')} | {r.get('hmma')} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- launches
def read_launches(parts: Path) -> dict[str, Any] | None:
    """The dict ``python -m tools.launches --json`` printed (the last JSON object in its output)."""
    p = parts / "launches.out"
    if not p.is_file():
        return None
    text = p.read_text()
    try:
        obj = json.loads(text)
        return obj if isinstance(obj, dict) else None
    except json.JSONDecodeError:
        pass
    lines = text.splitlines()
    for i in reversed(range(len(lines))):  # the last JSON object: one line, or indented over the lines after it
        if lines[i].lstrip().startswith("{"):
            for chunk in (lines[i], "\n".join(lines[i:])):
                try:
                    obj = json.loads(chunk)
                except json.JSONDecodeError:
                    continue
                if isinstance(obj, dict):
                    return obj
    return None


def launches_note(parts: str | Path) -> str:
    d = read_launches(Path(parts))
    if not d:
        return "no launch count in tools.launches' output"
    s = f"{d.get('total')} kernel launches per training iteration (triton {d.get('triton')}, aten {d.get('aten')})"
    return (f"{d['preset']}: " if d.get("preset") else "") + s


# ---------------------------------------------------------------------------------------------- training
def train_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Iterations reached, it/s over the run, the last train row's loss."""
    train = [r for r in rows if r.get("split", "train") == "train" and "step" in r]
    if not train:
        return {"rows": 0}
    last = train[-1]
    rates = [r["it_per_s"] for r in train if r.get("it_per_s")]
    out = {"rows": len(train), "step": last["step"], "loss": last.get("loss"), "elapsed_s": last.get("elapsed_s"),
           "it_per_s_last": last.get("it_per_s")}
    if last.get("elapsed_s"):
        out["it_per_s_overall"] = last["step"] / last["elapsed_s"]
    if rates:
        out["it_per_s_median"] = sorted(rates)[len(rates) // 2]
    tests = [r for r in rows if r.get("split") == "test"]
    if tests:
        out["test"] = {k: tests[-1].get(k) for k in ("step", "iwae", "bpd", "n_images")}
    return out


def compare_losses(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """Loss of two runs at the largest step both logged (same seed and data order: they should agree)."""
    la = {r["step"]: r["loss"] for r in a if r.get("split", "train") == "train" and "loss" in r}
    lb = {r["step"]: r["loss"] for r in b if r.get("split", "train") == "train" and "loss" in r}
    common = sorted(set(la) & set(lb))
    if not common:
        return {"common_steps": 0}
    s = common[-1]
    rel = abs(la[s] - lb[s]) / max(abs(lb[s]), 1e-12)
    return {"common_steps": len(common), "step": s, "loss_a": la[s], "loss_b": lb[s], "rel_diff": rel,
            "first_step": common[0], "loss_a_first": la[common[0]], "loss_b_first": lb[common[0]]}


def _curve(rows: list[dict[str, Any]], window: int = 3) -> list[tuple[int, float, float]]:
    """(step, elapsed_s, loss smoothed over the last ``window`` logged rows) of the train rows."""
    train = [r for r in rows if r.get("split", "train") == "train" and "loss" in r and "elapsed_s" in r
             and r.get("loss") is not None and math.isfinite(r["loss"])]
    out = []
    for i, r in enumerate(train):
        w = [x["loss"] for x in train[max(0, i - window + 1): i + 1]]
        out.append((r["step"], float(r["elapsed_s"]), sum(w) / len(w)))
    return out


def time_to_quality(default: list[dict[str, Any]], ref: list[dict[str, Any]]) -> dict[str, Any]:
    """The run at default settings (backend auto) against the reference backend (--backend torch), the same
    wall-clock budget each: loss at equal wall times and iterations, it/s, and how long the default run took to
    reach the reference's final loss (losses smoothed over 3 logged windows)."""
    cf, cr = _curve(default), _curve(ref)
    out: dict[str, Any] = {"default": train_summary(default), "reference": train_summary(ref)}
    if not cf or not cr:
        return out
    horizon = min(cf[-1][1], cr[-1][1])

    def at_time(c: list[tuple[int, float, float]], t: float) -> float | None:
        before = [x for x in c if x[1] <= t + 1e-9]
        return before[-1][2] if before else None

    out["at_wall_time"] = [{"t_s": round(horizon * f, 2), "default": at_time(cf, horizon * f),
                            "reference": at_time(cr, horizon * f)} for f in (0.25, 0.5, 0.75, 1.0)]
    sf, sr = {s: lo for s, _, lo in cf}, {s: lo for s, _, lo in cr}
    common = sorted(set(sf) & set(sr))
    if common:
        picks = sorted({common[0], common[len(common) // 2], common[-1]})
        out["at_iteration"] = [{"step": s, "default": sf[s], "reference": sr[s]} for s in picks]
    target = cr[-1][2]
    reach = next((x for x in cf if x[2] <= target), None)
    out["reference_final_loss"] = target
    out["reference_elapsed_s"] = cr[-1][1]
    if reach is not None:
        out["default_reaches_reference_loss_s"] = reach[1]
        out["default_reaches_reference_loss_step"] = reach[0]
        out["time_to_quality_speedup"] = cr[-1][1] / reach[1] if reach[1] > 0 else None
    if out["default"].get("it_per_s_overall") and out["reference"].get("it_per_s_overall"):
        out["it_per_s_ratio"] = out["default"]["it_per_s_overall"] / out["reference"]["it_per_s_overall"]
    out["curves"] = {"default": cf, "reference": cr}
    return out


def _md(s: str) -> str:
    """Text for a markdown table cell (a '|' would end the cell)."""
    return str(s).replace("|", "\\|")


def _g(x: Any, f: str = ".4g") -> str:
    return "-" if x is None else format(x, f)


def train_precision(stages: list[dict[str, Any]]) -> dict[str, str]:
    """How each training run computed, from the train stages' notes (the trainer's 'model: ...' line, e.g. 'fused
    Triton kernels on cuda:0, TF32 dots (...)'): {"default": ..., "reference": ...}, where known."""
    out = {}
    for s in stages:
        name = {"train_auto": "default", "train_triton": "default", "train_torch": "reference"}.get(s.get("stage"))
        note = (s.get("note") or "").split(";")[0].strip()
        if name and note and not note.startswith(("failed", "no MNIST", "time limit")):
            out[name] = re.sub(r"^precision ", "", note)
    return out


def _precision_note(prec: dict[str, str]) -> str:
    return f"; default: {prec.get('default', '?')} / reference: {prec.get('reference', '?')}" if prec else ""


def ttq_line(t: dict[str, Any]) -> str:
    f, r = t.get("default", {}), t.get("reference", {})
    if not f.get("rows") or not r.get("rows"):
        return f"no metrics rows from the {'default' if not f.get('rows') else 'reference'} run"
    prec = t.get("precision") or {}
    pf, pr = (f" ({prec[k]})" if prec.get(k) else "" for k in ("default", "reference"))
    s = (f"default settings{pf} {_g(f.get('it_per_s_overall'), '.2f')} it/s vs --backend torch{pr} "
         f"{_g(r.get('it_per_s_overall'), '.2f')} it/s ({_g(t.get('it_per_s_ratio'), '.2f')}x); {f['step']} vs "
         f"{r['step']} iterations")
    if t.get("at_wall_time"):
        last = t["at_wall_time"][-1]
        s += (f"; loss at {last['t_s']:.0f} s: default {_g(last['default'], '.2f')} vs reference "
              f"{_g(last['reference'], '.2f')}")
    if "default_reaches_reference_loss_s" in t:
        s += (f"; the default run reached the reference's final loss {t['reference_final_loss']:.2f} after "
              f"{t['default_reaches_reference_loss_s']:.1f} s (reference: {t['reference_elapsed_s']:.1f} s, "
              f"{_g(t.get('time_to_quality_speedup'), '.2f')}x)")
    elif "reference_final_loss" in t:
        s += f"; the default run did not reach the reference's final loss {t['reference_final_loss']:.2f}"
    return s


def ttq_markdown(t: dict[str, Any]) -> str:
    lines = ["## Time to quality: mnist-doubling at default settings (`fastnca train`, backend auto) vs "
             "`--backend torch`, the same wall-clock budget", "",
             f"- {ttq_line(t)}", ""]
    if t.get("at_wall_time"):
        lines += ["| wall time s | default loss | reference loss |", "|---:|---:|---:|"]
        lines += [f"| {x['t_s']} | {_g(x['default'], '.3f')} | {_g(x['reference'], '.3f')} |"
                  for x in t["at_wall_time"]]
        lines.append("")
    if t.get("at_iteration"):
        lines += ["| iteration | default loss | reference loss |", "|---:|---:|---:|"]
        lines += [f"| {x['step']} | {x['default']:.3f} | {x['reference']:.3f} |" for x in t["at_iteration"]]
        lines.append("")
    prec = t.get("precision") or {}
    if prec:
        lines.append(f"How each ran: default {prec.get('default', '?')}; reference {prec.get('reference', '?')} (the "
                     "trainer's own line: backend and the NCA's dot arithmetic).")
    lines.append("Losses are each run's logged training loss averaged over 3 consecutive log windows; same seed and "
                 "data order, so at equal iterations they differ only by the backends' rounding (and precisions).")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- benchmark
def _bench_rows(bench: dict[str, Any]) -> list[str]:
    m = bench.get("meta", {})
    peaks = bench.get("peaks", {})
    claim = bool(m.get("speed_claim"))
    out = [f"card: {m.get('gpu') or 'CPU'} ({m.get('sm_count')} SMs, driver {m.get('driver')}), "
           f"torch {m.get('torch')}, triton {m.get('triton')}, commit {m.get('commit')}, {m.get('date_utc')}"]
    if not claim:
        out += ["tiny sizes (a code-path check): times only, no speed claim", "",
                "| case | backend | sizes run | median ms | parity | status |", "|---|---|---|---:|---|---|"]
        for r in bench.get("rows", []):
            tm, par = r.get("time_ms"), r.get("parity", {})
            ms = f"{tm['median']:.3f}" if tm else "-"
            out.append(f"| {r['case']} | {r['backend']} | {_md(r.get('sizes', '-'))} | {ms} "
                       f"| {_g(par.get('rel_err'), '.2g')} | {r['status']} |")
        return out
    if "matmul_bf16" in peaks and "copy" in peaks:
        out.append(f"peaks measured in this run: bf16 matmul {peaks['matmul_bf16']['tflops']:.0f} TFLOP/s, "
                   f"copy {peaks['copy']['tbps']:.2f} TB/s")
    out += ["", "| case | backend | ckpt | median ms | speed-up vs fp32 / bf16 ref | TFLOP/s | % peak | peak GiB "
            "| parity | status |", "|---|---|---|---:|---|---:|---:|---:|---|---|"]
    for r in bench.get("rows", []):
        tm, sp, mem = r.get("time_ms"), r.get("speedup", {}), r.get("mem", {})
        par = r.get("parity", {})
        spc = " / ".join(f"{sp[k]:.2f}" if k in sp else "-" for k in ("vs torch-fp32", "vs torch-bf16-cl"))
        out.append(
            f"| {r['case']} | {r['backend']} | {r.get('checkpoint', '-')} | {tm['median']:.3f} |" if tm else
            f"| {r['case']} | {r['backend']} | {r.get('checkpoint', '-')} | - |")
        if tm:
            out[-1] += (f" {spc} | {r.get('tflops_model', math.nan):.1f} | {100 * r.get('frac_peak', math.nan):.1f} "
                        f"| {mem.get('torch_peak_bytes', math.nan) / 2**30:.2f} "
                        f"| {par.get('rel_err', math.nan):.2g} | {r['status']} |")
        else:
            out[-1] += f" - | - | - | - | {par.get('rel_err', '-')} | {r['status']} |"
    return out


# ------------------------------------------------------------------------------------------------ summary
def _headline(check: dict[str, Any]) -> list[str]:
    """The headline table: one row per question the run answers."""
    env, stages = check.get("env") or {}, {s["stage"]: s for s in check.get("stages", [])}
    smi = check.get("nvidia_smi") or {}
    rows: list[tuple[str, str]] = []
    card = env.get("gpu") or "CPU (no speed claim)"
    if env.get("capability"):
        card += f", sm_{env['capability'].replace('.', '')}, {env.get('sm_count')} SMs"
    if smi:
        card += (f", SM clock {smi.get('clocks.current.sm [MHz]', smi.get('clocks.sm [MHz]', '?'))}"
                 f" (max {smi.get('clocks.max.sm [MHz]', '?')})")
    rows.append(("card", card))
    driver = smi.get("driver_version") or env.get("driver")
    rows.append(("driver, versions", f"driver {driver}, CUDA {env.get('cuda')}, torch {env.get('torch')}, "
                 f"triton {env.get('triton')}, python {env.get('python')}"))
    rows.append(("commit, date", f"{env.get('commit')}{' (dirty)' if env.get('dirty') else ''}, {env.get('date_utc')}"))
    bench = check.get("bench") or {}
    claim = bool(bench.get("meta", {}).get("speed_claim"))
    for r in bench.get("rows", []):
        if "time_ms" not in r or r.get("impl") != "triton":
            continue
        s = f"{r['time_ms']['median']:.3f} ms"
        if claim:
            sp = r.get("speedup", {})
            s += (f"; speed-up {_g(sp.get('vs torch-fp32'), '.2f')}x vs eager fp32, "
                  f"{_g(sp.get('vs torch-bf16-cl'), '.2f')}x vs eager bf16")
            if "frac_peak" in r:
                s += f"; {100 * r['frac_peak']:.1f} % of the run's {r.get('peak_used', 'matmul')} peak"
            if "vs per-step" in sp:
                s += f"; small-grid path {sp['vs per-step']:.2f}x vs per-step"
            if "vs graphs off" in sp:
                s += f"; CUDA graph {sp['vs graphs off']:.2f}x vs eager"
        else:
            s += f" at {r.get('sizes', 'tiny sizes')} (no speed claim)"
        rows.append((f"{r['case']} {r['backend']}", s))
    for r in bench.get("rows", []):
        if claim and r.get("samples_per_s"):  # importance samples (decoded latents) per second
            test_min = 10_000 * 128 / r["samples_per_s"] / 60
            rows.append((f"{r['case']} {r['backend']} throughput",
                         f"{r['samples_per_s']:.4g} importance samples/s: the 10,000-image test set at k = 128 "
                         f"would take {test_min:.1f} min (extrapolated)"))
    for r in bench.get("rows", []):
        if r.get("case", "").startswith("train") and "predicted_memory" in r:
            rows.append((f"memory: {r['case']} {r['backend']}", memory_line(r)))
    launches = check.get("launches")
    rows.append(("launches / training iteration",
                 launches_note_from(launches) if launches else stages.get("launches", {}).get("note", "not run")))
    prof = check.get("profile") or {}
    for t in prof.get("targets", []):
        if "error" in t:
            rows.append((f"profile: {t['label']}", f"error: {t['error']}"))
        elif t.get("busy_share") is not None:
            rows.append((f"GPU busy: {t['label']}",
                         f"{100 * t['busy_share']:.1f} % of {t['wall_plain_ms']:.3f} ms wall (idle "
                         f"{100 * t['idle_share']:.1f} % = host + launch overhead); {t['launches']} launches"))
        else:
            rows.append((f"profile: {t['label']}",
                         f"CPU, {t['sizes']}: {t['wall_plain_ms']:.1f} ms; no GPU busy share"))
    if not prof:
        rows.append(("profile", stages.get("profile", {}).get("note") or "no profile"))
    fit = stages.get("fit", {})
    fit_text = fit.get("note") or "not run"
    cap = str(env.get("capability") or "")
    if fit and cap and cap != "9.0":
        fit_text += f" (the GPU present is sm_{cap.replace('.', '')}: tools.fit compiles for sm_90 only)"
    rows.append(("fit on the installed Triton", fit_text))
    ncu = check.get("ncu") or []
    if ncu:
        top = sorted(ncu, key=lambda r: -(r.get("duration_us") or 0))[:3]
        rows.append(("ncu (longest kernels)", "; ".join(
            f"{r['kernel'][:40]}: tensor pipe {_g(r.get('tensor_pipe_pct'), '.3g')} %, occupancy "
            f"{_g(r.get('achieved_occupancy_pct'), '.3g')} %, L2 {_g(r.get('l2_throughput_pct'), '.3g')} %, DRAM "
            f"{_g(r.get('dram_throughput_pct'), '.3g')} %, {_g(r.get('registers'), '.0f')} regs" for r in top)))
    else:
        rows.append(("ncu", stages.get("ncu", {}).get("note") or "not run"))
    rows.append(("time to quality", ttq_line(check.get("time_to_quality") or {})))
    tests = stages.get("tests")
    rows.append(("kernel tests (compiled)", f"{tests['note']} (rc {tests['rc']})" if tests else "not run"))
    return ["| | |", "|---|---|"] + [f"| {k} | {_md(v)} |" for k, v in rows]


def memory_line(r: dict[str, Any]) -> str:
    """A training row's peak memory: fastnca.memory's prediction (its peak moment) against
    torch.cuda.max_memory_allocated, and their ratio; without a CUDA measurement the prediction alone."""
    pred, mem = r.get("predicted_memory"), r.get("mem") or {}
    if not isinstance(pred, dict) or "total" not in pred:
        return f"no prediction ({pred})"
    s = f"predicted {pred['total'] / 2**30:.2f} GiB (at the {pred.get('peak_moment', '?')} moment)"
    measured = mem.get("torch_peak_bytes")
    if not measured:
        return s + ", not measured (no CUDA device)"
    return (s + f", measured peak {measured / 2**30:.2f} GiB (torch.cuda.max_memory_allocated; "
            f"{mem.get('torch_before_bytes', 0) / 2**30:.2f} GiB allocated before the row; predicted / measured "
            f"{pred['total'] / max(measured, 1):.2f})")


def launches_note_from(d: dict[str, Any]) -> str:
    s = f"{d.get('total')} (triton {d.get('triton')}, aten {d.get('aten')})"
    return (f"{d['preset']}: " if d.get("preset") else "") + s


def summarize(out_dir: Path, parts: Path | None = None, note: str = "") -> str:
    """Write OUTDIR/check.json, details.md and summary.md from a gpu_check run; return the summary."""
    out_dir = Path(out_dir)
    parts = Path(parts) if parts is not None else out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    check: dict[str, Any] = {"note": note, "stages": read_stages(parts / "stages.tsv"),
                             "env": _read_json(parts / "env.json"), "nvidia_smi": _nvidia_smi(parts / "nvidia-smi.txt"),
                             "fit": fit_rows(parts), "launches": read_launches(parts),
                             "profile": _read_json(parts / "profile.json"),
                             "ncu": (_read_json(parts / "ncu.json") or {}).get("ncu"),
                             "bench": _read_json(out_dir / "bench.json")}
    tests = out_dir / "tests.txt"
    check["tests"] = pytest_line(tests.read_text()) if tests.is_file() else None
    # the run at default settings (train_auto; train_triton in checks before 2026-12) and the reference's
    default = parts / "train_auto.jsonl"
    runs = {"auto": read_jsonl(default if default.is_file() else parts / "train_triton.jsonl"),
            "torch": read_jsonl(parts / "train_torch.jsonl")}
    check["train"] = runs
    check["time_to_quality"] = time_to_quality(runs["auto"], runs["torch"])
    check["time_to_quality"]["precision"] = train_precision(check["stages"])
    check["loss_at_equal_iterations"] = compare_losses(runs["auto"], runs["torch"])
    (out_dir / "check.json").write_text(json.dumps(check, indent=1, default=str))

    env = check["env"] or {}
    spills = any(r.get("spills") or r.get("spill_ops") for r in check["fit"])
    lines = ["# gpu_check summary", ""]
    if spills:
        lines += [f"**WARNING: REGISTER SPILLS in the sm_90 compile on triton {env.get('triton')}** (see details.md)",
                  ""]
    if env and env.get("device_type") != "cuda":
        lines += ["**No CUDA device: a code-path check, no number here is a speed claim.**", ""]
    if note:
        lines += [note, ""]
    lines += _headline(check)
    lines += ["", "## stages", "| stage | rc | s | note |", "|---|---|---:|---|"]
    lines += [f"| {s['stage']} | {s['rc']} | {s['seconds']} | {_md(s['note'])} |" for s in check["stages"]]
    lines += ["", "## quick benchmark"]
    lines += _bench_rows(check["bench"]) if check["bench"] else ["- missing: bench.json"]
    cmp_ = check["loss_at_equal_iterations"]
    lines.append("")
    if cmp_.get("common_steps"):
        lines.append(f"loss at equal iterations: step {cmp_['first_step']}: default {cmp_['loss_a_first']:.4f} vs "
                     f"torch {cmp_['loss_b_first']:.4f}; step {cmp_['step']}: default {cmp_['loss_a']:.4f} vs torch "
                     f"{cmp_['loss_b']:.4f} (rel diff {cmp_['rel_diff']:.2e}); {cmp_['common_steps']} common steps"
                     + _precision_note(check["time_to_quality"].get("precision") or {}))
    else:
        lines.append("loss at equal iterations: no step logged by both runs")
    text = "\n".join(lines) + "\n"

    details = ["# gpu_check details", ""]
    details.append(fit_markdown(check["fit"], env.get("triton")) if check["fit"] else "## Fit\n\nno fit rows\n")
    pmd = parts / "profile.md"
    details.append(pmd.read_text() if pmd.is_file() else "## Profile\n\nno profile\n")
    nmd = parts / "ncu.md"
    ncu_note = next((s["note"] for s in check["stages"] if s["stage"] == "ncu"), "") or "not run"
    details.append(nmd.read_text() if nmd.is_file() else f"## Nsight Compute\n\n{ncu_note}\n")
    details.append(ttq_markdown(check["time_to_quality"]))
    (out_dir / "details.md").write_text("\n".join(details))
    (out_dir / "summary.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    """CLI: write check.json, details.md, summary.md into OUTDIR and print the summary."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.summarize", description=__doc__.split("\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--parts", type=Path, default=None, help="folder of the stage outputs (default: OUTDIR)")
    p.add_argument("--note", default="", help="a line printed under the title (e.g. how the project was imported)")
    args = p.parse_args(argv)
    print(summarize(args.out_dir, args.parts, args.note))


if __name__ == "__main__":
    main()
