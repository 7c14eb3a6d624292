"""Draws chapters/figures/01_sliding_window.png: (inputs, targets) windows cut from a token stream.

Used by the chapter "Working with text data" (chapters/01_data.ipynb). Words stand in for tokens so that the
picture can be read; the rule is the one of ``SlidingWindowDataset``: window k starts at k * stride, its inputs are
``context_length`` tokens and its targets the same tokens shifted one position to the right; tokens after the last
full window are dropped.

Run from the repository root: `.venv/bin/python chapters/figures/make_01_sliding_window.py`.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

TOKENS = "Now is the winter of our discontent made glorious summer by this".split()
CONTEXT_LENGTH = 4
INPUT, TARGET, STREAM, DROPPED = "#9ecae1", "#fdae6b", "#e6e6e6", "#f7f7f7"
OUT = Path(__file__).with_name("01_sliding_window.png")


def box(ax, x, y, text, color, *, width=0.94, height=0.62, style="-", fontsize=8):
    ax.add_patch(Rectangle((x + 0.03, y), width, height, facecolor=color, edgecolor="0.35", lw=0.7, ls=style))
    ax.text(x + 0.5, y + height / 2, text, ha="center", va="center", fontsize=fontsize if len(text) < 9 else 7)


def panel(ax, stride: int) -> None:
    n = len(TOKENS)
    n_windows = (n - CONTEXT_LENGTH - 1) // stride + 1
    last_target = (n_windows - 1) * stride + CONTEXT_LENGTH  # position of the last token used
    for t, token in enumerate(TOKENS):
        box(ax, t, 0, token, STREAM if t <= last_target else DROPPED, style="-" if t <= last_target else "--")
        ax.text(t + 0.5, 0.75, str(t), ha="center", va="bottom", fontsize=7, color="0.4")
    ax.text(-0.2, 0.31, "token stream", ha="right", va="center", fontsize=8)
    if last_target < n - 1:
        ax.text((last_target + 1 + n) / 2, -0.35, "dropped: no full window", ha="center", va="top", fontsize=7,
                color="0.4")
    for k in range(n_windows):
        start, y = k * stride, -1.75 * (k + 1)
        for j in range(CONTEXT_LENGTH):
            box(ax, start + j, y + 0.7, TOKENS[start + j], INPUT)
            box(ax, start + 1 + j, y, TOKENS[start + 1 + j], TARGET)
        ax.text(start - 0.2, y + 0.66, f"window {k}", ha="right", va="center", fontsize=8)
        if k:
            arrow = FancyArrowPatch((start - stride + 0.5, y + 1.45), (start + 0.5, y + 1.45), arrowstyle="->",
                                    mutation_scale=8, color="0.3", lw=0.8)
            ax.add_patch(arrow)
            ax.text(start - stride / 2 + 0.5, y + 1.5, f"stride {stride}", ha="center", va="bottom", fontsize=7)
    overlap = "the windows overlap" if stride < CONTEXT_LENGTH else "the windows do not overlap"
    ax.set_title(f"context_length = {CONTEXT_LENGTH}, stride = {stride}: {n_windows} windows, {overlap}",
                 fontsize=9, loc="left")
    ax.set_xlim(-2.4, n + 0.2)
    ax.set_ylim(-1.75 * n_windows - 0.2, 1.2)
    ax.axis("off")


def main(out: Path = OUT) -> None:
    fig, axes = plt.subplots(2, 1, figsize=(10, 7.6), dpi=110, gridspec_kw={"height_ratios": [2.6, 4.6]})
    panel(axes[0], stride=4)
    panel(axes[1], stride=2)
    handles = [Rectangle((0, 0), 1, 1, facecolor=c, edgecolor="0.35") for c in (INPUT, TARGET)]
    fig.legend(handles, ["inputs (what the model reads)", "targets (the next token at each position)"],
               loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(out)
    plt.close(fig)


if __name__ == "__main__":
    main()
