"""Helpers shared by the recurrent mixers (S4D, S6, SSD, RG-LRU).

Glossary (code letter → symbol): ``b`` batch, ``l``/``N`` tokens (time), ``d`` channels (d_model),
``n`` state size, ``h`` heads, ``p`` head width. ``log_a`` is the log of a decay ``a_t ∈ (0, 1]``,
``u`` the input already multiplied by ``B̄_t``.
"""
from __future__ import annotations

import math

import torch

__all__ = ["segsum_exp", "diag_recurrence", "inv_softplus", "scan_module"]


def segsum_exp(log_a: torch.Tensor) -> torch.Tensor:
    """The 1-semiseparable mask ``L[..., i, j] = Π_{k=j+1..i} a_k`` (1 on the diagonal, 0 above it).

    Args:
        log_a: ``(..., N)`` logs of the decays (≤ 0 for a contraction; any finite value works).

    Returns:
        ``(..., N, N)``, lower-triangular.

    The segment sums are accumulated from the diagonal down each column (not as a difference of two
    prefix sums), so that long sequences do not lose precision by cancellation.
    """
    n = log_a.shape[-1]
    rep = log_a.unsqueeze(-1).expand(*log_a.shape, n)  # rep[..., i, j] = log_a[i]
    strict = torch.ones(n, n, dtype=torch.bool, device=log_a.device).tril(-1)
    seg = rep.masked_fill(~strict, 0.0).cumsum(dim=-2)  # seg[i, j] = Σ_{j<k≤i} log_a[k]
    lower = torch.ones(n, n, dtype=torch.bool, device=log_a.device).tril()
    return seg.masked_fill(~lower, float("-inf")).exp()


def diag_recurrence(log_a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Sequential reference of the diagonal linear recurrence ``h_t = a_t ⊙ h_{t−1} + u_t``, ``h_{−1} = 0``.

    Args:
        log_a: ``(b, N, ...)``, broadcastable to ``u`` (logs of the decays).
        u: ``(b, N, ...)`` inputs.

    Returns:
        ``(b, N, ...)``: every state ``h_t``.

    A plain loop over time — O(N) steps, clear rather than fast. The mixers use the package's
    scan kernels (:mod:`lambdaskip.scan`) when they are available and this loop otherwise.
    """
    a = log_a.exp()
    h = torch.zeros_like(u[:, 0])
    states = []
    for t in range(u.shape[1]):
        h = a[:, t] * h + u[:, t]
        states.append(h)
    return torch.stack(states, dim=1)


def inv_softplus(y: torch.Tensor) -> torch.Tensor:
    """Inverse of ``softplus`` for ``y > 0``: ``y + log(1 − e^{−y})`` (used to initialise Δ biases)."""
    return y + torch.log(-torch.expm1(-y))


def log_uniform(shape, low: float, high: float, generator=None) -> torch.Tensor:
    """Samples ``exp(U[log low, log high])`` — the Δ initialisation of S4D, Mamba and Mamba-2."""
    u = torch.rand(shape, generator=generator)
    return torch.exp(u * (math.log(high) - math.log(low)) + math.log(low))


def scan_module():
    """The :mod:`lambdaskip.scan` module if it is importable with the expected functions, else ``None``."""
    try:
        from .. import scan  # noqa: PLC0415  (optional, developed separately)
    except Exception:  # pragma: no cover - the fallback is the reference loop
        return None
    if hasattr(scan, "selective_scan") and hasattr(scan, "ssd_scan"):
        return scan
    return None
