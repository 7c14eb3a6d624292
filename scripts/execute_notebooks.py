"""Re-executes chapter notebooks in place so their committed outputs are current.

    python scripts/execute_notebooks.py [NOTEBOOK ...] [-p NAME VALUE ...]

Runs each notebook through papermill (kernel cwd = chapters/, default parameters unless
``-p`` overrides them), then strips volatile metadata (timestamps, papermill's run record)
so that re-running an unchanged chapter gives an unchanged file. Called by `make execute`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
import papermill

ROOT = Path(__file__).resolve().parent.parent


def clean(path: Path) -> None:
    """Drops run-specific metadata that would make every execution a diff."""
    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("papermill", None)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            for out in cell.outputs:
                out.get("metadata", {}).pop("execution", None)
    tmp = path.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, path)  # atomic: an interrupted run never leaves half a notebook


def _value(text: str):
    """Parses a -p value like papermill's CLI does: int, float, bool, None or string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))
    params = {name: _value(value) for name, value in args.parameter}
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("PYTHONHASHSEED", "0")
    for nb_path in notebooks:
        nb_path = nb_path.resolve()
        if not nb_path.is_file():
            print(f"no such notebook: {nb_path}", file=sys.stderr)
            return 2
        start = time.perf_counter()
        tmp = nb_path.with_name(nb_path.stem + ".run.ipynb")
        try:
            papermill.execute_notebook(
                str(nb_path), str(tmp), parameters=params, cwd=str(nb_path.parent),
                kernel_name="python3", progress_bar=False, log_output=False,
            )
            os.replace(tmp, nb_path)
        finally:
            tmp.unlink(missing_ok=True)
        clean(nb_path)
        print(f"{nb_path.relative_to(ROOT)}: executed in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
