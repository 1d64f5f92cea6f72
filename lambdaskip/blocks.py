"""λ-skip blocks and deep stacks of them.

A **post-norm** λ-skip block (the theory's form, reference §1) computes ::

    y = N(λ·x + mixer(x))

and a **pre-norm** block (as in most modern transformers and Mamba) computes ::

    y = λ·x + mixer(N(x))

λ = 1 is the usual residual connection, λ = 0 removes it, negative values are allowed. λ can be a
fixed number, a different number per layer (give the stack a sequence), or learnable (a scalar
``nn.Parameter`` per block, initialised at the given value).

A :class:`LambdaSkipStack` chains K blocks, ``Y^{k+1} = block_k(Y^k)`` with ``Y^0 = N(X)`` for
post-norm stacks, and can return every layer's output so that metrics can be taken per layer.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ._checks import check_choice, check_finite_real, check_positive_int, check_tokens
from .mixers import TokenMixer, make_mixer
from .norms import NORM_KINDS, make_norm

__all__ = ["LambdaSkipBlock", "LambdaSkipStack"]

NORM_POSITIONS = ("post", "pre")


class LambdaSkipBlock(nn.Module):
    """One λ-skip block around a token mixer.

    Args:
        mixer: the token mixer (input/output ``(batch, N, d_model)``).
        lam: the skip strength λ (finite real).
        learnable_lambda: make λ a trainable scalar parameter initialised at ``lam``.
        norm: ``"none"``, ``"rms"`` (the theory's row-wise normalisation), ``"layernorm"`` or ``"rmsnorm"``.
        norm_position: ``"post"`` (``N(λx + mixer(x))``) or ``"pre"`` (``λx + mixer(N(x))``).
        norm_scale, norm_eps: passed to the ``"rms"`` normalisation (see :mod:`lambdaskip.norms`).

    Shapes: ``(batch, N, d_model)`` in and out.
    """

    def __init__(
        self,
        mixer: TokenMixer,
        lam: float = 1.0,
        *,
        learnable_lambda: bool = False,
        norm: str = "rms",
        norm_position: str = "post",
        norm_scale: str = "sqrt_d",
        norm_eps: float = 0.0,
    ):
        super().__init__()
        if not isinstance(mixer, nn.Module):
            raise TypeError(f"mixer must be a TokenMixer module, got {type(mixer).__name__}")
        lam = check_finite_real(lam, "lam")
        self.mixer = mixer
        self.d_model = mixer.d_model
        self.norm_kind = check_choice(norm, "norm", NORM_KINDS)
        self.norm_position = check_choice(norm_position, "norm_position", NORM_POSITIONS)
        self.norm = make_norm(norm, self.d_model, scale=norm_scale, eps=norm_eps)
        lam_tensor = torch.tensor(lam, dtype=torch.get_default_dtype())
        if learnable_lambda:
            self.lam = nn.Parameter(lam_tensor)
        else:
            self.register_buffer("lam", lam_tensor)
        self.learnable_lambda = bool(learnable_lambda)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lam = self.lam.to(x.dtype)
        if self.norm_position == "post":
            return self.norm(lam * x + self.mixer(x))
        return lam * x + self.mixer(self.norm(x))

    def extra_repr(self) -> str:
        kind = "learnable" if self.learnable_lambda else "fixed"
        return f"lam={float(self.lam):g} ({kind}), norm={self.norm_kind!r}, position={self.norm_position!r}"


class LambdaSkipStack(nn.Module):
    """K λ-skip blocks in sequence.

    For post-norm stacks the input is normalised first (``Y^0 = N(X)``, as in the theory), so that
    every layer, including layer 0, sits on the same sphere.

    Shapes: ``forward(x)`` maps ``(batch, N, d_model)`` to ``(batch, N, d_model)``; with
    ``return_all=True`` it returns ``(K+1, batch, N, d_model)``: ``Y^0, …, Y^K``.
    """

    def __init__(self, blocks: Sequence[LambdaSkipBlock]):
        super().__init__()
        blocks = list(blocks)
        if not blocks:
            raise ValueError("blocks must contain at least one block (depth >= 1)")
        self.blocks = nn.ModuleList(blocks)
        first = blocks[0]
        self.d_model = first.d_model
        self.input_norm = first.norm if first.norm_position == "post" else nn.Identity()

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def lambdas(self) -> torch.Tensor:
        """The current λ of every block, shape ``(K,)`` (detached)."""
        return torch.stack([b.lam.detach() for b in self.blocks])

    @classmethod
    def build(
        cls,
        mixer: str = "softmax",
        *,
        d_model: int,
        depth: int,
        lam: float | Sequence[float] = 1.0,
        learnable_lambda: bool = False,
        norm: str = "rms",
        norm_position: str = "post",
        norm_scale: str = "sqrt_d",
        norm_eps: float = 0.0,
        shared_weights: bool = False,
        mixer_kwargs: dict | None = None,
    ) -> "LambdaSkipStack":
        """Build a stack of ``depth`` blocks around mixers made by :func:`~lambdaskip.mixers.make_mixer`.

        Args:
            mixer: a registered mixer name (see :func:`~lambdaskip.mixers.available_mixers`).
            lam: one λ for all layers, or a sequence of ``depth`` values (one per layer).
            shared_weights: one mixer instance reused by every layer (a "looped" network).
            mixer_kwargs: extra arguments for the mixer constructor.
            Other arguments: as in :class:`LambdaSkipBlock`.
        """
        check_positive_int(depth, "depth")
        check_positive_int(d_model, "d_model")
        if isinstance(lam, (int, float, torch.Tensor)) and not (isinstance(lam, torch.Tensor) and lam.numel() > 1):
            lams = [lam] * depth
        else:
            lams = [float(v) for v in lam]
            if len(lams) != depth:
                raise ValueError(f"lam must be a number or a sequence of depth={depth} values, got {len(lams)} values")
        mixer_kwargs = dict(mixer_kwargs or {})
        shared = make_mixer(mixer, d_model, **mixer_kwargs) if shared_weights else None
        blocks = [
            LambdaSkipBlock(
                shared if shared is not None else make_mixer(mixer, d_model, **mixer_kwargs),
                lam=value,
                learnable_lambda=learnable_lambda,
                norm=norm,
                norm_position=norm_position,
                norm_scale=norm_scale,
                norm_eps=norm_eps,
            )
            for value in lams
        ]
        return cls(blocks)

    def forward(self, x: torch.Tensor, return_all: bool = False) -> torch.Tensor:
        check_tokens(x)
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (batch, N, d_model={self.d_model}), got {tuple(x.shape)}")
        y = self.input_norm(x)
        outputs = [y]
        for block in self.blocks:
            y = block(y)
            if return_all:
                outputs.append(y)
        return torch.stack(outputs) if return_all else y
