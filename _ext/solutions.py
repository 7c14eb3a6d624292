"""Exercise solutions: collapsed in the HTML book, left out of the PDF.

Chapters mark a solution with the cell tags ``solution`` and ``hide-cell``. For a code cell, myst-nb
puts the tags into the classes of the cell's container (``tag_solution``) and collapses it in HTML.
For a Markdown cell, myst-nb keeps no trace of its tags, so this extension wraps the cell's text in a
container with the classes ``toggle tag_solution`` when the notebook is read: sphinx-togglebutton
collapses it in HTML, and both kinds of cell are then found the same way.

For LaTeX builders (the PDF), every container with the class ``tag_solution`` is replaced by a
one-line note, one note per run of consecutive solution cells. The removal happens in a
post-transform, which runs on each build's own copy of the doctree, so an HTML build that shares the
doctree cache with a PDF build still shows the solutions.

What it does not do: collect the solutions into an appendix, or handle a solution cell whose Markdown
holds a section heading (a heading cannot sit inside a container; write solutions without headings).
"""

from __future__ import annotations

import json
import re

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.transforms.post_transforms import SphinxPostTransform

SOLUTION_TAG = "solution"
SOLUTION_CLASS = "tag_solution"
#: The same class as the container directive spells it (docutils turns "_" into "-" in class names).
SOLUTION_CLASSES = {SOLUTION_CLASS, "tag-solution"}
NOTE_CLASS = "solution-note"
NOTE_TEXT = "Solution: see the notebook or the online book."


def _wrap_markdown_solutions(app: Sphinx, docname: str, source: list[str]) -> None:
    """source-read: wrap the text of Markdown cells tagged ``solution`` in a toggle container."""
    if not str(app.env.doc2path(docname)).endswith(".ipynb"):
        return
    try:
        notebook = json.loads(source[0])
    except ValueError:
        return  # not JSON (a text notebook): myst-nb reports it
    changed = False
    for cell in notebook.get("cells", []):
        tags = cell.get("metadata", {}).get("tags", [])
        if cell.get("cell_type") != "markdown" or SOLUTION_TAG not in tags:
            continue
        text = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        # A backtick fence longer than any run of backticks inside, so nested code blocks stay intact.
        longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
        fence = "`" * max(3, longest + 1)
        cell["source"] = f"{fence}{{container}} toggle {SOLUTION_CLASS}\n{text.rstrip()}\n{fence}\n"
        changed = True
    if changed:
        source[0] = json.dumps(notebook, ensure_ascii=False)


class RemoveSolutions(SphinxPostTransform):
    """LaTeX only: each run of solution cells becomes one line that says where the solution is."""

    default_priority = 5  # before references are resolved (10), so nothing points into a removed cell
    formats = ("latex",)

    def run(self, **kwargs) -> None:
        for container in list(self.document.findall(nodes.container)):
            parent = container.parent
            if parent is None or not SOLUTION_CLASSES & set(container.get("classes", [])):
                continue
            position = parent.index(container)
            previous = parent[position - 1] if position > 0 else None
            if isinstance(previous, nodes.paragraph) and NOTE_CLASS in previous.get("classes", []):
                parent.remove(container)
                continue
            note = nodes.paragraph("", "", nodes.emphasis(text=NOTE_TEXT), classes=[NOTE_CLASS])
            container.replace_self(note)


def setup(app: Sphinx) -> dict:
    app.connect("source-read", _wrap_markdown_solutions)
    app.add_post_transform(RemoveSolutions)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
