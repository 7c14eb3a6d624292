"""Bits per character: one unit of quality that compares models with different tokenizers.

Explained in the chapter "Pre-training" (chapters/05_pretraining.ipynb). A loss in nats per
token depends on how much text a token holds: a character-level model predicts one character
per token, GPT-2's tokenizer about four. Dividing the total information by the number of
characters (or UTF-8 bytes) the tokens decode to removes that dependence:

    bits per character = (nats per token / ln 2) * (tokens / characters)

What it does not do: run a model. ``llm_from_scratch.train.bits_per_char`` scores a model on a
whole text and reports these numbers; this module holds the conversion and the text counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TextStats:
    """How much text ``tokens`` token ids decode to: ``chars`` characters, ``bytes`` UTF-8 bytes."""

    tokens: int
    chars: int
    bytes: int

    def __post_init__(self) -> None:
        for name in ("tokens", "chars", "bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TextStats.{name} must be a positive int, got {value!r}")

    @property
    def chars_per_token(self) -> float:
        return self.chars / self.tokens


def _decode_bytes(tokenizer, ids: list[int]) -> bytes:
    if hasattr(tokenizer, "decode_bytes"):  # our BPETokenizer, tiktoken.Encoding
        return tokenizer.decode_bytes(ids)
    if hasattr(tokenizer, "decode"):  # CharTokenizer and other tokenizers of whole characters
        return tokenizer.decode(ids).encode("utf-8")
    raise TypeError(f"tokenizer must have decode_bytes() or decode(), got {type(tokenizer).__name__}")


def text_stats(token_ids: Sequence[int], tokenizer) -> TextStats:
    """Counts the tokens of ``token_ids`` and the characters and bytes they decode to.

    ``tokenizer`` needs ``decode_bytes`` (our ``BPETokenizer``, a ``tiktoken.Encoding``) or
    ``decode`` (``CharTokenizer``). Characters are those of the UTF-8 text of all the tokens
    together, so a character whose bytes span two tokens counts once.
    """
    ids = [int(i) for i in (token_ids.tolist() if hasattr(token_ids, "tolist") else token_ids)]
    if not ids:
        raise ValueError("token_ids is empty: there is no text to count")
    data = _decode_bytes(tokenizer, ids)
    chars = len(data.decode("utf-8", errors="replace"))
    return TextStats(tokens=len(ids), chars=chars, bytes=len(data))


def nats_to_bits(nats: float) -> float:
    """A loss in nats (natural log) in bits (log base 2)."""
    return nats / math.log(2)


def bits_per_char(nats_per_token: float, stats: TextStats) -> float:
    """Mean loss in nats per token, as bits per character of the text the tokens decode to."""
    return nats_to_bits(nats_per_token) * stats.tokens / stats.chars


def bits_per_byte(nats_per_token: float, stats: TextStats) -> float:
    """Mean loss in nats per token, as bits per UTF-8 byte of the text the tokens decode to."""
    return nats_to_bits(nats_per_token) * stats.tokens / stats.bytes
