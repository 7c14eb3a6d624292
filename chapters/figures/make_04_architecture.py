"""Draws the two architecture diagrams of the chapter "The GPT architecture".

* chapters/figures/04_block.png: one pre-norm transformer block, x + attn(ln_1(x)), then x + mlp(ln_2(x)),
  with the residual stream on the left and the places where dropout acts;
* chapters/figures/04_gpt.png: the whole GPT, token ids -> token + position embeddings -> N blocks ->
  final layer norm -> output layer (tied to the token embedding) -> logits.

Run from the repository root: `.venv/bin/python chapters/figures/make_04_architecture.py`.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch  # noqa: E402

HERE = Path(__file__).parent
LN, ATTN, MLP, EMB, HEAD, DROP = "#e8f1fb", "#fbe9ec", "#e8f6ec", "#fdf3e1", "#efe9fb", "#eeeeee"


def box(ax, x, y, w, h, text, colour, detail=None, fontsize=10):
    """A rounded box centred at (x, y)."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=colour, edgecolor="#333333", linewidth=1.1))
    if detail is None:
        ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)
    else:
        ax.text(x, y + h / 2 - 0.17, text, ha="center", va="center", fontsize=fontsize, fontweight="bold")
        ax.text(x, y + h / 2 - 0.3, detail, ha="center", va="top", fontsize=7.5, color="#444444", family="monospace")


def arrow(ax, start, end, color="#333333", **kw):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=11, color=color,
                                 shrinkA=0, shrinkB=0, **kw))


def plus(ax, x, y, r=0.13):
    ax.add_patch(Circle((x, y), r, facecolor="white", edgecolor="#333333", linewidth=1.1))
    ax.text(x, y - 0.01, "+", ha="center", va="center", fontsize=12)


def residual_branch(ax, y_in, boxes, x=0.0, side=-1.5):
    """Stream enters at y_in (going down), branches through boxes, is added back. Returns y after the +."""
    y = y_in
    arrow(ax, (x, y), (x, y - 0.45))
    y_fork = y - 0.25
    y -= 0.45
    for text, colour, detail, h in boxes:
        yc = y - h / 2
        box(ax, x, yc, 2.6, h, text, colour, detail, fontsize=9.5)
        y = yc - h / 2
        arrow(ax, (x, y), (x, y - 0.3))
        y -= 0.3
    y_plus = y - 0.13
    plus(ax, x, y_plus)
    # the shortcut: around the branch on the left, into the +
    ax.plot([x, x + side, x + side], [y_fork, y_fork, y_plus], color="#1f77b4", linewidth=1.6)
    arrow(ax, (x + side, y_plus), (x - 0.13, y_plus), color="#1f77b4", linewidth=1.6)
    return y_plus - 0.13


def draw_block(out: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.6, 7.6), dpi=110)
    ax.text(0, 0.35, "x: (B, T, d_model), the residual stream", ha="center", fontsize=9)
    y = residual_branch(ax, 0.15, [
        ("LayerNorm ln_1", LN, None, 0.4),
        ("causal multi-head attention", ATTN, "c_attn -> heads -> softmax\n-> dropout on the weights\n-> c_proj", 1.05),
        ("dropout", DROP, None, 0.35),
    ])
    y = residual_branch(ax, y, [
        ("LayerNorm ln_2", LN, None, 0.4),
        ("MLP", MLP, "c_fc: d -> 4d, GELU,\nc_proj: 4d -> d", 0.85),
        ("dropout", DROP, None, 0.35),
    ])
    arrow(ax, (0, y), (0, y - 0.35))
    ax.text(0, y - 0.5, "output: (B, T, d_model), same shape", ha="center", fontsize=9)
    ax.text(-1.55, -1.6, "shortcut\nx", ha="right", va="center", fontsize=8, color="#1f77b4")
    ax.text(-1.55, y + 2.0, "shortcut\nx", ha="right", va="center", fontsize=8, color="#1f77b4")
    ax.set_title("One GPT-2 block (pre-norm)", fontsize=11)
    ax.set_xlim(-2.3, 1.5)
    ax.set_ylim(y - 0.7, 0.55)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.savefig(out, bbox_inches="tight", facecolor="white")
    plt.close(fig)


def draw_gpt(out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 7.4), dpi=110)
    ax.text(-1.0, 0.3, "token ids idx: (B, T)", ha="center", fontsize=9)
    ax.text(1.2, 0.3, "positions 0 .. T-1", ha="center", fontsize=9)
    box(ax, -1.0, -0.45, 1.8, 0.62, "token embedding", EMB, "wte: (V, d_model)", fontsize=9)
    box(ax, 1.2, -0.45, 1.8, 0.62, "position embedding", EMB, "wpe: (context, d)", fontsize=9)
    arrow(ax, (-1.0, 0.22), (-1.0, -0.13))
    arrow(ax, (1.2, 0.22), (1.2, -0.13))
    plus(ax, 0.1, -1.25)
    arrow(ax, (-1.0, -0.77), (0.0, -1.17))
    arrow(ax, (1.2, -0.77), (0.2, -1.17))
    arrow(ax, (0.1, -1.38), (0.1, -1.62))
    box(ax, 0.1, -1.8, 1.6, 0.35, "dropout", DROP)
    # N blocks: a stack of three frames
    for i in (2, 1, 0):
        ax.add_patch(FancyBboxPatch((-1.0 + 0.08 * i, -4.35 + 0.08 * i), 2.2, 2.0,
                                    boxstyle="round,pad=0.02,rounding_size=0.1", facecolor="white" if i else "#fafafa",
                                    edgecolor="#333333", linewidth=1.1))
    arrow(ax, (0.1, -1.98), (0.1, -2.35))
    ax.text(0.1, -2.5, "N x block", ha="center", fontsize=10, fontweight="bold")
    box(ax, 0.1, -2.95, 1.9, 0.32, "LN -> attention -> +", ATTN, fontsize=9)
    box(ax, 0.1, -3.45, 1.9, 0.32, "LN -> MLP -> +", MLP, fontsize=9)
    ax.text(0.1, -3.95, "(B, T, d_model) in and out", ha="center", fontsize=8, color="#444444")
    arrow(ax, (0.1, -4.4), (0.1, -4.65))
    box(ax, 0.1, -4.85, 1.9, 0.35, "final LayerNorm ln_f", LN)
    arrow(ax, (0.1, -5.03), (0.1, -5.3))
    box(ax, 0.1, -5.6, 1.9, 0.6, "output layer", HEAD, "lm_head: d_model -> V")
    arrow(ax, (0.1, -5.9), (0.1, -6.17))
    ax.text(0.1, -6.35, "logits: (B, T, V), one score per possible next token", ha="center", fontsize=9)
    # weight tying
    ax.annotate("", xy=(-1.92, -0.45), xytext=(-0.85, -5.6),
                arrowprops=dict(arrowstyle="<->", linestyle="--", color="#9467bd", connectionstyle="arc3,rad=-0.25"))
    ax.text(-1.95, -3.1, "tied:\nthe same\nmatrix", ha="center", fontsize=8, color="#9467bd")
    ax.set_title("The whole GPT", fontsize=11)
    ax.set_xlim(-2.6, 2.3)
    ax.set_ylim(-6.6, 0.5)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.savefig(out, bbox_inches="tight", facecolor="white")
    plt.close(fig)


def main() -> None:
    draw_block(HERE / "04_block.png")
    draw_gpt(HERE / "04_gpt.png")


if __name__ == "__main__":
    main()
