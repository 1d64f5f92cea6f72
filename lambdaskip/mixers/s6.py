"""A selective SSM in the Mamba-1 / S6 style.

For every channel c (``d_model`` of them) and a diagonal real state matrix ``A_c ∈ R^n`` (n = d_state)::

    Δ_t = softplus(W_Δ x_t + b_Δ) ∈ R^d,   B_t = W_B x_t ∈ R^n,   C_t = W_C x_t ∈ R^n
    h^{(c)}_t = exp(Δ_{t,c} A_c) ⊙ h^{(c)}_{t−1} + Δ_{t,c} B_t x_{t,c},   y_{t,c} = C_tᵀ h^{(c)}_t

(``B̄_t = Δ_t B_t`` is Mamba's simplified discretisation of B). Unrolling the recurrence, channel c
mixes tokens with its own matrix ::

    M^{(c)}_ij = C_iᵀ diag(exp((Σ_{k=j+1..i} Δ_{k,c}) A_c)) Δ_{j,c} B_j      (j ≤ i), 0 above,

so the output is ``y[:, c] = M^{(c)} x[:, c]`` (values ``V = X``, ``C_V = I``). M depends on the input
through Δ, B and C; B and C are linear in x, so M is (for fixed Δ) **quadratic** in the input.

Initialisation as in Mamba (Gu & Dao, 2023): S4D-Real ``A_{c,k} = −(k+1)`` stored as ``log(−A)``;
``W_Δ`` low-rank (``dt_rank = ⌈d/16⌉``) with weights uniform in ``±dt_rank^{−1/2}`` and bias
``softplus^{−1}(Δ₀)``, ``Δ₀`` log-uniform in ``[0.001, 0.1]``; ``D = 1`` if the feedthrough is enabled.
The mixer is the SSM core only: Mamba's input/output projections, short convolution and gate are
left out (gating lives in :class:`~lambdaskip.blocks.LambdaSkipBlock`).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .._checks import check_positive_int
from ._ssm import diag_recurrence, inv_softplus, log_uniform, scan_module, segsum_exp
from .base import PerChannelMixer, register_mixer

__all__ = ["S6"]


@register_mixer("s6")
class S6(PerChannelMixer):
    """Selective SSM with one mixing matrix per channel.

    Args:
        d_model: number of channels d.
        d_state: state size n per channel.
        dt_rank: rank of the Δ projection (default ``⌈d/16⌉`` as in Mamba).
        dt_min, dt_max: range of the log-uniform initialisation of Δ.
        d_skip: add the feedthrough ``D x`` (Mamba's D, initialised at 1) on the diagonal of M. Off by
            default, because the book studies the skip through λ.

    Shapes: input ``(batch, N, d)``; ``mixing_matrix`` ``(batch, d, N, N)``; ``values`` ``(batch, d, N, 1)``;
    output ``(batch, N, d)``.
    """

    causal = True

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        d_skip: bool = False,
    ):
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(d_state, "d_state")
        dt_rank = math.ceil(d_model / 16) if dt_rank is None else check_positive_int(dt_rank, "dt_rank")
        if not (0 < dt_min <= dt_max):
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.d_model, self.d_state, self.dt_rank = d_model, d_state, dt_rank
        a = torch.arange(1, d_state + 1, dtype=torch.get_default_dtype()).expand(d_model, d_state)
        self.a_log = nn.Parameter(a.log().clone())  # A = −exp(a_log) < 0
        self.x_proj = nn.Linear(d_model, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_model, bias=True)
        bound = dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_softplus(log_uniform((d_model,), dt_min, dt_max).clamp(min=1e-4)))
        self.d_skip = bool(d_skip)
        if self.d_skip:
            self.d = nn.Parameter(torch.ones(d_model))

    @property
    def A(self) -> torch.Tensor:
        """The diagonal state matrices, ``(d, n)``, all entries < 0."""
        return -self.a_log.exp()

    def ssm_params(self, x: torch.Tensor):
        """Input-dependent parameters: ``Δ (b, N, d) > 0``, ``B (b, N, n)``, ``C (b, N, n)``."""
        dt_in, b, c = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.softplus(self.dt_proj(dt_in)), b, c

    def mixing_matrix(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        dt, b, c = self.ssm_params(x)
        log_a = dt.transpose(1, 2).unsqueeze(-1) * self.A.to(x.dtype).unsqueeze(1)  # (b, d, N, n): Δ_{t,c} A_{c,k}
        decay = segsum_exp(log_a.transpose(-1, -2))  # (b, d, n, N, N)
        # M[b, c, i, j] = Σ_k C[b, i, k] decay[b, c, k, i, j] B[b, j, k] Δ[b, j, c]
        m = torch.einsum("bik,bckij,bjk->bcij", c, decay, b)
        m = m * dt.transpose(1, 2).unsqueeze(-2)
        if self.d_skip:
            m = m + torch.diag_embed(self.d.to(x.dtype).unsqueeze(-1).expand(-1, x.shape[1]))
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        dt, b, c = self.ssm_params(x)
        A = self.A.to(x.dtype)
        scan = scan_module()
        if scan is not None:
            y = scan.selective_scan(
                x.transpose(1, 2), dt.transpose(1, 2), A, b.transpose(1, 2), c.transpose(1, 2)
            ).transpose(1, 2)
        else:
            log_a = dt.unsqueeze(-1) * A  # (b, N, d, n)
            u = (dt * x).unsqueeze(-1) * b.unsqueeze(2)  # Δ_t x_t B_t, (b, N, d, n)
            y = torch.einsum("bldn,bln->bld", diag_recurrence(log_a, u), c)
        if self.d_skip:  # the feedthrough is added here rather than inside the kernel
            y = y + self.d.to(x.dtype) * x
        return y

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={self.d_state}, dt_rank={self.dt_rank}, d_skip={self.d_skip}"
