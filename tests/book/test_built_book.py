"""Checks on the built book: pages for every chapter, math typeset offline in a real browser,
figures present, and a PDF that contains every chapter. Run after `make html pdf`."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from .conftest import CHAPTERS, ROOT, chapter_title, require, toc_files

HTML = ROOT / "_build" / "html"
PDF = ROOT / "_build" / "latex" / "book.pdf"


class _Images(HTMLParser):
    """Collects <img src> and every resource a page loads when opened (scripts, styles, images)."""

    def __init__(self):
        super().__init__()
        self.sources: list[str] = []
        self.loads: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs.get("src") or "")
        if tag in ("script", "img", "iframe") and attrs.get("src"):
            self.loads.append(attrs["src"])
        if tag == "link" and attrs.get("href") and "stylesheet" in (attrs.get("rel") or ""):
            self.loads.append(attrs["href"])


def _browser_dom(page: Path, screenshot: Path | None = None) -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    require(chromium is not None, "Chromium is not installed (Debian package: chromium)")
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--virtual-time-budget=15000", "--window-size=1280,1600",
    ]
    with tempfile.TemporaryDirectory() as profile:
        flags.append(f"--user-data-dir={profile}")
        if screenshot is not None:
            subprocess.run([chromium, *flags, f"--screenshot={screenshot}", page.as_uri()],
                           check=True, capture_output=True, timeout=180)
        done = subprocess.run([chromium, *flags, "--dump-dom", page.as_uri()],
                              check=True, capture_output=True, text=True, timeout=180)
    return done.stdout


@pytest.fixture(scope="module")
def built():
    require((HTML / "index.html").is_file(), "the HTML book is not built (make html)")
    return HTML


def test_every_toc_entry_has_a_page(built):
    missing = [f for f in toc_files() if not (built / f"{f}.html").is_file()]
    assert not missing, f"pages missing from the build: {missing}"


def test_every_chapter_is_in_the_toc():
    listed = set(toc_files())
    absent = [nb.name for nb in CHAPTERS if f"chapters/{nb.stem}" not in listed]
    assert not absent, f"chapters not listed in _toc.yml: {absent}"


def test_no_page_loads_from_a_cdn(built):
    offenders = []
    for page in built.rglob("*.html"):
        parser = _Images()
        parser.feed(page.read_text(encoding="utf-8", errors="replace"))
        offenders += [f"{page.relative_to(built)}: {url}" for url in parser.loads
                      if re.match(r"(https?:)?//", url)]
    assert not offenders, "pages load resources from the network:\n" + "\n".join(offenders[:20])
    assert (built / "_static" / "mathjax" / "tex-chtml.js").is_file(), "MathJax is not shipped with the site"


def test_math_is_typeset_in_a_real_browser(built):
    shots = ROOT / "_build" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    dom = _browser_dom(built / "intro.html", screenshot=shots / "intro.png")
    static = (built / "intro.html").read_text(encoding="utf-8")
    n_math = static.count('class="math notranslate nohighlight"')
    assert n_math > 0, "intro.html has no math to check"
    assert dom.count("<mjx-container") >= n_math, (
        f"MathJax typeset {dom.count('<mjx-container')} of the {n_math} formulas on intro.html"
    )
    assert (shots / "intro.png").stat().st_size > 10_000, "the screenshot of intro.html is (nearly) empty"
    # A chapter's math too, where the chapter has any.
    for nb in CHAPTERS:
        text = nb.read_text(encoding="utf-8")
        if "$" in text:
            dom = _browser_dom(built / "chapters" / f"{nb.stem}.html")
            assert "mjx-container" in dom, f"MathJax did not typeset the math of {nb.name}"
            break


def test_figures_are_present(built):
    pages = [built / "intro.html"] + [built / "chapters" / f"{nb.stem}.html" for nb in CHAPTERS]
    for page in pages:
        parser = _Images()
        parser.feed(page.read_text(encoding="utf-8"))
        for src in parser.sources:
            if src.startswith("data:"):
                continue
            target = (page.parent / src.split("#")[0]).resolve()
            assert target.is_file() and target.stat().st_size > 0, f"{page.name}: image {src} is missing"
    intro = _Images()
    intro.feed((built / "intro.html").read_text(encoding="utf-8"))
    assert any("pipeline" in s for s in intro.sources), "the pipeline diagram is not on the front page"
    for nb in CHAPTERS:
        expected = nb.read_text(encoding="utf-8").count('"image/png"')
        parser = _Images()
        parser.feed((built / "chapters" / f"{nb.stem}.html").read_text(encoding="utf-8"))
        assert len(parser.sources) >= expected, f"{nb.name}: {expected} figures in the notebook, " \
            f"{len(parser.sources)} images on its page"


def test_pdf_contains_every_chapter():
    require(PDF.is_file(), "the PDF is not built (make pdf; needs TeX)")
    pdftotext = shutil.which("pdftotext")
    require(pdftotext is not None, "pdftotext is not installed (Debian package: poppler-utils)")
    text = subprocess.run([pdftotext, "-layout", str(PDF), "-"], check=True, capture_output=True,
                          text=True, timeout=120).stdout
    flat = " ".join(text.split())
    titles = [chapter_title(nb) for nb in CHAPTERS] + ["How to use this book", "Notation"]
    missing = [t for t in titles if " ".join(t.split()) not in flat]
    assert not missing, f"chapter titles missing from the PDF: {missing}"
