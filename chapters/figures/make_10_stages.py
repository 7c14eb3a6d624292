"""Draws chapters/figures/10_stages.png: the three training stages of the chapter "Following instructions".

Pre-training (chapter 5) gives the base model; supervised fine-tuning (SFT) on instruction/response pairs, with the
loss on the response only, gives the SFT model; DPO trains a copy of it (the policy) on preference pairs against a
frozen copy (the reference). Each box names the data it learns from and what the model does afterwards.
Run from the repository root: `.venv/bin/python chapters/figures/make_10_stages.py`.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).with_name("10_stages.png")

STAGES = [
    ("Pre-training\n(chapter 5)", "8 works of Shakespeare\nnext token everywhere", "base model:\ncontinues text", "#dbe8f6"),
    ("Supervised fine-tuning", "instruction -> response pairs\nloss on the response only", "SFT model:\nanswers, then <|end|>",
     "#dff2e1"),
    ("DPO", "pairs: chosen vs rejected answer\nfrozen reference = SFT model", "policy: prefers\nthe chosen answers",
     "#fbe7d3"),
]


def main() -> None:
    fig, ax = plt.subplots(figsize=(10, 2.9))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 3)
    ax.axis("off")
    for i, (title, data, result, color) in enumerate(STAGES):
        x = 0.2 + i * 3.35
        ax.add_patch(FancyBboxPatch((x, 0.35), 2.75, 2.3, boxstyle="round,pad=0.05", facecolor=color,
                                    edgecolor="#555"))
        ax.text(x + 1.375, 2.35, title, ha="center", va="center", fontsize=11, weight="bold")
        ax.text(x + 1.375, 1.55, data, ha="center", va="center", fontsize=8.5)
        ax.text(x + 1.375, 0.75, result, ha="center", va="center", fontsize=8.5, style="italic")
        if i:
            ax.add_patch(FancyArrowPatch((x - 0.6, 1.5), (x - 0.05, 1.5), arrowstyle="-|>", mutation_scale=16,
                                         color="#333"))
    ax.set_title("From a text predictor to an assistant: the three stages and what each learns from", fontsize=11)
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)


if __name__ == "__main__":
    main()
