"""The documentation the project cites is in the project: every cited docs page exists in the repository's docs/."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SUFFIXES = {".py", ".md", ".sh", ".toml", ".txt", ".cfg"}
_SKIP = {".git", ".venv", "venv", "build", "dist", "runs", "__pycache__", ".pytest_cache", ".ruff_cache"}
_CITED = re.compile(r"[\w./-]*docs/[\w-]+\.md")


def _project_files() -> list[Path]:
    out = []
    for p in ROOT.rglob("*"):
        rel = p.relative_to(ROOT)
        if p.is_file() and p.suffix in _SUFFIXES and not _SKIP.intersection(rel.parts) and ".egg-info" not in str(rel):
            out.append(p)
    return out


def test_every_cited_docs_page_is_in_the_repository():
    bad = []
    for path in _project_files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for ref in _CITED.findall(line):
                prefix, name = ref.rsplit("docs/", 1)
                inside = re.fullmatch(r"(\.\.?/)*", prefix) is not None  # this repository's docs/
                if not inside or not (ROOT / "docs" / name).is_file():
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {ref}")
    assert not bad, "expected every cited docs page to exist in this repository's docs/; not found:\n" + "\n".join(bad)


def test_the_readmes_api_snippet_runs_as_written_in_seconds(tmp_path):
    """The README's `Use` example, run as a user would paste it (on the CPU here: it must stay quick there)."""
    import subprocess
    import sys

    text = (ROOT / "README.md").read_text()
    use = text[text.index("## Use") :]
    snippet = use[use.index("```python") + len("```python") : use.index("```", use.index("```python") + 9)]
    assert "model.iwae(" in snippet, "expected the snippet with the IWAE call"
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"the README snippet failed:\n{proc.stderr[-2000:]}"
