"""Shared helpers for the checks that run the notebooks and look at the built book."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
# chapters/NN_slug.ipynb only: not the *.run.ipynb copies that papermill runs leave (ignored by git).
CHAPTERS = sorted(p for p in (ROOT / "chapters").glob("[0-9][0-9]_*.ipynb") if "." not in p.stem)


def require(condition: bool, reason: str) -> None:
    """Skips with a reason on a developer's machine, but fails under CI (CI=true)."""
    if condition:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (required under CI=true)")
    pytest.skip(reason)


def chapter_title(notebook: Path) -> str:
    """The first Markdown heading of a notebook: the chapter's title."""
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    raise AssertionError(f"{notebook.name} has no '# Title' heading")


def toc_files() -> list[str]:
    """Every document listed in _toc.yml, in order (without suffix)."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return files
