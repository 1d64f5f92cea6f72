"""Softmax attention as a token mixer.

For head h, ``M_h = softmax(Q_h K_hᵀ / √d_h + mask)`` with ``Q_h = X W_Q^h`` and ``K_h = X W_K^h``;
the values are ``V_h = X W_V^h`` and the heads are concatenated and projected by ``W_O``:
``O = Σ_h M_h X W_V^h W_O^h``. Rows of ``M_h`` sum to 1, so ``||M_h||_F <= √N``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import MultiHeadProjections, register_mixer

__all__ = ["SoftmaxAttention"]


@register_mixer("softmax")
class SoftmaxAttention(MultiHeadProjections):
    """Multi-head softmax attention (no biases).

    Args:
        d_model: model width d; must be divisible by ``n_heads``.
        n_heads: number of heads H (head width ``d_h = d_model // n_heads``).
        causal: mask future tokens (``M`` lower-triangular) if True; bidirectional otherwise.
        init_std: standard deviation of the Gaussian initialisation of ``W_Q, W_K, W_V, W_O``;
            default ``1/√d_model`` keeps token norms of order one through each projection.

    Shapes: input ``(batch, N, d_model)``; ``mixing_matrix`` ``(batch, H, N, N)``;
    ``values`` ``(batch, H, N, d_h)``; output ``(batch, N, d_model)``.
    """

    def __init__(self, d_model: int, n_heads: int = 1, causal: bool = False, init_std: float | None = None):
        super().__init__()
        self._init_projections(d_model, n_heads, init_std)
        self.causal = bool(causal)

    def mixing_matrix(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        q, k = self._split(self.w_q(x)), self._split(self.w_k(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        if self.causal:
            n = x.shape[1]
            future = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        return scores.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        q, k, v = self._split(self.w_q(x)), self._split(self.w_k(x)), self.values(x)
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.combine(out)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}"
