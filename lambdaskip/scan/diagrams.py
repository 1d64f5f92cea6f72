"""Dependency diagrams of the three scan algorithms (used by the book's scan chapter).

Each function draws on a matplotlib ``Axes``: tokens ``t = 0..L-1`` along the x axis, rounds or
stages down the y axis, and an arrow for every "combine" the algorithm performs, so that the
depth (number of rows) and the work (number of arrows) can be read off the picture. They return
``(depth, work)`` counted from what was drawn.
"""
from __future__ import annotations

import math

__all__ = ["draw_sequential", "draw_hillis_steele", "draw_chunked"]


def _node(ax, x, y, label=None, color="#4c72b0"):
    ax.scatter([x], [y], s=160, color=color, zorder=3, edgecolor="white")
    if label is not None:
        ax.text(x, y, label, ha="center", va="center", fontsize=7, color="white", zorder=4)


def _arrow(ax, x0, y0, x1, y1, color="0.35"):
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                arrowprops=dict(arrowstyle="->", color=color, lw=1.0, shrinkA=7, shrinkB=7), zorder=2)


def _finish(ax, L, depth, title, ylabels):
    ax.set_xlim(-0.7, L - 0.3)
    ax.set_ylim(depth + 0.6, -0.6)
    ax.set_xticks(range(L))
    ax.set_xlabel("token t")
    ax.set_yticks(range(len(ylabels)))
    ax.set_yticklabels(ylabels, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def draw_sequential(ax, L: int = 8):
    """The loop: one combine per token, each waiting for the previous one (depth L-1, work L-1)."""
    work = 0
    for t in range(L):
        _node(ax, t, t, str(t))
        if t:
            _arrow(ax, t - 1, t - 1, t, t)
            work += 1
    _finish(ax, L, L - 1, f"sequential: depth {L - 1}, work {work}", [f"step {t}" for t in range(L)])
    return L - 1, work


def draw_hillis_steele(ax, L: int = 8):
    """Log-depth scan: in round r every token t ≥ 2^r combines with token t - 2^r."""
    rounds = math.ceil(math.log2(L)) if L > 1 else 0
    work = 0
    for t in range(L):
        _node(ax, t, 0, str(t))
    for r in range(rounds):
        shift = 2 ** r
        for t in range(L):
            _node(ax, t, r + 1, color="#55a868" if t >= shift else "#bbbbbb")
            _arrow(ax, t, r, t, r + 1, color="0.8")
            if t >= shift:
                _arrow(ax, t - shift, r, t, r + 1)
                work += 1
    _finish(ax, L, rounds, f"parallel (Hillis–Steele): depth {rounds}, work {work}",
            ["input"] + [f"round {r + 1} (shift {2 ** r})" for r in range(rounds)])
    return rounds, work


def draw_chunked(ax, L: int = 8, T: int = 4):
    """Chunked scan: (1) scan inside every chunk at once, (2) carry states across chunks,
    (3) add the carried state to every token of the next chunk."""
    K = L // T
    work = 0
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]
    for t in range(L):
        _node(ax, t, 0, str(t), color=colors[(t // T) % len(colors)])
    for t in range(L):  # stage 1: T-1 steps inside each chunk, all chunks in parallel
        _node(ax, t, 1, color=colors[(t // T) % len(colors)])
        if t % T:
            _arrow(ax, t - 1, 0 if t % T == 1 else 1, t, 1)
            work += 1
    for k in range(1, K):  # stage 2: chunk-end states carried across chunks
        _node(ax, k * T + T - 1, 2, color="#c44e52")
        src_y = 1 if k == 1 else 2
        _arrow(ax, (k - 1) * T + T - 1, src_y, k * T + T - 1, 2, color="#c44e52")
        work += 1
    for k in range(1, K):  # stage 3: the carried state enters every token of chunk k
        for t in range(k * T, k * T + T - 1):
            _node(ax, t, 3, color="#8172b3")
            _arrow(ax, k * T - 1, 2 if k > 1 else 1, t, 3, color="#8172b3")
            work += 1
    _finish(ax, L, 3, f"chunked (T={T}): {T - 1} + {K - 1} + 1 sequential stages, work {work}",
            ["input", "1: inside chunks", "2: across chunks", "3: fix-up"])
    return T - 1 + K - 1 + 1, work
