"""Draws the course map (chapters/figures/pipeline.png): the pipeline this book builds.

Run from the repository root: `.venv/bin/python chapters/figures/make_pipeline.py`.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

STAGES = [
    ("text", "raw corpus", "#e8f1fb"),
    ("tokens", "byte-pair\nencoding", "#e8f6ec"),
    ("embeddings", "token +\nposition", "#fdf3e1"),
    ("attention", "causal\nmulti-head", "#fbe9ec"),
    ("GPT", "stacked\nblocks", "#efe9fb"),
    ("pre-training", "next-token\nloss", "#e9f7f8"),
    ("generation", "sampling +\nKV cache", "#f4f4e6"),
    ("distributed", "DDP / FSDP\non many devices", "#eeeeee"),
]


OUT = Path(__file__).with_name("pipeline.png")


def main(out: Path = OUT) -> None:
    fig, ax = plt.subplots(figsize=(13, 2.6), dpi=150)
    width, gap = 1.5, 0.3
    for i, (name, detail, colour) in enumerate(STAGES):
        x = i * (width + gap)
        ax.add_patch(FancyBboxPatch((x, 0), width, 1.2, boxstyle="round,pad=0.04,rounding_size=0.12",
                                    facecolor=colour, edgecolor="#333333", linewidth=1.2))
        ax.text(x + width / 2, 0.85, name, ha="center", va="center", fontsize=10, fontweight="bold")
        ax.text(x + width / 2, 0.38, detail, ha="center", va="center", fontsize=8.5, color="#444444")
        if i + 1 < len(STAGES):
            ax.add_patch(FancyArrowPatch((x + width + 0.03, 0.6), (x + width + gap - 0.03, 0.6),
                                         arrowstyle="-|>", mutation_scale=12, color="#333333"))
    ax.text(0, 1.45, "Chapter by chapter, the book builds each stage and hands it to the next",
            fontsize=10, color="#333333")
    ax.set_xlim(-0.1, len(STAGES) * (width + gap))
    ax.set_ylim(-0.15, 1.65)
    ax.axis("off")
    fig.savefig(out, bbox_inches="tight", facecolor="white")


if __name__ == "__main__":
    main()
