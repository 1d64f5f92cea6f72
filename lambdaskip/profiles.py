"""Size profiles: one environment variable decides how big every chapter's computation is.

``LAMBDASKIP_PROFILE`` is one of

* ``ci``   — tiny; what the test suite (nbval) executes in seconds per chapter;
* ``book`` — what ``make book`` renders on a 2-core CPU (the default);
* ``full`` — paper scale, meant for one GPU (e.g. Colab).

Chapters ask for sizes with :func:`by_profile` so that one line states all three, and print the
active profile so the numbers on a page always say where they came from.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["PROFILES", "current_profile", "by_profile", "pick_device", "seed_everything", "setup"]

PROFILES = ("ci", "book", "full")
_ENV = "LAMBDASKIP_PROFILE"


def current_profile() -> str:
    """The active size profile (``$LAMBDASKIP_PROFILE``, default ``"book"``)."""
    profile = os.environ.get(_ENV, "book").strip().lower() or "book"
    if profile not in PROFILES:
        raise ValueError(f"{_ENV} must be one of {PROFILES}, got {profile!r}")
    return profile


def by_profile(*, ci, book, full=None, profile: str | None = None):
    """Pick a value for the active profile; ``full`` defaults to ``book``."""
    profile = profile or current_profile()
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    return {"ci": ci, "book": book, "full": book if full is None else full}[profile]


def pick_device(prefer: str | None = None) -> torch.device:
    """CUDA when available (or when ``prefer="cuda"``), else CPU. ``prefer="cpu"`` forces the CPU."""
    if prefer == "cpu":
        return torch.device("cpu")
    if prefer == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("prefer='cuda' but torch.cuda.is_available() is False")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) in one call."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(seed: int = 0, *, verbose: bool = True) -> tuple[str, torch.device]:
    """What every chapter's setup cell calls: seed, pick the device and the profile, apply the plot style.

    Returns ``(profile, device)``.
    """
    from . import plotting  # local import: plotting pulls in matplotlib

    seed_everything(seed)
    # tqdm's monitor thread may redraw a notebook progress bar from a background thread; in executed
    # notebooks (book build, nbval) we saw a cell's reply go missing after that, leaving the build
    # waiting forever. The monitor only tunes redraw frequency, so switch it off.
    import tqdm

    tqdm.tqdm.monitor_interval = 0
    profile = current_profile()
    device = pick_device()
    plotting.set_style()
    if verbose:
        from . import __version__

        print(f"lambdaskip {__version__} | profile={profile} | device={device} | torch {torch.__version__}")
    return profile, device
