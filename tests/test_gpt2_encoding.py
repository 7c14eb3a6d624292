"""The packaged GPT-2 ranks: checked against tiktoken's published ids, with no network."""

import hashlib
from importlib import resources

import pytest

from llm_from_scratch.bpe import GPT2_RANKS_SHA256, gpt2_encoding


def test_hello_world_ids():
    assert gpt2_encoding().encode("Hello, world!") == [15496, 11, 995, 0]


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        # ids published with GPT-2 / tiktoken's r50k_base (hand-checked values)
        ("<|endoftext|>", [50256]),
        (" the", [262]),
        ("The quick brown fox", [464, 2068, 7586, 21831]),
    ],
)
def test_known_ids(text, ids):
    assert gpt2_encoding().encode(text, allowed_special="all") == ids


def test_round_trip_and_vocab_size():
    enc = gpt2_encoding()
    text = "Héllo wörld 👋  tabs\tand\nnewlines 12345"
    assert enc.decode(enc.encode(text)) == text
    assert enc.n_vocab == 50257


def test_packaged_file_is_in_the_installed_package_and_intact():
    data = resources.files("llm_from_scratch").joinpath("assets", "gpt2.tiktoken").read_bytes()
    assert len(data) == 835_554
    assert hashlib.sha256(data).hexdigest() == GPT2_RANKS_SHA256
    notice = resources.files("llm_from_scratch").joinpath("assets", "LICENSE-gpt2.txt").read_text()
    assert "MIT License" in notice and "OpenAI" in notice


def test_corrupt_ranks_are_refused(monkeypatch):
    import llm_from_scratch.bpe as bpe

    class Fake:
        def joinpath(self, *parts):
            return self

        def read_bytes(self):
            return b"dGVzdA== 0\n"

    monkeypatch.setattr(bpe.resources, "files", lambda _: Fake())
    with pytest.raises(RuntimeError, match="corrupt"):
        bpe._gpt2_ranks()
