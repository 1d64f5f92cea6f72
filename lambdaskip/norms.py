"""Normalisations used by the λ-skip blocks.

The theory (reference §1) uses a row-wise RMS normalisation with no centring and no affine
parameters, ``LN(Z)_i = s · z_i / ||z_i||``. We support both scales the paper might mean:

* ``scale="sqrt_d"`` (default): every token gets norm √d, so ``||LN(Z)||_F² = N d``. The constant
  ``b = 2|λ| N d S C_M / ...`` of Theorem A points to this choice.
* ``scale="unit"``: every token gets norm 1, so ``||LN(Z)||_F² = N``.

**Zero rows (a documented decision).** With ``eps = 0`` (default) a zero row has no direction, so
:func:`rms_normalize` raises a ``ValueError`` that names the row, instead of returning NaN. This
is what happens in the 2-token example at λ = −1. Pass ``eps > 0`` to use
``s · z_i / sqrt(||z_i||² + eps)`` instead, which maps a zero row to zero.

For practical blocks :func:`make_norm` also builds ``torch.nn.LayerNorm`` and ``torch.nn.RMSNorm``
(with learnable affine parameters, as in transformers and Mamba).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ._checks import check_choice, check_tokens

__all__ = ["rms_normalize", "RowRMSNorm", "make_norm", "NORM_KINDS"]

_SCALES = ("sqrt_d", "unit")
NORM_KINDS = ("none", "rms", "layernorm", "rmsnorm")


def rms_normalize(z: torch.Tensor, *, scale: str = "sqrt_d", eps: float = 0.0) -> torch.Tensor:
    """The theory's row-wise normalisation ``s · z_i / ||z_i||``.

    Args:
        z: ``(..., N, d)`` tokens.
        scale: ``"sqrt_d"`` (rows get norm √d) or ``"unit"`` (rows get norm 1).
        eps: 0 for the exact map (zero rows raise), or > 0 to regularise the norm.

    Returns:
        ``(..., N, d)``, every row of norm ``s`` (exactly, when ``eps == 0``).

    Raises:
        ValueError: a zero row with ``eps == 0``; bad ``scale``; negative ``eps``; bad shape.
    """
    check_tokens(z, "z")
    check_choice(scale, "scale", _SCALES)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    s = math.sqrt(z.shape[-1]) if scale == "sqrt_d" else 1.0
    # Divide each row by a power of two near its largest |entry| first: squaring the raw entries
    # overflowed to Inf (float32 rows of norm > ~1e19, as on the unnormalised skip path of a deep stack
    # with |λ| > 1, silently became zero rows) or underflowed to 0 (tiny non-zero rows were reported as
    # zero rows). Scaling by a power of two is exact in floating point, so in the normal range the
    # result is bit-for-bit what s·z/||z|| gives.
    row_scale = _pow2_scale(z.detach().abs().amax(dim=-1, keepdim=True))
    scaled = z / row_scale
    sq = scaled.pow(2).sum(dim=-1, keepdim=True)  # in [1, 4d) for non-zero rows, 0 for zero rows
    if eps == 0:
        zero = sq == 0
        if bool(zero.any()):
            index = tuple(int(i) for i in zero.squeeze(-1).nonzero()[0])
            raise ValueError(
                f"z has a zero row at index {index} (batch..., token): the row-wise normalisation is "
                "undefined there; pass eps > 0 to map zero rows to zero"
            )
        return s * scaled / sq.sqrt()
    # s z / sqrt(||z||² + eps) = s (z/r) / sqrt(||z/r||² + eps/r²); a zero row maps to 0.
    return s * scaled / (sq + eps / row_scale.pow(2)).sqrt()


def _pow2_scale(peak: torch.Tensor) -> torch.Tensor:
    """``2^(e−1)`` with ``peak = m·2^e``, ``m ∈ [0.5, 1)``: a power of two in ``(peak/2, peak]`` (1/2 for 0)."""
    _, exponent = torch.frexp(peak)
    return torch.ldexp(torch.ones_like(peak), exponent - 1)


class RowRMSNorm(nn.Module):
    """Module form of :func:`rms_normalize` (no parameters). Input and output ``(..., N, d)``."""

    def __init__(self, scale: str = "sqrt_d", eps: float = 0.0):
        super().__init__()
        self.scale = check_choice(scale, "scale", _SCALES)
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):  # fail at construction
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        self.eps = eps

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return rms_normalize(z, scale=self.scale, eps=self.eps)

    def extra_repr(self) -> str:
        return f"scale={self.scale!r}, eps={self.eps}"


def make_norm(kind: str, d_model: int, *, scale: str = "sqrt_d", eps: float = 0.0) -> nn.Module:
    """Build a normalisation by name.

    * ``"none"``: identity;
    * ``"rms"``: the theory's row-wise normalisation (:class:`RowRMSNorm`, no parameters);
    * ``"layernorm"``: ``torch.nn.LayerNorm(d_model)`` (centring + scaling + affine);
    * ``"rmsnorm"``: ``torch.nn.RMSNorm(d_model)`` (scaling + affine, as in Mamba).

    ``eps`` applies to ``"rms"``; the torch norms keep their own default ``eps`` (1e-5 / machine eps).
    """
    check_choice(kind, "norm", NORM_KINDS)
    if kind == "none":
        return nn.Identity()
    if kind == "rms":
        return RowRMSNorm(scale=scale, eps=eps)
    if kind == "layernorm":
        return nn.LayerNorm(d_model)
    return nn.RMSNorm(d_model)
