"""One visual style for the book, and the standard figures."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

__all__ = ["set_style", "plot_mu_over_depth"]


def set_style() -> None:
    """Apply the book's plotting style (seaborn whitegrid, colour-blind palette, readable sizes)."""
    sns.set_theme(style="whitegrid", palette="colorblind", context="notebook")
    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 150, "figure.figsize": (7, 4), "axes.titleweight": "bold"})


def plot_mu_over_depth(
    data: pd.DataFrame,
    *,
    hue: str = "lam",
    ax=None,
    logy: bool = True,
    floor: float = 1e-16,
    title: str | None = None,
):
    """μ̃ against layer, mean ± one standard deviation over inputs, one line per ``hue`` value.

    Args:
        data: long-form frame with columns ``layer``, ``mu_tilde`` and ``hue`` (e.g. from
            :func:`lambdaskip.experiments.collapse_sweep`).
        logy: logarithmic y axis; values below ``floor`` are clipped to it so exact zeros stay visible.

    Returns:
        The matplotlib axes.
    """
    if ax is None:
        _, ax = plt.subplots()
    plot_data = data.assign(mu_tilde=data["mu_tilde"].clip(lower=floor)) if logy else data
    sns.lineplot(data=plot_data, x="layer", y="mu_tilde", hue=hue, errorbar="sd", palette="colorblind", ax=ax, marker="o", markersize=3)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("layer k")
    ax.set_ylabel(r"$\tilde\mu(Y^k) = \mu(Y^k)/\|Y^k\|_F$")
    if title:
        ax.set_title(title)
    return ax
