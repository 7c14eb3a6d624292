"""`make test` runs every test file: each file under tests/ is run by a target of `make test`.

`make unit` runs tests/ but tests/book/; `make smoke` and `make book-tests` name the files of
tests/book/ one by one, so a new file there must be added to one of their lists (a browser test
once sat outside both, run by nobody).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _named_book_tests(text: str) -> set[str]:
    return set(re.findall(r"tests/book/test_\w+\.py", text))


def test_every_book_test_file_is_run_by_make_test():
    text = (ROOT / "Makefile").read_text(encoding="utf-8").replace("\\\n", " ")
    assert re.search(r"^unit:.*\n\t.*pytest tests --ignore=tests/book", text, re.M), "make unit runs tests/"
    assert re.search(r"^test:.*\n(\t.*\n)*\t.*lint unit nbval smoke", text, re.M), "make test runs unit and smoke"
    assert re.search(r"^test:.*\n(\t.*\n)*\t.*book-tests", text, re.M), "make test runs book-tests"
    named = _named_book_tests(text)
    present = {f"tests/book/{p.name}" for p in (ROOT / "tests" / "book").glob("test_*.py")}
    assert present - named == set(), f"tests/book files that no make target runs: {sorted(present - named)}"
    assert named - present == set(), f"the Makefile names test files that do not exist: {sorted(named - present)}"
