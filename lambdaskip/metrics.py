"""Measures of rank collapse for token matrices.

All functions take ``x`` of shape ``(..., N, d)`` — N tokens (rows) of d channels with any number
of leading batch axes — and reduce the last two axes, returning a tensor of shape ``(...)``.
They work in float32 and float64, on any device, and are differentiable.

Notation (theory reference §2):

* ``mu(X) = ||X - 1 γᵀ||_F`` with ``γ = Xᵀ1/N`` the mean token: the distance of X from the set of
  matrices whose rows are all equal. ``mu(X) = 0`` exactly when all tokens coincide.
* ``normalized_mu(X) = mu(X) / ||X||_F`` lies in ``[0, 1]``; this is what the plots show per layer.
"""
from __future__ import annotations

import torch

from ._checks import check_tokens

__all__ = [
    "mu",
    "normalized_mu",
    "stable_rank",
    "effective_rank",
    "token_cosine",
    "composite_norm",
    "dong_residual",
    "dong_residual_norm",
]


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num/den where den > 0, and 0 where den == 0 (without NaN gradients)."""
    positive = den > 0
    return torch.where(positive, num / torch.where(positive, den, torch.ones_like(den)), torch.zeros_like(num))


def _matrix_scale(x: torch.Tensor) -> torch.Tensor:
    """A power of two in ``(peak/2, peak]`` with ``peak`` the largest |entry| of each matrix (1/2 for 0).

    Shape ``(..., 1, 1)``, no gradient. Dividing by it is exact in floating point, and keeps squares and
    sums of squares finite: without it, a float32 matrix with entries above ~1e19 (the unnormalised skip
    path of a deep stack with |λ| > 1) gave ``mu = inf`` and ``normalized_mu = NaN`` although the matrix
    was finite.
    """
    _, exponent = torch.frexp(x.detach().abs().amax(dim=(-2, -1), keepdim=True))
    return torch.ldexp(torch.ones_like(x[..., :1, :1]), exponent - 1)


def _safe_fro(y: torch.Tensor) -> torch.Tensor:
    """Frobenius norm over the last two axes whose gradient at 0 is 0 instead of NaN."""
    scale = _matrix_scale(y)
    sq = (y / scale).pow(2).sum(dim=(-2, -1))
    positive = sq > 0
    root = torch.where(positive, torch.where(positive, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))
    return root * scale[..., 0, 0]


def center_tokens(x: torch.Tensor) -> torch.Tensor:
    """``P X`` with ``P = I - 11ᵀ/N``: subtract the mean token from every token. Shape ``(..., N, d)``."""
    return x - x.mean(dim=-2, keepdim=True)


def mu(x: torch.Tensor) -> torch.Tensor:
    """Distance of ``x`` from rank-collapsed matrices, ``||X - 1 γ_Xᵀ||_F``.

    Args:
        x: ``(..., N, d)`` tokens.

    Returns:
        ``(...)`` non-negative values; 0 exactly when all N tokens are equal. The gradient at a fully
        collapsed input is defined as 0 (the norm is not differentiable there).
    """
    check_tokens(x)
    scale = _matrix_scale(x)  # exact rescaling, so that the mean token cannot overflow
    return _safe_fro(center_tokens(x / scale)) * scale[..., 0, 0]


def normalized_mu(x: torch.Tensor) -> torch.Tensor:
    """``mu(X) / ||X||_F`` in ``[0, 1]``, shape ``(...)``.

    The all-zero matrix is collapsed by any reasonable reading, so it gets the value 0 (not NaN).
    """
    check_tokens(x)
    x = x / _matrix_scale(x)  # exact rescaling: μ̃ is scale-invariant, and the sums cannot overflow
    return _safe_ratio(_safe_fro(center_tokens(x)), _safe_fro(x))


def stable_rank(x: torch.Tensor) -> torch.Tensor:
    """Stable rank ``||X||_F² / ||X||_2²`` in ``[1, min(N, d)]`` (0 for the zero matrix). Shape ``(...)``.

    Unlike the numerical rank it is continuous in X, so it does show a matrix that is *almost* rank one.
    """
    check_tokens(x)
    s = torch.linalg.svdvals(x / _matrix_scale(x))  # scale-invariant; the rescaling avoids overflow
    return _safe_ratio(s.pow(2).sum(-1), s[..., 0].pow(2))


def effective_rank(x: torch.Tensor) -> torch.Tensor:
    """Effective rank (Roy & Vetterli, 2007): ``exp(H(p))`` with ``p = σ / Σσ`` the normalised singular values.

    Lies in ``[1, min(N, d)]`` for a non-zero matrix; the zero matrix gets 0. Shape ``(...)``.
    """
    check_tokens(x)
    s = torch.linalg.svdvals(x / _matrix_scale(x))  # scale-invariant; the rescaling avoids overflow
    total = s.sum(-1, keepdim=True)
    p = _safe_ratio(s, total.expand_as(s))
    entropy = -torch.special.xlogy(p, p).sum(-1)
    return torch.where(total.squeeze(-1) > 0, entropy.exp(), torch.zeros_like(entropy))


def token_cosine(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean cosine similarity over all ordered pairs of distinct tokens, shape ``(...)``.

    1 means all tokens point the same way (collapse in direction). Needs N >= 2. A zero token has
    cosine 0 with everything: its norm is clamped at ``eps``, measured after the matrix is rescaled
    (exactly, by a power of two) so that its largest |entry| lies in ``[1, 2)``.
    """
    check_tokens(x, min_tokens=2)
    n = x.shape[-2]
    x = x / _matrix_scale(x)  # cosines are scale-invariant; the rescaling keeps the norms finite
    u = x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    gram = u @ u.transpose(-1, -2)
    off_diagonal = gram.sum(dim=(-2, -1)) - torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)
    return off_diagonal / (n * (n - 1))


def composite_norm(x: torch.Tensor) -> torch.Tensor:
    """Dong et al.'s composite norm ``sqrt(||X||_1 ||X||_∞)``, shape ``(...)``.

    ``||X||_1`` is the largest absolute column sum and ``||X||_∞`` the largest absolute row sum.
    """
    check_tokens(x)
    one = x.abs().sum(dim=-2).amax(dim=-1)
    inf = x.abs().sum(dim=-1).amax(dim=-1)
    return (one * inf).sqrt()


def dong_residual(x: torch.Tensor) -> torch.Tensor:
    """The residual ``res(X) = X - 1 xᵀ`` of Dong, Cordonnier & Loukas (2021), shape ``(..., N, d)``.

    Dong et al. take x as a minimiser of the residual's norm; we use the mean token, the exact
    minimiser in the Frobenius norm (so ``||dong_residual(X)||_F == mu(X)``). In the composite norm
    the mean token is within a factor of 2 of the optimum (triangle inequality), which is all the
    collapse plots need.
    """
    check_tokens(x)
    return center_tokens(x)


def dong_residual_norm(x: torch.Tensor) -> torch.Tensor:
    """``composite_norm(dong_residual(x))``, shape ``(...)``."""
    return composite_norm(dong_residual(x))
