"""Constants and bounds of the guarantee: Theorem A (the paper's Theorem 4.1, reconstructed) and
Lemma B / Theorem C (ours), as executable functions. See the chapter "The guarantee".

Notation (theory reference §4). A λ-skip layer with the theory's row-wise normalisation is ::

    Z = λ Y + E,   E = M(Y) Y C_V,   Y⁺ = LN(Z),   LN(Z)_i = √d · z_i / ||z_i||

with ``Y`` of shape ``(N, d)`` whose rows all have norm √d (so ``||Y||_F² = N d``), and

* ``C_M >= ||M||_F`` (``√N`` for softmax attention, whose rows sum to one),
* ``S >= ||C_V||_2`` (spectral norm; ``S = 1`` for SSMs, where ``C_V = I``).

Every step of both proofs uses the two constants only through the product ``G = S·C_M`` (the
*gain*), because all they need is ``||E||_F <= S C_M ||Y||_F``. The functions below therefore take
``S`` and ``C_M`` separately (as the theorems are stated) and the margin checkers take the gain.

**Theorem A (paper, reconstructed).** For ``a ∈ (0, 1)`` and depth ``K``: if
``λ² > a (S C_M + |λ|)²`` and ``μ(Y⁰)² >= b = 2|λ| N d S C_M / (a^K (λ² − a (S C_M + |λ|)²))``
then ``μ(Y^k)² >= a^k μ(Y⁰)²`` for every ``k <= K``.

The paper's proof route divides by the normalisation's largest row scale; that step is false for the
row-wise normalisation (``Z = [[1, 0], [2, 0]]``), but the one-step inequality it serves is true:
``μ(LN(Z))²/(Nd) >= (μ(Y)²/(Nd) − 2h)/(1 + h)²`` with ``h = ||E||_F/(|λ|√(Nd))``, for any ``E`` such
that ``Z`` has no zero row (our proof, in the chapter; :func:`row_step_scalar_margin` is its last
two-number inequality). Theorem A's hypotheses do not exclude a zero row of ``Z`` (one row of ``E``
may cancel its skip term); the chapter shows such a layer. With the exact normalisation the theorem
therefore needs "no zero rows" as an extra hypothesis (or any rule sending a zero row to a row of norm √d).

**Theorem C (ours).** ``μ(Y⁺) >= μ(Y) − 2||E||_F/|λ| >= μ(Y) − 2 S C_M √(N d)/|λ|``; hence
``μ(Y^K) >= μ(Y⁰) − 2 K S C_M √(N d)/|λ|``.

Shapes in the checkers: ``y`` and ``e`` are ``(B, N, d)`` (a batch of B instances), ``lam`` and
``gain`` are scalars or ``(B,)``; every margin is returned as ``(B,)``. All proof checks are meant
to run in float64.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import pandas as pd
import torch
from torch import nn

from .._checks import check_choice, check_finite_real, check_positive_int, check_tokens
from ..metrics import mu
from ..norms import rms_normalize

__all__ = [
    "softmax_mixing_bound",
    "lambda_threshold",
    "max_rate",
    "theorem_a_b",
    "admissible_rate",
    "theorem_a_curve",
    "theorem_c_additive",
    "theorem_c_multiplicative_threshold",
    "theorem_c_lambda_for_target",
    "theorem_a_lambda_for_target",
    "compare_lambda_requirements",
    "measure_constants",
    "proof_margins",
    "PROOF_STEPS",
    "RELATIVE_STEPS",
    "row_step_scalar_margin",
    "INSTANCE_FAMILIES",
    "random_instance_params",
    "instance_from_params",
    "random_instances",
    "promised_fraction",
    "mixer_instances",
    "search_violation",
    "rowwise_stack_run",
    "random_stack_layers",
    "stack_margins",
    "bound_curve",
]


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------


def _nonneg(value, name: str, *, positive: bool = False) -> float:
    value = check_finite_real(value, name)
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (it is a norm bound), got {value}")
    return value


def _rate(a, name: str = "a") -> float:
    a = check_finite_real(a, name)
    if not 0 < a < 1:
        raise ValueError(f"{name} must lie in the open interval (0, 1), got {a}")
    return a


def _lam(lam, name: str = "lam") -> float:
    lam = check_finite_real(lam, name)
    if lam == 0:
        raise ValueError(f"{name} must be non-zero (the bounds divide by |λ|), got 0")
    return lam


def _fraction(value, name: str) -> float:
    value = check_finite_real(value, name)
    if not 0 < value <= 1:
        raise ValueError(f"{name} must lie in (0, 1], got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# constants and thresholds
# ----------------------------------------------------------------------------------------------


def softmax_mixing_bound(n_tokens: int) -> float:
    """``C_M = √N`` for softmax attention: each row of M is a probability vector, so its norm is
    at most 1 and ``||M||_F <= √N`` (equality when every row is one-hot)."""
    return math.sqrt(check_positive_int(n_tokens, "n_tokens"))


def lambda_threshold(*, S: float, C_M: float, a: float) -> float:
    """Theorem A's skip threshold: ``λ² > a (S C_M + |λ|)²`` holds exactly when
    ``|λ| > √a · S C_M / (1 − √a)``; returns that right-hand side.

    Example: N = 128, S = 1, C_M = √128, a = 0.9999 gives about 2.26·10⁵.
    """
    S, C_M, a = _nonneg(S, "S"), _nonneg(C_M, "C_M"), _rate(a)
    root = math.sqrt(a)
    return root * S * C_M / (1.0 - root)


def max_rate(lam: float, *, S: float, C_M: float) -> float:
    """The supremum of the rates a allowed by Theorem A's λ-condition, ``λ² / (S C_M + |λ|)²``.

    The condition is strict, so every ``a`` strictly below this value is admissible (as far as the
    λ-condition goes) and the value itself is not.
    """
    lam, S, C_M = _lam(lam), _nonneg(S, "S"), _nonneg(C_M, "C_M")
    return lam**2 / (S * C_M + abs(lam)) ** 2


def theorem_a_b(lam: float, *, S: float, C_M: float, a: float, K: int, N: int, d: int) -> float:
    """Theorem A's constant ``b = 2|λ| N d S C_M / (a^K (λ² − a (S C_M + |λ|)²))``.

    Raises:
        ValueError: bad arguments, or ``λ² <= a (S C_M + |λ|)²`` (then b is undefined: no rate a
        works for this λ; see :func:`lambda_threshold`).
    """
    lam, S, C_M, a = _lam(lam), _nonneg(S, "S"), _nonneg(C_M, "C_M"), _rate(a)
    K = check_positive_int(K, "K", minimum=0)
    N, d = check_positive_int(N, "N"), check_positive_int(d, "d")
    gap = lam**2 - a * (S * C_M + abs(lam)) ** 2
    if gap <= 0:
        raise ValueError(
            f"Theorem A needs lam² > a (S C_M + |lam|)², i.e. |lam| > {lambda_threshold(S=S, C_M=C_M, a=a):.6g} "
            f"for a={a}; got lam={lam}"
        )
    return 2 * abs(lam) * N * d * S * C_M / (a**K * gap)


def _admissible_rate_tensor(rho: torch.Tensor, m0: torch.Tensor, K: int, iters: int = 200) -> torch.Tensor:
    """Vectorised core of :func:`admissible_rate` in normalised variables.

    With ``ρ = S C_M/|λ|`` and ``m0 = μ(Y⁰)²/(N d)``, the two conditions of Theorem A read
    ``a (1+ρ)² < 1`` and ``f(a) = a^K (1 − a (1+ρ)²) >= 2ρ/m0``. ``f`` rises up to
    ``a* = K/((K+1)(1+ρ)²)`` and falls after it, so the admissible set is an interval whose right
    end we find by bisection on ``[a*, 1/(1+ρ)²]``. NaN where no rate is admissible.
    """
    rho, m0 = torch.as_tensor(rho, dtype=torch.float64), torch.as_tensor(m0, dtype=torch.float64)
    rho, m0 = torch.broadcast_tensors(rho, m0)
    top = 1.0 / (1.0 + rho) ** 2
    need = 2 * rho / m0.clamp_min(1e-300)

    def f(a):
        return a**K * (1 - a * (1 + rho) ** 2)

    lo = top * K / (K + 1) if K > 0 else torch.zeros_like(top)
    ok = (f(lo) >= need) & (m0 > 0)
    hi = top.clone()
    lo_b = lo.clone()
    for _ in range(iters):  # invariant: f(lo_b) >= need, f(hi) < need (f(top) = 0 < need when ρ > 0)
        mid = 0.5 * (lo_b + hi)
        good = f(mid) >= need
        lo_b = torch.where(good, mid, lo_b)
        hi = torch.where(good, hi, mid)
    out = torch.where(ok, lo_b, torch.full_like(lo_b, float("nan")))
    # ρ = 0 (no mixer): every a < 1 works.
    return torch.where(rho == 0, torch.full_like(out, 1.0), out)


def admissible_rate(
    lam: float,
    *,
    S: float,
    C_M: float,
    mu0: float | None = None,
    K: int | None = None,
    N: int | None = None,
    d: int | None = None,
) -> float:
    """The largest rate a that Theorem A admits for this λ.

    * Without ``mu0``: only the λ-condition is used, and the supremum :func:`max_rate` is returned
      (not attained: the condition is strict).
    * With ``mu0, K, N, d``: also ``μ(Y⁰)² >= b(a)``; returns the largest such a (to ~1e-15), or NaN
      when no a in (0, 1) satisfies both conditions (Theorem A then says nothing). Note that b
      blows up both as ``a → 0`` (through ``a^K``) and as ``a`` approaches :func:`max_rate`, so the
      admissible rates form an interval; this returns its right end, the strongest guarantee.
    """
    lam, S, C_M = _lam(lam), _nonneg(S, "S"), _nonneg(C_M, "C_M")
    if mu0 is None:
        return max_rate(lam, S=S, C_M=C_M)
    mu0 = _nonneg(mu0, "mu0")
    if K is None or N is None or d is None:
        raise ValueError("admissible_rate with mu0 also needs K, N and d")
    K = check_positive_int(K, "K", minimum=0)
    N, d = check_positive_int(N, "N"), check_positive_int(d, "d")
    rho = S * C_M / abs(lam)
    return float(_admissible_rate_tensor(torch.tensor(rho, dtype=torch.float64), torch.tensor(mu0**2 / (N * d), dtype=torch.float64), K))


def theorem_a_curve(mu0: float, *, a: float, K: int) -> torch.Tensor:
    """Theorem A's guarantee ``μ(Y^k) >= a^{k/2} μ(Y⁰)`` for ``k = 0..K``, shape ``(K+1,)`` (float64)."""
    mu0, a = _nonneg(mu0, "mu0"), _rate(a)
    K = check_positive_int(K, "K", minimum=0)
    return mu0 * a ** (torch.arange(K + 1, dtype=torch.float64) / 2)


def theorem_c_additive(mu0: float, *, K: int, lam: float, S: float, C_M: float, N: int, d: int) -> torch.Tensor:
    """Theorem C, additive form: ``μ(Y^k) >= μ(Y⁰) − 2 k S C_M √(N d)/|λ|`` for ``k = 0..K``.

    Returns ``(K+1,)`` float64 values, clipped below at 0 (μ is never negative, so a negative
    right-hand side says nothing).
    """
    mu0, lam, S, C_M = _nonneg(mu0, "mu0"), _lam(lam), _nonneg(S, "S"), _nonneg(C_M, "C_M")
    K = check_positive_int(K, "K", minimum=0)
    N, d = check_positive_int(N, "N"), check_positive_int(d, "d")
    k = torch.arange(K + 1, dtype=torch.float64)
    return (mu0 - 2 * k * S * C_M * math.sqrt(N * d) / abs(lam)).clamp_min(0.0)


def theorem_c_multiplicative_threshold(lam: float, *, S: float, C_M: float, N: int, d: int, a: float) -> float:
    """Theorem C, multiplicative form: ``μ(Y^{k+1}) >= √a μ(Y^k)`` whenever ``μ(Y^k)`` is at least
    the returned value ``2 S C_M √(N d) / (|λ| (1 − √a))``."""
    lam, S, C_M, a = _lam(lam), _nonneg(S, "S"), _nonneg(C_M, "C_M"), _rate(a)
    N, d = check_positive_int(N, "N"), check_positive_int(d, "d")
    return 2 * S * C_M * math.sqrt(N * d) / (abs(lam) * (1 - math.sqrt(a)))


def theorem_c_lambda_for_target(*, K: int, S: float, C_M: float, mu_tilde0: float, mu_tilde_target: float) -> float:
    """Smallest |λ| for which Theorem C guarantees ``μ̃(Y^K) >= mu_tilde_target``:
    ``2 K S C_M / (μ̃₀ − μ̃_target)`` (μ̃ = μ/√(N d), the normalised measure of a normalised stack)."""
    K = check_positive_int(K, "K")
    S, C_M = _nonneg(S, "S", positive=True), _nonneg(C_M, "C_M", positive=True)
    m0, mt = _fraction(mu_tilde0, "mu_tilde0"), _nonneg(mu_tilde_target, "mu_tilde_target")
    if mt >= m0:
        raise ValueError(f"mu_tilde_target must be < mu_tilde0={m0}, got {mt}")
    return 2 * K * S * C_M / (m0 - mt)


def theorem_a_lambda_for_target(
    *, K: int, S: float, C_M: float, mu_tilde0: float, mu_tilde_target: float, return_rate: bool = False
):
    """Smallest |λ| for which Theorem A guarantees ``μ̃(Y^K) >= mu_tilde_target``.

    Theorem A guarantees ``μ̃_K >= a^{K/2} μ̃₀``, so the target ``r = μ̃_target/μ̃₀`` needs
    ``a^K >= r²``, i.e. ``a >= r^{2/K}``, and both of its conditions must hold for such an a. In the
    normalised variables ``ρ = S C_M/|λ|`` these are ``a (1+ρ)² < 1`` and
    ``a^K (1 − a(1+ρ)²) >= 2ρ/μ̃₀²`` (N and d cancel). Feasibility shrinks as ρ grows, so the
    largest feasible ρ is found by bisection (on log ρ) and ``|λ| = S C_M/ρ``.

    Returns:
        ``|λ|_min`` (float), or ``(|λ|_min, a)`` with the rate used when ``return_rate``.
    """
    K = check_positive_int(K, "K")
    S, C_M = _nonneg(S, "S", positive=True), _nonneg(C_M, "C_M", positive=True)
    m0, mt = _fraction(mu_tilde0, "mu_tilde0"), _nonneg(mu_tilde_target, "mu_tilde_target")
    if not 0 < mt < m0:
        raise ValueError(f"mu_tilde_target must lie in (0, mu_tilde0={m0}), got {mt}")
    a_lo = (mt / m0) ** (2.0 / K)

    def best(rho: float):
        top = 1.0 / (1.0 + rho) ** 2
        if a_lo >= top:
            return None
        a = min(max(K / ((K + 1) * (1 + rho) ** 2), a_lo), top)
        f = a**K * (1 - a * (1 + rho) ** 2)
        return a if f >= 2 * rho / m0**2 else None

    lo, hi = -60.0, 5.0  # log ρ; ρ = e^-60 is feasible for any target < μ̃₀ reachable in float64
    if best(math.exp(lo)) is None:
        raise ValueError("target too close to mu_tilde0 to resolve in float64")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if best(math.exp(mid)) is not None:
            lo = mid
        else:
            hi = mid
    rho = math.exp(lo)
    lam_min = S * C_M / rho
    return (lam_min, best(rho)) if return_rate else lam_min


def compare_lambda_requirements(
    retentions: Sequence[float], *, K: int, N: int, S: float = 1.0, C_M: float | None = None, mu_tilde0: float = 1.0
) -> pd.DataFrame:
    """Table of the smallest |λ| each theorem needs to keep ``μ̃_K >= r μ̃₀`` for each retention r.

    ``C_M`` defaults to the softmax value √N. Columns: ``retention, mu_tilde_target, rate_a_A,
    lambda_A, lambda_C, ratio_A_over_C``.
    """
    K, N = check_positive_int(K, "K"), check_positive_int(N, "N")
    C_M = softmax_mixing_bound(N) if C_M is None else _nonneg(C_M, "C_M", positive=True)
    rows = []
    for r in retentions:
        r = _fraction(r, "retention")
        target = r * mu_tilde0
        lam_a, a = theorem_a_lambda_for_target(K=K, S=S, C_M=C_M, mu_tilde0=mu_tilde0, mu_tilde_target=target, return_rate=True)
        lam_c = theorem_c_lambda_for_target(K=K, S=S, C_M=C_M, mu_tilde0=mu_tilde0, mu_tilde_target=target)
        rows.append((r, target, a, lam_a, lam_c, lam_a / lam_c))
    return pd.DataFrame(rows, columns=["retention", "mu_tilde_target", "rate_a_A", "lambda_A", "lambda_C", "ratio_A_over_C"])


# ----------------------------------------------------------------------------------------------
# measured constants of mixers and stacks
# ----------------------------------------------------------------------------------------------


def _value_maps(mixer: nn.Module, dtype, device) -> torch.Tensor:
    """Probe ``C_V^h`` (shape ``(H, d, d)``) of a mixer whose output is ``Σ_h M_h X C_V^h``.

    ``values`` and ``combine`` must be linear maps; feeding the identity (d tokens e_1..e_d) through
    ``values`` and then through ``combine`` one head at a time reads the matrix off row by row.
    """
    d = mixer.d_model
    eye = torch.eye(d, dtype=dtype, device=device).unsqueeze(0)  # (1, d, d): d "tokens"
    vals = mixer.values(eye)  # (1, H, d, dv)
    maps = []
    for h in range(vals.shape[1]):
        only_h = torch.zeros_like(vals)
        only_h[:, h] = vals[:, h]
        maps.append(mixer.combine(only_h)[0])
    return torch.stack(maps)


@torch.no_grad()
def measure_constants(module: nn.Module, x: torch.Tensor, *, check: bool = True) -> dict:
    """Measure C_M, S and the gain of a mixer or of a λ-skip stack on a batch of inputs.

    Args:
        module: a :class:`~lambdaskip.mixers.TokenMixer` or a :class:`~lambdaskip.blocks.LambdaSkipStack`.
        x: ``(B, N, d)`` inputs; for a stack the constants are taken at every layer's actual input.
        check: verify that the mixer output equals ``Σ_h M_h X C_V^h`` (the form the theory needs).

    Returns:
        dict with ``C_M`` (sup of ``||M_h||_F`` over batch, heads and layers), ``S`` (max over layers
        of ``Σ_h ||C_V^h||_2``), ``gain_bound = S·C_M`` and ``gain`` (sup of ``||E||_F / ||Y||_F``, the
        constant the proofs actually use; always ``<= gain_bound``). These are suprema over the
        given batch, i.e. empirical estimates of the theorem's constants; for softmax attention
        ``C_M <= √N`` holds for every input.

    Raises:
        ValueError: the mixer is not of the form ``Σ_h M_h X C_V^h`` (e.g. gated).
    """
    check_tokens(x)
    if hasattr(module, "blocks"):
        ys = module(x, return_all=True)
        layers = [(blk.mixer, ys[k]) for k, blk in enumerate(module.blocks)]
    else:
        layers = [(module, x)]
    c_m, s_val, gain = 0.0, 0.0, 0.0
    for mixer, y in layers:
        m = mixer.mixing_matrix(y)  # (B, H, N, N)
        maps = _value_maps(mixer, y.dtype, y.device)  # (H, d, d)
        if check:
            rebuilt = torch.einsum("bhij,bjc,hce->bie", m, y, maps)
            out = mixer(y)
            tol = 1e-8 if y.dtype == torch.float64 else 1e-3
            err = float((rebuilt - out).abs().max() / out.abs().max().clamp_min(1e-30))
            if err > tol:
                raise ValueError(
                    f"mixer {type(mixer).__name__} is not of the form sum_h M_h X C_V^h (relative error {err:.2e}); "
                    "the theory's constants do not apply to it"
                )
        else:
            out = mixer(y)
        c_m = max(c_m, float(torch.linalg.matrix_norm(m).max()))
        s_val = max(s_val, float(torch.linalg.matrix_norm(maps, ord=2).sum()))
        gain = max(gain, float((torch.linalg.matrix_norm(out) / torch.linalg.matrix_norm(y)).max()))
    return {"C_M": c_m, "S": s_val, "gain_bound": c_m * s_val, "gain": gain}


# ----------------------------------------------------------------------------------------------
# the proof steps as margins (LHS − RHS; >= 0 means the inequality holds)
# ----------------------------------------------------------------------------------------------

PROOF_STEPS = {
    "A1": "μ(Z)² ≥ λ²μ(Y)² − 2|λ| μ(Y) ‖E‖_F",
    "A2_mixer": "‖E‖_F ≤ S C_M √(Nd)",
    "A2_mu": "μ(Y) ≤ √(Nd)",
    "A12": "μ(Z)² ≥ λ²μ(Y)² − 2|λ| N d S C_M",
    "A3_global": "μ(√(Nd) Z/‖Z‖_F)² ≥ μ(Z)²/(S C_M + |λ|)²",
    "A3_row_shortcut": "μ(LN(Z)) ≥ μ(Z) / max_i(‖z_i‖/√d)",
    "A3_row": "μ(LN(Z))² ≥ μ(Z)²/(S C_M + |λ|)²",
    "A_onestep_global": "μ(√(Nd) Z/‖Z‖_F)² ≥ (λ²μ(Y)² − 2|λ| N d S C_M)/(S C_M + |λ|)²",
    "A3_row_proj": "‖ū‖ ≥ q − h √(1 − q²) − 2h² (ū, q: mean token of Y, of LN(Z), over √d; h = ‖E‖_F/(|λ|√(Nd)))",
    "A_onestep_row_h": "μ(LN(Z))²/(Nd) ≥ (μ(Y)²/(Nd) − 2h)/(1 + h)², h = ‖E‖_F/(|λ|√(Nd))",
    "A_onestep_row": "μ(LN(Z))² ≥ (λ²μ(Y)² − 2|λ| N d S C_M)/(S C_M + |λ|)²",
    "A4_row": "μ(LN(Z))² ≥ a μ(Y)² for the largest a allowed by step 4",
    "B_unit": "‖u/‖u‖ − v/‖v‖‖ ≤ 2‖u − v‖/‖v‖ (rows u = z_i, v = λ y_i)",
    "B": "‖LN(z_i) − sgn(λ) y_i‖ ≤ 2‖e_i‖/|λ| for every row",
    "mu_lipschitz": "μ(LN(Z)) ≥ μ(sgn(λ) Y) − ‖LN(Z) − sgn(λ) Y‖_F",
    "C": "μ(LN(Z)) ≥ μ(Y) − 2‖E‖_F/|λ|",
    "C_const": "μ(LN(Z)) ≥ μ(Y) − 2 S C_M √(Nd)/|λ|",
}


def _as_batch(value, name: str, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        t = t.expand(like.shape[0])
    if t.shape != (like.shape[0],):
        raise ValueError(f"{name} must be a scalar or have shape (B,)=({like.shape[0]},), got {tuple(t.shape)}")
    return t


RELATIVE_STEPS = ("A1", "A_onestep_global", "A_onestep_row_h", "A_onestep_row", "A4_row", "B_unit", "B", "C", "C_const")


def proof_margins(
    y: torch.Tensor, e: torch.Tensor, lam, gain, *, steps: Sequence[str] | None = None, relative: bool = False
) -> dict:
    """Margins (left side minus right side) of every inequality of both proofs, per instance.

    Args:
        y: ``(B, N, d)`` layer inputs; every row must have norm √d (the output of the normalisation).
        e: ``(B, N, d)`` mixer outputs ``E = M Y C_V``.
        lam: λ, scalar or ``(B,)``, non-zero.
        gain: ``S·C_M``, scalar or ``(B,)``; the steps use the constants only through this product.
        steps: names from :data:`PROOF_STEPS` to compute (default all).
        relative: return scale-free margins for the steps in :data:`RELATIVE_STEPS` (the others are
            left out): the margin divided by the drop the bound allows, e.g. for a bound
            ``μ(Y⁺)² >= R`` it is ``(μ(Y⁺)² − R)/(μ(Y)² − R) = 1 − (fraction of the allowed drop used)``.
            It is 1 when nothing is lost (above 1 when μ grows), 0 when the bound is attained,
            < 0 on a violation, and huge where the bound allows (almost) no drop. Plain
            margins shrink to 0 whenever the mixer is weak against λ (both sides tend to μ(Y)²), so
            a search on them drifts to that trivial corner; the relative margin does not.

    Returns:
        dict step name → ``(B,)`` margin. Squared inequalities are divided by ``N d`` and unsquared
        ones by ``√(N d)`` (row inequalities by ``√d``), so margins of different sizes compare.
        A margin ``>= 0`` (up to rounding, ~1e-12 in float64) means the inequality holds.
    """
    if relative:
        wanted_rel = RELATIVE_STEPS if steps is None else [s for s in steps if s in RELATIVE_STEPS]
        if steps is not None and len(wanted_rel) != len(list(steps)):
            raise ValueError(f"relative margins exist only for {RELATIVE_STEPS}, got {list(steps)}")
        return _relative_margins(y, e, lam, gain, wanted_rel)
    check_tokens(y, "y")
    check_tokens(e, "e")
    if y.dim() != 3 or e.shape != y.shape:
        raise ValueError(f"y and e must both have shape (B, N, d); got {tuple(y.shape)} and {tuple(e.shape)}")
    n, d = y.shape[-2:]
    row_norms = y.norm(dim=-1)
    if not torch.allclose(row_norms, torch.full_like(row_norms, math.sqrt(d)), rtol=1e-6, atol=0):
        raise ValueError("y must have every row of norm sqrt(d) (apply rms_normalize(..., scale='sqrt_d') first)")
    lam = _as_batch(lam, "lam", y)
    gain = _as_batch(gain, "gain", y)
    if bool((lam == 0).any()):
        raise ValueError("lam must be non-zero in every instance")
    if bool((gain < 0).any()):
        raise ValueError("gain must be >= 0 (it is S·C_M)")
    wanted = set(PROOF_STEPS) if steps is None else set(steps)
    unknown = wanted - set(PROOF_STEPS)
    if unknown:
        raise ValueError(f"unknown steps {sorted(unknown)}; known: {list(PROOF_STEPS)}")

    nd = float(n * d)
    root = math.sqrt(nd)
    lam_abs = lam.abs()
    lam3 = lam[:, None, None]
    mu_y = mu(y)
    norm_e = torch.linalg.matrix_norm(e)
    z = lam3 * y + e
    mu_z = mu(z)
    c = gain + lam_abs
    rhs12 = lam**2 * mu_y**2 - 2 * lam_abs * nd * gain
    out = {}
    need_row = wanted & {"A3_row_shortcut", "A3_row", "A3_row_proj", "A_onestep_row_h", "A_onestep_row", "A4_row", "B",
                         "mu_lipschitz", "C", "C_const"}
    h = norm_e / (lam_abs * root)  # the tight constant: ||E||_F <= h |λ| √(Nd) with equality
    if need_row:
        ln_z = rms_normalize(z, scale="sqrt_d")
        mu_ln = mu(ln_z)
    if wanted & {"A3_global", "A_onestep_global"}:
        zg = root * z / torch.linalg.matrix_norm(z)[:, None, None]
        mu_g = mu(zg)
    if "A1" in wanted:
        out["A1"] = (mu_z**2 - (lam**2 * mu_y**2 - 2 * lam_abs * mu_y * norm_e)) / nd
    if "A2_mixer" in wanted:
        out["A2_mixer"] = (gain * root - norm_e) / root
    if "A2_mu" in wanted:
        out["A2_mu"] = (root - mu_y) / root
    if "A12" in wanted:
        out["A12"] = (mu_z**2 - rhs12) / nd
    if "A3_global" in wanted:
        out["A3_global"] = (mu_g**2 - mu_z**2 / c**2) / nd
    if "A3_row_shortcut" in wanted:
        shrink = (z.norm(dim=-1) / math.sqrt(d)).amax(dim=-1)
        out["A3_row_shortcut"] = (mu_ln - mu_z / shrink) / root
    if "A3_row" in wanted:
        out["A3_row"] = (mu_ln**2 - mu_z**2 / c**2) / nd
    if "A_onestep_global" in wanted:
        out["A_onestep_global"] = (mu_g**2 - rhs12 / c**2) / nd
    if "A3_row_proj" in wanted:
        p_bar = y.mean(dim=-2).norm(dim=-1) / math.sqrt(d)
        q_bar = ln_z.mean(dim=-2).norm(dim=-1) / math.sqrt(d)
        out["A3_row_proj"] = p_bar - (q_bar - h * (1 - q_bar**2).clamp_min(0).sqrt() - 2 * h**2)
    if "A_onestep_row_h" in wanted:
        out["A_onestep_row_h"] = mu_ln**2 / nd - (mu_y**2 / nd - 2 * h) / (1 + h) ** 2
    if "A_onestep_row" in wanted:
        out["A_onestep_row"] = (mu_ln**2 - rhs12 / c**2) / nd
    if "A4_row" in wanted:
        # Step 4: λ² > a c² and μ(Y)² ≥ 2|λ| N d G/(λ² − a c²) hold exactly for a ≤ rhs12/(c² μ(Y)²);
        # take the largest such a (0 when none is positive).
        a = torch.where(mu_y > 0, rhs12 / (c**2 * mu_y.clamp_min(1e-300) ** 2), torch.zeros_like(mu_y)).clamp_min(0)
        out["A4_row"] = (mu_ln**2 - a * mu_y**2) / nd
    if "B_unit" in wanted:
        u, v = z, lam3 * y
        lhs = (u / u.norm(dim=-1, keepdim=True) - v / v.norm(dim=-1, keepdim=True)).norm(dim=-1)
        rhs = 2 * (u - v).norm(dim=-1) / v.norm(dim=-1)
        out["B_unit"] = (rhs - lhs).amin(dim=-1)
    sgn_y = torch.sign(lam3) * y
    if "B" in wanted:
        lhs = (ln_z - sgn_y).norm(dim=-1)
        rhs = 2 * e.norm(dim=-1) / lam_abs[:, None]
        out["B"] = ((rhs - lhs) / math.sqrt(d)).amin(dim=-1)
    if "mu_lipschitz" in wanted:
        out["mu_lipschitz"] = (mu_ln - (mu(sgn_y) - torch.linalg.matrix_norm(ln_z - sgn_y))) / root
    if "C" in wanted:
        out["C"] = (mu_ln - (mu_y - 2 * norm_e / lam_abs)) / root
    if "C_const" in wanted:
        out["C_const"] = (mu_ln - (mu_y - 2 * gain * root / lam_abs)) / root
    return {k: out[k] for k in PROOF_STEPS if k in out}


def _relative_margins(y, e, lam, gain, steps) -> dict:
    """Margins divided by the drop each bound allows (see :func:`proof_margins`)."""
    plain = proof_margins(y, e, lam, gain, steps=steps)
    n, d = y.shape[-2:]
    nd, root = float(n * d), math.sqrt(n * d)
    lam = _as_batch(lam, "lam", y)
    gain = _as_batch(gain, "gain", y)
    lam_abs = lam.abs()
    mu_y = mu(y)
    norm_e = torch.linalg.matrix_norm(e)
    c = gain + lam_abs
    rhs12 = lam**2 * mu_y**2 - 2 * lam_abs * nd * gain
    h_tight = norm_e / (lam_abs * root)
    tiny = torch.finfo(y.dtype).tiny
    allowed = {
        "A1": 2 * lam_abs * mu_y * norm_e / nd,
        "A_onestep_global": (mu_y**2 - rhs12 / c**2) / nd,
        "A_onestep_row": (mu_y**2 - rhs12 / c**2) / nd,
        "A_onestep_row_h": mu_y**2 / nd - (mu_y**2 / nd - 2 * h_tight) / (1 + h_tight) ** 2,
        "C": 2 * norm_e / (lam_abs * root),
        "C_const": 2 * gain / lam_abs,
    }
    out = {}
    for step in steps:
        if step in ("B", "B_unit"):
            # the row bound's right-hand side is the allowed drop itself; margin/rhs = 1 − lhs/rhs
            z = lam[:, None, None] * y + e
            if step == "B":
                rhs = 2 * e.norm(dim=-1) / (lam_abs[:, None] * math.sqrt(d))
                lhs = (rms_normalize(z, scale="sqrt_d") - torch.sign(lam)[:, None, None] * y).norm(dim=-1) / math.sqrt(d)
            else:
                v = lam[:, None, None] * y
                lhs = (z / z.norm(dim=-1, keepdim=True) - v / v.norm(dim=-1, keepdim=True)).norm(dim=-1)
                rhs = 2 * e.norm(dim=-1) / v.norm(dim=-1)
            out[step] = ((rhs - lhs) / rhs.clamp_min(tiny)).amin(dim=-1)
        elif step == "A4_row":
            a = torch.where(mu_y > 0, rhs12 / (c**2 * mu_y.clamp_min(tiny) ** 2), torch.zeros_like(mu_y)).clamp_min(0)
            out[step] = plain[step] / ((1 - a) * mu_y**2 / nd).clamp_min(tiny)
        else:
            out[step] = plain[step] / allowed[step].clamp_min(tiny)
    return out


def row_step_scalar_margin(h, alpha) -> torch.Tensor:
    """The last inequality of our proof of the row-wise one-step bound, as a function of two numbers.

    With ``q = cos α`` (norm of the mean of the normalised output tokens), ``s = sin α`` (so
    ``s² = μ(Y⁺)²/(Nd)``), ``h = ||E||_F/(|λ|√(Nd))`` and ``L = q − h s − 2h²``, returns
    ``D = s²(1+h)² + 2h − 1 + max(L, 0)²``. For ``0 <= h <= 1/2`` and ``α ∈ [0, π/2]`` the proof shows
    ``D >= (3/2 − √2)·h ≈ 0.0858·h`` where ``L >= 0`` and ``D > 0`` where ``L < 0`` (``D >= 0`` is what
    the one-step bound needs; the linear rate on the branch ``L < 0`` is only measured). Broadcasts like torch.
    """
    h = torch.as_tensor(h, dtype=torch.float64)
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    q, s = torch.cos(alpha), torch.sin(alpha)
    low = (q - h * s - 2 * h**2).clamp_min(0)
    return s**2 * (1 + h) ** 2 + 2 * h - 1 + low**2


# ----------------------------------------------------------------------------------------------
# instances: random, from mixers, and adversarial search
# ----------------------------------------------------------------------------------------------

INSTANCE_FAMILIES = {
    "general": "M any N×N matrix, C_V any d×d matrix; C_M = ‖M‖_F, S = ‖C_V‖_2",
    "stochastic": "M row-stochastic (softmax of free logits, attention-like), C_V any; C_M = ‖M‖_F, S = ‖C_V‖_2",
    "ssm": "Assumption 4.1 selective SSM: M = L_α ∘ (Y W Yᵀ), C_V = I; C_M = ‖M‖_F, S = 1",
    "free": "E any N×d matrix (every mixer at once); gain = ‖E‖_F/√(Nd), the smallest step 2 allows",
}


def random_instance_params(family: str, batch: int, n: int, d: int, *, generator: torch.Generator) -> dict:
    """Random raw parameters of ``batch`` layer instances of one family (float64).

    Spreads every factor over orders of magnitude so the check sees many regimes: the input's
    collapse (a random shared offset is added to the tokens before normalising), |λ| in
    [1e-2, 1e3] with a random sign, the mixer's scale in [1e-2, 1e2], and for the SSM the decay
    α in (0, 1). Feed the result to :func:`instance_from_params`.
    """
    check_choice(family, "family", INSTANCE_FAMILIES)
    b, n, d = check_positive_int(batch, "batch"), check_positive_int(n, "n"), check_positive_int(d, "d")
    g = dict(generator=generator, dtype=torch.float64)

    def logu(lo, hi, shape):
        return 10 ** (lo + (hi - lo) * torch.rand(shape, **g))

    offset = 3 * torch.rand(b, 1, 1, **g) * torch.randn(b, 1, d, **g)
    p = {
        "y_raw": torch.randn(b, n, d, **g) + offset,
        "log_lam": torch.log(logu(-2, 3, (b,))),
        "lam_sign": torch.where(torch.rand(b, **g) < 0.5, -1.0, 1.0).to(torch.float64),
    }
    if family == "general":
        p["m"] = torch.randn(b, n, n, **g) * logu(-2, 1, (b, 1, 1)) / math.sqrt(n)
        p["c_v"] = torch.randn(b, d, d, **g) * logu(-1, 1, (b, 1, 1)) / math.sqrt(d)
    elif family == "stochastic":
        p["logits"] = torch.randn(b, n, n, **g) * logu(-1, 1.5, (b, 1, 1))
        p["c_v"] = torch.randn(b, d, d, **g) * logu(-1, 1, (b, 1, 1)) / math.sqrt(d)
    elif family == "ssm":
        p["w"] = torch.randn(b, d, d, **g) * logu(-2, 0.5, (b, 1, 1)) / d
        p["alpha_logit"] = 3 * torch.randn(b, **g)
    else:
        p["e"] = torch.randn(b, n, d, **g) * logu(-2, 2, (b, 1, 1))
    return p


def instance_from_params(family: str, params: dict) -> tuple:
    """Turn raw parameters into a layer instance ``(y, e, lam, gain)`` (differentiable).

    ``y = LN(y_raw)`` (rows of norm √d), ``lam = sign · exp(log_lam)`` with ``log_lam`` clipped to
    [−12, 12] (an optimiser may push it anywhere), ``e = M(y) y C_V`` and ``gain = C_M · S`` with
    the tightest constants of that instance, ``C_M = ‖M‖_F`` and ``S = ‖C_V‖_2``.
    """
    check_choice(family, "family", INSTANCE_FAMILIES)
    y = rms_normalize(params["y_raw"], scale="sqrt_d")
    n, d = y.shape[-2:]
    lam = params["lam_sign"] * params["log_lam"].clamp(-12, 12).exp()
    if family in ("general", "stochastic"):
        m = params["m"] if family == "general" else params["logits"].softmax(dim=-1)
        c_v = params["c_v"]
        e = m @ y @ c_v
        gain = torch.linalg.matrix_norm(m) * torch.linalg.matrix_norm(c_v, ord=2)
    elif family == "ssm":
        alpha = torch.sigmoid(params["alpha_logit"])
        steps = torch.arange(n, dtype=y.dtype, device=y.device)
        diff = steps[:, None] - steps[None, :]
        # L_α[i, j] = α^{i−j} for j ≤ i, 0 above the diagonal (causal).
        mask = torch.where(diff >= 0, alpha[:, None, None] ** diff.clamp_min(0), torch.zeros((), dtype=y.dtype))
        m = mask * (y @ params["w"] @ y.transpose(-1, -2))
        e = m @ y
        gain = torch.linalg.matrix_norm(m)
    else:
        e = params["e"]
        gain = torch.linalg.matrix_norm(e) / math.sqrt(n * d)
    return y, e, lam, gain


def promised_fraction(y, e, lam, gain, *, step: str = "A_onestep_row") -> torch.Tensor:
    """How much a one-step bound promises to keep, per instance ``(B,)``: ``R/μ(Y)²`` for
    Theorem A's one-step bound ``μ(Y⁺)² >= R`` (steps ``A_onestep_row``/``A_onestep_global``),
    ``R/μ(Y)`` for Theorem C's ``μ(Y⁺) >= R`` (``C``, ``C_const``). ``<= 0`` means the bound is empty."""
    n, d = y.shape[-2:]
    nd = float(n * d)
    lam = _as_batch(lam, "lam", y)
    gain = _as_batch(gain, "gain", y)
    mu_y = mu(y).clamp_min(torch.finfo(y.dtype).tiny)
    if step in ("A_onestep_row", "A_onestep_global"):
        rhs = (lam**2 * mu_y**2 - 2 * lam.abs() * nd * gain) / (gain + lam.abs()) ** 2
        return rhs / mu_y**2
    if step == "A_onestep_row_h":
        h = torch.linalg.matrix_norm(e) / (lam.abs() * math.sqrt(nd))
        return (mu_y**2 / nd - 2 * h) / ((1 + h) ** 2 * mu_y**2 / nd)
    if step == "C":
        return 1 - 2 * torch.linalg.matrix_norm(e) / (lam.abs() * mu_y)
    if step == "C_const":
        return 1 - 2 * gain * math.sqrt(nd) / (lam.abs() * mu_y)
    raise ValueError(f"step must be A_onestep_row, A_onestep_row_h, A_onestep_global, C or C_const, got {step!r}")


def random_instances(family: str, batch: int, n: int, d: int, *, generator: torch.Generator) -> tuple:
    """``instance_from_params(family, random_instance_params(...))``: ``(y, e, lam, gain)``."""
    return instance_from_params(family, random_instance_params(family, batch, n, d, generator=generator))


@torch.no_grad()
def mixer_instances(mixer: nn.Module, x: torch.Tensor, lam) -> tuple:
    """Layer instances ``(y, e, lam, gain)`` from a real mixer on inputs ``x`` of shape ``(B, N, d)``.

    ``y = LN(x)``, ``e = mixer(y)`` and ``gain = ||M(y)||_F · S`` per instance, with M the largest-norm
    head and S probed as in :func:`measure_constants` (the mixer must be ``Σ_h M_h X C_V^h``).
    """
    y = rms_normalize(check_tokens(x), scale="sqrt_d")
    m = mixer.mixing_matrix(y)
    s_val = float(torch.linalg.matrix_norm(_value_maps(mixer, y.dtype, y.device), ord=2).sum())
    gain = torch.linalg.matrix_norm(m).amax(dim=-1) * s_val
    return y, mixer(y), _as_batch(lam, "lam", y), gain


def search_violation(
    step: str,
    family: str,
    *,
    n: int,
    d: int,
    batch: int = 64,
    iters: int = 100,
    lr: float = 0.05,
    seed: int = 0,
    relative: bool = False,
    promise: float | None = None,
) -> dict:
    """Try to violate one proof step by gradient descent on its margin (Adam, float64).

    Starts from :func:`random_instance_params` and lets Adam move every raw parameter (the tokens,
    the mixing matrix or its logits, C_V, λ) to make the margin as small as possible; the
    constants are recomputed at every step as the tightest ones of the current instance, so the
    search cannot win by loosening them.

    With ``relative=True`` it minimises the scale-free margin of :func:`proof_margins` instead.
    Both kinds of margin also go to 0 in corners where a bound promises nothing (λ → 0 makes the
    right-hand side of Theorem A's one-step bound ≤ 0). ``promise=p`` (for the steps
    ``A_onestep_row``, ``A_onestep_global``, ``C``, ``C_const``) keeps the search where the bound
    promises to keep at least the fraction ``p`` of ``μ(Y)²`` (of ``μ(Y)`` for C): instances that
    leave this region are pushed back by a penalty and do not count as "worst".

    Returns:
        dict with ``worst`` (the smallest margin seen over all iterations and instances),
        ``instance`` (``(y, e, lam, gain)`` of that instance, detached, batch of one) and
        ``history`` (smallest margin per iteration, a list).
    """
    if step not in PROOF_STEPS:
        raise ValueError(f"step must be one of {list(PROOF_STEPS)}, got {step!r}")
    check_positive_int(iters, "iters", minimum=0)
    generator = torch.Generator().manual_seed(seed)
    params = random_instance_params(family, batch, n, d, generator=generator)
    fixed = {"lam_sign"}
    leaves = {k: v.clone().requires_grad_(k not in fixed) for k, v in params.items()}
    opt = torch.optim.Adam([v for k, v in leaves.items() if k not in fixed], lr=lr)
    worst, best_inst, history = math.inf, None, []
    if promise is not None and step not in ("A_onestep_row", "A_onestep_row_h", "A_onestep_global", "C", "C_const"):
        raise ValueError(f"promise applies to the steps A_onestep_row(_h), A_onestep_global, C, C_const; got {step!r}")
    for it in range(iters + 1):
        inst = instance_from_params(family, leaves)
        margin = proof_margins(*inst, steps=[step], relative=relative)[step]
        if promise is not None:
            frac = promised_fraction(*inst, step=step)
            inside = frac >= promise
            objective = torch.where(inside, margin, 1.0 + (promise - frac))
            margin = objective
            tracked = torch.where(inside, margin.detach(), torch.full_like(margin.detach(), math.inf))
        else:
            objective = margin
            tracked = margin.detach()
        low, idx = tracked.min(dim=0)
        history.append(float(low))
        if float(low) < worst:
            worst = float(low)
            best_inst = tuple(t.detach()[idx : idx + 1].clone() for t in inst)
        if it == iters:
            break
        opt.zero_grad()
        objective.sum().backward()
        with torch.no_grad():  # a diverging coordinate must not end the search with NaN
            for v in leaves.values():
                if v.grad is not None:
                    v.grad.nan_to_num_(0.0, 0.0, 0.0)
        opt.step()
    return {"worst": worst, "instance": best_inst, "history": history}


# ----------------------------------------------------------------------------------------------
# deep stacks: the induction (step 5) and the bound curves
# ----------------------------------------------------------------------------------------------


def rowwise_stack_run(y0: torch.Tensor, layers: Sequence[Callable], lam) -> tuple:
    """Run ``Y^{k+1} = LN(λ Y^k + E^k)`` with ``E^k, G^k = layers[k](Y^k)``.

    Args:
        y0: ``(B, N, d)`` with rows of norm √d.
        layers: callables ``y -> (e, gain)`` with ``e`` of shape ``(B, N, d)`` and ``gain`` ``(B,)``.
        lam: λ, scalar or ``(B,)``.

    Returns:
        ``(ys, es, gains)``: ``(K+1, B, N, d)``, ``(K, B, N, d)``, ``(K, B)``.
    """
    check_tokens(y0, "y0")
    lam = _as_batch(lam, "lam", y0)[:, None, None]
    ys, es, gains = [y0], [], []
    for layer in layers:
        e, g = layer(ys[-1])
        es.append(e)
        gains.append(g)
        ys.append(rms_normalize(lam * ys[-1] + e, scale="sqrt_d"))
    return torch.stack(ys), torch.stack(es), torch.stack(gains)


def random_stack_layers(family: str, depth: int, batch: int, n: int, d: int, *, scale, generator: torch.Generator) -> list:
    """``depth`` random layers of one family (``"general"``, ``"stochastic"`` or ``"ssm"``) for
    :func:`rowwise_stack_run`; each a callable ``y -> (e, gain)`` with gain the tightest ``C_M·S``.

    ``scale`` (scalar or ``(B,)``) multiplies C_V (general, stochastic) or W (ssm), setting the
    mixer's strength relative to λ. Attention-like layers compute ``M = softmax(Y W Yᵀ/√d)`` from the
    layer input, the SSM layers ``M = L_α ∘ (Y W Yᵀ)``: both depend on Y, as real mixers do.
    """
    check_choice(family, "family", ("general", "stochastic", "ssm"))
    check_positive_int(depth, "depth")
    g = dict(generator=generator, dtype=torch.float64)
    scale = torch.as_tensor(scale, dtype=torch.float64).reshape(-1, 1, 1)
    layers = []
    for _ in range(depth):
        if family == "general":
            m = torch.randn(batch, n, n, **g) / math.sqrt(n)
            c_v = scale * torch.randn(batch, d, d, **g) / math.sqrt(d)

            def layer(y, m=m, c_v=c_v):
                return m @ y @ c_v, torch.linalg.matrix_norm(m) * torch.linalg.matrix_norm(c_v, ord=2)

        elif family == "stochastic":
            w = torch.randn(batch, d, d, **g) / math.sqrt(d)
            c_v = scale * torch.randn(batch, d, d, **g) / math.sqrt(d)

            def layer(y, w=w, c_v=c_v):
                m = (y @ w @ y.transpose(-1, -2) / math.sqrt(d)).softmax(dim=-1)
                return m @ y @ c_v, torch.linalg.matrix_norm(m) * torch.linalg.matrix_norm(c_v, ord=2)

        else:
            w = scale * torch.randn(batch, d, d, **g) / d
            alpha = torch.rand(batch, 1, 1, **g)
            steps = torch.arange(n, dtype=torch.float64)
            diff = steps[:, None] - steps[None, :]
            mask = torch.where(diff >= 0, alpha ** diff.clamp_min(0), torch.zeros((), dtype=torch.float64))

            def layer(y, w=w, mask=mask):
                m = mask * (y @ w @ y.transpose(-1, -2))
                return m @ y, torch.linalg.matrix_norm(m)

        layers.append(layer)
    return layers


def stack_margins(ys: torch.Tensor, es: torch.Tensor, gains: torch.Tensor, lam) -> dict:
    """Depth-level checks (step 5 of Theorem A, and Theorem C over K layers) per instance.

    With ``G = max_k gains[k]`` (the theorem's ``S C_M``, a supremum over the layers actually run),
    ``a`` the largest rate Theorem A admits (:func:`admissible_rate`) and ``μ_k = μ(Y^k)``:

    * ``A_depth``: ``min_{1<=k<=K} (μ_k² − a^k μ_0²)/(N d)`` (NaN where Theorem A does not apply);
    * ``C_depth``: ``min_{1<=k<=K} (μ_k − (μ_0 − 2 k G √(Nd)/|λ|))/√(Nd)``;
    * ``C_depth_chained``: ``min_k (μ_k − (μ_0 − Σ_{j<k} 2‖E^j‖_F/|λ|))/√(Nd)`` (the one-step
      form of Theorem C chained with the measured ``‖E^j‖``).

    Also returns ``rate`` (the a used, ``(B,)``). Shapes: ``ys (K+1, B, N, d)``, ``es (K, B, N, d)``,
    ``gains (K, B)``.
    """
    k1, b, n, d = ys.shape
    depth = k1 - 1
    nd = n * d
    lam = _as_batch(lam, "lam", ys[0]).abs()
    mus = mu(ys)  # (K+1, B)
    gain = gains.amax(dim=0)
    rate = _admissible_rate_tensor(gain / lam, mus[0] ** 2 / nd, depth)
    ks = torch.arange(k1, dtype=ys.dtype)[:, None]
    # layers 1..K only: at k = 0 every bound is an equality and would make every margin 0
    a_depth = ((mus**2 - rate[None] ** ks * mus[0] ** 2) / nd)[1:].amin(dim=0)
    c_depth = ((mus - (mus[0] - 2 * ks * gain * math.sqrt(nd) / lam)) / math.sqrt(nd))[1:].amin(dim=0)
    spent = torch.cumsum(2 * torch.linalg.matrix_norm(es) / lam, 0)
    chained = ((mus[1:] - (mus[0] - spent)) / math.sqrt(nd)).amin(dim=0)
    return {"A_depth": a_depth, "C_depth": c_depth, "C_depth_chained": chained, "rate": rate}


@torch.no_grad()
def bound_curve(stack: nn.Module, x: torch.Tensor, *, C_M: float | None = None, S: float | None = None) -> pd.DataFrame:
    """The measured μ̃ of a λ-skip stack against both theorems' guarantees, layer by layer.

    The stack must be post-norm with the theory's normalisation (``norm="rms"``, √d scale) and one
    λ for all layers. C_M and S default to the suprema measured on ``x`` (:func:`measure_constants`);
    pass the analytic values (e.g. ``C_M = √N`` for softmax attention) for a bound valid on every input.

    Args:
        stack: a :class:`~lambdaskip.blocks.LambdaSkipStack` of K blocks.
        x: ``(B, N, d)`` inputs.

    Returns:
        Long data frame, one row per (layer, input): ``layer, input, mu_tilde`` (measured),
        ``theorem_a`` (``a^{k/2} μ̃_0`` with the largest admissible a; NaN where Theorem A says
        nothing), ``theorem_c`` (``max(0, μ̃_0 − 2 k S C_M/|λ|)``) and ``theorem_c_chained``
        (``μ̃_0 − Σ_{j<k} 2‖E^j‖_F/(|λ|√(Nd))``, clipped at 0). ``df.attrs`` holds ``C_M, S, gain, lam, rate``.
    """
    check_tokens(x)
    blocks = list(stack.blocks)
    for blk in blocks:
        if blk.norm_kind != "rms" or blk.norm_position != "post" or getattr(blk.norm, "scale", None) != "sqrt_d":
            raise ValueError("bound_curve needs post-norm blocks with norm='rms' and norm_scale='sqrt_d' (the theory's layer)")
    lams = {float(blk.lam) for blk in blocks}
    if len(lams) != 1:
        raise ValueError(f"bound_curve needs one λ for all layers, got {sorted(lams)}")
    lam = lams.pop()
    if lam == 0:
        raise ValueError("bound_curve needs lam != 0 (both theorems divide by |λ|)")
    consts = measure_constants(stack, x)
    c_m = consts["C_M"] if C_M is None else _nonneg(C_M, "C_M")
    s_val = consts["S"] if S is None else _nonneg(S, "S")
    ys = stack(x, return_all=True)
    depth, (b, n, d) = len(blocks), x.shape
    nd = n * d
    mus = mu(ys) / math.sqrt(nd)  # rows have norm √d, so μ̃ = μ/√(Nd)
    rate = _admissible_rate_tensor(torch.full((b,), s_val * c_m / abs(lam), dtype=torch.float64), mus[0].double() ** 2, depth)
    ks = torch.arange(depth + 1, dtype=torch.float64)[:, None]
    theorem_a = mus[0].double()[None] * rate[None] ** (ks / 2)
    theorem_c = (mus[0].double()[None] - 2 * ks * s_val * c_m / abs(lam)).clamp_min(0)
    es = torch.stack([blk.mixer(ys[k]) for k, blk in enumerate(blocks)])
    spent = torch.cat([torch.zeros(1, b, dtype=torch.float64), torch.cumsum(2 * torch.linalg.matrix_norm(es).double() / (abs(lam) * math.sqrt(nd)), 0)])
    chained = (mus[0].double()[None] - spent).clamp_min(0)
    rows = []
    for k in range(depth + 1):
        for i in range(b):
            rows.append((k, i, float(mus[k, i]), float(theorem_a[k, i]), float(theorem_c[k, i]), float(chained[k, i])))
    df = pd.DataFrame(rows, columns=["layer", "input", "mu_tilde", "theorem_a", "theorem_c", "theorem_c_chained"])
    df.attrs.update({"C_M": c_m, "S": s_val, "gain": consts["gain"], "lam": lam, "rate": rate.tolist()})
    return df
