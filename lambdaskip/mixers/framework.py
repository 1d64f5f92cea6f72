"""The unifying framework in one table: every mixer's M, checked against its efficient forward.

:func:`equivalence_table` is what ``python -m lambdaskip.mixers`` prints and what the framework
chapter shows: for each mixer, on one shared float64 input, the largest entry of
``|forward(x) − combine(M(x) V(x))|``, the shape of M, and structural facts (causal,
lower-triangular, row sums).
"""
from __future__ import annotations

import torch

from .._checks import check_positive_int
from .base import TokenMixer, make_mixer

__all__ = ["MIXER_FORMULAS", "TABLE_MIXERS", "shared_input", "build_table_mixers", "equivalence_table"]

#: The mixing matrix of each registered mixer, as written in the chapter (i = output, j = input token).
MIXER_FORMULAS: dict[str, str] = {
    "softmax": "softmax(Q Kᵀ/√d_h [+ causal mask]) per head",
    "linear": "φ(q_i)ᵀφ(k_j) / Σ_{l≤i} φ(q_i)ᵀφ(k_l), φ = elu+1, j ≤ i",
    "s4d": "K_{i−j} = κ Re Σ_k C_k Ā_k^{i−j} B̄_k per channel (Toeplitz, input-independent)",
    "s6": "C_iᵀ exp(Σ_{j<k≤i} Δ_k A) Δ_j B_j per channel",
    "ssd": "(Π_{j<k≤i} a_k) C_iᵀ Δ_j B_j per head  (L ∘ C B̄ᵀ)",
    "rglru": "(Π_{j<k≤i} a_k) √(1−a_j²) i_j per channel",
}

#: The rows of the table: (label, registry name, keyword arguments).
TABLE_MIXERS: tuple[tuple[str, str, dict], ...] = (
    ("softmax", "softmax", {"n_heads": 2}),
    ("softmax (causal)", "softmax", {"n_heads": 2, "causal": True}),
    ("linear", "linear", {"n_heads": 2}),
    ("s4d", "s4d", {}),
    ("s6", "s6", {}),
    ("ssd", "ssd", {"n_heads": 2}),
    ("ssd (fixed decay α=0.9)", "ssd", {"n_heads": 1, "fixed_decay": 0.9}),
    ("rglru", "rglru", {}),
)


def _formula(mixer: TokenMixer) -> str:
    """The row's formula: the registry's, except for the fixed-decay SSD, which has no Δ."""
    if getattr(mixer, "fixed_decay", None) is not None:
        return f"α^(i−j) C_iᵀ B_j per head, α = {mixer.fixed_decay:g}  (L_α ∘ C Bᵀ, Assumption 4.1)"
    return MIXER_FORMULAS[mixer.registry_name]


def shared_input(batch: int = 2, n_tokens: int = 16, d_model: int = 8, *, seed: int = 0,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A reproducible standard-normal input ``(batch, N, d_model)`` (its own generator: no global state)."""
    for value, name in ((batch, "batch"), (n_tokens, "n_tokens"), (d_model, "d_model")):
        check_positive_int(value, name)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n_tokens, d_model, generator=g, dtype=torch.float64).to(dtype)


def build_table_mixers(d_model: int = 8, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> dict[str, TokenMixer]:
    """One mixer per row of :data:`TABLE_MIXERS`, seeded (``seed + row``), in ``dtype``, eval mode."""
    mixers = {}
    for row, (label, name, kwargs) in enumerate(TABLE_MIXERS):
        torch.manual_seed(seed + row)
        mixers[label] = make_mixer(name, d_model, **kwargs).to(dtype).eval()
    return mixers


def equivalence_table(batch: int = 2, n_tokens: int = 16, d_model: int = 8, *, seed: int = 0):
    """Check ``forward(x) == combine(M(x) V(x))`` in float64 for every mixer on one shared input.

    Returns:
        A pandas DataFrame, one row per mixer configuration, with columns ``mixer``, ``name``,
        ``M shape`` (``(batch, H, N, N)``), ``max |forward − M·V|``, ``causal``,
        ``lower-triangular`` (largest |entry| above the diagonal is 0), ``max |row sum − 1|``,
        ``max ||M_h||_F`` and ``formula``.
    """
    import pandas as pd  # noqa: PLC0415  (lazy: only the table needs pandas)

    x = shared_input(batch, n_tokens, d_model, seed=seed)
    rows = []
    with torch.no_grad():
        for label, mixer in build_table_mixers(d_model, seed=seed).items():
            m = mixer.mixing_matrix(x)
            err = (mixer(x) - mixer.combine(m @ mixer.values(x))).abs().max().item()
            upper = m.triu(1).abs().max().item() if n_tokens > 1 else 0.0
            rows.append({
                "mixer": label,
                "name": mixer.registry_name,
                "M shape": tuple(m.shape),
                "max |forward − M·V|": err,
                "causal": bool(mixer.causal),
                "lower-triangular": upper == 0.0,
                "max |row sum − 1|": (m.sum(-1) - 1).abs().max().item(),
                "max ||M_h||_F": m.flatten(-2).norm(dim=-1).max().item(),
                "formula": _formula(mixer),
            })
    return pd.DataFrame(rows)
