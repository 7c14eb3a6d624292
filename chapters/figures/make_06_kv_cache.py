"""Draws chapters/figures/06_kv_cache.png: what the KV cache keeps and what each step computes.

One attention layer, a prompt of 4 tokens, then 3 decode steps. Each column is one forward pass:
the tokens it reads (top), the key and value rows of the layer's cache after it (one row per
position; orange: computed in this pass, blue: kept from earlier passes), and the attention it
computes (queries x keys). The last line says what the same step costs without the cache.
Run from the repository root: `.venv/bin/python chapters/figures/make_06_kv_cache.py`.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

PROMPT = ["To", " be", ",", " or"]
NEW = [" not", " to", " be"]
HEAD_DIM = 4
NEW_COLOUR, CACHED_COLOUR, QUERY_COLOUR = "#fdae6b", "#9ecae1", "#a1d99b"
OUT = Path(__file__).with_name("06_kv_cache.png")


def block(ax, x0, y_top, n_rows, n_new, size):
    """A cache tensor: n_rows rows of HEAD_DIM cells, the last n_new of them computed in this pass."""
    for r in range(n_rows):
        colour = NEW_COLOUR if r >= n_rows - n_new else CACHED_COLOUR
        for c in range(HEAD_DIM):
            ax.add_patch(Rectangle((x0 + c * size, y_top - (r + 1) * size), size, size,
                                   facecolor=colour, edgecolor="white", linewidth=1.0))


def main(out: Path = OUT) -> None:
    fig, ax = plt.subplots(figsize=(13, 4.6), dpi=110)
    s = 0.26  # side of one cell
    col_width = 3.55
    tokens = PROMPT + NEW
    passes = [("prefill: the prompt", 0, len(PROMPT))]
    passes += [(f"decode step {i + 1}", len(PROMPT) + i, 1) for i in range(len(NEW))]
    for col, (title, start, n_in) in enumerate(passes):
        x = col * col_width
        n_rows = start + n_in  # positions in the cache after this pass
        ax.text(x + 1.5, 4.15, title, ha="center", va="bottom", fontsize=11, weight="bold")
        # The tokens this pass reads (all of the prompt, or only the newest token).
        read = tokens[start:start + n_in]
        ax.text(x + 1.5, 3.8, "reads: " + "".join(f"[{t.strip() or t}]" for t in read), ha="center",
                va="bottom", fontsize=9, family="monospace")
        y_top = 3.55
        block(ax, x + 0.1, y_top, n_rows, n_in, s)
        block(ax, x + 0.1 + HEAD_DIM * s + 0.35, y_top, n_rows, n_in, s)
        ax.text(x + 0.1 + HEAD_DIM * s / 2, y_top + 0.03, "K cache", ha="center", va="bottom", fontsize=8)
        ax.text(x + 0.45 + 1.5 * HEAD_DIM * s, y_top + 0.03, "V cache", ha="center", va="bottom", fontsize=8)
        for r in range(n_rows):
            ax.text(x + 0.05, y_top - (r + 0.5) * s, tokens[r].strip() or tokens[r], ha="right", va="center",
                    fontsize=7, family="monospace", color="#555555")
        # The queries of this pass and the attention scores they compute (causal within the pass).
        qx = x + 0.1 + 2 * HEAD_DIM * s + 0.35 + 0.2
        ax.text(qx + 0.4, y_top + 0.03, "Q · Kᵀ", ha="center", va="bottom", fontsize=8)
        score = 0.11
        for q in range(n_in):
            for k in range(n_rows):
                allowed = k <= start + q
                ax.add_patch(Rectangle((qx + k * score, y_top - (start + q + 1) * s + (s - score) / 2), score, score,
                                       facecolor=QUERY_COLOUR if allowed else "#eeeeee", edgecolor="white",
                                       linewidth=0.5))
        y_text = y_top - len(tokens) * s - 0.25
        with_cache = (f"computes {n_in} quer{'y' if n_in == 1 else 'ies'}, {n_in} new K/V row{'s' * (n_in > 1)},\n"
                      f"{n_in} x {n_rows} attention scores")
        ax.text(x + 1.5, y_text, with_cache, ha="center", va="top", fontsize=9)
        without = ("the same: nothing is cached yet" if col == 0 else
                   f"without the cache: {n_rows} queries,\n{n_rows} K/V rows, {n_rows} x {n_rows} scores")
        ax.text(x + 1.5, y_text - 0.55, without, ha="center", va="top", fontsize=9, color="#b2182b")
    ax.legend(handles=[Patch(color=NEW_COLOUR, label="computed in this pass"),
                       Patch(color=CACHED_COLOUR, label="kept in the cache from earlier passes"),
                       Patch(color=QUERY_COLOUR, label="attention score computed (grey: masked, causal)")],
              loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=9, frameon=False)
    ax.set_xlim(-0.5, len(passes) * col_width - 0.2)
    ax.set_ylim(0.0, 4.5)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title("The KV cache of one attention layer: prefill once, then one new K/V row per decode step",
                 fontsize=12)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
