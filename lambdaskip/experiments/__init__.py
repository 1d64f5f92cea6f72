"""Experiments: measurements over depth, sweeps, and saved results."""
from .depth import collapse_sweep, mu_over_depth, query_key_grad_norms

__all__ = ["collapse_sweep", "mu_over_depth", "query_key_grad_norms"]
