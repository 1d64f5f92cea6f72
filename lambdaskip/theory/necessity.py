"""Is the skip necessary? Executable pieces of the necessity chapter (theory reference §5).

Three groups of functions, all float64-friendly and batched over leading axes:

* **Consensus** (the mechanism behind collapse without a skip):
  :func:`ergodicity_coefficient` τ(M), :func:`token_diameter`, :func:`consensus_bound`
  (``1 − N·min_ij M_ij``), :func:`random_stochastic_matrix` (test instances) and
  :func:`search_consensus_violation` (an optimiser that tries to break the consensus lemma).
* **The Assumption-4.1 selective SSM built from matrices**: :func:`assumption41_mixing_matrix`
  ``M = L_α ∘ (Y G Yᵀ)`` and :func:`assumption41_stack` (a deep stack ``Y⁺ = N(λY + M(Y)Y)``), and the
  **2-token, 2-dimensional example** on top of it: :func:`two_token_kappa`, :func:`two_token_angle_map`,
  :func:`two_token_angle_after` (closed form), :func:`two_token_initial`, :func:`two_token_simulate`,
  :func:`token_angle`, :func:`two_token_regime`, :func:`two_token_c_m`, :func:`two_token_rate`.
* **Decay fits**: :func:`fit_exponential_decay` (``log v`` linear in depth),
  :func:`fit_doubly_exponential_decay` (``log(−log v)`` linear in depth) and :func:`fit_decay_order`
  (the order p of ``v_{k+1} ≈ c v_k^p`` from successive log-decrements), returning a :class:`DecayFit`.

Glossary: ``N`` tokens, ``d`` channels, ``α`` the fixed scalar decay of Assumption 4.1, ``G = W_C W_Bᵀ``
(d×d), ``λ`` the skip strength, ``r²`` the squared row norm after normalisation (1 for
``scale="unit"``, d for ``scale="sqrt_d"``), ``κ`` the 2-token contraction factor, ``θ`` the angle between
the two tokens (in ``[0, π]``).

Why the SSM is built here from matrices: the 2-token example needs ``W_B = W_C = I`` exactly and no
discretisation step, which is simplest to state as the formula ``M = L_α ∘ (Y G Yᵀ)`` itself. The
package's SSD mixer (``make_mixer("ssd", fixed_decay=α)``) realises the same matrix with learned
``W_B, W_C``; the tests cross-check the two when it is available.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .._checks import check_choice, check_finite_real, check_positive_int, check_tokens
from ..norms import rms_normalize

__all__ = [
    "ergodicity_coefficient",
    "token_diameter",
    "consensus_bound",
    "random_stochastic_matrix",
    "search_consensus_violation",
    "decay_mask",
    "assumption41_mixing_matrix",
    "assumption41_stack",
    "two_token_kappa",
    "two_token_boundaries",
    "two_token_angle_map",
    "two_token_angle_after",
    "two_token_initial",
    "two_token_simulate",
    "token_angle",
    "two_token_mu_tilde",
    "TWO_TOKEN_REGIMES",
    "two_token_regime",
    "two_token_c_m",
    "two_token_rate",
    "DecayFit",
    "fit_exponential_decay",
    "fit_doubly_exponential_decay",
    "fit_decay_order",
]

_SCALES = ("unit", "sqrt_d")


# --------------------------------------------------------------------------------------------------
# Consensus: the ergodicity coefficient
# --------------------------------------------------------------------------------------------------
def _check_square(m, name: str = "m") -> torch.Tensor:
    check_tokens(m, name)
    if m.shape[-1] != m.shape[-2]:
        raise ValueError(f"{name} must have shape (..., N, N) (square in the last two axes), got {tuple(m.shape)}")
    return m


def ergodicity_coefficient(m: torch.Tensor) -> torch.Tensor:
    """Dobrushin's ergodicity coefficient ``τ(M) = ½ max_{i,i'} Σ_j |M_ij − M_i'j|``.

    Args:
        m: ``(..., N, N)``; usually row-stochastic (rows sum to 1), where
            ``τ(M) = 1 − min_{i,i'} Σ_j min(M_ij, M_i'j) ∈ [0, 1]``.

    Returns:
        ``(...)``. τ = 0 exactly when all rows are equal (M averages every token to the same point).
    """
    _check_square(m)
    diff = (m.unsqueeze(-2) - m.unsqueeze(-3)).abs().sum(-1)  # (..., N, N): ℓ1 distance of rows i, i'
    return 0.5 * diff.amax(dim=(-2, -1))


def token_diameter(y: torch.Tensor) -> torch.Tensor:
    """``max_{i,i'} ‖y_i − y_i'‖₂`` over the tokens (rows) of ``y`` of shape ``(..., N, d)``; returns ``(...)``."""
    check_tokens(y, "y")
    diff = y.unsqueeze(-2) - y.unsqueeze(-3)  # (..., N, N, d)
    return diff.pow(2).sum(-1).amax(dim=(-2, -1)).sqrt()


def consensus_bound(m: torch.Tensor) -> torch.Tensor:
    """The consensus lemma's bound ``1 − N ε`` with ``ε = min_ij M_ij``, for ``m`` of shape ``(..., N, N)``.

    For row-stochastic M, ``τ(M) ≤ consensus_bound(M)``; it is < 1 exactly when every entry is positive.
    """
    _check_square(m)
    n = m.shape[-1]
    return 1.0 - n * m.amin(dim=(-2, -1))


def random_stochastic_matrix(
    batch: int,
    n: int,
    *,
    min_entry: float = 0.0,
    concentration: float = 1.0,
    seed: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Random row-stochastic matrices with every entry ``≥ min_entry``.

    Each row is ``min_entry + (1 − n·min_entry) · p`` with ``p`` Dirichlet(``concentration``): small
    concentrations give spiky rows (the hard cases for the lemma), large ones nearly uniform rows.
    Drawn with NumPy's ``default_rng(seed)`` (torch's Gamma sampler takes no generator).

    Returns:
        ``(batch, n, n)`` in ``dtype``.
    """
    check_positive_int(batch, "batch")
    check_positive_int(n, "n")
    min_entry = check_finite_real(min_entry, "min_entry")
    if not 0.0 <= min_entry <= 1.0 / n:
        raise ValueError(f"min_entry must lie in [0, 1/n] = [0, {1.0 / n}], got {min_entry}")
    concentration = check_finite_real(concentration, "concentration")
    if concentration <= 0:
        raise ValueError(f"concentration must be > 0, got {concentration}")
    p = np.random.default_rng(seed).dirichlet(np.full(n, concentration), size=(batch, n))
    p = torch.as_tensor(p, dtype=dtype)
    return min_entry + (1.0 - n * min_entry) * p


def search_consensus_violation(
    n: int = 4,
    d: int = 3,
    *,
    restarts: int = 8,
    steps: int = 200,
    lr: float = 0.05,
    seed: int = 0,
) -> dict:
    """Gradient search for a counterexample to the consensus lemma (float64).

    The lemma has two inequalities, for row-stochastic M and any Y:

    1. ``τ(M) ≤ 1 − N min_ij M_ij``;
    2. ``diam(M Y) ≤ τ(M) · diam(Y)``.

    M is parametrised as a row-wise softmax of free logits (always row-stochastic) and Y is free.
    Adam maximises the relative violations ``τ − bound`` and ``(diam(MY) − τ diam(Y)) / diam(Y)``
    from ``restarts`` random starts (all optimised in one batch).

    Returns:
        ``{"margin_bound": float, "margin_diameter": float}``: the smallest margins
        ``bound − τ`` and ``(τ diam(Y) − diam(MY)) / diam(Y)`` seen at any step (≥ 0 if the lemma held).
    
    Raises:
        FloatingPointError: a margin became NaN/Inf (it is never silently skipped).
    """
    check_positive_int(n, "n", minimum=2)
    check_positive_int(d, "d")
    check_positive_int(restarts, "restarts")
    check_positive_int(steps, "steps")
    gen = torch.Generator().manual_seed(seed)
    logits = (2.0 * torch.randn(restarts, n, n, generator=gen, dtype=torch.float64)).requires_grad_()
    y = torch.randn(restarts, n, d, generator=gen, dtype=torch.float64).requires_grad_()
    opt = torch.optim.Adam([logits, y], lr=lr)
    worst_bound, worst_diam = math.inf, math.inf
    for _ in range(steps):
        m = logits.softmax(-1)
        tau = ergodicity_coefficient(m)
        margin_bound = consensus_bound(m) - tau
        dy = token_diameter(y)
        margin_diam = (tau * dy - token_diameter(m @ y)) / dy
        if not bool(torch.isfinite(margin_bound).all() and torch.isfinite(margin_diam).all()):
            # Python's min() would silently skip a NaN and report "no violation" from then on.
            raise FloatingPointError(
                "search_consensus_violation: a margin became non-finite (e.g. all tokens of Y coincided, "
                "diam(Y) = 0); try another seed or a smaller lr"
            )
        worst_bound = min(worst_bound, float(margin_bound.detach().min()))
        worst_diam = min(worst_diam, float(margin_diam.detach().min()))
        opt.zero_grad()
        (margin_bound.sum() + margin_diam.sum()).backward()  # minimise the margins = maximise violations
        opt.step()
    return {"margin_bound": worst_bound, "margin_diameter": worst_diam}


# --------------------------------------------------------------------------------------------------
# The Assumption-4.1 selective SSM, from matrices
# --------------------------------------------------------------------------------------------------
def _check_alpha(alpha) -> float:
    alpha = check_finite_real(alpha, "alpha")
    if alpha <= 0:
        raise ValueError(f"alpha (the fixed decay of Assumption 4.1) must be > 0, got {alpha}")
    return alpha


def decay_mask(n: int, alpha: float, *, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """``L_α`` of shape ``(n, n)``: ``α^{i−j}`` for ``j ≤ i`` and 0 above the diagonal (causal)."""
    check_positive_int(n, "n")
    alpha = _check_alpha(alpha)
    i = torch.arange(n, device=device)
    lag = (i[:, None] - i[None, :]).to(dtype)
    return torch.where(lag >= 0, torch.tensor(alpha, dtype=dtype, device=device) ** lag.clamp_min(0), torch.zeros((), dtype=dtype, device=device))


def assumption41_mixing_matrix(y: torch.Tensor, alpha: float, g: torch.Tensor | None = None) -> torch.Tensor:
    """The selective-SSM mixing matrix under Assumption 4.1: ``M = L_α ∘ (Y G Yᵀ)``.

    ``M_ij = α^{i−j} y_iᵀ G y_j`` for ``j ≤ i`` (fixed scalar decay ``Ā_t = α I``, ``B_t = W_B y_t``,
    ``C_t = W_C y_t``, ``G = W_C W_Bᵀ``). Quadratic in Y.

    Args:
        y: ``(..., N, d)`` tokens.
        alpha: the decay α > 0.
        g: ``(d, d)`` matrix G, or None for the identity.

    Returns:
        ``(..., N, N)``, lower-triangular.
    """
    check_tokens(y, "y")
    d = y.shape[-1]
    if g is None:
        gram = y @ y.transpose(-1, -2)
    else:
        if not isinstance(g, torch.Tensor) or g.shape != (d, d):
            raise ValueError(f"g must be a tensor of shape (d, d) = ({d}, {d}), got {getattr(g, 'shape', type(g))}")
        gram = y @ g.to(y.dtype) @ y.transpose(-1, -2)
    return decay_mask(y.shape[-2], alpha, dtype=y.dtype, device=y.device) * gram


def _as_lam(lam, ref: torch.Tensor) -> torch.Tensor:
    """λ as a tensor broadcastable against ``ref`` of shape ``(..., N, d)`` (λ has shape ``(...)`` or is a scalar)."""
    if isinstance(lam, torch.Tensor):
        if not bool(torch.isfinite(lam).all()):
            raise ValueError("lam must be finite")
        return lam.to(ref.dtype)[..., None, None]
    return torch.tensor(check_finite_real(lam, "lam"), dtype=ref.dtype, device=ref.device)


def assumption41_stack(
    x: torch.Tensor,
    depth: int,
    *,
    alpha: float,
    g: torch.Tensor | None = None,
    lam=0.0,
    norm: str = "rms",
    scale: str = "sqrt_d",
    eps: float = 0.0,
) -> torch.Tensor:
    """A deep stack of the Assumption-4.1 selective SSM: ``Y^{k+1} = N(λ Y^k + M(Y^k) Y^k)``.

    Args:
        x: ``(..., N, d)`` inputs.
        depth: number of layers K.
        alpha, g: the mixer (see :func:`assumption41_mixing_matrix`); the same for every layer.
        lam: λ, a number or a tensor of shape ``(...)`` (one λ per batch element, e.g. a grid).
        norm: ``"rms"`` (the theory's row-wise normalisation, also applied to the input: ``Y^0 = N(X)``)
            or ``"none"`` (``Y^0 = X``).
        scale, eps: passed to :func:`lambdaskip.norms.rms_normalize`; ``eps = 0`` raises on a zero row.

    Returns:
        ``(K+1, ..., N, d)``: ``Y^0, …, Y^K``. Without normalisation the entries can underflow to 0 (the
        map is cubic in Y); the caller must mask those layers.

    Raises:
        FloatingPointError: a layer overflowed to Inf/NaN (possible only with ``norm="none"``).
    """
    check_tokens(x)
    check_positive_int(depth, "depth")
    check_choice(norm, "norm", ("rms", "none"))
    lam_t = _as_lam(lam, x)
    y = rms_normalize(x, scale=scale, eps=eps) if norm == "rms" else x
    out = [y]
    for k in range(depth):
        z = lam_t * y + assumption41_mixing_matrix(y, alpha, g) @ y
        if not bool(torch.isfinite(z).all()):
            # Without normalisation the map is cubic in Y: a large input overflows within a few layers.
            raise FloatingPointError(
                f"the Assumption-4.1 stack overflowed at layer {k + 1}: it produced Inf/NaN (the map is cubic "
                "in Y without normalisation; use a smaller input scale, fewer layers, or norm='rms')"
            )
        y = rms_normalize(z, scale=scale, eps=eps) if norm == "rms" else z
        out.append(y)
    return torch.stack(out)


# --------------------------------------------------------------------------------------------------
# The 2-token, 2-dimensional example
# --------------------------------------------------------------------------------------------------
def _r2(scale: str) -> float:
    """Squared row norm after normalisation in the 2-token example (d = 2)."""
    check_choice(scale, "scale", _SCALES)
    return 1.0 if scale == "unit" else 2.0


def two_token_kappa(lam, alpha: float, *, scale: str = "unit"):
    """``κ = (λ + r²(1 + α)) / (λ + r²)``: the factor by which ``cot θ`` is multiplied per layer.

    Works elementwise on numbers, NumPy arrays or tensors ``lam``. At ``λ = −r²`` it is undefined
    (token 1 is mapped to 0); there the function returns ±inf/nan (NumPy/torch semantics), or raises
    ``ValueError`` for a plain number.
    """
    alpha = _check_alpha(alpha)
    r2 = _r2(scale)
    if isinstance(lam, (int, float)) and not isinstance(lam, bool):
        lam = check_finite_real(lam, "lam")
        if lam + r2 == 0:
            raise ValueError(f"lam = {-r2} (= -r²) sends token 1 to zero: κ and the normalisation are undefined")
        return (lam + r2 * (1 + alpha)) / (lam + r2)
    return (lam + r2 * (1 + alpha)) / (lam + r2)


def two_token_boundaries(alpha: float, *, scale: str = "unit") -> dict:
    """The special values of λ in the 2-token example (all ≤ −r²·1).

    Returns ``{"undefined": −r², "flip": −r²(1 + α/2), "one_step_orthogonal": −r²(1 + α)}``: at
    ``undefined`` token 1 becomes 0; at ``flip`` κ = −1 (θ ↦ π − θ); at ``one_step_orthogonal`` κ = 0.
    """
    alpha = _check_alpha(alpha)
    r2 = _r2(scale)
    return {"undefined": -r2, "flip": -r2 * (1 + alpha / 2), "one_step_orthogonal": -r2 * (1 + alpha)}


def two_token_angle_map(theta, kappa):
    """One layer of the angle dynamics: ``θ⁺ = atan2(sin θ, κ cos θ)``, i.e. ``cot θ⁺ = κ cot θ`` on (0, π).

    ``theta`` in ``[0, π]`` and ``kappa`` (finite) broadcast; NumPy arrays or tensors. The ``atan2``
    form is exact also at θ = π/2 and for κ ≤ 0, and keeps θ⁺ in ``[0, π]``.
    """
    if isinstance(theta, torch.Tensor) or isinstance(kappa, torch.Tensor):
        theta, kappa = torch.as_tensor(theta, dtype=torch.float64), torch.as_tensor(kappa, dtype=torch.float64)
        return torch.atan2(torch.sin(theta), kappa * torch.cos(theta))
    return np.arctan2(np.sin(theta), np.multiply(kappa, np.cos(theta)))


def two_token_angle_after(theta0, lam, alpha: float, depth: int, *, scale: str = "unit"):
    """Closed form after K layers: ``cot θ_K = κ^K cot θ_0``, i.e. ``θ_K = atan2(sin θ_0, κ^K cos θ_0)``.

    NumPy in, NumPy out (elementwise, broadcasting ``theta0`` and ``lam``). ``κ^K`` is evaluated as a
    float64 power; it may overflow to ±inf for large K, which atan2 handles (θ_K = 0 or π).
    """
    check_positive_int(depth, "depth", minimum=0)
    kappa = two_token_kappa(np.asarray(lam, dtype=np.float64), alpha, scale=scale)
    with np.errstate(over="ignore"):
        kk = np.power(kappa, depth)
    theta0 = np.asarray(theta0, dtype=np.float64)
    cos0 = np.cos(theta0)
    # κ^K · cos θ0 with inf · 0 = 0 (θ0 = π/2 stays put for any κ).
    prod = np.where(cos0 == 0, 0.0, kk * np.where(cos0 == 0, 1.0, cos0))
    return np.arctan2(np.sin(theta0), prod)


def two_token_initial(theta0, *, phase: float = 0.0, scale: str = "unit", dtype=torch.float64) -> torch.Tensor:
    """Two tokens in the plane at angle ``theta0``: ``y_1 = r(cos φ, sin φ)``, ``y_2 = r(cos(φ+θ0), sin(φ+θ0))``.

    Args:
        theta0: number or tensor of shape ``(...)``.
        phase: the direction φ of token 1 (the dynamics do not depend on it; the tests check that).
        scale: ``"unit"`` (r = 1) or ``"sqrt_d"`` (r = √2).

    Returns:
        ``(..., 2, 2)`` (tokens × channels).
    """
    r = math.sqrt(_r2(scale))
    theta0 = torch.as_tensor(theta0, dtype=dtype)
    phase = torch.as_tensor(check_finite_real(phase, "phase"), dtype=dtype)
    y1 = torch.stack([torch.cos(phase), torch.sin(phase)]).expand(*theta0.shape, 2)
    y2 = torch.stack([torch.cos(phase + theta0), torch.sin(phase + theta0)], dim=-1)
    return r * torch.stack([y1, y2], dim=-2)


def two_token_simulate(
    theta0, lam, alpha: float, depth: int, *, scale: str = "unit", eps: float = 0.0, phase: float = 0.0
) -> torch.Tensor:
    """Simulate the 2-token example through the actual layer ``Y⁺ = LN(λY + (L_α ∘ YYᵀ) Y)``.

    ``theta0`` and ``lam`` (numbers or tensors) broadcast to a grid shape ``(...)``. Uses the package's
    row-wise normalisation with ``scale`` and ``eps``; at ``λ = −r²`` with ``eps = 0`` this raises the
    normalisation's ``ValueError`` (token 1 is mapped to 0).

    Returns:
        ``(K+1, ..., 2, 2)``, float64.
    """
    theta0 = torch.as_tensor(theta0, dtype=torch.float64)
    lam_t = torch.as_tensor(lam, dtype=torch.float64)
    shape = torch.broadcast_shapes(theta0.shape, lam_t.shape)
    y0 = two_token_initial(theta0.expand(shape), phase=phase, scale=scale)
    return assumption41_stack(y0, depth, alpha=alpha, lam=lam_t.expand(shape), norm="rms", scale=scale, eps=eps)


def token_angle(y: torch.Tensor) -> torch.Tensor:
    """The angle in ``[0, π]`` between the first two tokens of ``y`` of shape ``(..., N≥2, d)``; returns ``(...)``.

    Computed as ``atan2(‖y_1 ∧ y_2‖, y_1·y_2)``, accurate near 0 and π (unlike ``arccos``). NaN if a token is 0.
    """
    check_tokens(y, "y", min_tokens=2)
    a, b = y[..., 0, :], y[..., 1, :]
    dot = (a * b).sum(-1)
    # ‖a‖²‖b‖² − (a·b)² = ‖a ∧ b‖², written via the projection to avoid cancellation.
    na2 = a.pow(2).sum(-1)
    proj = b - (dot / na2).unsqueeze(-1) * a
    cross = proj.norm(dim=-1) * na2.sqrt()
    return torch.atan2(cross, dot)


def two_token_mu_tilde(theta):
    """μ̃ of two tokens of equal norm at angle θ: ``μ(Y)/‖Y‖_F = sin(θ/2)`` (NumPy or torch, elementwise).

    Aligned tokens (θ = 0) give 0, orthogonal ones sin(π/4) ≈ 0.707, and **antipodal** ones (θ = π) give 1:
    ``[y; −y]`` is rank one but as far from "all tokens equal" as two tokens of that norm can be.
    """
    if isinstance(theta, torch.Tensor):
        return torch.sin(theta / 2)
    return np.sin(np.asarray(theta, dtype=np.float64) / 2)


TWO_TOKEN_REGIMES = (
    "undefined",  # a zero row appears: λ = −r² (any θ0), or θ0 ∈ {0, π} with κ = 0
    "fixed",  # θ0 ∈ {0, π}: the tokens are parallel and stay so
    "orthogonal-fixed",  # θ0 = π/2: cot θ = 0 is a fixed point for every κ
    "align",  # κ > 1, θ0 < π/2: θ_k → 0 (μ̃ → 0)
    "antipodal",  # κ > 1, θ0 > π/2: θ_k → π (rank one, but μ̃ → 1)
    "alternate",  # κ < −1: θ_k jumps between ≈0 and ≈π (rank one; μ̃ alternates between ≈0 and ≈1)
    "period-2",  # κ = −1: θ_k alternates between θ0 and π − θ0
    "orthogonal",  # |κ| < 1: θ_k → π/2 (no collapse)
)


def two_token_regime(lam: float, alpha: float, theta0: float, *, scale: str = "unit", tol: float = 1e-12) -> str:
    """Classify the long-depth behaviour of the 2-token example (one of :data:`TWO_TOKEN_REGIMES`).

    With ``κ = (λ + r²(1+α))/(λ + r²)`` and ``cot θ_k = κ^k cot θ_0`` (α > 0):

    * λ > −r²: κ > 1 → ``"align"`` if θ0 < π/2, ``"antipodal"`` if θ0 > π/2;
    * −r²(1 + α/2) < λ < −r²: κ < −1 → ``"alternate"``;
    * λ = −r²(1 + α/2): κ = −1 → ``"period-2"``;
    * λ < −r²(1 + α/2): |κ| < 1 → ``"orthogonal"``;
    * λ = −r²: ``"undefined"``; θ0 ∈ {0, π}: ``"fixed"`` (``"undefined"`` if κ = 0, where z_2 = 0);
      θ0 = π/2: ``"orthogonal-fixed"``.

    ``tol`` is the absolute tolerance of the equality tests (λ at a boundary, θ0 at 0, π/2, π).
    """
    lam = check_finite_real(lam, "lam")
    theta0 = check_finite_real(theta0, "theta0")
    alpha = _check_alpha(alpha)
    if not -tol <= theta0 <= math.pi + tol:
        raise ValueError(f"theta0 must lie in [0, π], got {theta0}")
    b = two_token_boundaries(alpha, scale=scale)
    if abs(lam - b["undefined"]) <= tol:
        return "undefined"
    kappa = two_token_kappa(lam, alpha, scale=scale)
    if abs(theta0) <= tol or abs(theta0 - math.pi) <= tol:
        return "undefined" if abs(lam - b["one_step_orthogonal"]) <= tol else "fixed"
    if abs(theta0 - math.pi / 2) <= tol:
        return "orthogonal-fixed"
    if abs(lam - b["flip"]) <= tol:
        return "period-2"
    if kappa > 1:
        return "align" if theta0 < math.pi / 2 else "antipodal"
    if kappa < -1:
        return "alternate"
    return "orthogonal"


def two_token_c_m(alpha: float, *, scale: str = "unit") -> float:
    """``C_M = sup ‖M‖_F = r² √(2 + α²)`` over two tokens of norm r (the sup is attained at θ ∈ {0, π}).

    ``M = [[r², 0], [α r² cos θ, r²]]``, so ``‖M‖_F² = r⁴ (2 + α² cos² θ)``. (S = 1: the values are Y itself.)
    """
    alpha = _check_alpha(alpha)
    return _r2(scale) * math.sqrt(2.0 + alpha**2)


def two_token_rate(lam, alpha: float, *, scale: str = "unit"):
    """Asymptotic per-layer factor of ``μ̃²`` in the aligning regime: ``1/κ²``.

    Compare with :func:`lambdaskip.theory.bounds.max_rate` (the largest rate Theorem A admits at λ,
    with ``S = 1`` and ``C_M =`` :func:`two_token_c_m`) for the tightness question.

    For θ_0 < π/2 and κ > 1, ``tan θ_k = κ^{−k} tan θ_0`` and ``μ̃_k = sin(θ_k/2) ~ κ^{−k} tan(θ_0)/2``.
    """
    kappa = two_token_kappa(lam, alpha, scale=scale)
    return 1.0 / kappa**2


# --------------------------------------------------------------------------------------------------
# Fitting exponential and doubly exponential decay
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecayFit:
    """A straight-line fit ``f(v_k) ≈ intercept + slope · k`` over the usable layers.

    Attributes:
        kind: ``"exponential"`` (``f = log v``), ``"doubly_exponential"`` (``f = log(−log v)``) or
            ``"order"`` (``f = log(log v_k − log v_{k+1})``, indexed by k).
        slope, intercept: the least-squares line.
        factor: ``exp(slope)``: the per-layer factor of v (exponential) or the order p of
            ``v_{k+1} ≈ c · v_k^p`` (doubly exponential; 2 quadratic, 3 cubic).
        r2: coefficient of determination of the line (1 = perfectly straight).
        layers: the layer indices that were used (NumPy int array).
    """

    kind: str
    slope: float
    intercept: float
    factor: float
    r2: float
    layers: np.ndarray

    @property
    def n_points(self) -> int:
        return int(self.layers.size)


def _as_1d(values, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (one value per layer), got shape {v.shape}")
    return v


def _line_fit(k: np.ndarray, f: np.ndarray, kind: str, min_points: int) -> DecayFit:
    if k.size < min_points:
        raise ValueError(f"need at least {min_points} usable layers for a {kind} fit, got {k.size}")
    slope, intercept = np.polyfit(k.astype(np.float64), f, 1)
    resid = f - (intercept + slope * k)
    ss_tot = float(((f - f.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return DecayFit(kind, float(slope), float(intercept), float(math.exp(slope)), r2, k.astype(int))


def _select(values, layers, floor, ceiling, name="values"):
    v = _as_1d(values, name)
    k = np.arange(v.size) if layers is None else _as_1d(layers, "layers")
    if k.size != v.size:
        raise ValueError(f"layers must have the same length as {name} ({v.size}), got {k.size}")
    floor = check_finite_real(floor, "floor")
    if floor <= 0:
        raise ValueError(f"floor must be > 0 (logs of 0 are not data), got {floor}")
    keep = np.isfinite(v) & (v > floor) & (v < ceiling)
    return k[keep], v[keep]


def fit_exponential_decay(values, layers=None, *, floor: float = 1e-300, ceiling: float = math.inf, min_points: int = 2) -> DecayFit:
    """Fit ``log v_k = intercept + slope · k`` (exponential decay: ``v_k ≈ C · factor^k``).

    Args:
        values: ``(K+1,)`` one value per layer (e.g. μ̃ or μ of one input); NumPy or torch.
        layers: the layer index of each value (default ``0..K``).
        floor: values ``≤ floor`` are left out. Use it to drop what floating point cannot resolve: ~1e-300
            near float64 underflow for an absolute quantity, and ~1e-13 for μ̃ (a relative quantity
            whose rounding floor is about N·ε_mach ≈ 1e-15).
        ceiling: values ``≥ ceiling`` are left out (e.g. a transient).
        min_points: fewest usable layers accepted (else ``ValueError``).

    Non-finite values (overflow, NaN) are always left out. Returns a :class:`DecayFit`.
    """
    k, v = _select(values, layers, floor, ceiling)
    return _line_fit(k, np.log(v), "exponential", min_points)


def fit_doubly_exponential_decay(
    values, layers=None, *, floor: float = 1e-300, ceiling: float = 1.0, min_points: int = 2
) -> DecayFit:
    """Fit ``log(−log v_k) = intercept + slope · k`` (doubly exponential decay, ``v_k ≈ exp(−c p^k)``).

    The order ``p = exp(slope)``: ``v_{k+1} ≈ v_k^p``. Only values in ``(floor, ceiling)`` with
    ``ceiling ≤ 1`` are usable (``−log v`` must be positive); lower ``ceiling`` to fit only the asymptotic
    tail. Same arguments as :func:`fit_exponential_decay`.
    """
    ceiling = check_finite_real(ceiling, "ceiling")
    if ceiling > 1:
        raise ValueError(f"ceiling must be <= 1 (log(-log v) needs v < 1), got {ceiling}")
    k, v = _select(values, layers, floor, ceiling)
    return _line_fit(k, np.log(-np.log(v)), "doubly_exponential", min_points)


def fit_decay_order(values, layers=None, *, floor: float = 1e-300, ceiling: float = math.inf, min_points: int = 2) -> DecayFit:
    """Estimate the order p of ``v_{k+1} ≈ c · v_k^p`` from successive log-decrements.

    With ``ℓ_k = log v_k`` the map gives ``ℓ_{k+1} = p ℓ_k + log c``, hence the decrements
    ``δ_k = ℓ_k − ℓ_{k+1}`` satisfy ``δ_{k+1} = p δ_k`` **exactly, whatever c and the scale of v**. So
    ``log δ_k`` is linear in k with slope ``log p``: p = 1 for exponential decay, p = 2 quadratic, 3 cubic.
    (The ``log(−log v)`` fit of :func:`fit_doubly_exponential_decay` reaches the same slope only
    asymptotically, when ``|ℓ_k| ≫ |log c|/(p−1)``.)

    Only pairs of *consecutive* layers whose values are both usable (finite, in ``(floor, ceiling)``)
    and decreasing (``δ_k > 0``) enter the fit. Returns a :class:`DecayFit` of kind ``"order"`` with
    ``factor = p`` and ``layers`` the first layer k of every pair used.
    """
    k, v = _select(values, layers, floor, ceiling)
    consecutive = np.diff(k) == 1
    delta = np.log(v[:-1]) - np.log(v[1:])
    use = consecutive & (delta > 0)
    return _line_fit(k[:-1][use], np.log(delta[use]), "order", min_points)

