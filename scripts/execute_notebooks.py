"""Re-executes chapter notebooks in place so their committed outputs are current.

    python scripts/execute_notebooks.py [NOTEBOOK ...] [-p NAME VALUE ...] [--timing {keep,only}]

Runs each notebook through papermill (kernel cwd = chapters/, default parameters unless
``-p`` overrides them), then strips volatile metadata (timestamps, papermill's run record)
so that re-running an unchanged chapter gives an unchanged file. Called by `make execute`.

Cells tagged ``timing`` print measurements (seconds, tokens/s, a profile): nbval never checks
them. ``make execute`` runs in portable mode (``llm_from_scratch.utils.portable_math``: the same
bits on every CPU, and slower), so ``--timing keep`` leaves the measured outputs those cells
already have. ``make timings`` runs the chapter as a learner does (no portable mode) with
``--timing only``: it takes the new outputs of the ``timing`` cells alone and keeps every other.
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


def merge_outputs(new_path: Path, old_nb, tag: str, take_tagged: bool) -> None:
    """In ``new_path``, put back ``old_nb``'s outputs of the cells tagged ``tag`` (``take_tagged`` False)
    or of the cells not tagged ``tag`` (``take_tagged`` True), matching cells by id."""
    nb = nbformat.read(new_path, as_version=4)
    old = {cell.get("id"): cell for cell in old_nb.cells if cell.cell_type == "code"}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        tagged = tag in cell.metadata.get("tags", [])
        if tagged != take_tagged and cell.get("id") in old and old[cell.get("id")].source == cell.source:
            cell.outputs = old[cell.get("id")].outputs
            cell.execution_count = old[cell.get("id")].execution_count
    tmp = new_path.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, new_path)


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
    parser.add_argument("--timing", choices=("all", "keep", "only"), default="all",
                        help="cells tagged 'timing': take their new outputs with every other cell's (all), "
                             "keep the outputs they have (keep), or take theirs alone (only)")
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
        before = nbformat.read(nb_path, as_version=4)
        try:
            papermill.execute_notebook(
                str(nb_path), str(tmp), parameters=params, cwd=str(nb_path.parent),
                kernel_name="python3", progress_bar=False, log_output=False,
            )
            if args.timing != "all":
                merge_outputs(tmp, before, "timing", take_tagged=args.timing == "only")
            os.replace(tmp, nb_path)
        finally:
            tmp.unlink(missing_ok=True)
        clean(nb_path)
        print(f"{nb_path.relative_to(ROOT)}: executed in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
