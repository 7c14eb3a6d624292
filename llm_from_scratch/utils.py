"""Small helpers every chapter uses: choosing a device, seeding, where files go.

Explained in the chapter "Getting started" (chapters/00_setup.ipynb). Nothing here
knows about language models; it only keeps runs reproducible and portable.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
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


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``atomic_write_bytes`` for text, encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))
