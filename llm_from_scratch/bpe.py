"""Byte-pair encoding: train a byte-level BPE tokenizer and use GPT-2's, offline.

Explained in the chapter "Byte-pair encoding" (chapters/02_bpe.ipynb).

What it does:

- ``train_bpe`` learns merges from text, starting from the 256 byte values, after
  GPT-2's pre-tokenization (no merge crosses a pre-token or a special token).
  Two trainers give the same merges: a naive one (recount every pair after every
  merge) and a fast one (pre-tokens counted once, incremental pair counts, a
  pair -> words index and a heap with lazy invalidation). Ties between pairs
  of equal count are broken by an explicit, selectable rule.
- ``BPETokenizer`` encodes and decodes with any byte-level vocabulary, among
  them GPT-2's (``BPETokenizer.from_gpt2()`` gives tiktoken's ids exactly),
  saves and loads itself, and exports itself to a fast ``tiktoken.Encoding``.
- ``gpt2_encoding`` is GPT-2's tokenizer from the packaged ranks
  (``assets/gpt2.tiktoken``, MIT, (c) 2022 OpenAI): ``tiktoken.get_encoding("gpt2")``
  would need the network.

What it does not do: Unicode normalisation, characters instead of bytes, or
dropout/sampling of merges. Encoding is pure Python with a per-pre-token cache:
correct and readable, but use ``to_tiktoken()`` for throughput.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

import regex
import tiktoken

from llm_from_scratch.utils import atomic_write_text

if TYPE_CHECKING:
    import torch

#: GPT-2's pre-tokenization regex (contractions, letters, digits, other, spaces).
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
#: sha256 of the packaged ranks file, checked every time it is loaded.
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
ENDOFTEXT = "<|endoftext|>"
GPT2_ENDOFTEXT_ID = 50256


def _gpt2_ranks() -> dict[bytes, int]:
    data = resources.files("llm_from_scratch").joinpath("assets", "gpt2.tiktoken").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        raise RuntimeError(
            f"packaged gpt2.tiktoken is corrupt: sha256 {digest}, expected {GPT2_RANKS_SHA256}"
        )
    # The .tiktoken format: one "base64(token) rank" pair per line.
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """GPT-2's tokenizer as a ``tiktoken.Encoding``, built from the packaged ranks.

    Identical to ``tiktoken.get_encoding("gpt2")`` but needs no network:
    ``gpt2_encoding().encode("Hello, world!") == [15496, 11, 995, 0]``.
    """
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=_gpt2_ranks(),
        special_tokens={ENDOFTEXT: GPT2_ENDOFTEXT_ID},
        explicit_n_vocab=GPT2_ENDOFTEXT_ID + 1,
    )


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

#: Tie-break rules of ``train_bpe`` when several pairs have the highest count.
TIE_BREAKS = ("lexicographic", "lowest_id")
#: Version of the file format written by ``BPETokenizer.save``.
FORMAT_VERSION = 1
_FORMAT_NAME = "llm_from_scratch.bpe"


def _check_special_tokens(special_tokens) -> list[str]:
    """Validate special tokens (non-empty, distinct strings); return them as a list."""
    if special_tokens is None:
        return []
    if isinstance(special_tokens, str):
        raise TypeError(f"special_tokens must be a sequence of strings, not the string {special_tokens!r}")
    tokens = list(special_tokens)
    for token in tokens:
        if not isinstance(token, str):
            raise TypeError(f"special tokens must be str, got {type(token).__name__}: {token!r}")
        if not token:
            raise ValueError("special tokens must be non-empty strings, got ''")
    duplicates = sorted({t for t in tokens if tokens.count(t) > 1})
    if duplicates:
        raise ValueError(f"duplicate special tokens: {duplicates}")
    return tokens


def _special_regex(special_tokens) -> regex.Pattern | None:
    """A regex that finds special tokens, longest first (one capturing group)."""
    if not special_tokens:
        return None
    alternatives = "|".join(regex.escape(t) for t in sorted(special_tokens, key=len, reverse=True))
    return regex.compile(f"({alternatives})")


def _read_source(source) -> str:
    if isinstance(source, str):
        return source
    if isinstance(source, os.PathLike):
        data = Path(source).read_bytes()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{os.fspath(source)!r} is not UTF-8 text (byte {exc.start}: {exc.reason})"
            ) from exc
    raise TypeError(
        f"source must be a str (the text) or an os.PathLike (a file), got {type(source).__name__}"
    )


def _count_chunks(args: tuple[list[str], str]) -> Counter:
    """Count the pre-tokens of some chunks of text (a worker of ``count_pretokens``)."""
    chunks, pattern = args
    findall = regex.compile(pattern).findall
    counts: Counter = Counter()
    for chunk in chunks:
        counts.update(findall(chunk))
    return counts


def count_pretokens(
    text: str,
    special_tokens=(ENDOFTEXT,),
    pattern: str = GPT2_SPLIT_PATTERN,
    num_workers: int = 1,
) -> dict[bytes, int]:
    """Count each distinct pre-token of ``text`` once: ``{utf-8 bytes: count}``.

    The text is first cut at the special tokens (hard boundaries that are dropped
    here), then split with ``pattern``. With ``num_workers > 1`` the pieces between
    special tokens are shared among processes; the counts, hence the trained
    merges, are the same for any number of workers.
    """
    specials = _special_regex(_check_special_tokens(special_tokens))
    chunks = specials.split(text)[::2] if specials else [text]
    if num_workers > 1 and len(chunks) > 1:
        from multiprocessing import get_context

        groups = [chunks[i::num_workers] for i in range(num_workers)]
        with get_context("fork").Pool(num_workers) as pool:
            counts: Counter = Counter()
            for part in pool.map(_count_chunks, [(g, pattern) for g in groups]):
                counts.update(part)
    else:
        counts = _count_chunks((chunks, pattern))
    return {token.encode("utf-8"): n for token, n in counts.items()}


def _merge_word(word: list[int], a: int, b: int, new_id: int) -> list[int]:
    """Replace every (a, b) in ``word`` by ``new_id``, left to right, without overlaps."""
    out = []
    i, n = 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == a and word[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


class _Vocab:
    """id -> bytes during training; a merge whose bytes already exist reuses their id."""

    def __init__(self):
        self.tokens = [bytes([i]) for i in range(256)]
        self.ids = {t: i for i, t in enumerate(self.tokens)}

    def add(self, a: int, b: int) -> int:
        merged = self.tokens[a] + self.tokens[b]
        new_id = self.ids.get(merged)
        if new_id is None:  # the same bytes can be reached by two merges: keep one id (as HF does)
            new_id = len(self.tokens)
            self.tokens.append(merged)
            self.ids[merged] = new_id
        return new_id


def _lex_key(token: bytes) -> tuple[int, ...]:
    """A key whose *smallest* value is the lexicographically *greatest* byte string."""
    return (*(255 - x for x in token), 256)


def _train_naive(word_counts: dict[bytes, int], n_tokens: int, tie_break: str) -> tuple[_Vocab, list]:
    """Recount every pair after every merge: O(merges x corpus). The reference."""
    vocab = _Vocab()
    words = [list(w) for w in word_counts]
    counts = list(word_counts.values())
    merges = []
    while len(vocab.tokens) < n_tokens:
        pair_counts: Counter = Counter()
        for word, count in zip(words, counts, strict=True):
            for pair in pairwise(word):
                pair_counts[pair] += count
        if not pair_counts:
            break
        if tie_break == "lexicographic":
            best = max(pair_counts, key=lambda p: (pair_counts[p], vocab.tokens[p[0]], vocab.tokens[p[1]]))
        else:
            best = max(pair_counts, key=lambda p: (pair_counts[p], -p[0], -p[1]))
        new_id = vocab.add(*best)
        merges.append(best)
        words = [_merge_word(w, best[0], best[1], new_id) for w in words]
    return vocab, merges


def _train_fast(word_counts: dict[bytes, int], n_tokens: int, tie_break: str) -> tuple[_Vocab, list]:
    """Incremental pair counts + pair -> words index + heap with lazy invalidation.

    Same merges as ``_train_naive``. Each heap entry is ``(-count, tie_key, pair)``;
    an entry is stale (skipped when popped) when its count is no longer the pair's.
    """
    vocab = _Vocab()
    words = [list(w) for w in word_counts]
    counts = list(word_counts.values())
    lexicographic = tie_break == "lexicographic"
    lex_keys = [_lex_key(t) for t in vocab.tokens]

    def key(pair):
        return (lex_keys[pair[0]], lex_keys[pair[1]]) if lexicographic else pair

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    pair_words: dict[tuple[int, int], set[int]] = defaultdict(set)
    for index, (word, count) in enumerate(zip(words, counts, strict=True)):
        for pair in pairwise(word):
            pair_counts[pair] += count
            pair_words[pair].add(index)
    heap = [(-n, key(p), p) for p, n in pair_counts.items()]
    heapq.heapify(heap)

    merges = []
    while len(vocab.tokens) < n_tokens:
        while heap and pair_counts.get(heap[0][2], 0) != -heap[0][0]:
            heapq.heappop(heap)  # stale: the pair's count changed since this entry was pushed
        if not heap:
            break
        _, _, best = heapq.heappop(heap)
        a, b = best
        new_id = vocab.add(a, b)
        if new_id == len(lex_keys):
            lex_keys.append(_lex_key(vocab.tokens[new_id]))
        merges.append(best)
        changed = set()
        for index in pair_words.pop(best):
            word = words[index]
            count = counts[index]
            out: list[int] = []
            i, n = 0, len(word)
            while i < n:
                if word[i] == a and i + 1 < n and word[i + 1] == b:
                    # Only the pairs touching this occurrence change: (left, a) -> (left, new)
                    # and (b, right) -> (new, right). A right neighbour that starts the next
                    # occurrence is left to that occurrence, so nothing is counted twice.
                    if out:
                        old_pair, new_pair = (word[i - 1], a), (out[-1], new_id)
                        pair_counts[old_pair] -= count
                        pair_counts[new_pair] += count
                        pair_words[new_pair].add(index)
                        changed.add(old_pair)
                        changed.add(new_pair)
                    if i + 2 < n and not (word[i + 2] == a and i + 3 < n and word[i + 3] == b):
                        old_pair, new_pair = (b, word[i + 2]), (new_id, word[i + 2])
                        pair_counts[old_pair] -= count
                        pair_counts[new_pair] += count
                        pair_words[new_pair].add(index)
                        changed.add(old_pair)
                        changed.add(new_pair)
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            if len(out) < n:
                words[index] = out
        pair_counts.pop(best, None)
        changed.discard(best)
        for pair in changed:
            n = pair_counts[pair]
            if n > 0:
                heapq.heappush(heap, (-n, key(pair), pair))
            else:
                del pair_counts[pair]
    return vocab, merges


def train_bpe(
    source: str | os.PathLike,
    vocab_size: int,
    special_tokens=(ENDOFTEXT,),
    *,
    tie_break: str = "lexicographic",
    pattern: str = GPT2_SPLIT_PATTERN,
    algorithm: str = "fast",
    num_workers: int = 1,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Learn a byte-level BPE vocabulary from ``source`` (the text, or a UTF-8 file).

    ``vocab_size`` counts the 256 byte tokens, the merged tokens and the special
    tokens. Returns ``(vocab, merges)``: ``vocab`` maps id -> bytes (ids 0-255 are
    the bytes, then the merged tokens in the order they were learned, then the
    special tokens); ``merges`` lists the merged pairs of byte strings in the order
    they were learned. Training stops early when no pair is left.

    Pre-tokenization: the text is cut at the special tokens (never merged, never
    merged across) and split with ``pattern`` (GPT-2's regex); no merge crosses a
    pre-token. ``num_workers > 1`` counts pre-tokens in that many processes.

    ``tie_break`` decides among pairs of equal, highest count:

    - ``"lexicographic"``: the pair with the greatest ``(bytes(a), bytes(b))``,
      comparing Python ``bytes`` (so ``b"e"`` > ``b" "``, ``b"ab"`` > ``b"a"``);
    - ``"lowest_id"``: the pair with the smallest ``(id(a), id(b))``, ids as
      above (bytes by value, then merged tokens by age). This is the rule of
      Hugging Face ``tokenizers`` (whose own ids order the initial alphabet
      differently, so its merges can still differ from ours).

    ``algorithm="naive"`` recounts all pairs after each merge (slow, the
    reference); ``"fast"`` (default) gives the same merges incrementally. If a
    merge produces bytes that are already a token (``a+bc`` after ``ab+c``), the
    merge is recorded but the existing id is reused, as Hugging Face does.
    Explained in the chapter "Byte-pair encoding".
    """
    specials = _check_special_tokens(special_tokens)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if vocab_size < 256 + len(specials):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it must be at least 256 byte tokens "
            f"+ {len(specials)} special token(s) = {256 + len(specials)}"
        )
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")
    trainers = {"fast": _train_fast, "naive": _train_naive}
    if algorithm not in trainers:
        raise ValueError(f"algorithm must be one of {tuple(trainers)}, got {algorithm!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be a positive int, got {num_workers!r}")
    text = _read_source(source)
    word_counts = count_pretokens(text, specials, pattern, num_workers)
    vocab, merges = trainers[algorithm](word_counts, vocab_size - len(specials), tie_break)
    tokens = dict(enumerate(vocab.tokens))
    for token in specials:
        tokens[len(tokens)] = token.encode("utf-8")
    return tokens, [(vocab.tokens[a], vocab.tokens[b]) for a, b in merges]


# ----------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------

#: A pre-token starting this close to the end of a buffer may still change when more text comes
#: (GPT-2's regex looks at most 3 characters ahead, for contractions such as "'ll").
_LOOKAHEAD = 4
#: The per-pre-token cache of ``BPETokenizer.encode`` is emptied when it holds this many entries.
_CACHE_SIZE = 500_000
_WHITESPACE = regex.compile(r"\s")


class BPETokenizer:
    """A byte-level BPE tokenizer: text <-> token ids.

    ``vocab`` maps id -> bytes and must hold all 256 single bytes; ``merges``
    lists pairs of byte strings, earliest (highest priority) first, whose
    concatenations are in ``vocab``. ``special_tokens`` (a list of strings, or a
    mapping string -> id) are recognised in the text, longest match first, and
    never split; a special token missing from ``vocab`` gets the next free id.

    Encoding cuts the text at special tokens, splits it with ``pattern`` (GPT-2's
    regex), then inside each pre-token repeatedly merges the adjacent pair whose
    concatenation is the earliest learned token (leftmost on ties): tiktoken's
    rule, so that ``to_tiktoken()`` and ``from_gpt2()`` agree with tiktoken exactly.
    Explained in the chapter "Byte-pair encoding".
    """

    def __init__(
        self,
        vocab: Mapping[int, bytes],
        merges: Iterable[tuple[bytes, bytes]],
        special_tokens: Iterable[str] | Mapping[str, int] | None = None,
        *,
        pattern: str = GPT2_SPLIT_PATTERN,
    ):
        if not isinstance(vocab, Mapping):
            raise TypeError(f"vocab must be a mapping id -> bytes, got {type(vocab).__name__}")
        self.vocab: dict[int, bytes] = {}
        for token_id, token in vocab.items():
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise ValueError(f"vocab ids must be non-negative ints, got {token_id!r}")
            if not isinstance(token, bytes) or not token:
                raise ValueError(f"vocab[{token_id}] must be non-empty bytes, got {token!r}")
            self.vocab[token_id] = token
        self.merges: list[tuple[bytes, bytes]] = [(bytes(a), bytes(b)) for a, b in merges]
        self.pattern = pattern
        self._pattern = regex.compile(pattern)

        # Special tokens: resolve their ids, then keep them out of the ordinary tokens.
        if isinstance(special_tokens, Mapping):
            names = _check_special_tokens(list(special_tokens))
            self.special_tokens = {}
            for name in names:
                token_id = special_tokens[name]
                if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                    raise ValueError(f"special token {name!r} needs a non-negative int id, got {token_id!r}")
                if token_id in self.vocab and self.vocab[token_id] != name.encode("utf-8"):
                    raise ValueError(
                        f"special token {name!r} has id {token_id}, which is already the token "
                        f"{self.vocab[token_id]!r}"
                    )
                self.vocab[token_id] = name.encode("utf-8")
                self.special_tokens[name] = token_id
        else:
            names = _check_special_tokens(special_tokens)
            by_bytes = {token: token_id for token_id, token in self.vocab.items()}
            self.special_tokens = {}
            for name in names:
                token_id = by_bytes.get(name.encode("utf-8"))
                if token_id is None:
                    token_id = max(self.vocab, default=-1) + 1
                    self.vocab[token_id] = name.encode("utf-8")
                self.special_tokens[name] = token_id
        special_ids = set(self.special_tokens.values())

        self._token_to_id: dict[bytes, int] = {}
        for token_id, token in self.vocab.items():
            if token_id in special_ids:
                continue
            if token in self._token_to_id:
                raise ValueError(
                    f"vocab has the token {token!r} twice (ids {self._token_to_id[token]} and {token_id})"
                )
            self._token_to_id[token] = token_id
        missing = [i for i in range(256) if bytes([i]) not in self._token_to_id]
        if missing:
            raise ValueError(f"vocab must contain all 256 single bytes; missing {missing[:10]}...")
        self._ranks: dict[bytes, int] = {}  # merged token -> priority (earliest merge first)
        for rank, (a, b) in enumerate(self.merges):
            if a + b not in self._token_to_id:
                raise ValueError(f"merge {rank} ({a!r}, {b!r}) makes {a + b!r}, which is not in vocab")
            self._ranks.setdefault(a + b, rank)
        self._specials = _special_regex(names)
        self._byte_pieces = [bytes([i]) for i in range(256)]
        self._cache: dict[str, list[int]] = {}

    def __repr__(self) -> str:
        return (
            f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
            f"special_tokens={list(self.special_tokens)})"
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (max id + 1)."""
        return max(self.vocab) + 1

    def with_special_tokens(self, names: Iterable[str]) -> BPETokenizer:
        """A new tokenizer with the special tokens ``names`` appended after every existing id.

        Existing ids (ordinary and special) are unchanged, so a model trained with this
        tokenizer keeps its embedding rows; the new tokens get ids ``vocab_size``,
        ``vocab_size + 1``, ... in the order given. ``save``/``load`` keep them. A name that is
        already a special token, or whose bytes are an ordinary token, raises ``ValueError``.
        Used by the chapter "Following instructions" for the chat template's role markers.
        """
        names = _check_special_tokens(names)
        clashes = [n for n in names if n in self.special_tokens or n.encode("utf-8") in self._token_to_id]
        if clashes:
            raise ValueError(f"{clashes} are already tokens of this tokenizer: pick other names")
        specials = dict(self.special_tokens)
        ordinary = {i: t for i, t in self.vocab.items() if i not in set(specials.values())}
        for offset, name in enumerate(names):
            specials[name] = self.vocab_size + offset
        return type(self)(ordinary, self.merges, specials, pattern=self.pattern)

    # --- encoding ---------------------------------------------------------------------------
    def _encode_piece(self, piece: str) -> list[int]:
        """BPE inside one pre-token: merge the earliest-learned adjacent pair until none is left."""
        ranks = self._ranks
        parts = [self._byte_pieces[b] for b in piece.encode("utf-8")]
        while len(parts) > 1:
            best_rank, best = None, -1
            for i in range(len(parts) - 1):
                rank = ranks.get(parts[i] + parts[i + 1])
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, i
            if best_rank is None:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        ids = [self._token_to_id[p] for p in parts]
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[piece] = ids
        return ids

    def _encode_ordinary(self, text: str, out: list[int]) -> None:
        cache = self._cache
        for piece in self._pattern.findall(text):
            ids = cache.get(piece)
            if ids is None:
                ids = self._encode_piece(piece)
            out += ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens given at construction are recognised."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        out: list[int] = []
        if self._specials is None:
            self._encode_ordinary(text, out)
            return out
        for i, part in enumerate(self._specials.split(text)):
            if i % 2:  # odd items are the special tokens that split the text
                out.append(self.special_tokens[part])
            elif part:
                self._encode_ordinary(part, out)
        return out

    def _safe_cut(self, buffer: str) -> int:
        """How much of ``buffer`` can be encoded now without changing the result later."""
        limit = len(buffer)
        for name in self.special_tokens:  # a special token may be cut in two at the end
            for k in range(min(len(name), len(buffer) + 1) - 1, 0, -1):
                if buffer.endswith(name[:k]):
                    limit = min(limit, len(buffer) - k)
                    break
        start = 0
        if self._specials is not None:
            for match in self._specials.finditer(buffer, 0, limit):
                start = match.end()
        matches = list(self._pattern.finditer(buffer, start, limit))
        cut = start
        # Keep back the last pre-token, any near the end, and whitespace: how a run of spaces
        # splits depends on the character that follows it.
        for match in matches[:-1]:
            end = match.end()
            if end > limit - _LOOKAHEAD:
                break
            if not _WHITESPACE.match(buffer, end - 1):
                cut = end
        return cut

    def encode_iterable(self, iterable: Iterable[str]) -> Iterator[int]:
        """Lazily encode an iterable of strings (e.g. a file's lines) as one text.

        Yields exactly ``encode("".join(iterable))`` while holding only a short tail
        of text in memory: a chunk is encoded as soon as its pre-tokens can no longer
        change (the last few characters wait for the next chunk).
        """
        buffer = ""
        for chunk in iterable:
            if not isinstance(chunk, str):
                raise TypeError(f"encode_iterable expects strings, got {type(chunk).__name__}")
            buffer += chunk
            cut = self._safe_cut(buffer)
            if cut:
                yield from self.encode(buffer[:cut])
                buffer = buffer[cut:]
        if buffer:
            yield from self.encode(buffer)

    # --- decoding ---------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of a sequence of ids (no UTF-8 decoding)."""
        vocab = self.vocab
        ids = list(ids)
        try:
            return b"".join([vocab[i] for i in ids])
        except (KeyError, TypeError):
            bad = next(i for i in ids if not isinstance(i, int) or i not in vocab)
            raise ValueError(
                f"token id {bad!r} is out of range: expected an id of this vocabulary "
                f"(0 <= id < {self.vocab_size})"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of ids. Bytes that are not valid UTF-8 (a multi-byte
        character cut between tokens, say) become U+FFFD (``errors="replace"``)."""
        return self.decode_bytes(list(ids)).decode("utf-8", errors="replace")

    # --- other tokenizers -------------------------------------------------------------------
    @classmethod
    def from_gpt2(cls) -> BPETokenizer:
        """GPT-2's tokenizer, rebuilt from the packaged ranks (ids equal tiktoken's)."""
        vocab, merges = _gpt2_vocab_and_merges()
        return cls(dict(vocab), merges, {ENDOFTEXT: GPT2_ENDOFTEXT_ID})

    def to_tiktoken(self, name: str = "llm_from_scratch_bpe") -> tiktoken.Encoding:
        """The same tokenizer as a (fast, Rust) ``tiktoken.Encoding``.

        tiktoken's rank of a token is both its id and its merge priority, so the ids
        of the merged tokens must grow in the order they were learned (true for
        ``train_bpe`` and GPT-2); otherwise ``ValueError``.
        """
        special_ids = set(self.special_tokens.values())
        merged = sorted(self._ranks, key=self._ranks.__getitem__)
        ids = [self._token_to_id[t] for t in merged]
        others = [
            t for i, t in self.vocab.items() if i not in special_ids and len(t) > 1 and t not in self._ranks
        ]
        if others or any(x >= y for x, y in pairwise(ids)):
            raise ValueError(
                "to_tiktoken needs every multi-byte token to come from a merge, with ids that grow "
                "in the order the merges were learned"
            )
        return tiktoken.Encoding(
            name=name,
            pat_str=self.pattern,
            mergeable_ranks={t: i for i, t in self.vocab.items() if i not in special_ids},
            special_tokens=dict(self.special_tokens),
            explicit_n_vocab=self.vocab_size if self.vocab_size == len(self.vocab) else None,
        )

    # --- files ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer (pattern, vocab, merges, special tokens) as versioned JSON, atomically."""
        return atomic_write_text(Path(path), self.to_json())

    def fingerprint(self) -> str:
        """sha256 of ``to_json()``: equal to the sha256 of the file ``save`` writes."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def to_json(self) -> str:
        """The versioned JSON text that ``save`` writes and ``load`` reads."""
        b64 = lambda token: base64.b64encode(token).decode("ascii")  # noqa: E731
        special_ids = set(self.special_tokens.values())
        data = {
            "format": _FORMAT_NAME,
            "version": FORMAT_VERSION,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "vocab": [[i, b64(t)] for i, t in sorted(self.vocab.items()) if i not in special_ids],
            "merges": [[b64(a), b64(b)] for a, b in self.merges],
        }
        return json.dumps(data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        """Read a file written by ``save``; ``ValueError`` if it is corrupt or of an unknown version."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"{os.fspath(path)!r} is not a saved BPETokenizer (corrupt JSON: {exc})"
            ) from exc
        if not isinstance(data, dict) or data.get("format") != _FORMAT_NAME:
            raise ValueError(
                f"{os.fspath(path)!r} is not a saved BPETokenizer (format is not {_FORMAT_NAME!r})"
            )
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{os.fspath(path)!r} has format version {data.get('version')!r}; this code reads "
                f"version {FORMAT_VERSION}"
            )
        try:
            vocab = {int(i): base64.b64decode(t, validate=True) for i, t in data["vocab"]}
            merges = [
                (base64.b64decode(a, validate=True), base64.b64decode(b, validate=True))
                for a, b in data["merges"]
            ]
            specials = {str(k): int(v) for k, v in data["special_tokens"].items()}
            pattern = str(data["pattern"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{os.fspath(path)!r} is a corrupt BPETokenizer file: {exc!r}") from exc
        return cls(vocab, merges, specials, pattern=pattern)


def _bpe_split(token: bytes, ranks: Mapping[bytes, int], max_rank: int) -> list[bytes]:
    """tiktoken's BPE on ``token`` using only ranks below ``max_rank``."""
    parts = [bytes([b]) for b in token]
    while True:
        best_rank, best = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best_rank is None or rank < best_rank):
                best_rank, best = rank, i
        if best_rank is None:
            return parts
        parts[best : best + 2] = [parts[best] + parts[best + 1]]


@lru_cache(maxsize=1)
def _gpt2_vocab_and_merges() -> tuple[tuple[tuple[int, bytes], ...], tuple[tuple[bytes, bytes], ...]]:
    """GPT-2's vocab and merges, recovered from its ranks.

    A token of rank r was made by the merge that BPE, allowed only the ranks below
    r, leaves as exactly two parts (the standard tiktoken -> merges reconstruction).
    """
    ranks = _gpt2_ranks()
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _bpe_split(token, ranks, rank)
        if len(parts) != 2:
            raise RuntimeError(f"GPT-2 token {token!r} (rank {rank}) is not a merge of two tokens")
        merges.append((parts[0], parts[1]))
    vocab = tuple((rank, token) for token, rank in ranks.items())
    return vocab, tuple(merges)


#: The course's validation split: 10% of the works (one of the nine "small" works), chosen by
#: ``train_val_split(documents, COURSE_VAL_FRACTION, seed=COURSE_SPLIT_SEED)``: Macbeth.
COURSE_VAL_FRACTION = 0.1
COURSE_SPLIT_SEED = 2


def default_tokenizer_path(
    vocab_size: int,
    subset: str | None,
    tie_break: str = "lexicographic",
    *,
    val_fraction: float = COURSE_VAL_FRACTION,
    split_seed: int = COURSE_SPLIT_SEED,
) -> Path:
    """Where ``train_or_load_tokenizer`` keeps a course tokenizer (its name says which documents it saw)."""
    from llm_from_scratch.utils import artifacts_dir

    docs = "all" if val_fraction == 0 else f"train{val_fraction:g}-seed{split_seed}"
    return artifacts_dir("tokenizers") / f"shakespeare-{subset or 'full'}-{docs}-{vocab_size}-{tie_break}.json"


def train_or_load_tokenizer(
    vocab_size: int = 4096,
    subset: str | None = "small",
    *,
    tie_break: str = "lexicographic",
    path: str | os.PathLike | None = None,
    val_fraction: float = COURSE_VAL_FRACTION,
    split_seed: int = COURSE_SPLIT_SEED,
) -> BPETokenizer:
    """The course tokenizer: loaded from ``path`` when it exists, else trained and saved.

    Trains on the *training* documents only: ``train_val_split(load_documents("shakespeare",
    subset=subset), val_fraction, seed=split_seed)[0]`` joined by ``<|endoftext|>``, the only
    special token. The held-out work is never seen, so its compression and the models' losses
    on it measure text that nothing in the pipeline was fitted to (``val_fraction=0`` trains on
    every document). ``path`` defaults to ``default_tokenizer_path(...)`` under
    ``artifacts_dir("tokenizers")``. Later chapters call this; the chapter "Byte-pair encoding"
    creates the default one.
    """
    if path is None:
        path = default_tokenizer_path(vocab_size, subset, tie_break, val_fraction=val_fraction, split_seed=split_seed)
    path = Path(path)
    if path.exists():
        tokenizer = BPETokenizer.load(path)
        if tokenizer.vocab_size > vocab_size:  # smaller is fine: training stops when no pair is left
            raise ValueError(
                f"{os.fspath(path)!r} holds a vocabulary of {tokenizer.vocab_size}, not {vocab_size}"
            )
        return tokenizer
    from llm_from_scratch.data import load_documents, train_val_split

    documents = load_documents("shakespeare", subset=subset)
    train_docs, _ = train_val_split(documents, val_fraction, seed=split_seed)
    vocab, merges = train_bpe(ENDOFTEXT.join(train_docs), vocab_size, (ENDOFTEXT,), tie_break=tie_break)
    tokenizer = BPETokenizer(vocab, merges, [ENDOFTEXT])
    tokenizer.save(path)
    return tokenizer


@dataclass
class CourseData:
    """The course's data set, tokenized: what ``course_data`` returns.

    ``train_ids`` / ``val_ids`` are 1-D int64 tensors of the training and validation documents,
    each list joined by ``<|endoftext|>``; ``val_text`` is the validation text they encode.
    """

    tokenizer: BPETokenizer
    train_docs: list[str]
    val_docs: list[str]
    train_ids: torch.Tensor
    val_ids: torch.Tensor

    @property
    def val_text(self) -> str:
        return ENDOFTEXT.join(self.val_docs)


def course_data(
    vocab_size: int = 4096,
    subset: str | None = "small",
    *,
    val_fraction: float = COURSE_VAL_FRACTION,
    split_seed: int = COURSE_SPLIT_SEED,
) -> CourseData:
    """The one pipeline every training chapter uses: split the works, train (or load) the
    tokenizer on the training works only, tokenize both sides.

    The same arguments give the same split, the same tokenizer file and the same ids in every
    chapter and in ``python -m llm_from_scratch train``. Explained in the chapter "Pre-training".
    """
    from llm_from_scratch.data import load_documents, train_val_split

    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1) for a validation set, got {val_fraction}")
    tokenizer = train_or_load_tokenizer(vocab_size, subset, val_fraction=val_fraction, split_seed=split_seed)
    documents = load_documents("shakespeare", subset=subset)
    train_docs, val_docs = train_val_split(documents, val_fraction, seed=split_seed)
    return CourseData(tokenizer, train_docs, val_docs, *encode_documents(tokenizer, train_docs, val_docs))


def encode_documents(tokenizer: BPETokenizer, *document_lists: list[str]) -> list[torch.Tensor]:
    """Each list of documents joined by ``<|endoftext|>`` and encoded: one 1-D int64 tensor per list."""
    import torch

    encoding = tokenizer.to_tiktoken()
    return [
        torch.tensor(encoding.encode(ENDOFTEXT.join(docs), allowed_special={ENDOFTEXT}), dtype=torch.int64)
        for docs in document_lists
    ]
