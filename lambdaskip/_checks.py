"""Input validation shared by the whole package.

Every public function that takes token matrices calls these helpers first, so that bad input
fails early with a message that names the argument and the expected shape or range, instead of
producing a silent NaN or a wrong answer later.
"""
from __future__ import annotations

import math

import torch

__all__ = ["check_tokens", "check_finite_real", "check_choice", "check_positive_int"]


def check_tokens(x, name: str = "x", *, min_tokens: int = 1, check_finite: bool = True) -> torch.Tensor:
    """Validate a token matrix (or a batch of them) and return it unchanged.

    Args:
        x: tensor of shape ``(..., N, d)``: N tokens (rows) of d channels, any leading batch axes.
        name: the argument name used in error messages.
        min_tokens: smallest admissible N.
        check_finite: also reject NaN/Inf entries (costs one reduction).

    Raises:
        TypeError: ``x`` is not a tensor, or not a floating-point tensor.
        ValueError: fewer than two dimensions, N < ``min_tokens``, d < 1, or non-finite entries.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (..., N, d), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype (float32 or float64), got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape (..., N, d) with at least 2 dimensions, got shape {tuple(x.shape)}")
    n, d = x.shape[-2], x.shape[-1]
    if n < min_tokens:
        raise ValueError(f"{name} must have N >= {min_tokens} tokens (dimension -2), got shape {tuple(x.shape)}")
    if d < 1:
        raise ValueError(f"{name} must have d >= 1 channels (dimension -1), got shape {tuple(x.shape)}")
    if check_finite and x.numel() > 0 and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf entries")
    return x


def check_finite_real(value, name: str) -> float:
    """Return ``value`` as a float after checking that it is a finite real number."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_choice(value, name: str, choices) -> str:
    """Check that ``value`` is one of ``choices`` (strings) and return it."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    """Check that ``value`` is an int >= ``minimum`` and return it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value
