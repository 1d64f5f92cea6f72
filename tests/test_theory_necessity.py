"""Tests of lambdaskip.theory.necessity: consensus lemma, the Assumption-4.1 SSM, the 2-token example, decay fits."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lambdaskip as ls
from lambdaskip.metrics import normalized_mu
from lambdaskip.theory import max_rate
from lambdaskip.theory import necessity as nec

F64 = torch.float64


# ----------------------------------------------------------------------------------------- consensus
def test_ergodicity_coefficient_known_values():
    uniform = torch.full((3, 3), 1 / 3, dtype=F64)
    assert float(nec.ergodicity_coefficient(uniform)) == pytest.approx(0.0, abs=1e-15)
    identity = torch.eye(3, dtype=F64)
    assert float(nec.ergodicity_coefficient(identity)) == pytest.approx(1.0)
    eps = 0.1
    m = torch.tensor([[1 - eps, eps], [eps, 1 - eps]], dtype=F64)  # the equality case of τ ≤ 1 − Nε
    assert float(nec.ergodicity_coefficient(m)) == pytest.approx(1 - 2 * eps)
    assert float(nec.consensus_bound(m)) == pytest.approx(1 - 2 * eps)


def test_token_diameter():
    y = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]], dtype=F64)
    assert float(nec.token_diameter(y)) == pytest.approx(5.0)
    assert nec.token_diameter(torch.zeros(2, 4, 3, dtype=F64)).shape == (2,)


def test_random_stochastic_matrix_properties():
    m = nec.random_stochastic_matrix(200, 5, min_entry=0.05, concentration=0.3, seed=1)
    assert m.shape == (200, 5, 5) and m.dtype == F64
    assert torch.allclose(m.sum(-1), torch.ones(200, 5, dtype=F64), atol=1e-14)
    assert float(m.min()) >= 0.05 - 1e-15
    again = nec.random_stochastic_matrix(200, 5, min_entry=0.05, concentration=0.3, seed=1)
    assert torch.equal(m, again)
    with pytest.raises(ValueError, match="min_entry"):
        nec.random_stochastic_matrix(2, 4, min_entry=0.3)


def test_consensus_lemma_random_instances():
    for n, conc in [(2, 0.2), (4, 1.0), (7, 0.5)]:
        m = nec.random_stochastic_matrix(2000, n, min_entry=0.3 / n, concentration=conc, seed=n)
        y = torch.randn(2000, n, 3, dtype=F64)
        tau = nec.ergodicity_coefficient(m)
        assert float((nec.consensus_bound(m) - tau).min()) >= -1e-12
        assert float((tau * nec.token_diameter(y) - nec.token_diameter(m @ y)).min()) >= -1e-12


def test_consensus_violation_search_finds_none():
    out = nec.search_consensus_violation(n=3, d=2, restarts=4, steps=60, seed=0)
    assert out["margin_bound"] >= -1e-12 and out["margin_diameter"] >= -1e-12
    # The search does push towards equality (the lemma is tight), so the margins get small.
    assert out["margin_bound"] < 0.05


def test_consensus_search_refuses_non_finite_margins(monkeypatch):
    # regression: a NaN margin used to be skipped by min() and the search reported "no violation"
    monkeypatch.setattr(nec, "token_diameter", lambda y: torch.full(y.shape[:-2], float("nan"), dtype=y.dtype))
    with pytest.raises(FloatingPointError, match="non-finite"):
        nec.search_consensus_violation(n=3, d=2, restarts=2, steps=3, seed=0)


def test_ergodicity_rejects_bad_shapes():
    with pytest.raises(ValueError, match="square"):
        nec.ergodicity_coefficient(torch.ones(2, 3, dtype=F64))
    with pytest.raises(TypeError):
        nec.token_diameter([[0.0, 1.0]])


# ------------------------------------------------------------------------------- Assumption-4.1 SSM
def test_decay_mask_and_mixing_matrix():
    lmask = nec.decay_mask(4, 0.5)
    assert float(lmask[3, 1]) == 0.25 and float(lmask[1, 3]) == 0.0 and float(lmask[2, 2]) == 1.0
    y = torch.randn(2, 4, 3, dtype=F64)
    g = torch.randn(3, 3, dtype=F64)
    m = nec.assumption41_mixing_matrix(y, 0.5, g)
    i, j = 3, 1
    expected = 0.25 * (y[:, i] @ g * y[:, j]).sum(-1)
    assert torch.allclose(m[:, i, j], expected, atol=1e-14)
    assert torch.equal(m.triu(1), torch.zeros_like(m))
    with pytest.raises(ValueError, match="alpha"):
        nec.decay_mask(3, 0.0)
    with pytest.raises(ValueError, match="g must"):
        nec.assumption41_mixing_matrix(y, 0.5, torch.eye(2, dtype=F64))


def test_assumption41_matches_package_ssd():
    if "ssd" not in ls.available_mixers():
        pytest.skip("the SSD mixer is not registered in this checkout")
    torch.manual_seed(3)
    mixer = ls.make_mixer("ssd", 6, fixed_decay=0.8, n_heads=1).double()
    y = torch.randn(2, 5, 6, dtype=F64)
    g = (mixer.w_c.weight.T @ mixer.w_b.weight).detach()
    m_ref = nec.assumption41_mixing_matrix(y, 0.8, g)
    with torch.no_grad():
        assert torch.allclose(mixer.mixing_matrix(y)[:, 0], m_ref, atol=1e-12)
        assert torch.allclose(mixer(y), m_ref @ y, atol=1e-12)


def test_assumption41_stack_shapes_and_norm():
    x = torch.randn(3, 4, 5, dtype=F64)
    ys = nec.assumption41_stack(x, 6, alpha=0.9, lam=0.5)
    assert ys.shape == (7, 3, 4, 5)
    assert torch.allclose(ys.norm(dim=-1), torch.full((7, 3, 4), math.sqrt(5), dtype=F64), atol=1e-12)
    raw = nec.assumption41_stack(x, 2, alpha=0.9, norm="none")
    assert torch.equal(raw[0], x)
    with pytest.raises(ValueError, match="norm"):
        nec.assumption41_stack(x, 2, alpha=0.9, norm="layer")
    with pytest.raises(FloatingPointError, match="overflowed at layer"):
        nec.assumption41_stack(3.0 * x, 12, alpha=0.9, norm="none")


# --------------------------------------------------------------------------------- 2-token example
def test_kappa_and_boundaries():
    assert nec.two_token_kappa(0.0, 1.0) == pytest.approx(2.0)
    assert nec.two_token_kappa(-1.5, 1.0) == pytest.approx(-1.0)
    assert nec.two_token_kappa(-2.0, 1.0) == pytest.approx(0.0)
    assert nec.two_token_kappa(0.0, 1.0, scale="sqrt_d") == pytest.approx(2.0)
    assert nec.two_token_kappa(-3.0, 1.0, scale="sqrt_d") == pytest.approx(-1.0)
    b = nec.two_token_boundaries(1.0)
    assert b == {"undefined": -1.0, "flip": -1.5, "one_step_orthogonal": -2.0}
    with pytest.raises(ValueError, match="lam"):
        nec.two_token_kappa(-1.0, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        nec.two_token_kappa(0.0, -0.5)


@settings(max_examples=30)
@given(
    lam=st.floats(-6.0, 6.0).filter(lambda v: abs(v + 1) > 1e-3),
    alpha=st.floats(0.05, 1.0),
    theta=st.floats(0.01, math.pi - 0.01),
    phase=st.floats(-3.0, 3.0),
    scale=st.sampled_from(["unit", "sqrt_d"]),
)
def test_one_layer_angle_map_matches_simulation(lam, alpha, theta, phase, scale):
    ys = nec.two_token_simulate(theta, lam, alpha, 1, scale=scale, phase=phase)
    kappa = nec.two_token_kappa(lam, alpha, scale=scale)
    predicted = nec.two_token_angle_map(np.array(theta), kappa)
    assert float(nec.token_angle(ys[1])) == pytest.approx(float(predicted), abs=1e-9)
    # Token 1 keeps its direction up to the sign of λ + r².
    r2 = 1.0 if scale == "unit" else 2.0
    assert torch.allclose(ys[1][0], math.copysign(1.0, lam + r2) * ys[0][0], atol=1e-12)


def test_closed_form_matches_simulation_over_depth():
    lams = torch.tensor([-3.0, -1.8, -1.6, -1.3, -0.5, 0.0, 1.0, 4.0], dtype=F64)[:, None]
    thetas = torch.tensor([0.3, 1.0, 2.0, 2.8], dtype=F64)[None, :]
    ys = nec.two_token_simulate(thetas, lams, 1.0, 12)
    for k in range(13):
        closed = nec.two_token_angle_after(thetas.numpy(), lams.numpy(), 1.0, k)
        assert np.abs(nec.token_angle(ys[k]).numpy() - closed).max() < 1e-9


def test_mu_tilde_formula():
    theta = torch.linspace(0.0, math.pi, 7, dtype=F64)
    y = nec.two_token_initial(theta, phase=0.4)
    assert torch.allclose(normalized_mu(y), nec.two_token_mu_tilde(theta), atol=1e-14)
    assert nec.two_token_mu_tilde(np.pi) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "lam, theta0, expected",
    [
        (0.0, 1.0, "align"),
        (1.0, 2.0, "antipodal"),
        (-1.2, 1.0, "alternate"),
        (-1.5, 1.0, "period-2"),
        (-1.8, 1.0, "orthogonal"),
        (-5.0, 2.5, "orthogonal"),
        (-1.0, 1.0, "undefined"),
        (-2.0, 0.0, "undefined"),
        (0.5, 0.0, "fixed"),
        (0.5, math.pi / 2, "orthogonal-fixed"),
    ],
)
def test_regime_classifier(lam, theta0, expected):
    assert nec.two_token_regime(lam, 1.0, theta0) == expected


def test_regime_classifier_agrees_with_simulation():
    depth = 60
    lams = np.array([-4.0, -2.2, -1.7, -1.4, -1.1, -0.6, 0.0, 1.0, 3.0])
    thetas = np.array([0.4, 1.2, 1.9, 2.7])
    ys = nec.two_token_simulate(torch.tensor(thetas)[None, :], torch.tensor(lams)[:, None], 1.0, depth)
    last, prev = nec.token_angle(ys[-1]).numpy(), nec.token_angle(ys[-2]).numpy()
    for a, lam in enumerate(lams):
        for b, th in enumerate(thetas):
            regime = nec.two_token_regime(float(lam), 1.0, float(th))
            if regime == "align":
                assert last[a, b] < 1e-3
            elif regime == "antipodal":
                assert last[a, b] > math.pi - 1e-3
            elif regime == "alternate":
                assert min(last[a, b], math.pi - last[a, b]) < 1e-3 and abs(last[a, b] - prev[a, b]) > 3.0
            elif regime == "orthogonal":
                assert abs(last[a, b] - math.pi / 2) < 1e-3
            else:
                pytest.fail(f"unexpected regime {regime}")


def test_lambda_minus_one_raises_and_eps_zeroes_token_one():
    with pytest.raises(ValueError, match="zero row"):
        nec.two_token_simulate(1.0, -1.0, 1.0, 2)
    for eps in (1e-12, 1e-6):
        ys = nec.two_token_simulate(1.0, -1.0, 1.0, 8, eps=eps)
        # With eps > 0 the rows have norm 1/sqrt(1+eps) < 1, so z_1 = (λ + ||y_1||²) y_1 ≈ −eps·y_1 and
        # the normalisation leaves token 1 with a norm of order sqrt(eps) instead of 0 ...
        assert 0.5 < float(ys[1][0].norm()) / math.sqrt(eps) < 2.0
        # ... after which the two tokens are (anti)parallel at every layer: rank one.
        assert float(torch.sin(nec.token_angle(ys[1:])).abs().max()) < 1e-3


def test_c_m_is_the_sup_of_the_frobenius_norm():
    for scale in ["unit", "sqrt_d"]:
        theta = torch.linspace(0, math.pi, 181, dtype=F64)
        y = nec.two_token_initial(theta, scale=scale)
        m = nec.assumption41_mixing_matrix(y, 0.7)
        fro = m.pow(2).sum((-2, -1)).sqrt()
        assert float(fro.max()) == pytest.approx(nec.two_token_c_m(0.7, scale=scale), rel=1e-12)


def test_rate_and_theorem_a_limit_are_consistent():
    lams = np.array([-0.5, 0.5, 1.0, 10.0, 1e3, 1e5])
    rate = nec.two_token_rate(lams, 1.0)
    a_star = np.array([max_rate(float(v), S=1.0, C_M=nec.two_token_c_m(1.0)) for v in lams])
    assert np.all(a_star < rate)
    ratio = (1 - a_star[-1]) / (1 - rate[-1])
    assert ratio == pytest.approx(math.sqrt(3), rel=1e-3)


# --------------------------------------------------------------------------------------- decay fits
def test_fit_exponential_recovers_rate_and_masks():
    k = np.arange(40)
    v = 3.0 * 0.5**k
    v[30:] = 0.0  # "underflow": must be left out, not fitted
    v[5] = np.nan
    fit = nec.fit_exponential_decay(v, floor=1e-300)
    assert fit.factor == pytest.approx(0.5, rel=1e-12) and fit.n_points == 29
    assert fit.r2 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="usable"):
        nec.fit_exponential_decay(np.zeros(5))
    with pytest.raises(ValueError, match="floor"):
        nec.fit_exponential_decay(v, floor=0.0)


def test_fit_doubly_exponential_recovers_order():
    v = np.array([0.5 ** (3.0**k) for k in range(8)])  # v_{k+1} = v_k³, underflows at the end
    fit = nec.fit_doubly_exponential_decay(torch.tensor(v))
    assert fit.factor == pytest.approx(3.0, rel=1e-9)
    assert fit.n_points == int(np.sum(v > 1e-300))
    with pytest.raises(ValueError, match="ceiling"):
        nec.fit_doubly_exponential_decay(v, ceiling=2.0)
    with pytest.raises(ValueError, match="one-dimensional"):
        nec.fit_doubly_exponential_decay(np.ones((2, 2)) * 0.5)


def test_fit_decay_order_is_exact_for_power_maps():
    for p, c in [(1.0, 0.3), (2.0, 1.5), (3.0, 0.01)]:
        v = [0.5]
        for _ in range(7):
            v.append(c * v[-1] ** p)
        v = np.array(v)
        fit = nec.fit_decay_order(v)
        assert fit.factor == pytest.approx(p, rel=1e-9), p
    # Unusable layers break pairs instead of being bridged.
    v = np.array([0.5, 0.25, np.nan, 0.0625, 0.03125, 0.015625])
    fit = nec.fit_decay_order(v)
    assert list(fit.layers) == [0, 3, 4] and fit.factor == pytest.approx(1.0)
    with pytest.raises(ValueError, match="usable"):
        nec.fit_decay_order(np.array([1.0, 2.0, 3.0]))

