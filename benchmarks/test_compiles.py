"""benchmarks.compiles: the per-preset kernel counts recorded as a GPU run would compile them, and the compile
command's report read back (a stand-in interpreter prints it; the real sm_90 compiles are what the tool measures).

No speed claims: these check code paths and what the recorded launches are.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from benchmarks import compiles


def _fake_python(tmp_path: Path, body: str) -> str:
    script = tmp_path / "python"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_compile_once_reads_the_warmup_report_line(tmp_path):
    python = _fake_python(tmp_path, 'echo "warmup: 3/3 kernels, 12 s"\n'
                                    'echo "warmup: compiled 2 of 3 kernels for sm_90 in 12.5 s (1 cached, 2 workers)'
                                    ' (40 launches recorded)"\n')
    got = compiles.compile_once(python, tmp_path / "x.pkl", tmp_path / "cache", 2, 90, timeout=60)
    assert (got["compiled"], got["kernels"], got["seconds"], got["cached"], got["workers"]) == (2, 3, 12.5, 1, 2), got
    assert got["failed"] == 0, got
    assert got["wall_s"] >= 0 and got["cpu_s"] >= 0


def test_compile_once_counts_kernels_that_failed(tmp_path):
    python = _fake_python(tmp_path, 'echo "warmup: compiled 1 of 3 kernels for sm_90 in 2.0 s (0 cached, 1 workers),'
                                    ' 2 failed (compiled at their first launch instead) (5 launches recorded)"\n')
    got = compiles.compile_once(python, tmp_path / "x.pkl", tmp_path / "cache", 1, 90, timeout=60)
    assert (got["compiled"], got["kernels"], got["failed"]) == (1, 3, 2), got


def test_compile_once_raises_with_the_commands_last_lines(tmp_path):
    python = _fake_python(tmp_path, 'echo "ImportError: no triton" >&2\nexit 3\n')
    with pytest.raises(RuntimeError, match="exited with 3: ImportError: no triton"):
        compiles.compile_once(python, tmp_path / "x.pkl", tmp_path / "cache", 1, 90, timeout=60)


def test_counts_of_the_small_preset_are_written_per_kernel(tmp_path):
    assert compiles.main(["--presets", "small", "--no-compile", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "compiles.json").read_text())
    (row,) = data["rows"]
    assert row["preset"] == "small" and row["launches"] >= row["distinct"] > 0, row
    assert sum(row["by_kernel"].values()) == row["distinct"], row
    # one training iteration of a doubling preset launches the step forward and backward kernels at least
    assert {"_nca_step_fwd_kernel", "_nca_step_bwd_kernel"} <= set(row["by_kernel"]), row["by_kernel"]
    assert set(data["meta"]) == {"machine", "date", "commit"}
