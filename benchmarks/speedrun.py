"""The best model a time budget buys: the course's pre-training recipe against the clock.

    .venv/bin/python benchmarks/speedrun.py --minutes 5            # wall-clock budget (a quiet machine)
    .venv/bin/python benchmarks/speedrun.py --cpu-seconds 300      # CPU time per thread (a shared machine)

Three rows, trained one after the other in the same run with the same budget and the same
package code (``llm_from_scratch.speedrun.train_for_budget``: ``train.configure_optimizer`` and
``train.train_step``), each scored on every non-overlapping window of the same held-out work
(Macbeth) with ``train.bits_per_char``:

1. the recipe (``speedrun.RECIPE``, chosen by ``benchmarks/speedrun_search.py``);
2. a character-level model (``data.CharTokenizer`` over the same training works) with the
   recipe's model and optimizer, its context in characters twice the recipe's in tokens;
3. the chapter "Pre-training"'s earlier recipe (tiny GPT, BPE 4096 on the small subset,
   batch 16, max_lr 3e-3, the cosine schedule of 500 steps, continued at its floor).

The budget counts optimizer steps only: data loading before, and the evaluation after, are
not in it. The clock stops a run before a step that would not fit. ``--cpu-seconds`` replaces
the wall clock by the process's CPU time divided by its threads, which other programs on a
shared machine do not use up (it still slows down under load: caches and memory are shared).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from llm_from_scratch.generate import generate_text
from llm_from_scratch.speedrun import PREVIOUS_RECIPE, RECIPE, Budget, Recipe, cpu_supports_bf16, run_recipe


def char_recipe(recipe: Recipe) -> Recipe:
    return recipe.replace(vocab_size=None, context_length=2 * recipe.context_length)


def sample(result, prompt: str, n_tokens: int, seed: int = 0) -> str:
    return generate_text(result.model, result.tokenizer, prompt, n_tokens, temperature=0.8, top_k=50, seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget of each row")
    parser.add_argument("--cpu-seconds", type=float, default=None,
                        help="budget each row by process CPU seconds per thread instead (shared machines)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    parser.add_argument("--device", default="cpu", help="where each row trains: cpu, cuda, auto (utils.get_device)")
    parser.add_argument("--rows", default="recipe,chars,previous", help="comma-separated: recipe, chars, previous")
    parser.add_argument("--sample-tokens", type=int, default=120, help="tokens of a sample from each BPE model")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = (Budget(seconds=args.cpu_seconds, clock="cpu") if args.cpu_seconds
              else Budget(seconds=60 * args.minutes, clock="wall"))
    rows = {"recipe": ("recipe", RECIPE), "chars": ("character-level", char_recipe(RECIPE)),
            "previous": ("previous chapter recipe", PREVIOUS_RECIPE)}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, bf16 instructions: {cpu_supports_bf16()}")
    print(f"budget per row: {budget.describe()}" + (" (CPU-time budget: the machine is shared)"
                                                     if budget.clock == "cpu" else ""))
    results = []
    for key in args.rows.split(","):
        name, recipe = rows[key]
        load = os.getloadavg()
        t0 = time.perf_counter()
        result = run_recipe(recipe, budget, device=args.device)
        results.append((name, result, load, os.getloadavg(), time.perf_counter() - t0))
        print(f"  {name}: {result.run.steps} steps, {result.score['bits_per_char']:.3f} bits/char "
              f"(load {load[0]:.2f} -> {os.getloadavg()[0]:.2f})", flush=True)
    print()
    print("| model | params | bits/char | bits/byte | nats/token | steps | tokens seen | tokens/s | "
          "train time (budget clock) | train wall time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r, _, _, _ in results:
        s, run = r.score, r.run
        print(f"| {name} | {r.n_parameters / 1e6:.2f}M | {s['bits_per_char']:.3f} | {s['bits_per_byte']:.3f} | "
              f"{s['nats_per_token']:.3f} | {run.steps} | {run.tokens:,} | {run.tokens_per_s:,.0f} | "
              f"{run.seconds:.1f} s | {run.wall_seconds:.1f} s |")
    print()
    for name, r, load, load_after, total in results:
        rec = r.recipe
        print(f"{name}: {rec.arch}, d_model {rec.d_model}, {rec.n_layers} layers, context {rec.context_length}, "
              f"vocab {rec.vocab_size or 'characters'} ({r.tokenizer.vocab_size}), subset {rec.subset or 'all works'}, "
              f"batch {rec.batch_size}, max_lr {rec.max_lr:g}, precision {rec.precision}; scored on "
              f"{r.score['chars']:,} characters; load average {load[0]:.2f} before, {load_after[0]:.2f} after; "
              f"{total:.0f} s with data and evaluation")
    if args.sample_tokens:
        prompt = "MACBETH.\n"
        for name, r, *_ in results:
            n = args.sample_tokens * (3 if r.recipe.vocab_size is None else 1)
            print(f"\n--- sample, {name} (prompt {prompt!r}, temperature 0.8, top-k 50) ---")
            print(sample(r, prompt, n))


if __name__ == "__main__":
    main()
