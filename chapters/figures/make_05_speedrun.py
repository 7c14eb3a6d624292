"""Draws chapters/figures/05_speedrun.png: what each change to the speedrun recipe buys at equal wall-clock.

Reads the search of ``benchmarks/speedrun_search.py`` as committed in
``benchmarks/speedrun_search.jsonl`` (one JSON row per run, the same budget for each, the base recipe
first) and draws, for every other run, the change in bits per character on the development play
(Julius Caesar) against the base: left of zero is better. Each label gives the steps the budget bought; the
grey band is the difference between two runs of the base recipe (the noise).
Run from the repository root: `.venv/bin/python chapters/figures/make_05_speedrun.py`.
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SEARCH = ROOT / "benchmarks" / "speedrun_search.jsonl"
OUT = Path(__file__).with_name("05_speedrun.png")
#: What each change is, in words (the names are those of benchmarks/speedrun_search.py; "+" combines).
LABELS = {
    "base": "base, run a second time (the noise)",
    "previous": "the chapter's earlier recipe (tiny GPT)",
    "small_subset": "1.1 MB subset, not 5 MB",
    "gpt": "GPT blocks, not Llama-style",
    "fp32": "float32, not bf16 autocast",
    "vocab2048": "vocabulary 2,048",
    "vocab8192": "vocabulary 8,192",
    "untied": "untied output layer",
    "cosine": "cosine, not WSD",
    "warmup10": "warm-up 10% of the budget, not 2%",
    "decay20": "decay over the last 20%, not 40%",
    "lr5e-4": "learning rate 5e-4",
    "lr1e-3": "learning rate 1e-3",
    "lr4e-3": "learning rate 4e-3",
    "batch32": "batch 32",
    "d384": "width 384",
    "layers6": "6 layers",
    "ctx32": "context 32",
    "ctx64": "context 64",
    "ctx128": "context 128",
    "gpt_dropout0.1": "GPT blocks, dropout 0.1",
    "chars": "characters, context 512",
}
BASE = "Llama-style, 5 MB, vocabulary 4,096, width 256 x 4 layers,\ncontext 256, batch 16, learning rate 2e-3, WSD, bf16"


def label(name: str) -> str:
    return " + ".join(LABELS.get(part, part) for part in name.split("+"))


def main() -> None:
    rows = [json.loads(line) for line in SEARCH.read_text().splitlines() if line.strip()]
    base = rows[0]
    assert base["name"] == "base", "the search starts with the base recipe"
    others = sorted(rows[1:], key=lambda r: r["dev_bpc"])
    deltas = [r["dev_bpc"] - base["dev_bpc"] for r in others]
    fig, ax = plt.subplots(figsize=(10, 0.34 * len(others) + 1.8))
    y = range(len(others))
    colours = ["#999999" if r["name"] == "base" else "#4c9a5b" if d < 0 else "#c0504d"
               for r, d in zip(others, deltas, strict=True)]
    ax.barh(list(y), deltas, color=colours)
    ax.set_yticks(list(y), [f"{label(r['name'])}  ({r['steps']} steps)" for r in others],
                  fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    noise = max((abs(r["dev_bpc"] - base["dev_bpc"]) for r in others if r["name"] == "base"), default=0.0)
    ax.axvspan(-noise, noise, color="#dddddd", zorder=0, label=f"noise: the base run twice ({noise:.3f})")
    ax.legend(loc="lower right", fontsize=8)
    for i, d in enumerate(deltas):
        ax.text(d + (0.01 if d >= 0 else -0.01), i, f"{d:+.3f}", va="center", ha="left" if d >= 0 else "right",
                fontsize=7)
    ax.set_xlabel(f"change in bits per character on the development play, Julius Caesar\n(base: "
                  f"{base['dev_bpc']:.3f} bits per character in {base['steps']} steps; left of zero is better)")
    budget = base["budget"].replace(" min wall x ", " minutes of wall-clock time, ").replace(" thr", " threads")
    ax.set_title(f"Variants of the base recipe, each trained for the same budget ({budget})\n"
                 f"base: {BASE}", fontsize=9)
    ax.set_xlim(min(deltas + [0]) - 0.16, max(deltas) + 0.14)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT, dpi=130)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
