"""The common interface of every token mixer, and the registry that builds them by name.

The unifying framework (theory reference §3): every mixer computes ``O = combine(M(X) · V(X))`` with

* ``M(X)`` — ``(batch, H, N, N)``: one N×N token-mixing matrix per head (attention, SSD) or per
  channel (S6); ``M[b, h, i, j]`` is how much output token i takes from input token j;
* ``V(X)`` — ``(batch, H, N, d_v)``: the values that M mixes (``X W_V`` per head for attention,
  the raw channels for SSMs);
* ``combine`` — maps ``(batch, H, N, d_v)`` back to ``(batch, N, d_model)`` (the output projection,
  or just a reshape).

``forward(x)`` is the efficient computation (attention as attention, SSMs as a scan);
:meth:`TokenMixer.forward_via_matrix` is the materialised ``O(N²)`` version, and the tests check the
two agree in float64.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .._checks import check_positive_int, check_tokens

__all__ = ["TokenMixer", "MultiHeadProjections", "PerChannelMixer", "register_mixer", "make_mixer", "available_mixers", "frobenius_per_head"]

_REGISTRY: dict[str, Callable[..., "TokenMixer"]] = {}


class TokenMixer(nn.Module):
    """Base class of all mixers. Subclasses implement :meth:`mixing_matrix`, :meth:`values`,
    :meth:`combine` and (for speed) :meth:`forward`.

    Attributes:
        d_model: the model width d.
        causal: whether ``M`` is lower-triangular (token i only sees tokens j <= i).
    """

    d_model: int
    causal: bool = False

    def check_input(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        """Validate a mixer input of shape ``(batch, N, d_model)``."""
        check_tokens(x, name)
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"{name} must have shape (batch, N, d_model={self.d_model}), got {tuple(x.shape)}"
            )
        return x

    def mixing_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, N, d_model)`` → ``M(x)`` of shape ``(batch, H, N, N)``."""
        raise NotImplementedError

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, N, d_model)`` → ``V(x)`` of shape ``(batch, H, N, d_v)``."""
        raise NotImplementedError

    def combine(self, mixed: torch.Tensor) -> torch.Tensor:
        """``(batch, H, N, d_v)`` → ``(batch, N, d_model)``."""
        raise NotImplementedError

    def forward_via_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """``combine(M(x) @ V(x))``: the materialised (O(N²)) computation, ``(batch, N, d_model)``."""
        self.check_input(x)
        return self.combine(self.mixing_matrix(x) @ self.values(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # default: the materialised path
        return self.forward_via_matrix(x)



class MultiHeadProjections(TokenMixer):
    """Shared part of the attention-style mixers: query/key/value/output projections split into heads.

    ``V_h = X W_V^h`` (``values``), and ``combine`` concatenates the heads and applies ``W_O``, so
    ``O = Σ_h M_h X W_V^h W_O^h``. Subclasses define ``mixing_matrix`` (and a fast ``forward``).
    Weights are Gaussian with standard deviation ``init_std`` (default ``1/√d_model``, which keeps
    token norms of order one through each projection).
    """

    def _init_projections(self, d_model: int, n_heads: int, init_std: float | None) -> None:
        check_positive_int(d_model, "d_model")
        check_positive_int(n_heads, "n_heads")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model, self.n_heads = d_model, n_heads
        self.head_dim = d_model // n_heads
        self.w_q = nn.Linear(d_model, d_model, bias=False)
        self.w_k = nn.Linear(d_model, d_model, bias=False)
        self.w_v = nn.Linear(d_model, d_model, bias=False)
        self.w_o = nn.Linear(d_model, d_model, bias=False)
        std = 1.0 / math.sqrt(d_model) if init_std is None else float(init_std)
        for lin in (self.w_q, self.w_k, self.w_v, self.w_o):
            nn.init.normal_(lin.weight, std=std)

    def _split(self, y: torch.Tensor) -> torch.Tensor:
        """``(batch, N, d_model)`` → ``(batch, H, N, d_h)``."""
        b, n, _ = y.shape
        return y.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        return self._split(self.w_v(x))

    def combine(self, mixed: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = mixed.shape
        return self.w_o(mixed.transpose(1, 2).reshape(b, n, self.d_model))


class PerChannelMixer(TokenMixer):
    """Shared part of the mixers with one mixing matrix per channel (S4D, S6, RG-LRU): ``C_V = I``.

    ``values`` is every channel as its own one-dimensional "head", ``(batch, d, N, 1)``, and
    ``combine`` puts the channels back, ``(batch, N, d)``: ``O[:, c] = M^{(c)} X[:, c]``.
    """

    def values(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).unsqueeze(-1)

    def combine(self, mixed: torch.Tensor) -> torch.Tensor:
        return mixed.squeeze(-1).transpose(1, 2)

def register_mixer(name: str):
    """Class decorator: make a mixer constructible as ``make_mixer(name, d_model=..., ...)``."""

    def decorator(cls):
        if name in _REGISTRY:
            raise ValueError(f"a mixer named {name!r} is already registered")
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return decorator


def available_mixers() -> list[str]:
    """Names accepted by :func:`make_mixer`."""
    return sorted(_REGISTRY)


def make_mixer(name: str, d_model: int, **kwargs) -> TokenMixer:
    """Build a registered mixer by name with its default hyper-parameters, overridable by ``kwargs``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown mixer {name!r}; available mixers: {available_mixers()}")
    return _REGISTRY[name](d_model=d_model, **kwargs)


def frobenius_per_head(mixer: TokenMixer, x: torch.Tensor) -> torch.Tensor:
    """``||M_h(x)||_F`` for every head (attention, SSD) or channel (S4D, S6, RG-LRU).

    Args:
        mixer: a :class:`TokenMixer`.
        x: ``(batch, N, d_model)`` input.

    Returns:
        ``(batch, H)``. The theory's constant ``C_M`` (reference §4) is the supremum of its maximum
        over heads/channels and over the inputs the layer can see.
    """
    if not isinstance(mixer, TokenMixer):
        raise TypeError(f"mixer must be a TokenMixer, got {type(mixer).__name__}")
    return mixer.mixing_matrix(x).flatten(-2).norm(dim=-1)
