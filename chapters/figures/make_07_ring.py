"""Draws chapters/figures/07_ring.png: the ring all-reduce of 4 ranks, step by step.

Each panel is one step. The columns are the ranks, the rows the W = 4 chunks of the vector each
rank holds; a cell names the ranks whose values that chunk already sums ("0+1" = rank 0's chunk
plus rank 1's), darker the more it holds. In each step every rank sends one chunk (thick outline)
to its right neighbour (rank 3 sends to rank 0, round the ring). W - 1 reduce-scatter steps add
the incoming chunk; W - 1 all-gather steps copy it. The schedule is the one of the chapter's
``ring_all_reduce``: at reduce-scatter step s rank r sends chunk r - s, at all-gather step s chunk
r + 1 - s (mod W).
Run from the repository root: `.venv/bin/python chapters/figures/make_07_ring.py`.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

W = 4
OUT = Path(__file__).with_name("07_ring.png")
CMAP = plt.get_cmap("Blues")
WIDTH = 1.25  # of a chunk's box


def schedule():
    """(title, holdings before the step, {rank: chunk it sends}) for every step, then the result."""
    held = [[{r} for _ in range(W)] for r in range(W)]  # held[rank][chunk]: ranks summed in it
    panels = []
    for phase in ("reduce-scatter", "all-gather"):
        for step in range(W - 1):
            offset = 0 if phase == "reduce-scatter" else 1
            sends = {r: (r - step + offset) % W for r in range(W)}
            panels.append((f"{phase} step {step + 1}", [[set(c) for c in row] for row in held], sends))
            incoming = {(r + 1) % W: (c, set(held[r][c])) for r, c in sends.items()}
            for r, (c, value) in incoming.items():
                held[r][c] = held[r][c] | value if phase == "reduce-scatter" else value
    panels.append(("result: every rank holds the sum", held, {}))
    return panels


def draw_panel(ax, title, held, sends):
    size = 1.0
    for r in range(W):
        for c in range(W):
            members = held[r][c]
            shade = CMAP(0.15 + 0.75 * (len(members) - 1) / (W - 1))
            sent = sends.get(r) == c
            ax.add_patch(Rectangle((r * 1.6, -c * size), WIDTH, size * 0.9, facecolor=shade,
                                   edgecolor="black" if sent else "white", linewidth=2.2 if sent else 1.0))
            label = "all" if len(members) == W else "+".join(str(m) for m in sorted(members))
            ax.text(r * 1.6 + WIDTH / 2, -c * size + 0.45 * size, label, ha="center", va="center", fontsize=7,
                    color="white" if len(members) > 2 else "black")
    for r, c in sends.items():
        if r < W - 1:  # to the right neighbour
            ax.add_patch(FancyArrowPatch((r * 1.6 + WIDTH, -c * size + 0.45), ((r + 1) * 1.6, -c * size + 0.45),
                                         arrowstyle="-|>", mutation_scale=9, color="#d62728", linewidth=1.3))
        else:  # round the ring, to rank 0
            ax.text(r * 1.6 + WIDTH + 0.05, -c * size + 0.45, "to 0", color="#d62728", fontsize=7, va="center")
    for r in range(W):
        ax.text(r * 1.6 + WIDTH / 2, 1.15, f"rank {r}", ha="center", fontsize=8)
    for c in range(W):
        ax.text(-0.15, -c * size + 0.45, f"chunk {c}", ha="right", va="center", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_xlim(-1.3, W * 1.6 + 0.2)
    ax.set_ylim(-W * size + 0.8, 1.5)
    ax.set_aspect("equal")
    ax.axis("off")


def main():
    panels = schedule()
    fig, axes = plt.subplots(2, 4, figsize=(12, 5.6))
    for ax, (title, held, sends) in zip(axes.flat, panels, strict=False):
        draw_panel(ax, title, held, sends)
    ax = axes.flat[-1]  # the ring itself
    ax.axis("off")
    ax.set_aspect("equal")
    import math
    points = [(math.cos(math.pi / 2 - 2 * math.pi * r / W), math.sin(math.pi / 2 - 2 * math.pi * r / W))
              for r in range(W)]
    for r, (x, y) in enumerate(points):
        ax.add_patch(plt.Circle((x, y), 0.22, facecolor="#9ecae1", edgecolor="black"))
        ax.text(x, y, str(r), ha="center", va="center", fontsize=10)
        nx, ny = points[(r + 1) % W]
        ax.add_patch(FancyArrowPatch((x, y), (nx, ny), connectionstyle="arc3,rad=-0.25", arrowstyle="-|>",
                                     mutation_scale=12, color="#d62728", shrinkA=14, shrinkB=14))
    ax.set_xlim(-1.6, 1.6)
    ax.set_ylim(-1.6, 1.6)
    ax.set_title("the ring: each rank sends to the next", fontsize=9)
    fig.suptitle("Ring all-reduce of 4 ranks: 3 reduce-scatter steps, then 3 all-gather steps "
                 "(thick outline: the chunk a rank sends)", fontsize=10)
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
