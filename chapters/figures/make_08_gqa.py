"""Draws chapters/figures/08_gqa.png: which key/value head each query head reads.

Three panels for n_heads = 8 query heads: multi-head attention (8 key/value heads), grouped-query
attention (2 key/value heads, groups of 4) and multi-query attention (1 key/value head). Query head
h reads key/value head h // (n_heads // n_kv_heads), as in the package's GroupedQueryAttention; the
KV cache stores only the key/value heads, so its size per token is proportional to n_kv_heads.
Run from the repository root: `.venv/bin/python chapters/figures/make_08_gqa.py`.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

N_HEADS = 8
COLOURS = ["#9ecae1", "#fdae6b", "#a1d99b", "#bcbddc", "#fc9272", "#c7e9c0", "#fdd0a2", "#dadaeb"]
OUT = Path(__file__).with_name("08_gqa.png")


def panel(ax, n_kv, title):
    group = N_HEADS // n_kv
    width, gap = 0.8, 0.2
    kv_x = {}
    for j in range(n_kv):  # key/value heads, centred under their group of query heads
        first, last = j * group, (j + 1) * group - 1
        centre = (first + last) / 2 * (width + gap) + width / 2
        kv_x[j] = centre
        ax.add_patch(Rectangle((centre - width / 2, 0), width, 0.8, facecolor=COLOURS[j], edgecolor="black"))
        ax.text(centre, 0.4, f"K,V\n{j}", ha="center", va="center", fontsize=7)
    for h in range(N_HEADS):
        x = h * (width + gap)
        j = h // group
        ax.add_patch(Rectangle((x, 2.2), width, 0.8, facecolor=COLOURS[j], edgecolor="black"))
        ax.text(x + width / 2, 2.6, f"Q\n{h}", ha="center", va="center", fontsize=7)
        ax.plot([x + width / 2, kv_x[j]], [2.2, 0.8], color="0.35", linewidth=1)
    ax.text(N_HEADS * (width + gap) / 2, -0.55, f"KV cache per token and layer: {n_kv} of {N_HEADS} heads "
            f"({N_HEADS // n_kv}x smaller than MHA)" if n_kv < N_HEADS else
            "KV cache per token and layer: all 8 heads", ha="center", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlim(-0.3, N_HEADS * (width + gap))
    ax.set_ylim(-0.9, 3.2)
    ax.axis("off")


def main():
    fig, axes = plt.subplots(1, 3, figsize=(12, 2.9))
    for ax, (n_kv, title) in zip(axes, ((8, "multi-head attention: 8 K/V heads"),
                                        (2, "grouped-query attention: 2 K/V heads"),
                                        (1, "multi-query attention: 1 K/V head")), strict=True):
        panel(ax, n_kv, title)
    fig.suptitle("8 query heads; query head h reads key/value head h // (8 / n_kv_heads)", fontsize=10)
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
