"""Checks on the built book that concern its machinery (run after `make html pdf`, by make book-tests):
the site offers the PDF for download, the PDF leaves the solutions out, prints no bulleted table of
contents on its first pages, and typesets the emoji that the chapters print."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess

import pytest
import yaml

from .conftest import CHAPTERS, ROOT, require

HTML = ROOT / "_build" / "html"
PDF = ROOT / "_build" / "latex" / "book.pdf"
NOTE = "Solution: see the notebook or the online book."


@functools.cache
def _pdf_text() -> str:
    require(PDF.is_file(), "the PDF is not built (make pdf; needs TeX)")
    require(shutil.which("pdftotext") is not None, "pdftotext is not installed (Debian package: poppler-utils)")
    return subprocess.run(["pdftotext", "-layout", str(PDF), "-"], check=True, capture_output=True, text=True,
                          timeout=120).stdout


def _flat(text: str) -> str:
    return " ".join(text.split())


def _solution_lines(notebook) -> list[str]:
    """Distinctive lines of the notebook's solution cells: long, and in no other cell."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    # What the other cells show, their outputs included: package code shown by show_source (an output) may
    # hold the very line that a solution re-implements.
    shown = []
    for c in cells:
        if "solution" in c["metadata"].get("tags", []):
            continue
        shown.append("".join(c["source"]))
        for out in c.get("outputs", []):
            shown.append("".join(out.get("text", "")))
            for mime in ("text/markdown", "text/plain"):
                shown.append("".join(out.get("data", {}).get(mime, "")))
    other = _flat("\n".join(shown))
    lines = []
    for cell in cells:
        if "solution" in cell["metadata"].get("tags", []):
            lines += [line.strip() for line in "".join(cell["source"]).splitlines()
                      if len(line.strip()) >= 30 and _flat(line) not in other and not line.strip().startswith("#")]
    return lines


def test_site_offers_the_pdf():
    require((HTML / "index.html").is_file(), "the HTML book is not built (make html)")
    require(PDF.is_file(), "the PDF is not built (make pdf; needs TeX)")
    offered = HTML / "book.pdf"
    assert offered.is_file(), "_build/html/book.pdf is missing: make html/pdf copy the PDF into the site"
    assert offered.read_bytes() == PDF.read_bytes(), "the site offers an older PDF than _build/latex/book.pdf"
    for page in ("intro.html", "usage.html"):
        html = (HTML / page).read_text(encoding="utf-8")
        assert re.search(r'<a\b[^>]*href="book\.pdf"', html), f"{page} has no link to book.pdf"


@pytest.mark.parametrize("notebook", CHAPTERS, ids=[nb.stem for nb in CHAPTERS])
def test_pdf_leaves_solutions_out(notebook):
    lines = _solution_lines(notebook)
    if not lines:
        pytest.skip(f"{notebook.name} has no solution cell with a distinctive line")
    text = _flat(_pdf_text())
    printed = [line for line in lines if _flat(line) in text]
    assert not printed, f"{notebook.name}: solution lines printed in the PDF: {printed[:5]}"
    assert _flat(NOTE) in text, "the PDF does not say where the solutions are"


def test_pdf_has_no_bulleted_table_of_contents():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    captions = [part["caption"] for part in toc.get("parts", []) if part.get("caption")]
    bullets = [line.strip() for line in _pdf_text().splitlines()
               if re.match(r"^\s*[•◦–-]\s+(" + "|".join(map(re.escape, captions)) + r")\s*$", line)]
    assert not bullets, f"the PDF prints the table of contents as a list: {bullets}"


def _printed_text(cell: dict) -> str:
    """What the PDF prints of a cell: hidden cells and removed parts left out."""
    tags = set(cell["metadata"].get("tags", []))
    if tags & {"solution", "remove-cell", "hide-cell"}:
        return ""
    text = "" if "remove-input" in tags else "".join(cell["source"])
    if cell["cell_type"] == "code" and "remove-output" not in tags:
        for out in cell.get("outputs", []):
            text += "".join(out.get("text", "")) + "".join(out.get("data", {}).get("text/plain", ""))
    return text


def test_pdf_typesets_the_emoji():
    chars = set()
    for notebook in CHAPTERS:
        for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
            chars |= {ch for ch in _printed_text(cell) if 0x1F000 <= ord(ch) <= 0x1FAFF}
    if not chars:
        pytest.skip("no chapter prints an emoji")
    fonts = subprocess.run(["fc-list", "Symbola"], capture_output=True, text=True).stdout
    require(bool(fonts.strip()), "the font Symbola is not installed (Debian package fonts-symbola)")
    text = _pdf_text()
    missing = sorted(f"U+{ord(ch):04X}" for ch in chars if ch not in text)
    assert not missing, f"emoji missing from the PDF: {missing}"
    listed = subprocess.run(["pdffonts", str(PDF)], capture_output=True, text=True, check=True).stdout
    assert "Symbola" in listed, "the emoji font Symbola is not embedded in the PDF"
