"""Benchmark of the BPE trainer and encoders (chapter "Byte-pair encoding").

Times, in the same run:
- training an 8,192-token vocabulary on the full Shakespeare corpus (~5 MB): our fast trainer
  (1 and 2 pre-tokenization processes), reading the same file, against Hugging Face `tokenizers` (Rust) training a
  byte-level BPE of the same size on the same text (written to a temporary file);
- training a 500-token vocabulary on ~130 KB of English (the first 130,000 characters of the
  corpus): our fast trainer, target under 0.4 s;
- encoding the full corpus: our pure-Python encoder (fresh cache and warm cache), our
  `to_tiktoken()` export, and tiktoken's GPT-2.

Run from the repository root: `.venv/bin/python benchmarks/bpe.py [--repeats 3]`.
Each time is the median of the repeats.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from llm_from_scratch.bpe import ENDOFTEXT, BPETokenizer, gpt2_encoding, train_bpe
from llm_from_scratch.data import load_corpus


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def train_hf(path: str, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([path], trainer)
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    text = load_corpus("shakespeare")
    n_bytes = len(text.encode("utf-8"))
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"corpus: Shakespeare, {n_bytes / 1e6:.2f} MB\n")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "shakespeare.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        t_hf, hf = median_time(lambda: train_hf(path, 8192), args.repeats)
        t_ours, (vocab, merges) = median_time(lambda: train_bpe(Path(path), 8192), args.repeats)
        t_ours2, _ = median_time(lambda: train_bpe(Path(path), 8192, num_workers=2), args.repeats)
    assert hf.get_vocab_size() == len(vocab) == 8192
    rows.append(("train 8,192 vocab, 5 MB: HF tokenizers (Rust)", t_hf, "1.00x (reference)"))
    rows.append(
        ("train 8,192 vocab, 5 MB: ours (fast, 1 process)", t_ours, f"{t_ours / t_hf:.2f}x HF (target <= 3x)")
    )
    rows.append(("train 8,192 vocab, 5 MB: ours (fast, 2 processes)", t_ours2, f"{t_ours2 / t_hf:.2f}x HF"))

    small = text[:130_000]
    t_small, _ = median_time(lambda: train_bpe(small, 500), max(args.repeats, 5))
    rows.append(
        (f"train 500 vocab, {len(small.encode()) / 1e3:.0f} KB: ours (fast)", t_small, "target < 0.4 s")
    )

    ours = BPETokenizer(vocab, merges, [ENDOFTEXT])
    exported = ours.to_tiktoken()
    gpt2 = gpt2_encoding()

    def fresh_encode():
        return BPETokenizer(vocab, merges, [ENDOFTEXT]).encode(text)

    t_cold, ids = median_time(fresh_encode, args.repeats)
    ours.encode(text)
    t_warm, _ = median_time(lambda: ours.encode(text), args.repeats)
    t_tt, ids_tt = median_time(lambda: exported.encode(text, allowed_special="all"), args.repeats)
    t_gpt2, _ = median_time(lambda: gpt2.encode(text, allowed_special="all"), args.repeats)
    assert ids == ids_tt
    mb = n_bytes / 1e6
    rows.append(("encode 5 MB: tiktoken GPT-2 (Rust)", t_gpt2, f"{mb / t_gpt2:.1f} MB/s, 1.00x (reference)"))
    rows.append(("encode 5 MB: ours to_tiktoken()", t_tt, f"{mb / t_tt:.1f} MB/s, {t_tt / t_gpt2:.2f}x"))
    rows.append(
        (
            "encode 5 MB: ours pure Python, fresh cache",
            t_cold,
            f"{mb / t_cold:.1f} MB/s, {t_cold / t_gpt2:.2f}x",
        )
    )
    rows.append(
        (
            "encode 5 MB: ours pure Python, warm cache",
            t_warm,
            f"{mb / t_warm:.1f} MB/s, {t_warm / t_gpt2:.2f}x",
        )
    )

    width = max(len(r[0]) for r in rows)
    print(f"| {'task':<{width}} | time (s) | ratio / note |")
    print(f"| {'-' * width} | -------: | ------------ |")
    for name, seconds, note in rows:
        print(f"| {name:<{width}} | {seconds:8.3f} | {note} |")
    print(f"\nbytes per token on the corpus: ours 8,192 vocab {n_bytes / len(ids):.2f}")


if __name__ == "__main__":
    main()
