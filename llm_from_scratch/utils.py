"""Small helpers every chapter uses: choosing a device, seeding, where files go, showing code.

Explained in the chapter "Getting started" (chapters/00_setup.ipynb). Nothing here
knows about language models; it only keeps runs reproducible and portable, and shows the
package's own source in a chapter (``show_source``) wherever the chapter is read.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import random
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import torch

_DEVICE_KINDS = ("cuda", "mps", "cpu")

#: Environment variable that overrides where chapters write their files.
ARTIFACTS_ENV = "LLM_FROM_SCRATCH_ARTIFACTS"


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def get_device(preferred: str | torch.device | None = None) -> torch.device:
    """Return the best available device: CUDA, then Apple's MPS, then the CPU.

    ``preferred`` overrides the choice ("cpu", "cuda", "cuda:1", "mps" or a
    ``torch.device``); asking for a device that is not available raises a
    ``ValueError`` instead of failing later inside a kernel. ``None`` and "auto"
    pick automatically.
    """
    if preferred is None or (isinstance(preferred, str) and preferred.lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if not isinstance(preferred, (str, torch.device)):
        raise TypeError(
            f"preferred must be a str, a torch.device or None, got {type(preferred).__name__}"
        )
    try:
        device = torch.device(preferred)
    except RuntimeError as exc:
        raise ValueError(
            f"unknown device {preferred!r}: expected one of {_DEVICE_KINDS} (optionally with an index)"
        ) from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {preferred!r} was asked for, but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif device.type == "mps":
        if not _mps_available():
            raise ValueError("device 'mps' was asked for, but MPS is not available on this machine")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {preferred!r}: expected one of {_DEVICE_KINDS}")
    return device


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python's, NumPy's and PyTorch's random number generators.

    Returns a ``torch.Generator`` seeded with the same value, for code that
    prefers an explicit generator to the global state.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return torch.Generator().manual_seed(seed)


def artifacts_dir(*parts: str, create: bool = True) -> Path:
    """The folder where chapters write files (checkpoints, token files, plots).

    It is ``$LLM_FROM_SCRATCH_ARTIFACTS`` when that is set; otherwise the
    ``artifacts/`` folder at the root of the course (found by walking up from
    the current directory to the folder holding ``_toc.yml``), or ``./artifacts``
    outside the course. Git and the book build ignore it. ``parts`` name a
    subfolder, created when ``create`` is true.
    """
    env = os.environ.get(ARTIFACTS_ENV)
    if env:
        root = Path(env)
    else:
        here = Path.cwd().resolve()
        root = here / "artifacts"
        for folder in (here, *here.parents):
            if (folder / "_toc.yml").is_file():
                root = folder / "artifacts"
                break
    path = root.joinpath(*parts)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file beside it, then a rename.

    An interruption at any moment leaves either the old file or the new one, never half of
    one (``os.replace`` is atomic on POSIX and Windows). Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file with mode 0600; give it the mode a plain open() would (0666
        # less the umask), or the previous file's mode when it replaces one.
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o666 & ~_current_umask()
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return path


def _current_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``atomic_write_bytes`` for text, encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


class SourceCode:
    """Source code that renders as a highlighted Python block in Jupyter, Colab, the HTML book
    and the PDF (through Markdown), and as plain text elsewhere. Made by ``show_source``."""

    def __init__(self, code: str, header: str = "") -> None:
        self.code = code
        self.header = header

    def _repr_markdown_(self) -> str:
        fence = "````" if "```" in self.code else "```"
        text = f"{self.header}\n{self.code}" if self.header else self.code
        return f"{fence}python\n{text.rstrip()}\n{fence}\n"

    def __repr__(self) -> str:
        return f"{self.header}\n{self.code}" if self.header else self.code


def _package_path(obj) -> str:
    try:
        path = Path(inspect.getsourcefile(inspect.unwrap(obj)) or "").resolve()  # decorated: the function itself
    except TypeError:
        return ""
    package_root = Path(__file__).resolve().parent.parent
    try:
        return path.relative_to(package_root).as_posix()
    except ValueError:
        return path.name


def show_source(obj, *members: str) -> SourceCode:
    """The source of a function, method or class of the package, ready to display in a chapter.

    ``show_source(lr_at)`` shows one function; ``show_source(GPT, "__init__", "forward")`` shows the
    class line and only the named methods (the part the text explains, not every branch). A header
    comment names the file and the lines. Chapters call it in a cell tagged ``remove-input``, so the
    book shows the code itself and Jupyter the call and the code.
    """
    if not (inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isclass(obj)):
        raise TypeError(f"show_source expects a function, method or class, got {type(obj).__name__}")
    lines, first = inspect.getsourcelines(obj)
    where = _package_path(obj)
    if not members:
        header = f"# {where}, lines {first}-{first + len(lines) - 1}" if where else ""
        return SourceCode(textwrap.dedent("".join(lines)), header)
    if not inspect.isclass(obj):
        raise TypeError(f"members can only be named for a class, not for {obj.__qualname__}")
    missing = [m for m in members if m not in vars(obj)]
    if missing:
        raise ValueError(f"{obj.__name__} defines no {missing}: expected names from {sorted(vars(obj))}")
    # The class statement (with its decorators and base classes) up to the end of its docstring.
    head_end = next(i for i, line in enumerate(lines) if line.rstrip().endswith(":") and "class " in line) + 1
    doc = inspect.getdoc(obj)
    parts = ["".join(lines[:head_end]).rstrip()]
    if doc:
        parts.append(f'    """{doc.splitlines()[0]}"""')
    for name in members:
        member = vars(obj)[name]
        member = getattr(member, "fget", None) or getattr(member, "__func__", member)  # properties, classmethods
        m_lines, _ = inspect.getsourcelines(member)
        parts.append("\n" + "".join(m_lines).rstrip())
    header = f"# {where} ({obj.__name__}: {', '.join(members)})" if where else ""
    return SourceCode("\n".join(parts) + "\n", header)


# Portable mode: the same float32 bits on every x86-64 CPU (the course's tests run in it).
#: Environment variable that asks for the same float32 bits on every x86-64 CPU (see ``portable_math``).
PORTABLE_ENV = "LLM_FROM_SCRATCH_PORTABLE"
#: What ``make nbval`` and ``make execute`` set, beside ``LLM_FROM_SCRATCH_PORTABLE=1``, so that the
#: committed outputs of the training chapters are reproduced bit for bit on Intel and AMD processors
#: alike: PyTorch's AVX2 kernels (not AVX-512), MKL's reproducible code path for every x86-64 CPU,
#: oneDNN's AVX2 code, and a fixed number of threads. They must be set before PyTorch starts.
PORTABLE_MATH_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
}


def portable_math() -> bool:
    """Whether ``$LLM_FROM_SCRATCH_PORTABLE`` is ``1``: float32 results that do not depend on the CPU model.

    Training a model is chaotic: rounding differences of 1e-7, from a processor that sums a
    product in another order (AVX-512 against AVX2, Intel's libraries against AMD's), grow into a
    different model after a few hundred steps. In this mode the package's own fast paths step
    aside for code that gives the same bits on every x86-64 CPU with AVX2: ``Linear`` hands its
    products to ``F.linear`` (MKL) instead of oneDNN, and the quantized kernels are compiled for
    plain x86-64-v3 instead of ``-march=native``. With ``PORTABLE_MATH_ENV`` set too (the libraries'
    own switches), a chapter's outputs are the same on any such machine. It is slower (about 2.5x
    for training): the course's tests use it, a learner does not need it.
    """
    return os.environ.get(PORTABLE_ENV, "") == "1"
