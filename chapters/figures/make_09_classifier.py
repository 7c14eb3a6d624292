"""Draws chapters/figures/09_classifier.png: a GPT becomes a classifier.

A right-padded batch of two passages goes through the GPT without its output layer; the hidden
state of each passage's last real token (the only one that has seen the whole passage, under
causal attention) goes to a linear head with one output per genre.
Run from the repository root: `.venv/bin/python chapters/figures/make_09_classifier.py`.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).with_name("09_classifier.png")
ROWS = [["O", " Rome", ",", " thou", " art"], ["Good", " my", " lord", "<pad>", "<pad>"]]
LENGTHS = [5, 3]


def box(ax, x, y, w, h, text, colour, fontsize=9):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", facecolor=colour, edgecolor="#555555"))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)


def arrow(ax, start, end, colour="#555555"):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=10, color=colour, linewidth=1.2))


def main() -> None:
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for r, (tokens, length) in enumerate(zip(ROWS, LENGTHS, strict=True)):
        y0 = 2.3 - r * 1.4
        ax.text(-0.2, y0 + 0.9, f"passage {r + 1} ({length} tokens)", ha="left", fontsize=9, weight="bold")
        for t, token in enumerate(tokens):
            x = t * 1.05
            pad = t >= length
            box(ax, x, y0, 0.9, 0.35, repr(token)[1:-1] if not pad else token, "#eeeeee" if pad else "#c6dbef", 8)
            colour = "#dddddd" if pad else ("#fdae6b" if t == length - 1 else "#fee6ce")
            box(ax, x, y0 + 0.45, 0.9, 0.3, f"h{t}", colour, 8)
            arrow(ax, (x + 0.45, y0 + 0.36), (x + 0.45, y0 + 0.45))
        last_x = (length - 1) * 1.05 + 0.9
        arrow(ax, (last_x, y0 + 0.6), (6.0, 1.5 + (0.35 if r == 0 else -0.35)), "#d94801")
    box(ax, 6.0, 1.1, 1.3, 0.8, "head\nLinear(d, 3)", "#a1d99b")
    for k, genre in enumerate(("comedy", "history", "tragedy")):
        box(ax, 7.8, 2.0 - k * 0.55, 1.1, 0.4, genre, "#e5f5e0", 8)
        arrow(ax, (7.3, 1.5), (7.8, 2.2 - k * 0.55))
    ax.text(2.6, -0.55, "GPT blocks (causal attention): h_t has seen tokens 0..t only, so padding after the "
            "last real token changes nothing before it", ha="center", fontsize=8, style="italic")
    ax.set_xlim(-0.3, 9.1)
    ax.set_ylim(-0.8, 3.5)
    ax.axis("off")
    ax.set_title("A GPT as a classifier: the last real token's hidden state goes to a new head")
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)


if __name__ == "__main__":
    main()
