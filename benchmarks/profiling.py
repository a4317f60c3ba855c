"""Where the time goes: torch.profiler over one training iteration and one fused step, and Nsight Compute's view.

Usage::

    python -m benchmarks.profiling --json prof.json --md prof.md      # GPU: the three targets below
    python -m benchmarks.profiling --tiny                             # CPU: the same code paths at tiny sizes
    ncu --profile-from-start off ... python -m benchmarks.profiling --ncu-target   # what ncu profiles
    python -m benchmarks.profiling --ncu-csv ncu.csv --json ncu.json  # ncu's raw CSV page -> one row per kernel

Targets (``TARGETS``): one mnist-doubling training iteration (B = 32, fwd + bwd + clip + Adam) with the fused
backend in bf16 and in fp32, and the headline step forward + backward (B = 32, 64x64, |z| = h = 256, bf16, the
fused ``fastnca.kernels.nca_step.nca_step``). Each is built by ``benchmarks/cases.py`` (the same inputs the
benchmark times), run twice to compile and warm up, timed without the profiler (median of a few runs), then run
once under ``torch.profiler``. Reported per target:

- the top kernels by GPU time with their launch counts in that one iteration (memcpy/memset included);
- GPU-busy time (the union of the kernels' intervals) against the iteration's wall time measured without the
  profiler; the idle share ``1 - busy / wall`` is what the host and the launches cost.

On the CPU there are no GPU kernels: the table lists the top CPU operators by self time instead, and the busy
share is not defined (the Triton kernels run in the interpreter; a code-path check, no speed claim).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from fastnca.kernels import use_interpreter

__all__ = ["TARGETS", "busy_time_us", "profile_target", "profile_all", "to_markdown", "parse_ncu_csv",
           "ncu_markdown", "ncu_target", "main"]

# (label, benchmark case, backend): see benchmarks/cases.py
TARGETS: list[tuple[str, str, str]] = [
    ("train mnist-doubling fused bf16", "train-mnist-doubling", "triton-bf16"),
    ("train mnist-doubling fused fp32", "train-mnist-doubling", "triton-fp32"),
    ("step fwd+bwd fused bf16", "step-bwd", "triton-bf16"),
]
# tiny mode (CPU, interpreter): the fp32 training target runs the same code path as bf16, at the cost of minutes
TINY_TARGETS = [TARGETS[0], TARGETS[2]]


def busy_time_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals (overlapping kernels on several streams count once)."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(case: str, backend: str, device: torch.device, tiny: bool):
    from benchmarks.cases import CASES, CaseContext, parse_backend

    ctx = CaseContext(CASES[case], device, tiny=tiny)
    ctx.reference()  # the model cases share one model between backends: as the runner does, before prepare
    return ctx, ctx.prepare(parse_backend(backend))


def profile_target(label: str, case: str, backend: str, device: torch.device, *, tiny: bool, top: int = 12,
                   plain_reps: int = 5) -> dict[str, Any]:
    """Profile one target (see the module docstring); returns a JSON-able dict."""
    from torch.profiler import ProfilerActivity, profile

    ctx, prep = _build(case, backend, device, tiny)
    cuda = device.type == "cuda"
    for _ in range(0 if tiny else 2):  # compile, warm the allocator and the autotuning caches
        prep.fn()
    _sync(device)
    plain = []
    for _ in range(plain_reps if not tiny else 0):  # tiny: the interpreter is slow; the profiled run's wall only
        t0 = time.perf_counter()
        prep.fn()
        _sync(device)
        plain.append((time.perf_counter() - t0) * 1e3)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        prep.fn()
        _sync(device)
        wall_prof = (time.perf_counter() - t0) * 1e3
    out: dict[str, Any] = {"label": label, "case": case, "backend": backend, "device": device.type,
                           "sizes": ctx.sizes(), "wall_plain_ms": statistics.median(plain) if plain else wall_prof,
                           "wall_profiled_ms": wall_prof}
    events = prof.events()
    if cuda:
        kern = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        by: dict[str, dict[str, float]] = {}
        for e in kern:
            d = by.setdefault(e.name, {"count": 0, "total_us": 0.0})
            d["count"] += 1
            d["total_us"] += e.time_range.end - e.time_range.start
        busy = busy_time_us([(e.time_range.start, e.time_range.end) for e in kern])
        total = sum(d["total_us"] for d in by.values()) or 1.0
        rows = sorted(by.items(), key=lambda kv: -kv[1]["total_us"])
        out.update(
            kind="gpu kernels", launches=len(kern), distinct_kernels=len(by), gpu_busy_ms=busy / 1e3,
            busy_share=min(1.0, busy / 1e3 / out["wall_plain_ms"]),
            busy_share_profiled=min(1.0, busy / 1e3 / wall_prof),
            top=[{"name": n, "count": int(d["count"]), "total_us": d["total_us"], "share": d["total_us"] / total}
                 for n, d in rows[:top]])
        out["idle_share"] = 1.0 - out["busy_share"]
    else:
        avg = [a for a in prof.key_averages() if a.self_cpu_time_total > 0]
        total = sum(a.self_cpu_time_total for a in avg) or 1.0
        rows = sorted(avg, key=lambda a: -a.self_cpu_time_total)
        out.update(kind="cpu operators (no GPU: no busy share)", launches=None, distinct_kernels=None,
                   gpu_busy_ms=None, busy_share=None, idle_share=None,
                   top=[{"name": a.key, "count": int(a.count), "total_us": float(a.self_cpu_time_total),
                         "share": a.self_cpu_time_total / total} for a in rows[:top]])
    del prep, ctx
    return out


def profile_all(device: torch.device, *, tiny: bool, top: int = 12,
                targets: list[tuple[str, str, str]] | None = None) -> dict[str, Any]:
    """Every target; a target that fails is recorded with its error and the others still run."""
    res: dict[str, Any] = {"device": device.type, "tiny": tiny, "torch": torch.__version__, "targets": []}
    for label, case, backend in targets or (TINY_TARGETS if tiny else TARGETS):
        t0 = time.perf_counter()
        try:
            r = profile_target(label, case, backend, device, tiny=tiny, top=top)
        except Exception as err:  # noqa: BLE001 - one failing target must not hide the others
            msg = str(err).strip().splitlines()
            r = {"label": label, "case": case, "backend": backend,
                 "error": f"{type(err).__name__}: {msg[0][:300] if msg else ''}"}
        r["seconds"] = round(time.perf_counter() - t0, 1)
        res["targets"].append(r)
        print(f"profile {label}: " + (r.get("error") or _headline(r)), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def _headline(r: dict[str, Any]) -> str:
    s = f"{r['sizes']}; wall {r['wall_plain_ms']:.3f} ms (profiled {r['wall_profiled_ms']:.3f} ms)"
    if r.get("busy_share") is not None:
        s += (f"; {r['launches']} launches of {r['distinct_kernels']} kernels; GPU busy {r['gpu_busy_ms']:.3f} ms "
              f"= {100 * r['busy_share']:.1f} % of wall (idle {100 * r['idle_share']:.1f} %)")
    return s


def _short(name: str, n: int = 90) -> str:
    name = name.replace("|", "/")
    return name if len(name) <= n else name[: n - 3] + "..."


def to_markdown(res: dict[str, Any]) -> str:
    """The profile as markdown: one headline line and one top-kernels table per target."""
    lines = ["## torch.profiler: top kernels by GPU time, one iteration" if res.get("device") == "cuda" else
             "## torch.profiler on the CPU (tiny sizes, kernels interpreted: code paths only, no speed claim)", ""]
    for r in res.get("targets", []):
        lines.append(f"### {r['label']}")
        if "error" in r:
            lines += [f"- error: {r['error']}", ""]
            continue
        lines += [f"- {_headline(r)}", "",
                  f"| {'kernel' if r.get('busy_share') is not None else 'operator'} | calls | total us | share |",
                  "|---|---:|---:|---:|"]
        for t in r["top"]:
            lines.append(f"| `{_short(t['name'])}` | {t['count']} | {t['total_us']:.1f} | {100 * t['share']:.1f} % |")
        lines.append("")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- Nsight Compute
# what to read from ncu's raw page: first metric that exists wins (names differ between ncu releases and GPUs)
NCU_METRICS: dict[str, list[str]] = {
    "duration_us": ["gpu__time_duration.sum"],
    "registers": ["launch__registers_per_thread"],
    "achieved_occupancy_pct": ["sm__warps_active.avg.pct_of_peak_sustained_active"],
    "tensor_pipe_pct": [r"re:sm__pipe_tensor_op_gmma_cycles_active\..*pct_of_peak_sustained_active",
                        r"re:sm__pipe_tensor_op_hmma_cycles_active\..*pct_of_peak_sustained_active",
                        r"re:sm__pipe_tensor.*cycles_active.*pct_of_peak_sustained_active",
                        r"re:sm__inst_executed_pipe_tensor.*pct_of_peak_sustained_active"],
    "sm_throughput_pct": ["sm__throughput.avg.pct_of_peak_sustained_elapsed"],
    "l2_throughput_pct": ["lts__throughput.avg.pct_of_peak_sustained_elapsed",
                          "lts__t_sectors.avg.pct_of_peak_sustained_elapsed"],
    "dram_throughput_pct": ["gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
                            "dram__throughput.avg.pct_of_peak_sustained_elapsed"],
}


def _num(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def parse_ncu_csv(text: str) -> list[dict[str, Any]]:
    """ncu's ``--csv --page raw`` output -> one dict per profiled launch: the kernel name and the
    ``NCU_METRICS`` found (None where this ncu did not report it; ``metric_names`` says which name was read).

    The raw page is a header row of column names ("ID", ..., "Kernel Name", ..., metric names), a row of units
    (its "ID" is empty) and one row per launch. Lines before the header (ncu's own messages) are skipped.
    """
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if '"Kernel Name"' in ln), None)
    if start is None:
        return []
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    head, idx = rows[0], {name: i for i, name in enumerate(rows[0])}
    units: list[str] = [""] * len(head)
    out = []
    for row in rows[1:]:
        if len(row) != len(head):
            continue
        if _num(row[idx["ID"]]) is None if "ID" in idx else False:
            units = row  # the units row
            continue
        rec: dict[str, Any] = {"kernel": row[idx["Kernel Name"]], "metric_names": {}}
        for key, cands in NCU_METRICS.items():
            rec[key] = None
            for c in cands:
                names = [n for n in head if re.fullmatch(c[3:], n)] if c.startswith("re:") else [c]
                hit = next((n for n in names if n in idx and _num(row[idx[n]]) is not None), None)
                if hit is not None:
                    val = _num(row[idx[hit]])
                    unit = units[idx[hit]].strip().lower()
                    if key == "duration_us":
                        val = val / 1e3 if unit in ("ns", "nsecond") else val * 1e3 if unit in ("ms", "msecond") \
                            else val
                    rec[key], rec["metric_names"][key] = val, hit
                    break
        out.append(rec)
    return out


def ncu_markdown(rows: list[dict[str, Any]]) -> str:
    """A table of ncu's per-kernel counters."""
    cols = ["duration_us", "registers", "achieved_occupancy_pct", "tensor_pipe_pct", "sm_throughput_pct",
            "l2_throughput_pct", "dram_throughput_pct"]
    lines = ["## Nsight Compute: fused step forward + backward (B=32, 64x64, |z|=h=256, bf16)", "",
             "| kernel | " + " | ".join(c.replace("_pct", " %").replace("_", " ") for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for r in rows:
        vals = ["-" if r.get(c) is None else f"{r[c]:.4g}" for c in cols]
        lines.append(f"| `{_short(r['kernel'], 60)}` | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def ncu_target(tiny: bool = False) -> None:
    """The program ncu profiles: the headline step fwd+bwd, warmed up, then once between cudaProfilerStart/Stop."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, prep = _build("step-bwd", "triton-bf16", device, tiny or device.type != "cuda")
    for _ in range(2):
        prep.fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.cudart().cudaProfilerStart()
    prep.fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.cudart().cudaProfilerStop()
    print("ncu target: one fused step fwd+bwd profiled", flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profiling", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--tiny", action="store_true", help="tiny sizes (the default without a GPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--top", type=int, default=12, help="kernels per table")
    p.add_argument("--json", type=Path, default=None, help="write the result as JSON here")
    p.add_argument("--md", type=Path, default=None, help="write the markdown tables here")
    p.add_argument("--ncu-target", action="store_true", help="run the program Nsight Compute profiles")
    p.add_argument("--ncu-csv", type=Path, default=None, help="parse ncu's raw CSV page instead of profiling")
    args = p.parse_args(argv)
    use_interpreter()  # the interpreter without a GPU (the dry run); before a target imports a kernel module
    if args.ncu_target:
        ncu_target(args.tiny)
        return None
    if args.ncu_csv is not None:
        rows = parse_ncu_csv(args.ncu_csv.read_text(errors="replace"))
        res = {"ncu": rows}
        md = ncu_markdown(rows) if rows else "## Nsight Compute\n\nno kernel rows in ncu's output\n"
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        res = profile_all(device, tiny=args.tiny or device.type != "cuda", top=args.top)
        md = to_markdown(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    if args.md:
        args.md.write_text(md)
    print(md)
    return res


if __name__ == "__main__":
    main()
