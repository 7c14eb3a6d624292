"""Tests of bits per character: the conversion by hand, text counts, and a model scored on a whole text."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from llm_from_scratch.bpe import BPETokenizer, gpt2_encoding
from llm_from_scratch.data import CharTokenizer
from llm_from_scratch.metrics import TextStats, bits_per_byte, bits_per_char, nats_to_bits, text_stats
from llm_from_scratch.model import GPT, GPTConfig
from llm_from_scratch.train import bits_per_char as score_bits_per_char


def test_conversion_by_hand():
    # 1 nat per token, 2 characters (3 bytes) per token: 1 / ln 2 / 2 bits per character.
    stats = TextStats(tokens=10, chars=20, bytes=30)
    assert nats_to_bits(math.log(2)) == pytest.approx(1.0)
    assert bits_per_char(1.0, stats) == pytest.approx(0.7213475204444817)
    assert bits_per_byte(1.0, stats) == pytest.approx(0.4808983469629878)
    # A uniform guess over 256 byte values, one byte per token, is exactly 8 bits per byte.
    assert bits_per_byte(math.log(256), TextStats(tokens=5, chars=5, bytes=5)) == pytest.approx(8.0)


def test_text_stats_counts_characters_and_bytes():
    text = "naïve café\n"  # 11 characters, 13 UTF-8 bytes
    enc = gpt2_encoding()
    stats = text_stats(enc.encode(text), enc)
    assert (stats.tokens, stats.chars, stats.bytes) == (len(enc.encode(text)), 11, 13)
    chars = CharTokenizer.from_text(text)
    assert text_stats(chars.encode(text), chars) == TextStats(tokens=11, chars=11, bytes=13)
    ours = BPETokenizer.from_gpt2()
    assert text_stats(torch.tensor(ours.encode(text)), ours).chars == 11


def test_bad_stats_and_tokenizers():
    with pytest.raises(ValueError, match="chars"):
        TextStats(tokens=3, chars=0, bytes=3)
    with pytest.raises(ValueError, match="empty"):
        text_stats([], gpt2_encoding())
    with pytest.raises(TypeError, match="decode"):
        text_stats([1, 2], object())


def test_model_scored_on_every_window_of_the_text():
    enc = gpt2_encoding()
    ids = torch.tensor(enc.encode("To be, or not to be, that is the question. " * 12))
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50257, context_length=16, d_model=32, n_layers=1, n_heads=2, dropout=0.0)
    model = GPT(config).eval()
    score = score_bits_per_char(model, ids, enc, batch_size=3)
    # Reference: every non-overlapping window of 17 tokens, by F.cross_entropy, and the text its targets decode to.
    n = (len(ids) - 1) // 16
    inputs, targets = ids[: n * 16].view(n, 16), ids[1 : n * 16 + 1].view(n, 16)
    with torch.no_grad():
        logits = model(inputs)
    nats = nn.functional.cross_entropy(logits.reshape(-1, 50257), targets.reshape(-1)).item()
    text = enc.decode(targets.reshape(-1).tolist())
    assert score["tokens"] == n * 16
    assert score["nats_per_token"] == pytest.approx(nats, rel=1e-5)
    assert score["bits_per_char"] == pytest.approx(nats / math.log(2) * n * 16 / len(text), rel=1e-5)
    assert score["bits_per_byte"] == pytest.approx(nats / math.log(2) * n * 16 / len(text.encode()), rel=1e-5)
