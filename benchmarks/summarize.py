"""Summarise a gpu_check.sh output folder: kernel tests, quick benchmark, the two training runs.

Usage::

    python -m benchmarks.summarize OUTDIR [--rc tests=0 bench=0 train_triton=0 train_torch=0] [--note TEXT]

Reads ``OUTDIR/tests.txt`` (pytest's output), ``OUTDIR/bench.json`` (the runner's result) and
``OUTDIR/train_<backend>.jsonl`` (``fastnca train`` metrics rows), writes ``OUTDIR/summary.md`` and prints it.
Missing pieces are reported as missing, never guessed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

__all__ = ["summarize", "read_jsonl", "pytest_line", "train_summary", "compare_losses", "main"]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON rows of a metrics file (broken lines are skipped: a run killed mid-write)."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def pytest_line(text: str) -> str:
    """pytest's final '== N passed, M skipped in Xs ==' line, or the last non-empty line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"\b(passed|failed|error|errors|skipped|no tests ran)\b", ln) and " in " in ln:
            return ln.strip("= ")
    return lines[-1] if lines else "(no output)"


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


def _bench_rows(bench: dict[str, Any]) -> list[str]:
    m = bench.get("meta", {})
    peaks = bench.get("peaks", {})
    out = [f"card: {m.get('gpu') or 'CPU'} ({m.get('sm_count')} SMs, driver {m.get('driver')}), "
           f"torch {m.get('torch')}, triton {m.get('triton')}, commit {m.get('commit')}, {m.get('date_utc')}"]
    if "matmul_bf16" in peaks and "copy" in peaks:
        out.append(f"peaks: bf16 matmul {peaks['matmul_bf16']['tflops']:.0f} TFLOP/s, "
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


def summarize(out_dir: Path, rc: dict[str, str] | None = None, note: str = "") -> str:
    """The summary of a gpu_check output folder as markdown (also written to OUTDIR/summary.md)."""
    rc = rc or {}
    lines = ["# gpu_check summary", ""]
    if note:
        lines += [note, ""]
    tests = out_dir / "tests.txt"
    lines.append("## kernel tests (compiled, TRITON_INTERPRET unset)")
    lines.append(f"- {pytest_line(tests.read_text()) if tests.is_file() else 'missing: tests.txt'}"
                 f" (rc {rc.get('tests', '?')})")
    lines += ["", f"## quick benchmark (rc {rc.get('bench', '?')})"]
    bj = out_dir / "bench.json"
    if bj.is_file():
        try:
            lines += _bench_rows(json.loads(bj.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            lines.append(f"- bench.json unreadable: {err}")
    else:
        lines.append("- missing: bench.json")
    lines += ["", "## training, mnist-doubling (same seed and data; --time-limit each)",
              "| backend | rc | iterations | it/s (overall) | it/s (last window) | last loss | test IWAE |",
              "|---|---|---:|---:|---:|---:|---:|"]
    runs = {}
    for name in ("triton", "torch"):
        rows = read_jsonl(out_dir / f"train_{name}.jsonl")
        runs[name] = rows
        s = train_summary(rows)
        if not s.get("rows"):
            lines.append(f"| {name} | {rc.get('train_' + name, '?')} | no metrics rows | | | | |")
            continue
        iw = s.get("test", {}).get("iwae")
        lines.append(f"| {name} | {rc.get('train_' + name, '?')} | {s['step']} | {s.get('it_per_s_overall', 0):.2f} "
                     f"| {s.get('it_per_s_last') or 0:.2f} | {s.get('loss') or math.nan:.3f} "
                     f"| {'-' if iw is None else f'{iw:.2f}'} |")
    cmp_ = compare_losses(runs["triton"], runs["torch"])
    if cmp_.get("common_steps"):
        lines.append(f"\nloss at equal iterations: step {cmp_['first_step']}: triton {cmp_['loss_a_first']:.4f} vs "
                     f"torch {cmp_['loss_b_first']:.4f}; step {cmp_['step']}: triton {cmp_['loss_a']:.4f} vs torch "
                     f"{cmp_['loss_b']:.4f} (rel diff {cmp_['rel_diff']:.2e}); {cmp_['common_steps']} common steps")
        ta, tb = train_summary(runs["triton"]), train_summary(runs["torch"])
        if ta.get("it_per_s_overall") and tb.get("it_per_s_overall"):
            lines.append(f"training speed-up (it/s, fused over reference): "
                         f"{ta['it_per_s_overall'] / tb['it_per_s_overall']:.2f}x")
    else:
        lines.append("\nloss at equal iterations: no step logged by both runs")
    text = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    """CLI: print the summary of OUTDIR and write OUTDIR/summary.md."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.summarize", description=__doc__.split("\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--rc", nargs="*", default=[], metavar="STAGE=CODE", help="exit codes of the stages")
    p.add_argument("--note", default="", help="a line printed under the title (e.g. how the project was imported)")
    args = p.parse_args(argv)
    rc = dict(kv.split("=", 1) for kv in args.rc if "=" in kv)
    print(summarize(args.out_dir, rc, args.note))


if __name__ == "__main__":
    main()
