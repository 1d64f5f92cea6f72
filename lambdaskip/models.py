"""Sequence models for the training experiments: embedding → K λ-skip blocks → head.

The four architectures of the paper's Table 1 differ only in the token mixer inside the λ-skip
blocks (:mod:`lambdaskip.blocks`):

==================  ===========  ==================================================
architecture        mixer        notes
==================  ===========  ==================================================
``transformer``     ``softmax``  causal on MQAR, bidirectional on images; + MLP
``linear``          ``linear``   causal linear attention; + MLP
``mamba``           ``s6``       selective SSM (Mamba-1); gated; short convolution
``mamba2``          ``ssd``      structured state-space duality (Mamba-2); gated; short conv.
==================  ===========  ==================================================

Mamba and Mamba-2 blocks contain a short causal depthwise convolution before the SSM; our mixers
are the SSM core only, so the SSM models get one such convolution (width 4, residual) right after
the embedding instead of inside every block — a simplification of ours that keeps the λ-skip
blocks untouched. It lets a token see its predecessor, which associative recall needs.

Every block is pre-norm (``λ·x + mixer(LN(x))``, the usual trainable form) with λ fixed at a value
(1 is the standard residual) or learnable (one scalar per layer, initialised at the given value).
Architectures whose mixer is not registered yet are reported by :func:`available_architectures`.
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch
from torch import nn

from ._checks import check_choice, check_finite_real, check_positive_int
from .blocks import LambdaSkipStack
from .metrics import normalized_mu
from .mixers import available_mixers
from .tasks import TaskData

__all__ = ["ARCHITECTURES", "available_architectures", "SequenceModel", "build_model"]

# name -> (mixer registry name, block options we ask for when the blocks support them)
ARCHITECTURES: dict[str, dict] = {
    "transformer": dict(mixer="softmax", label="Transformer", block=dict(mlp=True), positional=True),
    "linear": dict(mixer="linear", label="Linear Transformer", block=dict(mlp=True), positional=True),
    "mamba": dict(mixer="s6", label="Mamba", block=dict(gate=True), positional=False, short_conv=4),
    "mamba2": dict(mixer="ssd", label="Mamba-2", block=dict(gate=True), positional=False, short_conv=4),
}


def available_architectures() -> list[str]:
    """Architectures whose token mixer is registered in :mod:`lambdaskip.mixers`."""
    have = set(available_mixers())
    return [a for a, spec in ARCHITECTURES.items() if spec["mixer"] in have]


def _build_kwargs_supported() -> set[str]:
    return set(inspect.signature(LambdaSkipStack.build).parameters)


class SequenceModel(nn.Module):
    """Embedding → :class:`~lambdaskip.blocks.LambdaSkipStack` → final norm → head.

    Args:
        arch: one of :data:`ARCHITECTURES`.
        input_kind: ``"tokens"`` (an ``nn.Embedding`` of ``n_inputs`` ids) or ``"pixels"`` (a linear
            map of each scalar grey level to ``d_model`` channels).
        n_inputs: vocabulary size (tokens) or 1 (pixels).
        n_outputs: classes of the head.
        seq_len: maximal N (size of the learned positional embedding of attention models).
        target_kind: ``"per_token"`` (logits at every position, MQAR) or ``"sequence"`` (mean over
            tokens, then one prediction per sequence, as in LRA).
        causal: causal token mixing (needed for MQAR).
        d_model, depth, n_heads: width, number of λ-skip blocks K, attention heads.
        lam: λ (one value, or one per layer).
        learnable_lambda: λ is an ``nn.Parameter`` per layer, initialised at ``lam``.
        norm: ``"layernorm"`` or ``"rmsnorm"`` (pre-norm).
        mixer_kwargs: extra arguments for the mixer.
        short_conv: width of the causal depthwise convolution after the embedding (0: none;
            default: the architecture's, 4 for the SSMs, 0 for attention).

    Shapes: ``forward(x)`` takes ``(B, N)`` (int64 ids or float grey levels) and returns
    ``(B, N, n_outputs)`` for per-token targets or ``(B, n_outputs)`` for sequence targets.
    """

    def __init__(
        self,
        arch: str,
        *,
        input_kind: str,
        n_inputs: int,
        n_outputs: int,
        seq_len: int,
        target_kind: str,
        causal: bool,
        d_model: int = 64,
        depth: int = 2,
        n_heads: int = 2,
        lam: float | Sequence[float] = 1.0,
        learnable_lambda: bool = False,
        norm: str = "layernorm",
        mixer_kwargs: dict | None = None,
        short_conv: int | None = None,
    ):
        super().__init__()
        check_choice(arch, "arch", tuple(ARCHITECTURES))
        spec = ARCHITECTURES[arch]
        if spec["mixer"] not in available_mixers():
            raise ValueError(
                f"arch={arch!r} needs the mixer {spec['mixer']!r}, which is not registered; "
                f"available architectures: {available_architectures()}"
            )
        self.input_kind = check_choice(input_kind, "input_kind", ("tokens", "pixels"))
        self.target_kind = check_choice(target_kind, "target_kind", ("per_token", "sequence"))
        check_choice(norm, "norm", ("layernorm", "rmsnorm"))
        for value, name in ((n_inputs, "n_inputs"), (n_outputs, "n_outputs"), (seq_len, "seq_len"),
                            (d_model, "d_model"), (depth, "depth"), (n_heads, "n_heads")):
            check_positive_int(value, name)
        if isinstance(lam, (int, float)):
            check_finite_real(lam, "lam")
        self.arch, self.seq_len, self.d_model = arch, seq_len, d_model
        if input_kind == "tokens":
            self.embed = nn.Embedding(n_inputs, d_model)
        else:
            if n_inputs != 1:
                raise ValueError(f"pixel inputs are scalars: n_inputs must be 1, got {n_inputs}")
            self.embed = nn.Linear(1, d_model)
        # Attention is permutation-equivariant without positions; SSMs know order through the scan.
        self.pos = nn.Parameter(torch.randn(seq_len, d_model) * 0.02) if spec["positional"] else None
        width = spec.get("short_conv", 0) if short_conv is None else short_conv
        if isinstance(width, bool) or not isinstance(width, int) or width < 0:
            raise ValueError(f"short_conv must be a non-negative int, got {width!r}")
        self.short_conv = width
        # Depthwise, left-padded by width-1 and cropped: output t sees inputs t-width+1..t only (causal).
        self.conv = nn.Conv1d(d_model, d_model, width, groups=d_model, padding=width - 1) if width else None

        mixer_kwargs = dict(mixer_kwargs or {})
        if spec["mixer"] in ("softmax", "linear"):
            mixer_kwargs.setdefault("n_heads", n_heads)
        if spec["mixer"] == "softmax":
            mixer_kwargs.setdefault("causal", causal)
        # Linear attention and the SSMs are causal by construction; for classification (causal=False)
        # that only means the mean-pooled summary weighs later tokens with more context.
        supported = _build_kwargs_supported()
        # Block options (gating, MLP) are used where the blocks offer them; what was used is recorded.
        block_opts = {k: v for k, v in spec["block"].items() if k in supported}
        self.block_options = dict(block_opts)
        self.stack = LambdaSkipStack.build(
            spec["mixer"],
            d_model=d_model,
            depth=depth,
            lam=lam,
            learnable_lambda=learnable_lambda,
            norm=norm,
            norm_position="pre",
            mixer_kwargs=mixer_kwargs,
            **block_opts,
        )
        self.final_norm = nn.LayerNorm(d_model) if norm == "layernorm" else nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, n_outputs)

    # ------------------------------------------------------------------ pieces
    def embed_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` ids or grey levels → ``(B, N, d_model)`` (with positions for attention models)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"x must be a tensor of shape (batch, N), got {getattr(x, 'shape', type(x).__name__)}")
        n = x.shape[1]
        if n > self.seq_len:
            raise ValueError(f"x has N={n} tokens, more than the model's seq_len={self.seq_len}")
        if self.input_kind == "tokens":
            if x.dtype != torch.int64:
                raise TypeError(f"token inputs must be int64 ids, got {x.dtype}")
            h = self.embed(x)
        else:
            if not x.is_floating_point():
                raise TypeError(f"pixel inputs must be floating point, got {x.dtype}")
            h = self.embed(x.unsqueeze(-1).to(self.embed.weight.dtype))
        if self.pos is not None:
            h = h + self.pos[:n]
        if self.conv is not None:
            h = h + self.conv(h.transpose(1, 2))[..., :n].transpose(1, 2)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.final_norm(self.stack(self.embed_inputs(x)))
        if self.target_kind == "sequence":
            h = h.mean(dim=1)  # LRA-style mean pooling over tokens
        return self.head(h)

    # ------------------------------------------------------------------ measurements
    @property
    def lambdas(self) -> torch.Tensor:
        """λ of every block, shape ``(K,)`` (detached)."""
        return self.stack.lambdas

    @torch.no_grad()
    def layer_mu(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised μ of the residual stream after the embedding and after every block.

        Returns shape ``(K+1,)``: the mean over the batch of ``μ(Y^k)/‖Y^k‖_F``, k = 0..K.
        """
        ys = self.stack(self.embed_inputs(x), return_all=True)  # (K+1, B, N, d)
        return normalized_mu(ys.double()).mean(dim=1).float()


def build_model(arch: str, data: TaskData, **kw) -> SequenceModel:
    """A :class:`SequenceModel` shaped for ``data`` (input kind, sizes, causality); ``kw`` as in the class."""
    return SequenceModel(
        arch,
        input_kind=data.input_kind,
        n_inputs=data.n_inputs,
        n_outputs=data.n_outputs,
        seq_len=data.seq_len,
        target_kind=data.target_kind,
        causal=data.causal,
        **kw,
    )
