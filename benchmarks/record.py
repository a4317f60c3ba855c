"""Record a gpu_check.sh run in benchmarks/RESULTS.md: one dated section, stamped from the run's own files.

Usage::

    python -m benchmarks.record OUTDIR [--results benchmarks/RESULTS.md] [--allow-cpu] [--print]

Reads OUTDIR/check.json (card, driver, versions, commit, date: all from the run itself), summary.md, bench.md
and details.md, and inserts a section under the marker line of "## Latest GPU measurements" (newest first),
plus one line in "## History". Nothing is typed by hand. A CPU run (the dry run) is refused unless
``--allow-cpu``; a run already recorded (same date and commit) is refused. ``--print`` prints the section
without writing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["MARKER", "section", "record", "main"]

MARKER = "<!-- gpu_check runs: `python -m benchmarks.record OUTDIR` inserts each below this line, newest first -->"
DEFAULT_RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


class RecordError(Exception):
    """The run cannot be recorded (missing files, a CPU run, already recorded)."""


def _demote(md: str, levels: int) -> str:
    """Push every markdown heading down ``levels`` levels (the files' '# ...' become '### ...')."""
    return re.sub(r"^(#+) ", lambda m: "#" * min(6, len(m.group(1)) + levels) + " ", md, flags=re.M)


def _strip_title(md: str) -> str:
    """Drop a file's first heading line (the section has its own)."""
    lines = md.strip("\n").splitlines()
    if lines and lines[0].startswith("#"):
        lines = lines[1:]
    return "\n".join(lines).strip("\n")


def _stamp(check: dict[str, Any]) -> dict[str, str]:
    env = check.get("env") or {}
    if not env:
        raise RecordError("check.json has no env (the env stage did not run): the run cannot be stamped")
    date = str(env.get("date_utc") or "unknown date")
    gpu = env.get("gpu") or "CPU"
    commit = str(env.get("commit") or "unknown")
    smi = check.get("nvidia_smi") or {}
    return {
        "date": date,
        "day": date[:10],
        "card": gpu + (f" (sm_{str(env['capability']).replace('.', '')}, {env.get('sm_count')} SMs)"
                       if env.get("capability") else ""),
        "driver": str(smi.get("driver_version") or env.get("driver") or "-"),
        "versions": f"CUDA {env.get('cuda')}, torch {env.get('torch')}, triton {env.get('triton')}, "
                    f"python {env.get('python')}",
        "commit": commit + (" (dirty tree)" if env.get("dirty") else ""),
        "short": commit[:12],
        "cuda": "yes" if env.get("device_type") == "cuda" else "no",
    }


def section(out_dir: Path) -> tuple[str, str, dict[str, str]]:
    """The RESULTS.md section and history line for the run in ``out_dir``."""
    check_path = out_dir / "check.json"
    if not check_path.is_file():
        raise RecordError(f"{check_path} is missing: was OUTDIR written by benchmarks/gpu_check.sh?")
    check = json.loads(check_path.read_text())
    st = _stamp(check)
    cpu = st["cuda"] != "yes"
    title = f"### {st['day']}: {st['card']}, commit {st['short']}" + (" (CPU dry run: no speed claim)" if cpu else "")
    parts = [title, "",
             f"- card: {st['card']}; driver {st['driver']}; {st['versions']}",
             f"- run: {st['date']}, commit {st['commit']}; `bash benchmarks/gpu_check.sh`, recorded by "
             f"`python -m benchmarks.record` from the run's own files",
             ""]
    summary = out_dir / "summary.md"
    if summary.is_file():
        parts += ["#### Summary", "", _demote(_strip_title(summary.read_text()), 3), ""]
    bench = out_dir / "bench.md"
    if bench.is_file():
        parts += ["#### Quick benchmark (bench.md)", "", _demote(_strip_title(bench.read_text()), 3), ""]
    details = out_dir / "details.md"
    if details.is_file():
        parts += [_demote(_strip_title(details.read_text()), 2), ""]
    stages = ", ".join(f"{s['stage']} {s['rc']}" for s in check.get("stages", []))
    history = f"- {st['day']}: gpu_check on {st['card']} at commit {st['short']} recorded (stages: {stages})."
    return "\n".join(parts).rstrip("\n") + "\n", history, st


def record(out_dir: Path, results: Path = DEFAULT_RESULTS, *, allow_cpu: bool = False) -> str:
    """Insert the run's section into ``results`` (see the module docstring); return the section."""
    text, history, st = section(out_dir)
    if st["cuda"] != "yes" and not allow_cpu:
        raise RecordError("this run had no CUDA device (a dry run): not recorded (pass --allow-cpu to force)")
    doc = results.read_text()
    stamp_line = f"- run: {st['date']}, commit {st['commit']};"
    if stamp_line in doc:
        raise RecordError(f"a run of {st['date']} at commit {st['commit']} is already in {results}")
    if MARKER not in doc:
        raise RecordError(f"{results} has no marker line to insert under:\n{MARKER}")
    doc = doc.replace(MARKER, MARKER + "\n\n" + text.rstrip("\n"), 1)
    if st["cuda"] == "yes":
        doc = doc.replace("**No GPU measurement yet.** To produce one,", "To produce a measurement,", 1)
    if re.search(r"^## History\s*$", doc, flags=re.M):
        doc = doc.rstrip("\n") + "\n" + history + "\n"
    else:
        doc = doc.rstrip("\n") + "\n\n## History\n\n" + history + "\n"
    results.write_text(doc)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.record", description=__doc__.split("\n")[0])
    p.add_argument("out_dir", type=Path, help="the folder gpu_check.sh wrote")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="the file to append to")
    p.add_argument("--allow-cpu", action="store_true", help="also record a run without a CUDA device")
    p.add_argument("--print", dest="print_only", action="store_true", help="print the section, write nothing")
    args = p.parse_args(argv)
    try:
        if args.print_only:
            print(section(args.out_dir)[0])
            return 0
        record(args.out_dir, args.results, allow_cpu=args.allow_cpu)
    except RecordError as err:
        print(f"record: {err}", file=sys.stderr)
        return 1
    print(f"recorded {args.out_dir} in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
