"""Byte-pair encoding: GPT-2 parity against tiktoken, fast trainer against the naive one, files, errors."""

import random

import pytest

from llm_from_scratch.bpe import (
    ENDOFTEXT,
    GPT2_ENDOFTEXT_ID,
    GPT2_SPLIT_PATTERN,
    TIE_BREAKS,
    BPETokenizer,
    count_pretokens,
    gpt2_encoding,
    train_bpe,
    train_or_load_tokenizer,
)
from llm_from_scratch.data import load_corpus

VARIED_TEXTS = {
    "ascii": "Hello, world! The quick brown fox jumps over the lazy dog.",
    "contractions": "It's what you'll see: they're here, I'd've gone, we've, I'm, don't 'tis",
    "multilingual": "Größe, déjà vu, señor, Ελληνικά, Привет мир, 日本語のテキスト, 한국어, العربية, हिन्दी",
    "emoji": "emoji 👋🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🤖!!",
    "whitespace": "a  b   c\t\td\n\n\ne \r\n f     \n   \t  \n\n\n    x   ",
    "digits": "3.14159 1,000,000 2024-01-31 007 12345678901234567890 ٣٤٥ ½",
    "specials": f"first{ENDOFTEXT}second {ENDOFTEXT}{ENDOFTEXT} third<|endoftext|",
    "code": "def f(x):\n    return x**2  # square\n\tif x != None: pass\n",
    "empty": "",
}


@pytest.fixture(scope="module")
def gpt2():
    return BPETokenizer.from_gpt2()


@pytest.fixture(scope="module")
def shakespeare():
    return load_corpus("shakespeare")


@pytest.mark.parametrize("name", sorted(VARIED_TEXTS))
def test_gpt2_parity_varied(gpt2, name):
    text = VARIED_TEXTS[name]
    ids = gpt2.encode(text)
    assert ids == gpt2_encoding().encode(text, allowed_special="all")
    assert gpt2.decode(ids) == text


def test_gpt2_parity_whole_shakespeare(gpt2, shakespeare):
    ids = gpt2.encode(shakespeare)
    assert ids == gpt2_encoding().encode(shakespeare, allowed_special="all")
    assert gpt2.decode(ids) == shakespeare


def test_gpt2_known_ids_and_size(gpt2):
    assert gpt2.encode("Hello, world!") == [15496, 11, 995, 0]
    assert gpt2.encode(ENDOFTEXT) == [GPT2_ENDOFTEXT_ID]
    assert gpt2.vocab_size == 50257 and len(gpt2.merges) == 50000


def test_wikipedia_example_by_hand_and_tie_rules_differ():
    # "aaabdaaabac": (a,a) wins with 4 (overlapping) occurrences -> "aa". Then (aa,a) and (a,b) tie at 2:
    # lexicographic prefers (b"aa", b"a") > (b"a", b"b"); lowest_id prefers (97, 98) < (256, 97).
    expected = {
        "lexicographic": [(b"a", b"a"), (b"aa", b"a"), (b"aaa", b"b")],
        "lowest_id": [(b"a", b"a"), (b"a", b"b"), (b"aa", b"ab")],
    }
    for tie_break, merges in expected.items():
        for algorithm in ("naive", "fast"):
            vocab, got = train_bpe("aaabdaaabac", 259, (), tie_break=tie_break, algorithm=algorithm)
            assert got == merges
            assert [vocab[i] for i in (256, 257, 258)] == [b"aa", merges[1][0] + merges[1][1], b"aaab"]


def _random_corpus(rng: random.Random) -> str:
    alphabet = rng.choice(["ab ", "abc \n", "abcde ,.'", "xyzé ü\t12"])
    words = []
    for _ in range(rng.randint(5, 120)):
        word = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9)))
        words.append(word)
        if rng.random() < 0.05:
            words.append(ENDOFTEXT)
    return " ".join(words)


@pytest.mark.parametrize("tie_break", TIE_BREAKS)
def test_fast_trainer_equals_naive_on_random_corpora(tie_break):
    rng = random.Random(1234)
    for _ in range(60):
        text = _random_corpus(rng)
        vocab_size = rng.randint(257, 257 + 80)
        naive = train_bpe(text, vocab_size, tie_break=tie_break, algorithm="naive")
        fast = train_bpe(text, vocab_size, tie_break=tie_break, algorithm="fast")
        assert fast == naive


def test_fast_trainer_equals_naive_on_real_text():
    text = load_corpus("shakespeare", subset="tiny")[:30_000]
    for tie_break in TIE_BREAKS:
        assert train_bpe(text, 400, tie_break=tie_break, algorithm="naive") == train_bpe(
            text, 400, tie_break=tie_break
        )


def test_pretoken_counts_match_an_independent_split():
    import re

    import regex

    text = VARIED_TEXTS["contractions"] + ENDOFTEXT + VARIED_TEXTS["whitespace"]
    expected = {}
    for part in re.split(re.escape(ENDOFTEXT), text):
        for piece in regex.findall(GPT2_SPLIT_PATTERN, part):
            expected[piece.encode()] = expected.get(piece.encode(), 0) + 1
    assert count_pretokens(text) == expected
    assert count_pretokens((text + ENDOFTEXT) * 3, num_workers=2) == {k: 3 * v for k, v in expected.items()}


def test_workers_give_the_same_merges():
    text = load_corpus("shakespeare", subset="tiny")
    assert train_bpe(text, 300, num_workers=2) == train_bpe(text, 300, num_workers=1)


def test_vocab_layout_and_no_merge_across_specials():
    text = "ab<|endoftext|>ab ab<|endoftext|>ba"
    vocab, merges = train_bpe(text, 260)
    assert vocab[259] == ENDOFTEXT.encode()
    assert all(vocab[i] == bytes([i]) for i in range(256))
    assert all(b"<|" not in a + b for a, b in merges)


@pytest.fixture(scope="module")
def trained():
    vocab, merges = train_bpe(load_corpus("shakespeare", subset="tiny"), 1000)
    return BPETokenizer(vocab, merges, [ENDOFTEXT])


def test_trained_round_trips_and_tiktoken_export(trained, shakespeare):
    enc = trained.to_tiktoken()
    sample = shakespeare[:300_000]
    for text in [*VARIED_TEXTS.values(), sample]:
        ids = trained.encode(text)
        assert ids == enc.encode(text, allowed_special="all")
        assert trained.decode(ids) == text
    assert enc.decode(trained.encode(sample)) == sample


def test_decode_invalid_utf8_replaces(trained):
    ids = trained.encode("é")  # two bytes, 0xC3 0xA9
    assert len(ids) in (1, 2)
    first_byte = trained._token_to_id[b"\xc3"]
    assert trained.decode([first_byte]) == "\ufffd"
    assert trained.decode_bytes([first_byte]) == b"\xc3"


def test_encode_iterable_is_lazy_and_exact(trained, gpt2):
    rng = random.Random(0)
    texts = [*VARIED_TEXTS.values(), load_corpus("shakespeare", subset="tiny")[:20_000]]
    text = "".join(texts) + "don't you'll x" + ENDOFTEXT[:5]
    for tokenizer in (trained, gpt2):
        expected = tokenizer.encode(text)
        for _ in range(20):
            cuts = sorted(rng.sample(range(len(text)), rng.randint(1, 400)))
            chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
            assert list(tokenizer.encode_iterable(chunks)) == expected
        assert list(tokenizer.encode_iterable(text.splitlines(keepends=True))) == expected
    # every split in two of a text full of whitespace runs, contractions and special tokens
    small = VARIED_TEXTS["whitespace"] + VARIED_TEXTS["contractions"] + VARIED_TEXTS["specials"] + " \n\n x"
    expected = trained.encode(small)
    for cut in range(len(small) + 1):
        assert list(trained.encode_iterable([small[:cut], small[cut:]])) == expected, cut

    # lazy: the first ids come before the iterable is exhausted
    def lines():
        yield "hello world, this is a line\n"
        yield "second line\n"
        raise RuntimeError("read too far")

    iterator = trained.encode_iterable(lines())
    assert next(iterator) == trained.encode("hello")[0]


def test_save_load_round_trip(tmp_path, trained, gpt2):
    for tokenizer in (trained, gpt2):
        path = tokenizer.save(tmp_path / "tok.json")
        loaded = BPETokenizer.load(path)
        assert loaded.pattern == tokenizer.pattern
        assert loaded.merges == tokenizer.merges
        assert loaded.special_tokens == tokenizer.special_tokens
        assert loaded.vocab == tokenizer.vocab
        text = VARIED_TEXTS["specials"] + VARIED_TEXTS["emoji"]
        assert loaded.encode(text) == tokenizer.encode(text)
    custom = BPETokenizer(trained.vocab, trained.merges, ["<|a|>", "<|ab|>"], pattern=r"\S+|\s+")
    loaded = BPETokenizer.load(custom.save(tmp_path / "custom.json"))
    assert loaded.pattern == r"\S+|\s+" and loaded.special_tokens == custom.special_tokens
    assert loaded.encode("x<|ab|>y<|a|>") == custom.encode("x<|ab|>y<|a|>")
    assert custom.encode("<|ab|>") == [custom.special_tokens["<|ab|>"]]  # longest match first


def test_train_or_load(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    tokenizer = train_or_load_tokenizer(300, "tiny", path=path)
    assert path.exists() and tokenizer.vocab_size == 300
    import llm_from_scratch.bpe as bpe

    monkeypatch.setattr(bpe, "train_bpe", lambda *a, **k: pytest.fail("should load, not train"))
    again = train_or_load_tokenizer(300, "tiny", path=path)
    assert again.merges == tokenizer.merges


def test_train_from_file_and_bad_files(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("hello hello world", encoding="utf-8")
    assert train_bpe(good, 260) == train_bpe("hello hello world", 260)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(ValueError, match="not UTF-8"):
        train_bpe(bad, 300)
    with pytest.raises(TypeError, match="source"):
        train_bpe(b"bytes", 300)


def test_bad_arguments(trained, tmp_path):
    with pytest.raises(ValueError, match="at least 256"):
        train_bpe("abc", 256)  # 256 bytes + <|endoftext|> = 257
    train_bpe("abc", 256, ())
    with pytest.raises(ValueError, match="non-empty"):
        train_bpe("abc", 300, ("",))
    with pytest.raises(ValueError, match="duplicate"):
        train_bpe("abc", 300, ("<|x|>", "<|x|>"))
    with pytest.raises(ValueError, match="tie_break"):
        train_bpe("abc", 300, tie_break="random")
    with pytest.raises(ValueError, match="duplicate"):
        BPETokenizer(trained.vocab, trained.merges, ["<s>", "<s>"])
    with pytest.raises(ValueError, match="out of range"):
        trained.decode([0, trained.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        trained.decode([-1])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="corrupt"):
        BPETokenizer.load(bad)
    path = trained.save(tmp_path / "ok.json")
    path.write_text(path.read_text().replace('"version": 1', '"version": 99'))
    with pytest.raises(ValueError, match="version 99"):
        BPETokenizer.load(path)
    path.write_text(
        path.read_text().replace('"version": 99', '"version": 1').replace('"merges": [[', '"merges": [[1')
    )
    with pytest.raises(ValueError, match="corrupt"):
        BPETokenizer.load(path)


def test_course_tokenizer_never_sees_the_validation_work(tmp_path, monkeypatch):
    from llm_from_scratch.bpe import course_data
    from llm_from_scratch.data import load_documents, train_val_split

    monkeypatch.setenv("LLM_FROM_SCRATCH_ARTIFACTS", str(tmp_path))
    documents = load_documents("shakespeare", subset="tiny")  # Hamlet and Macbeth
    train_docs, val_docs = train_val_split(documents, 0.1, seed=2)
    data = course_data(vocab_size=300, subset="tiny")
    assert data.val_docs == val_docs and data.train_docs == train_docs
    assert data.val_docs[0].startswith("MACBETH") or "Macbeth" in data.val_docs[0][:300]
    # The reference: BPE trained directly on the training works, and on everything (which differs).
    vocab_train, _ = train_bpe(ENDOFTEXT.join(train_docs), 300, (ENDOFTEXT,))
    vocab_all, _ = train_bpe(ENDOFTEXT.join(documents), 300, (ENDOFTEXT,))
    assert data.tokenizer.vocab == vocab_train
    assert vocab_train != vocab_all
    assert data.tokenizer.decode(data.val_ids.tolist()) == data.val_text
    assert "train0.1-seed2" in next(iter((tmp_path / "tokenizers").iterdir())).name


def test_tokenizer_fingerprint_of_object_equals_file(tmp_path):
    from llm_from_scratch.train import tokenizer_fingerprint

    tok = BPETokenizer.from_gpt2()
    path = tok.save(tmp_path / "gpt2.json")
    import hashlib

    by_file = tokenizer_fingerprint(path)
    assert by_file["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert tokenizer_fingerprint(tok, path)["sha256"] == by_file["sha256"]
    assert by_file["vocab_size"] == 50257
    with pytest.raises(TypeError, match="BPETokenizer"):
        tokenizer_fingerprint(object())
