"""Draws chapters/figures/03_heads.png: how multi-head attention splits d_model into heads.

(B, T, d_model) --view--> (B, T, n_heads, head_dim) --transpose(1, 2)--> (B, n_heads, T, head_dim),
drawn for one sequence of the batch with T = 4 tokens, d_model = 12, n_heads = 3, head_dim = 4.
Run from the repository root: `.venv/bin/python chapters/figures/make_03_heads.py`.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

T, N_HEADS, HEAD_DIM = 4, 3, 4
HEAD_COLOURS = ["#9ecae1", "#fdae6b", "#a1d99b"]  # one colour per head
TOKENS = ["Now", " is", " the", " winter"]
OUT = Path(__file__).with_name("03_heads.png")


def cells(ax, x0, y0, n_rows, n_cols, colour, size=0.3, label_rows=False):
    """A grid of n_rows x n_cols squares with its top-left corner at (x0, y0)."""
    for r in range(n_rows):
        for c in range(n_cols):
            ax.add_patch(Rectangle((x0 + c * size, y0 - (r + 1) * size), size, size,
                                   facecolor=colour, edgecolor="white", linewidth=1.0))
        if label_rows:
            ax.text(x0 - 0.08, y0 - (r + 0.5) * size, TOKENS[r], ha="right", va="center", fontsize=8)


def arrow(ax, x_from, x_to, y, text):
    ax.add_patch(FancyArrowPatch((x_from, y), (x_to, y), arrowstyle="-|>", mutation_scale=14, color="#333333"))
    ax.text((x_from + x_to) / 2, y + 0.12, text, ha="center", va="bottom", fontsize=9, family="monospace")


def main(out: Path = OUT) -> None:
    fig, ax = plt.subplots(figsize=(13, 3.6), dpi=110)
    s = 0.3  # side of one cell
    top = 1.6

    # 1. (B, T, d_model): one row per token, the heads' features side by side.
    x = 0.6
    for h in range(N_HEADS):
        cells(ax, x + h * HEAD_DIM * s, top, T, HEAD_DIM, HEAD_COLOURS[h], s, label_rows=h == 0)
    ax.text(x + N_HEADS * HEAD_DIM * s / 2, top + 0.35, "queries q: (B, T, d_model)", ha="center", fontsize=10,
            fontweight="bold")
    ax.text(x + N_HEADS * HEAD_DIM * s / 2, top - T * s - 0.25, "T = 4 rows (tokens), d_model = 12 columns",
            ha="center", fontsize=8.5, color="#444444")
    end1 = x + N_HEADS * HEAD_DIM * s

    # 2. (B, T, n_heads, head_dim): the same numbers, each row cut into n_heads groups.
    x2 = end1 + 1.9
    arrow(ax, end1 + 0.15, x2 - 0.15, top - T * s / 2, ".view(B, T, 3, 4)")
    gap = 0.12
    for h in range(N_HEADS):
        cells(ax, x2 + h * (HEAD_DIM * s + gap), top, T, HEAD_DIM, HEAD_COLOURS[h], s)
    width2 = N_HEADS * HEAD_DIM * s + (N_HEADS - 1) * gap
    ax.text(x2 + width2 / 2, top + 0.35, "(B, T, n_heads, head_dim)", ha="center", fontsize=10, fontweight="bold")
    ax.text(x2 + width2 / 2, top - T * s - 0.25, "no copy: only the shape changes", ha="center", fontsize=8.5,
            color="#444444")
    end2 = x2 + width2

    # 3. (B, n_heads, T, head_dim): one T x head_dim matrix per head, heads now a batch dimension.
    x3 = end2 + 2.0
    arrow(ax, end2 + 0.15, x3 - 0.15, top - T * s / 2, ".transpose(1, 2)")
    offset = 0.45
    for h in reversed(range(N_HEADS)):  # head 0 in front
        hx, hy = x3 + h * offset, top + h * offset * 0.5
        cells(ax, hx, hy, T, HEAD_DIM, HEAD_COLOURS[h], s)
    ax.text(x3 + HEAD_DIM * s / 2 + offset, top + 1.05, "(B, n_heads, T, head_dim)", ha="center", fontsize=10,
            fontweight="bold")
    ax.text(x3 + HEAD_DIM * s / 2 + offset, top - T * s - 0.45, "each head: its own T x head_dim block;\n"
            "q @ k.transpose(-2, -1) gives (B, n_heads, T, T)", ha="center", fontsize=8.5, color="#444444")

    handles = [Rectangle((0, 0), 1, 1, facecolor=c) for c in HEAD_COLOURS]
    ax.legend(handles, [f"head {h}: features {h * HEAD_DIM}-{h * HEAD_DIM + HEAD_DIM - 1}" for h in range(N_HEADS)],
              loc="lower center", ncol=N_HEADS, frameon=False, fontsize=9, bbox_to_anchor=(0.5, -0.12))
    ax.set_xlim(-0.2, x3 + 3.0)
    ax.set_ylim(-0.4, 2.9)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.savefig(out, bbox_inches="tight", facecolor="white")


if __name__ == "__main__":
    main()
