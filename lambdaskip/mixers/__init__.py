"""Token mixers: every layer as a token-mixing matrix (theory reference §3).

Build one by name with :func:`make_mixer`; :func:`available_mixers` lists the names.
"""
from .base import TokenMixer, available_mixers, make_mixer, register_mixer
from .attention import SoftmaxAttention

__all__ = ["TokenMixer", "available_mixers", "make_mixer", "register_mixer", "SoftmaxAttention"]
