"""Byte-pair encoding: GPT-2's tokenizer, offline.

Explained in the chapter "Byte-pair encoding". This module ships GPT-2's merge
ranks (``assets/gpt2.tiktoken``, MIT, (c) 2022 OpenAI) so the reference tokenizer
works with no network: ``tiktoken.get_encoding("gpt2")`` would download them.
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache
from importlib import resources

import tiktoken

#: GPT-2's pre-tokenization regex (contractions, letters, digits, other, spaces).
GPT2_SPLIT_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
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
