"""A Mamba-2 / SSD-style SSM: one scalar decay per head, so ``M = L ∘ (C B̄ᵀ)`` ("masked attention").

For head h with head width p (``d_model = H p``) and state size n ::

    Δ_{t,h} = softplus(W_Δ x_t + b_Δ)_h,   a_{t,h} = exp(Δ_{t,h} A_h),   B_t = W_B x_t,   C_t = W_C x_t
    H^{(h)}_t = a_{t,h} H^{(h)}_{t−1} + x^{(h)}_t (Δ_{t,h} B_t)ᵀ ∈ R^{p×n},   y^{(h)}_t = H^{(h)}_t C_t

Unrolled, every head is masked attention with queries C, keys ``B̄ = Δ B`` and values ``x^{(h)}`` ::

    M^{(h)} = L^{(h)} ∘ (C B̄^{(h)ᵀ}),   L^{(h)}_ij = Π_{k=j+1..i} a_{k,h}  (j ≤ i), 0 above.

``L`` is 1-semiseparable (Dao & Gu, 2024). B and C are shared by the heads (one group, as in Mamba-2).

**Assumption 4.1 of the paper (reconstructed)** — ``fixed_decay=α``: the decay is the same scalar α
for every token and head, Δ is not used (``B̄_t = B_t``), so ::

    M = L_α ∘ (C Bᵀ) = L_α ∘ (Y W_Cᵀ W_B Yᵀ),   (L_α)_ij = α^{i−j},

with ``W_B, W_C`` the ``(n, d)`` weights of :attr:`w_b`, :attr:`w_c` (``B_t = W_B y_t``). With
``n_heads=1`` and ``value_proj=False`` (the default, ``C_V = I``) the mixer output is exactly the
theory's ``M(Y) Y``.

Initialisation as in Mamba-2: ``A_h = −U[1, 16]`` stored as ``log(−A)``; Δ bias
``softplus^{−1}(Δ₀)`` with ``Δ₀`` log-uniform in ``[0.001, 0.1]``; PyTorch's default init for the
linear maps. Mamba-2's input/output projections, convolution, gate and norm are left out (gating
lives in :class:`~lambdaskip.blocks.LambdaSkipBlock`).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .._checks import check_finite_real, check_positive_int
from ._ssm import diag_recurrence, inv_softplus, log_uniform, scan_module, segsum_exp
from .base import TokenMixer, register_mixer

__all__ = ["SSD"]


@register_mixer("ssd")
class SSD(TokenMixer):
    """Mamba-2 style SSM with a scalar decay per head.

    Args:
        d_model: model width d; must be divisible by ``n_heads``.
        n_heads: number of heads H; default ``d_model // 16`` when d is a multiple of 16
            (head width 16), else 1.
        d_state: state size n (width of B and C).
        fixed_decay: ``None`` (selective, Δ from the input) or a number ``α ∈ (0, 1]``
            (Assumption 4.1: ``a_t = α``, no Δ).
        value_proj: multiply the input by a learned ``W_V`` (d×d) before mixing; ``False`` means
            ``C_V = I`` as in the theory.
        dt_min, dt_max, a_min, a_max: ranges of the initialisation of Δ and of ``−A``.
        d_skip: add Mamba-2's per-head feedthrough ``D x`` (initialised at 1) on the diagonal of M.

    Shapes: input ``(batch, N, d)``; ``mixing_matrix`` ``(batch, H, N, N)``; ``values``
    ``(batch, H, N, p)``; output ``(batch, N, d)``.
    """

    causal = True

    def __init__(
        self,
        d_model: int,
        n_heads: int | None = None,
        d_state: int = 16,
        fixed_decay: float | None = None,
        value_proj: bool = False,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        a_min: float = 1.0,
        a_max: float = 16.0,
        d_skip: bool = False,
    ):
        super().__init__()
        check_positive_int(d_model, "d_model")
        if n_heads is None:
            n_heads = d_model // 16 if d_model % 16 == 0 else 1
        check_positive_int(n_heads, "n_heads")
        check_positive_int(d_state, "d_state")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if fixed_decay is not None:
            fixed_decay = check_finite_real(fixed_decay, "fixed_decay")
            if not 0 < fixed_decay <= 1:
                raise ValueError(f"fixed_decay must be in (0, 1], got {fixed_decay}")
        if not (0 < dt_min <= dt_max) or not (0 < a_min <= a_max):
            raise ValueError("need 0 < dt_min <= dt_max and 0 < a_min <= a_max")
        self.d_model, self.n_heads, self.d_state = d_model, n_heads, d_state
        self.head_dim = d_model // n_heads
        self.fixed_decay = fixed_decay
        self.w_b = nn.Linear(d_model, d_state, bias=False)
        self.w_c = nn.Linear(d_model, d_state, bias=False)
        self.w_v = nn.Linear(d_model, d_model, bias=False) if value_proj else None
        if fixed_decay is None:
            self.w_dt = nn.Linear(d_model, n_heads, bias=False)
            self.dt_bias = nn.Parameter(inv_softplus(log_uniform((n_heads,), dt_min, dt_max).clamp(min=1e-4)))
            self.a_log = nn.Parameter(torch.empty(n_heads).uniform_(a_min, a_max).log())
        self.d_skip = bool(d_skip)
        if self.d_skip:
            self.d = nn.Parameter(torch.ones(n_heads))

    def ssm_params(self, x: torch.Tensor):
        """``log a (b, H, N) ≤ 0``, ``B̄ (b, H, N, n)``, ``C (b, H, N, n)``."""
        b_in, c_in = self.w_b(x), self.w_c(x)  # (b, N, n)
        bsz, n_tok, _ = x.shape
        c = c_in.unsqueeze(1).expand(bsz, self.n_heads, n_tok, self.d_state)
        if self.fixed_decay is not None:
            log_a = torch.full((bsz, self.n_heads, n_tok), math.log(self.fixed_decay), dtype=x.dtype, device=x.device)
            return log_a, b_in.unsqueeze(1).expand_as(c), c
        dt = F.softplus(self.w_dt(x) + self.dt_bias.to(x.dtype)).transpose(1, 2)  # (b, H, N)
        log_a = dt * (-self.a_log.exp().to(x.dtype)).unsqueeze(-1)
        return log_a, dt.unsqueeze(-1) * b_in.unsqueeze(1), c

    def mixing_matrix(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        log_a, b_bar, c = self.ssm_params(x)
        m = segsum_exp(log_a) * (c @ b_bar.transpose(-1, -2))
        if self.d_skip:
            m = m + torch.diag_embed(self.d.to(x.dtype).view(1, -1, 1).expand(x.shape[0], -1, x.shape[1]))
        return m

    def values(self, x: torch.Tensor) -> torch.Tensor:
        v = x if self.w_v is None else self.w_v(x)
        b, n, _ = v.shape
        return v.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)

    def combine(self, mixed: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = mixed.shape
        return mixed.transpose(1, 2).reshape(b, n, self.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        log_a, b_bar, c = self.ssm_params(x)
        v = self.values(x)  # (b, H, N, p)
        scan = scan_module()
        if scan is not None:
            y = scan.ssd_scan(v, log_a, b_bar, c)
        else:
            y = self._reference_scan(log_a, b_bar, c, v)
        if self.d_skip:  # the feedthrough is added here rather than inside the kernel
            y = y + self.d.to(x.dtype).view(1, -1, 1, 1) * v
        return self.combine(y)

    @staticmethod
    def _reference_scan(log_a, b_bar, c, v):
        """The SSD recurrence as a plain loop: ``(b, H, N, p)`` outputs."""
        # Reference loop over time on the state H_t ∈ R^{p×n} of every head.
        u = v.unsqueeze(-1) * b_bar.unsqueeze(-2)  # x_t B̄_tᵀ, (b, H, N, p, n)
        h = diag_recurrence(log_a.transpose(1, 2)[..., None, None], u.transpose(1, 2))  # (b, N, H, p, n)
        return torch.einsum("bhlpn,bhln->bhlp", h.transpose(1, 2), c)

    def extra_repr(self) -> str:
        decay = "selective" if self.fixed_decay is None else f"fixed_decay={self.fixed_decay:g}"
        return f"d_model={self.d_model}, n_heads={self.n_heads}, d_state={self.d_state}, {decay}"
