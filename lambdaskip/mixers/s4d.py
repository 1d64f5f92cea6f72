"""An LTI state space model in the S4D style (diagonal state matrix, zero-order hold).

Each channel c is a single-input single-output SSM with n diagonal (complex) modes ::

    h'(t) = A h(t) + B u(t),   y(t) = Re(Cᵀ h(t)) + D u(t)

discretised with step Δ_c by the zero-order hold, ``Ā = exp(Δ A)``, ``B̄ = (Ā − 1) / A · B``.
Unrolling the recurrence gives a convolution with the kernel ``K_l = κ Re(Σ_k C_k Ā_k^l B̄_k)``, so the
mixing matrix of channel c is the **Toeplitz** matrix ::

    M^{(c)}_ij = K_{i−j}  (j ≤ i),  0 above the diagonal,  (+ D_c on the diagonal if enabled)

It does not depend on the input: an LTI SSM mixes tokens with the same matrix whatever it sees.
(κ = 2 for ``init="lin"``, whose modes stand for conjugate pairs, κ = 1 for ``init="real"``.)

Initialisation as in S4D (Gu, Gupta, Goel & Ré, 2022): ``"lin"`` (S4D-Lin) ``A_k = −1/2 + iπk``;
``"real"`` (S4D-Real) ``A_k = −(k+1)``; ``B = 1``; ``C`` complex standard normal; ``log Δ`` uniform
in ``[log dt_min, log dt_max] = [log 0.001, log 0.1]``; ``D`` (if enabled) standard normal.

``forward`` computes the kernel once and convolves with FFT (``O(N log N)``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_choice, check_positive_int
from ._ssm import log_uniform
from .base import PerChannelMixer, register_mixer

__all__ = ["S4D"]


@register_mixer("s4d")
class S4D(PerChannelMixer):
    """Diagonal LTI SSM, one SISO system per channel (values ``V = X``, i.e. ``C_V = I``).

    Args:
        d_model: number of channels d (each has its own SSM and its own M).
        d_state: number of diagonal modes n per channel.
        init: ``"lin"`` (S4D-Lin, complex) or ``"real"`` (S4D-Real).
        dt_min, dt_max: range of the log-uniform initialisation of the step Δ.
        d_skip: add the feedthrough ``D u`` (a per-channel skip on the diagonal of M). Off by default,
            because the book studies the skip through λ.

    Shapes: input ``(batch, N, d)``; ``mixing_matrix`` ``(batch, d, N, N)``; ``values`` ``(batch, d, N, 1)``;
    ``kernel(N)`` ``(d, N)``; output ``(batch, N, d)``.
    """

    causal = True

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        init: str = "lin",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        d_skip: bool = False,
    ):
        super().__init__()
        check_positive_int(d_model, "d_model")
        check_positive_int(d_state, "d_state")
        self.init = check_choice(init, "init", ("lin", "real"))
        if not (0 < dt_min <= dt_max):
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.d_model, self.d_state = d_model, d_state
        k = torch.arange(d_state, dtype=torch.get_default_dtype())
        if init == "lin":
            a_re, a_im = torch.full((d_model, d_state), 0.5), (math.pi * k).expand(d_model, d_state).clone()
        else:
            a_re, a_im = (k + 1).expand(d_model, d_state).clone(), torch.zeros(d_model, d_state)
        # Re(A) = −exp(log_a_real) < 0 keeps every mode stable during training.
        self.log_a_real = nn.Parameter(a_re.log())
        self.a_imag = nn.Parameter(a_im, requires_grad=(init == "lin"))
        self.b = nn.Parameter(torch.stack([torch.ones(d_model, d_state), torch.zeros(d_model, d_state)], -1))
        self.c = nn.Parameter(torch.randn(d_model, d_state, 2) * math.sqrt(0.5))
        self.log_dt = nn.Parameter(log_uniform((d_model,), dt_min, dt_max).log())
        self.d_skip = bool(d_skip)
        if self.d_skip:
            self.d = nn.Parameter(torch.randn(d_model))

    def kernel(self, n_tokens: int) -> torch.Tensor:
        """The convolution kernel ``K[c, l]``, ``l = 0..N−1``, shape ``(d, N)`` (without ``D``)."""
        a = torch.complex(-self.log_a_real.exp(), self.a_imag)  # (d, n)
        dt = self.log_dt.exp().unsqueeze(-1)  # (d, 1)
        dta = dt * a
        b = torch.view_as_complex(self.b.contiguous())
        c = torch.view_as_complex(self.c.contiguous())
        b_bar = torch.expm1(dta) / a * b  # zero-order hold
        ell = torch.arange(n_tokens, device=a.device, dtype=dt.dtype)
        vander = torch.exp(dta.unsqueeze(-1) * ell)  # Ā_k^l, (d, n, N)
        k = torch.einsum("dn,dnl->dl", c * b_bar, vander).real
        return 2.0 * k if self.init == "lin" else k

    def mixing_matrix(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        b, n, _ = x.shape
        k = self.kernel(n).to(x.dtype)
        i = torch.arange(n, device=x.device)
        lag = i[:, None] - i[None, :]
        m = k[:, lag.clamp(min=0)] * (lag >= 0)  # Toeplitz: M[c, i, j] = K[c, i − j]
        if self.d_skip:
            m = m + torch.diag_embed(self.d.to(x.dtype).unsqueeze(-1).expand(-1, n))
        return m.unsqueeze(0).expand(b, -1, -1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        n = x.shape[1]
        k = self.kernel(n).to(x.dtype)  # (d, N)
        u = x.transpose(1, 2)  # (b, d, N)
        size = 2 * n  # zero padding turns the circular FFT convolution into a causal linear one
        y = torch.fft.irfft(torch.fft.rfft(u, n=size) * torch.fft.rfft(k, n=size), n=size)[..., :n]
        if self.d_skip:
            y = y + self.d.to(x.dtype).unsqueeze(-1) * u
        return y.transpose(1, 2)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={self.d_state}, init={self.init!r}, d_skip={self.d_skip}"
