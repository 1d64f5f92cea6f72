"""Token mixers: every layer as a token-mixing matrix (theory reference §3).

Build one by name with :func:`make_mixer`; :func:`available_mixers` lists the names:

* ``"softmax"`` — multi-head softmax attention (``causal=False`` by default, ``causal=True`` masks);
* ``"linear"`` — causal normalised linear attention, ``φ = elu + 1``;
* ``"s4d"`` — LTI diagonal SSM (S4D-Lin / S4D-Real, zero-order hold), Toeplitz M;
* ``"s6"`` — selective SSM (Mamba-1), one M per channel;
* ``"ssd"`` — Mamba-2 / SSD, scalar decay per head, ``M = L ∘ (C B̄ᵀ)``; ``fixed_decay=α`` gives the
  paper's Assumption 4.1;
* ``"rglru"`` — the RG-LRU gated RNN (Griffin), gates depending on the current input only.

:func:`frobenius_per_head` gives ``||M||_F`` per head/channel (the theory's ``C_M`` is its sup), and
:func:`equivalence_table` checks ``forward(x) == combine(M(x) V(x))`` for every mixer in float64
(``python -m lambdaskip.mixers`` prints it).
"""
from .base import TokenMixer, available_mixers, frobenius_per_head, make_mixer, register_mixer
from .attention import SoftmaxAttention
from .linear_attention import LinearAttention
from .s4d import S4D
from .s6 import S6
from .ssd import SSD
from .rglru import RGLRU
from .framework import MIXER_FORMULAS, TABLE_MIXERS, build_table_mixers, equivalence_table, shared_input

__all__ = [
    "TokenMixer",
    "available_mixers",
    "make_mixer",
    "register_mixer",
    "frobenius_per_head",
    "equivalence_table",
    "shared_input",
    "MIXER_FORMULAS",
    "TABLE_MIXERS",
    "build_table_mixers",
    "SoftmaxAttention",
    "LinearAttention",
    "S4D",
    "S6",
    "SSD",
    "RGLRU",
]
