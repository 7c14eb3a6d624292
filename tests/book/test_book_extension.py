"""The book's own Sphinx machinery on a throwaway two-page book built with the course's _config.yml:
_ext/solutions.py (solutions collapsed in HTML, left out of the PDF), the emoji fallback font of the
PDF (_latex/emojifallback.sty) and the PDF without a bulleted table of contents. About 10 s."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from .conftest import ROOT, require

JB = Path(sys.executable).parent / "jupyter-book"
NOTE = "Solution: see the notebook or the online book."
SECRETS = ("SECRET_CODE_SOLUTION", "SECRET_OUTPUT_SOLUTION", "SECRET_MARKDOWN_SOLUTION", "SECRET_SECOND_SOLUTION")
EMOJI = "\N{WAVING HAND SIGN}"


def _solution(cell):
    cell.metadata["tags"] = ["solution", "hide-cell"]
    cell.metadata["jupyter"] = {"source_hidden": True, "outputs_hidden": True}
    return cell


def _write_book(root: Path) -> None:
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    config = {key: config[key] for key in ("parse", "latex", "sphinx") if key in config}
    config.update(title="Tiny Book", author="Tests", only_build_toc_files=True,
                  execute={"execute_notebooks": "off"})
    # The extension and the LaTeX files of the real book, not copies.
    config["sphinx"]["local_extensions"] = {name: str(ROOT / path)
                                            for name, path in config["sphinx"]["local_extensions"].items()}
    config["sphinx"]["config"]["latex_additional_files"] = [
        str(ROOT / f) for f in config["sphinx"]["config"].get("latex_additional_files", [])]
    (root / "_config.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (root / "_toc.yml").write_text(yaml.safe_dump({
        "format": "jb-book", "root": "intro",
        "parts": [{"caption": "Tiny part", "chapters": [{"file": "chapters/01_demo"}]}],
    }), encoding="utf-8")
    (root / "intro.md").write_text("# Tiny Book\n\nFRONT_PAGE_TEXT\n\n```{tableofcontents}\n```\n", encoding="utf-8")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    stream = nbformat.v4.new_output
    nb.cells = [
        nbformat.v4.new_markdown_cell(f"# Demo chapter\n\nProse with an emoji {EMOJI} at the end {EMOJI}"),
        nbformat.v4.new_code_cell(f"print('{EMOJI}')", execution_count=1,
                                  outputs=[stream("stream", name="stdout", text=f"hi {EMOJI}\n{EMOJI}\n")]),
        nbformat.v4.new_markdown_cell("## Exercises\n\n1. EXERCISE_ONE.\n2. EXERCISE_TWO."),
        _solution(nbformat.v4.new_code_cell(
            "print('SECRET_CODE_SOLUTION')", execution_count=2,
            outputs=[stream("stream", name="stdout", text="SECRET_OUTPUT_SOLUTION\n")])),
        _solution(nbformat.v4.new_markdown_cell("SECRET_MARKDOWN_SOLUTION, with code:\n\n```python\nx = 1\n```")),
        nbformat.v4.new_markdown_cell("BETWEEN_SOLUTIONS"),
        _solution(nbformat.v4.new_code_cell("SECRET_SECOND_SOLUTION = 2", execution_count=3)),
        nbformat.v4.new_markdown_cell("## Further reading\n\nAFTER_SOLUTIONS"),
    ]
    (root / "chapters").mkdir()
    nbformat.write(nb, root / "chapters" / "01_demo.ipynb")


def _build(root: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([str(JB), "build", str(root), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"jupyter-book build {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def book(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tinybook")
    _write_book(root)
    return root


def test_html_collapses_every_solution(book):
    _build(book, "--builder", "html", "-W", "-n", "--keep-going")
    page = (book / "_build" / "html" / "chapters" / "01_demo.html").read_text(encoding="utf-8")
    # A code solution: myst-nb's hide-cell container (collapsed by its toggle).
    code = re.search(r'<div class="cell tag_solution tag_hide-cell[^"]*">(.*?)SECRET_CODE_SOLUTION', page, re.S)
    assert code, "the code solution is not inside a hide-cell container"
    # A Markdown solution: wrapped by _ext/solutions.py into a sphinx-togglebutton container.
    md = re.search(r'<div class="toggle tag-solution[^"]*">\s*<p>SECRET_MARKDOWN_SOLUTION', page)
    assert md, "the Markdown solution is not inside a toggle container"
    for text in SECRETS + ("BETWEEN_SOLUTIONS", "AFTER_SOLUTIONS"):
        assert text in page, f"{text} is missing from the HTML page"
    assert NOTE not in page, "the PDF's note must not appear in HTML"
    index = (book / "_build" / "html" / "intro.html").read_text(encoding="utf-8")
    assert "toctree-wrapper" in index, "the HTML front page lost its table of contents"


def test_latex_leaves_solutions_out(book):
    has_tex = shutil.which("xelatex") is not None and shutil.which("latexmk") is not None
    _build(book, "--builder", "pdflatex" if has_tex else "latex")
    # LaTeX escapes underscores: compare without them.
    tex = (book / "_build" / "latex" / "book.tex").read_text(encoding="utf-8").replace("\\_", "_")
    for text in SECRETS:
        assert text not in tex, f"{text} is in the LaTeX source"
    for text in ("EXERCISE_ONE", "BETWEEN_SOLUTIONS", "AFTER_SOLUTIONS", "FRONT_PAGE_TEXT"):
        assert text in tex, f"{text} is missing from the LaTeX source"
    # One note per run of consecutive solution cells: (code + Markdown), then the second one.
    assert tex.count(NOTE) == 2, f"expected 2 notes in place of the solutions, found {tex.count(NOTE)}"
    assert "\\usepackage{emojifallback}" in tex, "the emoji fallback package is not loaded"
    front = tex[tex.index("FRONT_PAGE_TEXT"):]
    front = front[:re.search(r"\\(part|chapter)\{", front).start()]
    assert "\\begin{itemize}" not in front, "the front page still carries a bulleted table of contents"
    if not has_tex:
        require(False, "xelatex/latexmk are not installed: the PDF itself was not built")


def test_pdf_has_the_emoji_and_no_solutions(book):
    pdf = book / "_build" / "latex" / "book.pdf"
    require(pdf.is_file(), "the tiny PDF was not built (needs TeX)")
    require(shutil.which("pdftotext") is not None, "pdftotext is not installed (poppler-utils)")
    fonts = subprocess.run(["fc-list", "Symbola"], capture_output=True, text=True).stdout
    require(bool(fonts.strip()), "the font Symbola is not installed (Debian package fonts-symbola)")
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    assert text.count(EMOJI) >= 4, f"the emoji are missing from the PDF ({text.count(EMOJI)} of 4)"
    assert not [s for s in SECRETS if s in text], "solutions are printed in the PDF"
    assert " ".join(NOTE.split()) in " ".join(text.split())
    listed = subprocess.run(["pdffonts", str(pdf)], capture_output=True, text=True, check=True).stdout
    assert "Symbola" in listed, f"Symbola is not embedded:\n{listed}"
