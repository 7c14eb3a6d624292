"""The recipe search behind ``benchmarks/speedrun.py``: each change to the recipe, at equal budget.

    .venv/bin/python benchmarks/speedrun_search.py --cpu-seconds 60 --threads 1 base vocab2048 gpt ...
    .venv/bin/python benchmarks/speedrun_search.py --minutes 2 --threads 2 base gpt ...   # quiet machine
    .venv/bin/python benchmarks/speedrun_search.py --table          # the table of every run so far

Every variant is the base recipe (``BASE`` below) with one change, trained for the same budget
(process CPU time per thread, so that runs on a shared machine compare, or with ``--minutes``
the wall clock, on a quiet machine) on the training works
minus a dev work (Julius Caesar), and scored on every window of the dev work and of the held-out
work (Macbeth). Choices are made on the dev column; the Macbeth column is reported once per row.
Results are appended to ``artifacts/speedrun/search.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from llm_from_scratch.speedrun import PREVIOUS_RECIPE, Budget, Recipe, recipe_data, run_recipe, without_work
from llm_from_scratch.train import bits_per_char
from llm_from_scratch.utils import artifacts_dir

DEV_WORK = "julius_caesar"
BASE = Recipe(subset=None, vocab_size=4096, arch="llama", d_model=256, n_layers=4, n_heads=4, context_length=256,
              tie_weights=True, batch_size=16, max_lr=2e-3, warmup_fraction=0.02, decay_fraction=0.4,
              schedule="wsd", precision="bf16")
VARIANTS = {
    "base": {},
    "previous": None,  # the chapter's earlier recipe, whole
    "small_subset": dict(subset="small"),
    "vocab1024": dict(vocab_size=1024),
    "vocab2048": dict(vocab_size=2048),
    "vocab8192": dict(vocab_size=8192),
    "gpt": dict(arch="gpt"),
    "untied": dict(tie_weights=False),
    "fp32": dict(precision="fp32"),
    "cosine": dict(schedule="cosine"),
    "lr5e-4": dict(max_lr=5e-4),
    "lr1e-3": dict(max_lr=1e-3),
    "lr4e-3": dict(max_lr=4e-3),
    "warmup10": dict(warmup_fraction=0.1),
    "decay20": dict(decay_fraction=0.2),
    "batch8": dict(batch_size=8),
    "batch32": dict(batch_size=32),
    "d192": dict(d_model=192, n_heads=3),
    "d384": dict(d_model=384, n_heads=6),
    "layers6": dict(n_layers=6),
    "layers2": dict(n_layers=2),
    "ctx32": dict(context_length=32),
    "ctx64": dict(context_length=64),
    "ctx128": dict(context_length=128),
    "ctx512": dict(context_length=512),
    "gpt_dropout0.1": dict(arch="gpt", dropout=0.1),
    "chars": dict(vocab_size=None, context_length=512),
}


def variant(name: str) -> Recipe:
    if name == "previous":
        return PREVIOUS_RECIPE
    changes = {}
    for part in name.split("+"):
        changes.update(VARIANTS[part])
    return BASE.replace(**changes)


def print_table(path) -> None:
    """Every run of ``path``, in order, as a Markdown table; changes are against the first "base" row."""
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    base = next((r for r in rows if r["name"] == "base"), None)
    print("| variant | budget | params | steps | tokens | dev bpc | change vs base | Macbeth bpc |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        delta = f"{r['dev_bpc'] - base['dev_bpc']:+.3f}" if base else ""
        print(f"| {r['name']} | {r['budget']} | {r['params'] / 1e6:.2f}M | {r['steps']} | {r['tokens'] / 1e6:.2f}M | "
              f"{r['dev_bpc']:.3f} | {delta} | {r['val_bpc']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="*", help=f"names, '+' combines changes: {', '.join(VARIANTS)}")
    parser.add_argument("--cpu-seconds", type=float, default=60.0, help="budget: process CPU seconds per thread")
    parser.add_argument("--minutes", type=float, default=None, help="budget: wall-clock minutes (a quiet machine)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table", action="store_true", help="print the table of the runs so far")
    parser.add_argument("--out", default=str(artifacts_dir("speedrun") / "search.jsonl"))
    args = parser.parse_args()
    if args.table:
        print_table(args.out)
        return
    torch.set_num_threads(args.threads)
    budget = (Budget(seconds=60 * args.minutes, clock="wall") if args.minutes
              else Budget(seconds=args.cpu_seconds, clock="cpu"))
    budget_name = (f"{args.minutes:g} min wall x {args.threads} thr" if args.minutes
                   else f"{args.cpu_seconds:g} CPU-s x {args.threads} thr")
    for name in args.variants:
        recipe = variant(name)
        full = recipe_data(recipe)
        data, dev_ids = without_work(full, DEV_WORK, recipe.subset)
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        result = run_recipe(recipe, budget, data=data, val_ids=dev_ids)
        macbeth = bits_per_char(result.model, full.val_ids, full.tokenizer, context_length=recipe.context_length)
        row = dict(name=name, budget=budget_name, params=result.n_parameters,
                   steps=result.run.steps, tokens=result.run.tokens, dev_bpc=result.score["bits_per_char"],
                   val_bpc=macbeth["bits_per_char"], val_nats=macbeth["nats_per_token"],
                   wall=time.perf_counter() - t0, load=[load, os.getloadavg()[0]],
                   final_train_loss=result.run.history[-1]["train_loss"] if result.run.history else None)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
