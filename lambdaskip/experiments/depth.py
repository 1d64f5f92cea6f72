"""Rank collapse measured layer by layer in λ-skip stacks.

These are the measurements behind chapter 1 (rank collapse) and the later ablation chapters:
μ̃ after every layer of a stack, averaged over many random inputs, and the gradients that reach
the query/key weights of each layer.
"""
from __future__ import annotations

from typing import Iterable

import pandas as pd
import torch

from .._checks import check_positive_int, check_tokens
from ..blocks import LambdaSkipStack
from ..metrics import normalized_mu

__all__ = ["mu_over_depth", "collapse_sweep", "query_key_grad_norms"]


@torch.no_grad()
def mu_over_depth(stack: LambdaSkipStack, x: torch.Tensor) -> torch.Tensor:
    """Normalised μ after every layer.

    Args:
        stack: a stack of K blocks.
        x: ``(batch, N, d_model)`` inputs.

    Returns:
        ``(K+1, batch)``: row k is μ̃(Y^k) for every input, with row 0 the (normalised) input.
        If an input's activations overflow to ±Inf or NaN at some layer (possible without
        normalisation), its entries are NaN from that layer on, while the other inputs go on — the
        caller sees which runs blew up, instead of a made-up number.
    """
    check_tokens(x)
    if x.dim() != 3 or x.shape[-1] != stack.d_model:
        raise ValueError(f"x must have shape (batch, N, d_model={stack.d_model}), got {tuple(x.shape)}")
    out = torch.full((stack.depth + 1, x.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    alive = torch.arange(x.shape[0], device=x.device)  # inputs whose activations are still finite
    y = stack.input_norm(x)
    for k in range(stack.depth + 1):
        if k > 0:
            y = stack.blocks[k - 1](y)
        finite = torch.isfinite(y).flatten(1).all(-1)
        y, alive = y[finite], alive[finite]
        if alive.numel() == 0:
            break
        out[k, alive] = normalized_mu(y)
    return out


def collapse_sweep(
    *,
    mixer: str = "softmax",
    lambdas: Iterable[float] = (0.0, 1.0),
    norms: Iterable[str] = ("rms", "none"),
    depth: int = 32,
    n_inputs: int = 32,
    n_tokens: int = 32,
    d_model: int = 32,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    mixer_kwargs: dict | None = None,
) -> pd.DataFrame:
    """μ̃ over depth for every (λ, normalisation) pair, on the same random weights and inputs.

    For each normalisation the stack's weights are drawn once from ``seed`` and reused for every
    λ, so curves differ only by λ. Inputs are i.i.d. standard Gaussian tokens.

    Returns:
        A long-form data frame with columns ``lam, norm, layer, input, mu_tilde``
        (``(len(lambdas) · len(norms) · (depth+1) · n_inputs)`` rows).
    """
    check_positive_int(depth, "depth")
    check_positive_int(n_inputs, "n_inputs")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_inputs, n_tokens, d_model, generator=generator, dtype=dtype).to(device)
    rows = []
    for norm in norms:
        torch.manual_seed(seed)
        stack = LambdaSkipStack.build(mixer, d_model=d_model, depth=depth, norm=norm, mixer_kwargs=mixer_kwargs)
        stack = stack.to(device=device, dtype=dtype)
        for lam in lambdas:
            for block in stack.blocks:
                block.lam.fill_(float(lam))
            curves = mu_over_depth(stack, x).cpu()
            for layer in range(curves.shape[0]):
                for i in range(n_inputs):
                    rows.append((float(lam), norm, layer, i, float(curves[layer, i])))
    return pd.DataFrame(rows, columns=["lam", "norm", "layer", "input", "mu_tilde"])


def query_key_grad_norms(
    stack: LambdaSkipStack, x: torch.Tensor, *, seed: int = 0
) -> pd.DataFrame:
    """Frobenius norms of the gradients reaching each layer's query and key weights.

    The loss is a fixed random linear read-out of the last layer, ``L = <R, Y^K>`` with R Gaussian
    (seeded), so the gradient measures how much the last layer's output can still be moved by each
    layer's attention pattern. Noci et al. (2022) show that rank collapse makes these gradients vanish.

    Args:
        stack: a stack whose mixers have ``w_q`` and ``w_k`` linear layers (softmax attention). With
            ``shared_weights=True`` every layer holds the same ``W_Q, W_K``, so every row reports the
            same total gradient.
        x: ``(batch, N, d_model)`` inputs.

    Returns:
        Data frame with columns ``layer`` (1..K), ``grad_wq``, ``grad_wk``.
    """
    check_tokens(x)
    generator = torch.Generator().manual_seed(seed)
    stack.zero_grad(set_to_none=True)
    y = stack(x)
    readout = torch.randn(y.shape, generator=generator, dtype=y.dtype).to(y.device)
    (readout * y).sum().backward()
    rows = []
    for k, block in enumerate(stack.blocks, start=1):
        mixer = block.mixer
        if not (hasattr(mixer, "w_q") and hasattr(mixer, "w_k")):
            raise ValueError(f"layer {k}: mixer {type(mixer).__name__} has no w_q/w_k (needs attention)")
        gq, gk = mixer.w_q.weight.grad, mixer.w_k.weight.grad
        rows.append((k, float(gq.norm()) if gq is not None else 0.0, float(gk.norm()) if gk is not None else 0.0))
    stack.zero_grad(set_to_none=True)
    return pd.DataFrame(rows, columns=["layer", "grad_wq", "grad_wk"])
