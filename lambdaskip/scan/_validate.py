"""Argument checks shared by every scan backend.

The kernels below trust their inputs (a fast path has no room for checks inside loops), so the
public entry points validate everything once, up front, and fail with a message that names the
argument, the expected shape and the expected range.
"""
from __future__ import annotations

import torch

__all__ = ["check_selective_args", "check_ssd_args", "check_recurrence_args", "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tensor(value, name: str, ndim: int, layout: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating-point dtype (float32 or float64), got {value.dtype}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dimensions), got shape {tuple(value.shape)}")
    return value


def _same(ref: torch.Tensor, value: torch.Tensor, name: str, ref_name: str) -> None:
    if value.dtype != ref.dtype:
        raise TypeError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {value.dtype}")
    if value.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {value.device}")


def _shape(value: torch.Tensor, expected: tuple, name: str, layout: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {layout} = {tuple(expected)}, got {tuple(value.shape)}")


def _finite(value: torch.Tensor, name: str) -> None:
    # fast path: one reduction; NaN and ±Inf propagate into the sum. A huge but finite tensor can
    # overflow the sum, so a non-finite sum is confirmed entry by entry before raising.
    if value.numel() and not bool(torch.isfinite(value.sum())) and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or Inf entries")


def check_selective_args(x, delta, A, B, C, D=None, initial_state=None) -> tuple[int, int, int, int]:
    """Validate the Mamba-1 layout and return ``(batch, channels, L, n)``.

    Shapes: ``x, delta: (batch, channels, L)``, ``A: (channels, n)``, ``B, C: (batch, n, L)``,
    ``D: (channels,)``, ``initial_state: (batch, channels, n)``. Ranges: ``delta >= 0`` and
    ``A <= 0`` (so every decay ``exp(delta * A)`` lies in ``(0, 1]``), everything finite.
    """
    x = _tensor(x, "x", 3, "(batch, channels, L)")
    b, c, L = x.shape
    if b < 1 or c < 1 or L < 1:
        raise ValueError(f"x must have batch, channels and L all >= 1, got shape {tuple(x.shape)}")
    delta = _tensor(delta, "delta", 3, "(batch, channels, L)")
    _same(x, delta, "delta", "x")
    _shape(delta, (b, c, L), "delta", "(batch, channels, L)")
    A = _tensor(A, "A", 2, "(channels, n)")
    _same(x, A, "A", "x")
    n = A.shape[1]
    if A.shape[0] != c or n < 1:
        raise ValueError(f"A must have shape (channels, n) with channels = {c} and n >= 1, got {tuple(A.shape)}")
    for name, t in (("B", B), ("C", C)):
        _tensor(t, name, 3, "(batch, n, L)")
        _same(x, t, name, "x")
        _shape(t, (b, n, L), name, "(batch, n, L)")
    if D is not None:
        _tensor(D, "D", 1, "(channels,)")
        _same(x, D, "D", "x")
        _shape(D, (c,), "D", "(channels,)")
    if initial_state is not None:
        _tensor(initial_state, "initial_state", 3, "(batch, channels, n)")
        _same(x, initial_state, "initial_state", "x")
        _shape(initial_state, (b, c, n), "initial_state", "(batch, channels, n)")
    _finite(x, "x")
    lo, hi = torch.aminmax(delta)  # one pass for both checks: NaN propagates into lo and hi
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        raise ValueError("delta contains NaN or Inf entries")
    for name, t in (("A", A), ("B", B), ("C", C), ("D", D), ("initial_state", initial_state)):
        if t is not None:
            _finite(t, name)
    if bool(lo < 0):
        raise ValueError("delta must be >= 0 (the step size, already passed through softplus); got negative entries")
    if bool(A.max() > 0):
        raise ValueError("A must be <= 0 so that every decay exp(delta * A) lies in (0, 1]; got positive entries")
    return b, c, L, n


def check_ssd_args(x, log_decay, B, C, D=None, initial_state=None) -> tuple[int, int, int, int, int]:
    """Validate the Mamba-2 / SSD layout and return ``(batch, heads, L, p, n)``.

    Shapes: ``x: (batch, heads, L, p)``, ``log_decay: (batch, heads, L)``, ``B, C: (batch, heads, L, n)``,
    ``D: (heads,)``, ``initial_state: (batch, heads, n, p)``. Range: ``log_decay <= 0`` (decays in (0, 1]).
    """
    x = _tensor(x, "x", 4, "(batch, heads, L, p)")
    b, H, L, p = x.shape
    if min(b, H, L, p) < 1:
        raise ValueError(f"x must have batch, heads, L and p all >= 1, got shape {tuple(x.shape)}")
    log_decay = _tensor(log_decay, "log_decay", 3, "(batch, heads, L)")
    _same(x, log_decay, "log_decay", "x")
    _shape(log_decay, (b, H, L), "log_decay", "(batch, heads, L)")
    B = _tensor(B, "B", 4, "(batch, heads, L, n)")
    _same(x, B, "B", "x")
    n = B.shape[-1]
    if tuple(B.shape[:3]) != (b, H, L) or n < 1:
        raise ValueError(f"B must have shape (batch, heads, L, n) = ({b}, {H}, {L}, n >= 1), got {tuple(B.shape)}")
    C = _tensor(C, "C", 4, "(batch, heads, L, n)")
    _same(x, C, "C", "x")
    _shape(C, (b, H, L, n), "C", "(batch, heads, L, n)")
    if D is not None:
        _tensor(D, "D", 1, "(heads,)")
        _same(x, D, "D", "x")
        _shape(D, (H,), "D", "(heads,)")
    if initial_state is not None:
        _tensor(initial_state, "initial_state", 4, "(batch, heads, n, p)")
        _same(x, initial_state, "initial_state", "x")
        _shape(initial_state, (b, H, n, p), "initial_state", "(batch, heads, n, p)")
    for name, t in (("x", x), ("log_decay", log_decay), ("B", B), ("C", C), ("D", D), ("initial_state", initial_state)):
        if t is not None:
            _finite(t, name)
    if bool(log_decay.max() > 0):
        raise ValueError("log_decay must be <= 0 so that every decay exp(log_decay) lies in (0, 1]; got positive entries")
    return b, H, L, p, n


def check_recurrence_args(a, u, h0=None, chunk=None) -> int:
    """Validate the arguments of the scalar recurrence ``h_t = a_t h_{t-1} + u_t`` along dim 0.

    ``a, u``: ``(L, *S)`` with the same shape, dtype and device, ``L >= 1``; ``h0``: ``(*S)`` or None;
    ``chunk``: a positive int or None. Returns ``L``. Finiteness is not checked here: the
    recurrence is an inner building block (the mixers call it on every forward pass).
    """
    _tensor_any(a, "a")
    _tensor_any(u, "u")
    _same(a, u, "u", "a")
    if u.dim() < 1 or u.shape[0] < 1:
        raise ValueError(f"u must have shape (L, *S) with L >= 1, got shape {tuple(u.shape)}")
    _shape(a, tuple(u.shape), "a", "(L, *S), the shape of u")
    if h0 is not None:
        _tensor_any(h0, "h0")
        _same(u, h0, "h0", "u")
        _shape(h0, tuple(u.shape[1:]), "h0", "(*S), the shape of u without its first (time) dimension")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive int (the chunk length T) or None, got {chunk!r}")
    return int(u.shape[0])


def _tensor_any(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (L, *S), got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating-point dtype (float32 or float64), got {value.dtype}")
    return value
