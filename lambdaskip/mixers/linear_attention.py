"""Normalised (causal) linear attention as a token mixer.

With the positive feature map ``φ(z) = elu(z) + 1`` (Katharopoulos et al., 2020), head h computes ::

    o_i = Σ_{j≤i} φ(q_i)ᵀφ(k_j) v_j / Σ_{l≤i} φ(q_i)ᵀφ(k_l)

so its mixing matrix is ``M_ij = φ(q_i)ᵀφ(k_j) / Σ_{l≤i} φ(q_i)ᵀφ(k_l)`` for ``j ≤ i`` (0 above the
diagonal). Because φ > 0, M is lower-triangular, non-negative and row-stochastic (rows sum to 1),
so ``||M_h||_F ≤ √N`` as for softmax attention.

``forward`` uses the recurrent form: a running state ``S_i = Σ_{j≤i} φ(k_j) v_jᵀ`` and normaliser
``z_i = Σ_{j≤i} φ(k_j)``, computed chunk-wise (quadratic inside chunks of ``chunk_size`` tokens,
the states carried across chunks), which costs ``O(N · chunk · d)`` instead of ``O(N²)``.
"""
from __future__ import annotations


import torch
from torch import nn
from torch.nn import functional as F

from .._checks import check_positive_int
from .base import MultiHeadProjections, register_mixer

__all__ = ["LinearAttention", "elu_feature_map"]


def elu_feature_map(z: torch.Tensor) -> torch.Tensor:
    """``φ(z) = elu(z) + 1 > 0`` elementwise (same shape as ``z``)."""
    return F.elu(z) + 1.0


@register_mixer("linear")
class LinearAttention(MultiHeadProjections):
    """Multi-head causal linear attention with feature map ``elu + 1`` (no biases).

    Args:
        d_model: model width d; must be divisible by ``n_heads``.
        n_heads: number of heads H (head width ``d_h = d_model // n_heads``).
        init_std: std of the Gaussian initialisation of ``W_Q, W_K, W_V, W_O`` (default ``1/√d_model``,
            as for :class:`~lambdaskip.mixers.SoftmaxAttention`).
        chunk_size: tokens per chunk in ``forward``.

    Shapes: input ``(batch, N, d_model)``; ``mixing_matrix`` ``(batch, H, N, N)``;
    ``values`` ``(batch, H, N, d_h)``; output ``(batch, N, d_model)``.
    """

    causal = True

    def __init__(self, d_model: int, n_heads: int = 1, init_std: float | None = None, chunk_size: int = 64):
        super().__init__()
        check_positive_int(chunk_size, "chunk_size")
        self._init_projections(d_model, n_heads, init_std)
        self.chunk_size = chunk_size

    def _features(self, x: torch.Tensor):
        """``φ(Q), φ(K)``, each ``(batch, H, N, d_h)``."""
        return elu_feature_map(self._split(self.w_q(x))), elu_feature_map(self._split(self.w_k(x)))

    def mixing_matrix(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        fq, fk = self._features(x)
        scores = (fq @ fk.transpose(-1, -2)).tril()  # φ(q_i)ᵀφ(k_j), j ≤ i
        return scores / scores.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        fq, fk = self._features(x)
        v = self.values(x)
        b, h, n, dh = fq.shape
        c = min(self.chunk_size, n)
        pad = (-n) % c
        if pad:  # zero-padded keys add nothing to the states; padded queries are dropped at the end
            fq, fk, v = (F.pad(t, (0, 0, 0, pad)) for t in (fq, fk, v))
        nc = (n + pad) // c
        fq, fk, v = (t.reshape(b, h, nc, c, dh) for t in (fq, fk, v))
        # States entering each chunk: exclusive prefix sums over chunks of Σ φ(k) vᵀ and Σ φ(k).
        kv = fk.transpose(-1, -2) @ v  # (b, h, nc, dh, dh)
        kz = fk.sum(dim=-2)  # (b, h, nc, dh)
        s_prev = kv.cumsum(dim=2) - kv
        z_prev = kz.cumsum(dim=2) - kz
        intra = (fq @ fk.transpose(-1, -2)).tril()  # (b, h, nc, c, c)
        num = intra @ v + fq @ s_prev
        den = intra.sum(dim=-1) + (fq * z_prev.unsqueeze(-2)).sum(dim=-1)
        out = (num / den.unsqueeze(-1)).reshape(b, h, nc * c, dh)[:, :, :n]
        return self.combine(out)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, causal=True, feature_map='elu+1'"
