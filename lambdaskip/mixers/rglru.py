"""A gated linear RNN whose gates depend only on the current input: the RG-LRU of Griffin/Hawk.

For every channel (De et al., 2024) ::

    r_t = σ(W_a x_t + b_a)                       recurrence gate
    i_t = σ(W_x x_t + b_x)                       input gate
    a_t = a^{c r_t},  a = σ(Λ),  c = 8           (so log a_t = −c r_t softplus(−Λ))
    h_t = a_t ⊙ h_{t−1} + √(1 − a_t²) ⊙ (i_t ⊙ x_t)

The gates at time t see only ``x_t``, so the transition is diagonal and time-varying and the same
product formula as for S6 gives one mixing matrix per channel ::

    M^{(c)}_ij = (Π_{k=j+1..i} a_{k,c}) √(1 − a_{j,c}²) i_{j,c}    (j ≤ i), 0 above,

with values ``V = X`` (``C_V = I``). Initialisation as in Griffin: ``Λ`` such that ``a^c`` is
uniform in ``[0.9, 0.999]``; PyTorch's default init for the gate projections (full matrices here,
where Griffin uses block-diagonal ones). Griffin's surrounding block (convolution, GeLU gate) is left
out.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .._checks import check_finite_real, check_positive_int
from ._ssm import diag_recurrence, scan_module, segsum_exp
from .base import PerChannelMixer, register_mixer

__all__ = ["RGLRU"]


@register_mixer("rglru")
class RGLRU(PerChannelMixer):
    """Real-Gated Linear Recurrent Unit, one state per channel.

    Args:
        d_model: number of channels d.
        c: the constant c of ``a_t = a^{c r_t}`` (Griffin: 8).
        a_min, a_max: range of the uniform initialisation of ``a^c`` (Griffin: 0.9, 0.999).

    Shapes: input ``(batch, N, d)``; ``mixing_matrix`` ``(batch, d, N, N)``; ``values`` ``(batch, d, N, 1)``;
    output ``(batch, N, d)``.
    """

    causal = True

    def __init__(self, d_model: int, c: float = 8.0, a_min: float = 0.9, a_max: float = 0.999):
        super().__init__()
        check_positive_int(d_model, "d_model")
        self.c = check_finite_real(c, "c")
        if self.c <= 0 or not (0 < a_min <= a_max < 1):
            raise ValueError(f"need c > 0 and 0 < a_min <= a_max < 1, got c={c}, a_min={a_min}, a_max={a_max}")
        self.d_model = d_model
        self.w_a = nn.Linear(d_model, d_model)
        self.w_x = nn.Linear(d_model, d_model)
        a = torch.empty(d_model).uniform_(a_min, a_max) ** (1.0 / self.c)
        self.lam_param = nn.Parameter(torch.log(a) - torch.log1p(-a))  # Λ = logit(a)

    def gates(self, x: torch.Tensor):
        """``log a_t`` and the input multiplier ``√(1 − a_t²) i_t``, each ``(b, N, d)``."""
        r = torch.sigmoid(self.w_a(x))
        i = torch.sigmoid(self.w_x(x))
        log_a = -self.c * r * F.softplus(-self.lam_param.to(x.dtype))
        # √(1 − a²) computed as √(−expm1(2 log a)) keeps precision when a is close to 1
        return log_a, torch.sqrt(-torch.expm1(2.0 * log_a)) * i

    def mixing_matrix(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        log_a, gain = self.gates(x)
        return segsum_exp(log_a.transpose(1, 2)) * gain.transpose(1, 2).unsqueeze(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        log_a, gain = self.gates(x)
        u = gain * x
        scan = scan_module()
        if scan is not None and hasattr(scan, "linear_recurrence"):
            # the scan package's chunked scalar recurrence runs along dimension 0 (time first)
            return scan.linear_recurrence(log_a.exp().transpose(0, 1), u.transpose(0, 1)).transpose(0, 1)
        return diag_recurrence(log_a, u)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, c={self.c:g}"
