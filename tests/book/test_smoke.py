"""Papermill smoke run: every chapter executes end to end at the tiny parameters of chapters/smoke.yml."""

from __future__ import annotations

import ast
import json

import papermill
import pytest
import yaml

from .conftest import CHAPTERS, ROOT

SMOKE = yaml.safe_load((ROOT / "chapters" / "smoke.yml").read_text(encoding="utf-8")) or {}
OUT = ROOT / "_build" / "smoke"


def declared_parameters(notebook) -> set[str]:
    """Names assigned in the cell tagged `parameters` (what papermill can override)."""
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{notebook.name}: expected one cell tagged 'parameters', found {len(cells)}"
    tree = ast.parse("".join(cells[0]["source"]))
    return {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}


def test_every_chapter_has_smoke_parameters():
    names = {nb.name for nb in CHAPTERS}
    assert names, "no chapter notebooks found"
    assert names - set(SMOKE) == set(), f"chapters missing from chapters/smoke.yml: {sorted(names - set(SMOKE))}"
    assert set(SMOKE) - names == set(), f"chapters/smoke.yml names unknown notebooks: {sorted(set(SMOKE) - names)}"


@pytest.mark.parametrize("notebook", CHAPTERS, ids=[nb.stem for nb in CHAPTERS])
def test_chapter_runs_with_tiny_parameters(notebook, monkeypatch):
    params = SMOKE.get(notebook.name) or {}
    declared = declared_parameters(notebook)
    unknown = set(params) - set(declared)
    assert not unknown, f"{notebook.name}: smoke parameters {sorted(unknown)} are not in its 'parameters' cell"
    OUT.mkdir(parents=True, exist_ok=True)
    # Kernels inherit the environment: a fresh artifacts folder exercises "create it when absent".
    monkeypatch.setenv("LLM_FROM_SCRATCH_ARTIFACTS", str(ROOT / "_build" / "artifacts-smoke"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    papermill.execute_notebook(
        str(notebook), str(OUT / notebook.name), parameters=params, cwd=str(notebook.parent),
        kernel_name="python3", progress_bar=False,
    )
