"""The sequential reference scans: the oracle every other backend is tested against.

They are deliberately plain: one Python step per token, the recurrence written exactly as in the
docstrings, differentiable through ordinary autograd. Slow for long sequences (that is the point of
the other backends), but easy to read and hard to get wrong.
"""
from __future__ import annotations

import torch

__all__ = ["selective_scan_ref", "ssd_scan_ref"]


def selective_scan_ref(x, delta, A, B, C, D=None, initial_state=None, return_final_state=False):
    """Mamba-1 layout, one step per token.

    For batch b, channel c, state index s::

        h_t[c, s] = exp(delta_t[c] A[c, s]) h_{t-1}[c, s] + delta_t[c] B_t[s] x_t[c]
        y_t[c]    = sum_s C_t[s] h_t[c, s] + D[c] x_t[c]

    Args:
        x, delta: ``(batch, channels, L)``.  A: ``(channels, n)``.  B, C: ``(batch, n, L)``.
        D: ``(channels,)`` or None.  initial_state: ``(batch, channels, n)`` or None (zeros).

    Returns:
        y ``(batch, channels, L)``, and the final state ``(batch, channels, n)`` if requested.
    """
    b, c, L = x.shape
    n = A.shape[1]
    h = x.new_zeros(b, c, n) if initial_state is None else initial_state
    ys = []
    for t in range(L):
        decay = torch.exp(delta[:, :, t, None] * A)  # (b, c, n)
        h = decay * h + (delta[:, :, t] * x[:, :, t])[:, :, None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))  # (b, c)
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * x
    return (y, h) if return_final_state else y


def ssd_scan_ref(x, log_decay, B, C, D=None, initial_state=None, return_final_state=False):
    """Mamba-2 / SSD layout, one step per token.

    For batch b and head h (state ``S`` of shape ``(n, p)``)::

        S_t = exp(log_decay_t) S_{t-1} + B_t x_tᵀ
        y_t = S_tᵀ C_t + D x_t

    Args:
        x: ``(batch, heads, L, p)``.  log_decay: ``(batch, heads, L)``.  B, C: ``(batch, heads, L, n)``.
        D: ``(heads,)`` or None.  initial_state: ``(batch, heads, n, p)`` or None (zeros).

    Returns:
        y ``(batch, heads, L, p)``, and the final state ``(batch, heads, n, p)`` if requested.
    """
    b, H, L, p = x.shape
    n = B.shape[-1]
    S = x.new_zeros(b, H, n, p) if initial_state is None else initial_state
    a = torch.exp(log_decay)
    ys = []
    for t in range(L):
        S = a[:, :, t, None, None] * S + B[:, :, t, :, None] * x[:, :, t, None, :]
        ys.append(torch.einsum("bhnp,bhn->bhp", S, C[:, :, t]))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + D[None, :, None, None] * x
    return (y, S) if return_final_state else y
