"""Softmax attention as a token mixer.

For head h, ``M_h = softmax(Q_h K_hᵀ / √d_h + mask)`` with ``Q_h = X W_Q^h`` and ``K_h = X W_K^h``;
the values are ``V_h = X W_V^h`` and the heads are concatenated and projected by ``W_O``:
``O = Σ_h M_h X W_V^h W_O^h``. Rows of ``M_h`` sum to 1, so ``||M_h||_F <= √N``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_positive_int
from .base import TokenMixer, register_mixer

__all__ = ["SoftmaxAttention"]


@register_mixer("softmax")
class SoftmaxAttention(TokenMixer):
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
        check_positive_int(d_model, "d_model")
        check_positive_int(n_heads, "n_heads")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model, self.n_heads, self.causal = d_model, n_heads, bool(causal)
        self.head_dim = d_model // n_heads
        self.w_q = nn.Linear(d_model, d_model, bias=False)
        self.w_k = nn.Linear(d_model, d_model, bias=False)
        self.w_v = nn.Linear(d_model, d_model, bias=False)
        self.w_o = nn.Linear(d_model, d_model, bias=False)
        std = 1.0 / math.sqrt(d_model) if init_std is None else float(init_std)
        for lin in (self.w_q, self.w_k, self.w_v, self.w_o):
            nn.init.normal_(lin.weight, std=std)

    def _split(self, y: torch.Tensor) -> torch.Tensor:
        b, n, _ = y.shape
        return y.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)

    def mixing_matrix(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        q, k = self._split(self.w_q(x)), self._split(self.w_k(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        if self.causal:
            n = x.shape[1]
            future = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        return scores.softmax(dim=-1)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        return self._split(self.w_v(x))

    def combine(self, mixed: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = mixed.shape
        return self.w_o(mixed.transpose(1, 2).reshape(b, n, self.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        q, k, v = self._split(self.w_q(x)), self._split(self.w_k(x)), self.values(x)
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.combine(out)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}"
