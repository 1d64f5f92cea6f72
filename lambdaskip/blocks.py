"""λ-skip blocks and deep stacks of them.

A **post-norm** λ-skip block (the theory's form, reference §1) computes ::

    y = N(λ·x + mixer(x))

and a **pre-norm** block (as in most modern transformers and Mamba) computes ::

    y = λ·x + mixer(N(x))

λ = 1 is the usual residual connection, λ = 0 removes it, negative values are allowed. λ can be a
fixed number, a different number per layer (give the stack a sequence), or learnable (a scalar
``nn.Parameter`` per block, initialised at the given value).

Two switches extend the block towards practical architectures (the theory leaves both out):

* **gating** (``gate=True``), as in Mamba/Mamba-2: the mixer branch is multiplied elementwise by
  ``SiLU(W_z u)``, where ``u`` is the input the mixer sees and ``W_z`` a d×d linear map, *before* the
  skip is added::

      post:  y = N(λ·x + SiLU(W_z x) ⊙ mixer(x))
      pre:   y = λ·x + SiLU(W_z N(x)) ⊙ mixer(N(x))

* **an MLP sub-block** (``mlp=True``): a second residual sub-layer with the same λ and the same norm
  placement (its own norm instance), ``MLP(h) = W_2 GELU(W_1 h)`` with hidden width
  ``mlp_ratio · d``. With ``h`` the output of the mixer sub-layer above::

      post:  y = N'(λ·h + MLP(h))
      pre:   y = λ·h + MLP(N'(h))

A :class:`LambdaSkipStack` chains K blocks, ``Y^{k+1} = block_k(Y^k)`` with ``Y^0 = N(X)`` for
post-norm stacks, and can return every layer's output so that metrics can be taken per layer.
"""
from __future__ import annotations

import numbers
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
        gate: multiply the mixer branch by ``SiLU(W_z u)`` (``u`` = the mixer's input), see the module
            docstring for where exactly.
        mlp: add a second residual sub-layer ``MLP(h) = W_2 GELU(W_1 h)`` with the same λ and norm placement.
        mlp_ratio: hidden width of the MLP in multiples of ``d_model``.

    Attributes:
        gate_proj: the ``nn.Linear(d, d)`` map ``W_z`` (``None`` without gating).
        mlp: the MLP ``nn.Sequential`` (``None`` without it); ``mlp_norm`` its normalisation.

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
        gate: bool = False,
        mlp: bool = False,
        mlp_ratio: int = 4,
    ):
        super().__init__()
        if not isinstance(mixer, nn.Module):
            raise TypeError(f"mixer must be a TokenMixer module, got {type(mixer).__name__}")
        if not hasattr(mixer, "d_model"):
            raise TypeError(f"mixer must have a d_model attribute (a TokenMixer), got {type(mixer).__name__}")
        for value, name in ((gate, "gate"), (mlp, "mlp")):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        check_positive_int(mlp_ratio, "mlp_ratio")
        if isinstance(lam, numbers.Real) and not isinstance(lam, bool):
            lam = float(lam)  # NumPy scalars (np.float32 is not a float subclass)
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
        self.gate_proj = nn.Linear(self.d_model, self.d_model, bias=False) if gate else None
        self.mlp_ratio = mlp_ratio
        if mlp:
            hidden = mlp_ratio * self.d_model
            self.mlp = nn.Sequential(nn.Linear(self.d_model, hidden), nn.GELU(), nn.Linear(hidden, self.d_model))
            self.mlp_norm = make_norm(norm, self.d_model, scale=norm_scale, eps=norm_eps)
        else:
            self.mlp, self.mlp_norm = None, None

    def mixer_branch(self, u: torch.Tensor) -> torch.Tensor:
        """The mixer's contribution ``mixer(u)``, times ``SiLU(W_z u)`` when gated; ``(batch, N, d)``."""
        out = self.mixer(u)
        if self.gate_proj is not None:
            out = out * nn.functional.silu(self.gate_proj(u))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lam = self.lam.to(x.dtype)
        if self.norm_position == "post":
            h = self.norm(lam * x + self.mixer_branch(x))
            return h if self.mlp is None else self.mlp_norm(lam * h + self.mlp(h))
        h = lam * x + self.mixer_branch(self.norm(x))
        return h if self.mlp is None else lam * h + self.mlp(self.mlp_norm(h))

    def extra_repr(self) -> str:
        kind = "learnable" if self.learnable_lambda else "fixed"
        return (
            f"lam={float(self.lam):g} ({kind}), norm={self.norm_kind!r}, position={self.norm_position!r}, "
            f"gate={self.gate_proj is not None}, mlp={self.mlp is not None}"
        )


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
        gate: bool = False,
        mlp: bool = False,
        mlp_ratio: int = 4,
    ) -> "LambdaSkipStack":
        """Build a stack of ``depth`` blocks around mixers made by :func:`~lambdaskip.mixers.make_mixer`.

        Args:
            mixer: a registered mixer name (see :func:`~lambdaskip.mixers.available_mixers`).
            lam: one λ for all layers, or a sequence of ``depth`` values (one per layer).
            shared_weights: one mixer (and, if enabled, one gate projection and one MLP) reused by every
                layer (a "looped" network); λ and the norms stay per layer.
            mixer_kwargs: extra arguments for the mixer constructor.
            Other arguments: as in :class:`LambdaSkipBlock`.
        """
        check_positive_int(depth, "depth")
        check_positive_int(d_model, "d_model")
        # numbers.Real also covers NumPy scalars (np.float32 is not a float subclass)
        if isinstance(lam, numbers.Real) or (isinstance(lam, torch.Tensor) and lam.numel() == 1):
            lams = [lam] * depth  # converted and checked by LambdaSkipBlock
        else:
            try:
                lams = [float(v) for v in lam]
            except (TypeError, ValueError):
                raise TypeError(
                    f"lam must be a real number or a sequence of depth={depth} real numbers, got {lam!r}"
                ) from None
            if len(lams) != depth:
                raise ValueError(f"lam must be a number or a sequence of depth={depth} values, got {len(lams)} values")
        for value in lams:  # fail at construction, not at the first forward
            check_finite_real(float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else value, "lam")
        if not isinstance(shared_weights, bool):
            raise TypeError(f"shared_weights must be a bool, got {type(shared_weights).__name__}")
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
                gate=gate,
                mlp=mlp,
                mlp_ratio=mlp_ratio,
            )
            for value in lams
        ]
        if shared_weights:  # the gate and MLP are shared too (assigning a module re-registers it)
            for block in blocks[1:]:
                block.gate_proj = blocks[0].gate_proj
                block.mlp = blocks[0].mlp
        return cls(blocks)

    def iter_layers(self, x: torch.Tensor):
        """Yield ``Y^0, Y^1, …, Y^K`` one at a time (each ``(batch, N, d_model)``).

        Stops early, after yielding the first non-finite output, if a layer overflows (possible
        without normalisation, where ``|λ|^k`` grows without bound) — so callers can record the
        overflow instead of feeding ``Inf`` into the next mixer.
        """
        check_tokens(x)
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (batch, N, d_model={self.d_model}), got {tuple(x.shape)}")
        y = self.input_norm(x)
        yield y
        for block in self.blocks:
            y = block(y)
            yield y
            if not bool(torch.isfinite(y).all()):
                return

    def forward(self, x: torch.Tensor, return_all: bool = False) -> torch.Tensor:
        outputs, count = [], 0
        for y in self.iter_layers(x):
            count += 1
            if return_all or count == self.depth + 1:
                outputs.append(y)
        if count != self.depth + 1 or not bool(torch.isfinite(y).all()):
            raise FloatingPointError(
                f"the stack overflowed at layer {count - 1}: it produced Inf/NaN (without normalisation "
                "the skip path grows like |λ|^k; use float64, a smaller |λ| or depth, or a normalisation)"
            )
        return torch.stack(outputs) if return_all else outputs[-1]
