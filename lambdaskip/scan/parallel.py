"""The textbook parallel scan (Hillis & Steele, 1986): log-depth, written for comparison.

The pair ``(a, u)`` stands for the affine map ``h ↦ a h + u``. Composing two steps (first
``(a1, u1)``, then ``(a2, u2)``) gives ``(a2 a1, a2 u1 + u2)`` — an *associative* operation, so
all prefixes can be combined in ``⌈log₂ L⌉`` rounds: in round ``r`` every position ``t ≥ 2^r``
absorbs the prefix ending ``2^r`` steps earlier. Each round touches every position, so the work
is ``O(L log L)`` (the work-efficient Blelloch variant and the chunked backend need ``O(L)``);
on a machine with as many processors as tokens the depth ``log L`` would win, on a 2-core CPU it
loses. It is differentiable through ordinary autograd (memory grows like ``L log L``).
"""
from __future__ import annotations

import torch

from ._validate import check_recurrence_args

__all__ = ["linear_recurrence_parallel", "selective_scan_parallel", "ssd_scan_parallel"]


def linear_recurrence_parallel(a: torch.Tensor, u: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """``h_t = a_t h_{t-1} + u_t`` along dimension 0 by ``⌈log₂ L⌉`` rounds of pairwise combination.

    Args:
        a, u: ``(L, *S)``.  h0: ``(*S)`` or None.

    Returns:
        h: ``(L, *S)``.
    """
    L = check_recurrence_args(a, u, h0)
    acc_a, acc_u = a, u
    shift = 1
    while shift < L:
        # positions t >= shift compose their accumulated map with the one ending at t - shift
        new_u = torch.cat([acc_u[:shift], acc_a[shift:] * acc_u[:-shift] + acc_u[shift:]], 0)
        acc_a = torch.cat([acc_a[:shift], acc_a[shift:] * acc_a[:-shift]], 0)
        acc_u = new_u
        shift *= 2
    # acc_a[t] is now the product a_0 ... a_t: the initial state decays by exactly that much
    return acc_u if h0 is None else acc_u + acc_a * h0


def selective_scan_parallel(x, delta, A, B, C, D=None, initial_state=None, return_final_state=False):
    """Mamba-1 layout via :func:`linear_recurrence_parallel` on time-major ``(L, b, c, n)`` tensors."""
    a = torch.exp(delta.permute(2, 0, 1)[..., None] * A)
    u = (delta * x).permute(2, 0, 1)[..., None] * B.permute(2, 0, 1)[:, :, None, :]
    h = linear_recurrence_parallel(a, u, initial_state)
    y = torch.einsum("lbcn,lbn->bcl", h, C.permute(2, 0, 1))
    if D is not None:
        y = y + D[:, None] * x
    return (y, h[-1]) if return_final_state else y


def ssd_scan_parallel(x, log_decay, B, C, D=None, initial_state=None, return_final_state=False):
    """Mamba-2 / SSD layout via :func:`linear_recurrence_parallel` on ``(L, b, H, n, p)`` states."""
    a = torch.exp(log_decay).permute(2, 0, 1)[..., None, None]
    u = torch.einsum("bhln,bhlp->lbhnp", B, x)
    h = linear_recurrence_parallel(a.expand_as(u), u, initial_state)
    y = torch.einsum("lbhnp,bhln->bhlp", h, C)
    if D is not None:
        y = y + D[None, :, None, None] * x
    return (y, h[-1]) if return_final_state else y
