"""Tests of lambdaskip.theory.bounds: known values, argument checks, and the proof checkers."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lambdaskip as ls
from lambdaskip import theory as th
from lambdaskip.metrics import mu
from lambdaskip.norms import rms_normalize

F64 = torch.float64


# --- constants and thresholds -----------------------------------------------------------------


def test_lambda_threshold_paper_example():
    # theory reference §4: N = 128, S = 1, C_M = √128, a = 0.9999 asks for |λ| > ~2.26e5
    value = th.lambda_threshold(S=1.0, C_M=th.softmax_mixing_bound(128), a=0.9999)
    assert 2.25e5 < value < 2.27e5
    root = math.sqrt(0.9999)
    assert value == pytest.approx(root * math.sqrt(128) / (1 - root), rel=1e-12)


def test_threshold_is_where_lambda_condition_flips():
    S, C_M, a = 1.3, 4.0, 0.81
    t = th.lambda_threshold(S=S, C_M=C_M, a=a)
    assert t == pytest.approx(0.9 * S * C_M / 0.1)
    for lam in (t * 1.001, -t * 1.001):
        assert lam**2 > a * (S * C_M + abs(lam)) ** 2
    assert (t * 0.999) ** 2 < a * (S * C_M + t * 0.999) ** 2
    # max_rate inverts the threshold: the rate at which λ = t is exactly on the boundary
    assert th.max_rate(t, S=S, C_M=C_M) == pytest.approx(a, rel=1e-12)


def test_softmax_bound_and_theorem_a_b():
    assert th.softmax_mixing_bound(64) == 8.0
    lam, S, C_M, a, K, N, d = 50.0, 1.0, 2.0, 0.8, 4, 8, 3
    gap = lam**2 - a * (S * C_M + lam) ** 2
    assert th.theorem_a_b(lam, S=S, C_M=C_M, a=a, K=K, N=N, d=d) == pytest.approx(2 * lam * N * d * S * C_M / (a**K * gap))
    with pytest.raises(ValueError, match="lam"):
        th.theorem_a_b(1.0, S=S, C_M=C_M, a=a, K=K, N=N, d=d)  # below the threshold


@pytest.mark.parametrize(
    "call",
    [
        lambda: th.lambda_threshold(S=1, C_M=1, a=1.0),
        lambda: th.lambda_threshold(S=1, C_M=1, a=0.0),
        lambda: th.lambda_threshold(S=1, C_M=1, a=-0.5),
        lambda: th.lambda_threshold(S=-1, C_M=1, a=0.5),
        lambda: th.lambda_threshold(S=1, C_M=-2, a=0.5),
        lambda: th.lambda_threshold(S=1, C_M=float("nan"), a=0.5),
        lambda: th.max_rate(0.0, S=1, C_M=1),
        lambda: th.theorem_c_additive(-1.0, K=3, lam=1, S=1, C_M=1, N=2, d=2),
        lambda: th.theorem_c_multiplicative_threshold(1.0, S=1, C_M=1, N=2, d=2, a=1.5),
        lambda: th.theorem_c_lambda_for_target(K=4, S=1, C_M=1, mu_tilde0=0.5, mu_tilde_target=0.6),
        lambda: th.theorem_a_lambda_for_target(K=4, S=1, C_M=1, mu_tilde0=1.0, mu_tilde_target=0.0),
        lambda: th.softmax_mixing_bound(0),
        lambda: th.admissible_rate(10.0, S=1, C_M=1, mu0=1.0),  # mu0 without K, N, d
    ],
)
def test_invalid_arguments_raise(call):
    with pytest.raises(ValueError):
        call()


def test_type_errors():
    with pytest.raises(TypeError):
        th.lambda_threshold(S="1", C_M=1, a=0.5)
    with pytest.raises(TypeError):
        th.theorem_a_b(1e3, S=1, C_M=1, a=0.5, K=2.0, N=2, d=2)


def test_admissible_rate_satisfies_both_conditions_and_is_maximal():
    lam, S, C_M, K, N, d = 400.0, 1.0, 2.0, 8, 4, 2
    mu0 = 0.9 * math.sqrt(N * d)
    a = th.admissible_rate(lam, S=S, C_M=C_M, mu0=mu0, K=K, N=N, d=d)
    assert 0 < a < th.max_rate(lam, S=S, C_M=C_M)
    assert mu0**2 >= th.theorem_a_b(lam, S=S, C_M=C_M, a=a, K=K, N=N, d=d) * (1 - 1e-9)
    a_more = a + 1e-6
    assert mu0**2 < th.theorem_a_b(lam, S=S, C_M=C_M, a=a_more, K=K, N=N, d=d)
    # without mu0 only the λ-condition counts
    assert th.admissible_rate(lam, S=S, C_M=C_M) == pytest.approx((lam / (lam + S * C_M)) ** 2)
    # λ too small: nothing admissible
    assert math.isnan(th.admissible_rate(3.0, S=S, C_M=C_M, mu0=mu0, K=K, N=N, d=d))


def test_theorem_c_forms():
    curve = th.theorem_c_additive(2.0, K=3, lam=-10.0, S=0.5, C_M=2.0, N=2, d=2)
    step = 2 * 0.5 * 2.0 * 2.0 / 10.0
    assert torch.allclose(curve, torch.tensor([2.0, 2 - step, 2 - 2 * step, 2 - 3 * step], dtype=F64))
    assert float(th.theorem_c_additive(1.0, K=10, lam=1.0, S=1, C_M=1, N=1, d=1)[-1]) == 0.0  # clipped
    thr = th.theorem_c_multiplicative_threshold(10.0, S=1, C_M=2, N=2, d=2, a=0.81)
    assert thr == pytest.approx(2 * 2 * 2 / (10 * 0.1))
    assert th.theorem_c_lambda_for_target(K=64, S=1, C_M=8, mu_tilde0=1.0, mu_tilde_target=0.5) == pytest.approx(2 * 64 * 8 / 0.5)
    assert torch.allclose(th.theorem_a_curve(3.0, a=0.25, K=2), torch.tensor([3.0, 1.5, 0.75], dtype=F64))


def test_lambda_for_target_comparison_is_consistent():
    table = th.compare_lambda_requirements([0.997, 0.5], K=64, N=128)
    for row in table.itertuples():
        # the rate Theorem A uses meets the target and both of its conditions at λ_A (slightly above)
        lam = row.lambda_A * (1 + 1e-9)
        assert row.rate_a_A ** 64 >= row.retention**2 * (1 - 1e-9)
        b = th.theorem_a_b(lam, S=1, C_M=math.sqrt(128), a=row.rate_a_A, K=64, N=128, d=4)
        assert b <= 128 * 4 * (1 + 1e-6)  # μ̃₀ = 1 means μ(Y⁰)² = N d
        # and slightly below λ_A no admissible rate reaches the target
        a_low = th.admissible_rate(row.lambda_A * 0.99, S=1, C_M=math.sqrt(128), mu0=math.sqrt(128 * 4), K=64, N=128, d=4)
        assert math.isnan(a_low) or a_low**64 < row.retention**2
    assert (table["lambda_C"] <= table["lambda_A"]).all()


# --- measured constants ---------------------------------------------------------------------


def test_measure_constants_softmax():
    torch.manual_seed(1)
    mixer = ls.make_mixer("softmax", 8, n_heads=2).double()
    x = torch.randn(3, 5, 8, dtype=F64)
    c = th.measure_constants(mixer, x)
    assert c["C_M"] <= math.sqrt(5) + 1e-12
    heads = [mixer.w_v.weight.detach().T[:, 4 * h : 4 * h + 4] @ mixer.w_o.weight.detach().T[4 * h : 4 * h + 4] for h in range(2)]
    expected_s = sum(float(torch.linalg.matrix_norm(m, ord=2)) for m in heads)
    assert c["S"] == pytest.approx(expected_s, rel=1e-10)
    assert c["gain"] <= c["gain_bound"]
    stack = ls.LambdaSkipStack.build("softmax", d_model=8, depth=3, lam=2.0).double()
    cs = th.measure_constants(stack, x)
    assert cs["C_M"] <= math.sqrt(5) + 1e-12 and cs["gain"] <= cs["gain_bound"]


def test_measure_constants_rejects_non_linear_values():
    class Gated(torch.nn.Module):
        d_model = 4

        def __init__(self):
            super().__init__()
            self.inner = ls.make_mixer("softmax", 4).double()

        def mixing_matrix(self, x):
            return self.inner.mixing_matrix(x)

        def values(self, x):
            return self.inner.values(x)

        def combine(self, m):
            return self.inner.combine(m)

        def forward(self, x):
            return self.inner(x) * torch.sigmoid(x)  # gating: not Σ M X C_V

    with pytest.raises(ValueError, match="not of the form"):
        th.measure_constants(Gated(), torch.randn(2, 3, 4, dtype=F64))


# --- proof checkers ---------------------------------------------------------------------------


def test_row_shortcut_counterexample():
    # theory reference §4: Z = [[1, 0], [2, 0]] has μ(Z) > 0 but μ(LN(Z)) = 0
    z = torch.tensor([[[1.0, 0.0], [2.0, 0.0]]], dtype=F64)
    assert float(mu(z)) > 0 and float(mu(rms_normalize(z))) == 0.0
    # as a layer: Y = (1, 1)/√… rows, λ = 1, E = Z − Y
    y = rms_normalize(torch.tensor([[[1.0, 0.0], [1.0, 0.0]]], dtype=F64))
    e = z - y
    margins = th.proof_margins(y, e, 1.0, float(torch.linalg.matrix_norm(e)) / 2, steps=["A3_row_shortcut", "A3_row"])
    assert float(margins["A3_row_shortcut"]) < 0
    # μ(Y) = 0 here, so Theorem A's composite step is not contradicted
    assert float(th.proof_margins(y, e, 1.0, 1.0, steps=["A_onestep_row"])["A_onestep_row"]) >= 0


@pytest.mark.parametrize("family", list(th.INSTANCE_FAMILIES))
def test_proven_steps_hold_on_random_instances(family):
    g = torch.Generator().manual_seed(3)
    for n, d in [(2, 1), (3, 2), (5, 4)]:
        inst = th.random_instances(family, 200, n, d, generator=g)
        margins = th.proof_margins(*inst)
        for step in ("A1", "A2_mixer", "A2_mu", "A12", "A3_global", "A_onestep_global", "A3_row_proj", "A_onestep_row_h",
                     "A_onestep_row", "A4_row", "B_unit", "B", "mu_lipschitz", "C", "C_const"):
            assert float(margins[step].min()) >= -1e-10, (family, n, d, step)
        rel = th.proof_margins(*inst, relative=True)
        for step in th.RELATIVE_STEPS:
            assert float(rel[step].min()) >= -1e-9


def test_proof_margins_are_exact_on_a_hand_example():
    # Y with mean zero (μ(Y)² = N d), E = 0: Z = λY, LN(Z) = sgn(λ) Y
    y = rms_normalize(torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]], dtype=F64))
    e = torch.zeros_like(y)
    m = th.proof_margins(y, e, -3.0, 0.0)
    assert float(m["A1"]) == pytest.approx(0.0, abs=1e-12)  # μ(Z)² = λ² μ(Y)²
    assert float(m["C"]) == pytest.approx(0.0, abs=1e-12)  # nothing lost
    assert float(m["A_onestep_row"]) == pytest.approx(0.0, abs=1e-12)


def test_proof_margins_validate_input():
    y = rms_normalize(torch.randn(2, 3, 2, dtype=F64))
    with pytest.raises(ValueError, match="sqrt"):
        th.proof_margins(2 * y, y, 1.0, 1.0)
    with pytest.raises(ValueError, match="non-zero"):
        th.proof_margins(y, y, 0.0, 1.0)
    with pytest.raises(ValueError, match="shape"):
        th.proof_margins(y, y[:, :2], 1.0, 1.0)
    with pytest.raises(ValueError, match="unknown steps"):
        th.proof_margins(y, y, 1.0, 1.0, steps=["nope"])


def test_search_finds_the_false_step_and_not_the_true_ones():
    bad = th.search_violation("A3_row", "free", n=2, d=2, batch=16, iters=30, seed=0)
    assert bad["worst"] < -0.1
    y, e, lam, gain = bad["instance"]
    assert float(th.proof_margins(y, e, lam, gain, steps=["A3_row"])["A3_row"]) == pytest.approx(bad["worst"])
    good = th.search_violation("C", "stochastic", n=3, d=2, batch=16, iters=30, seed=0, relative=True)
    assert good["worst"] >= -1e-9
    assert len(good["history"]) == 31


def test_search_promise_region():
    res = th.search_violation("A_onestep_row", "free", n=3, d=2, batch=16, iters=20, seed=0, relative=True, promise=0.2)
    y, e, lam, gain = res["instance"]
    assert float(th.promised_fraction(y, e, lam, gain)) >= 0.2
    assert res["worst"] >= -1e-9
    with pytest.raises(ValueError):
        th.search_violation("B", "free", n=2, d=2, iters=1, promise=0.1)


def test_row_step_scalar_margin():
    # the last inequality of the row-wise Step 3 proof: D >= (3/2 − √2) h on [0, 1/2] × [0, π/2]
    h = torch.linspace(0, 0.5, 201, dtype=F64)[:, None]
    alpha = torch.linspace(0, math.pi / 2, 401, dtype=F64)[None, :]
    d = th.row_step_scalar_margin(h, alpha)
    assert float(d.min()) >= -1e-14
    assert float((d[1:] / h[1:]).min()) >= 1.5 - math.sqrt(2)
    # no perturbation (h = 0) loses nothing: D = 0 exactly
    assert float(th.row_step_scalar_margin(0.0, 0.3)) == pytest.approx(0.0, abs=1e-15)


def test_step3_row_fails_where_the_composite_bound_promises_a_lot():
    # d = 1, tokens (1, 1, 1, -1), λ = 1, M = c P Y Yᵀ/(N d) so that E = c P Y: LN(Z) = Y, μ(Z) = (1 + c) μ(Y), S C_M = c √3/2
    y = torch.tensor([[[1.0], [1.0], [1.0], [-1.0]]], dtype=F64)
    py = y - y.mean(dim=-2, keepdim=True)
    for c in (0.05, 0.2, 0.4):
        m = c * py[0] @ y[0].T / 4
        e = m @ y
        gain = torch.linalg.matrix_norm(m)[None]
        assert float(gain) == pytest.approx(c * math.sqrt(3) / 2)
        assert torch.equal(rms_normalize(y + e), y)
        margins = th.proof_margins(y, e, 1.0, gain, steps=["A3_row", "A_onestep_row", "A_onestep_row_h"])
        assert float(margins["A3_row"]) < 0  # Step 3 (row-wise) is violated ...
        assert float(th.promised_fraction(y, e, 1.0, gain)) > 0  # ... where the composite bound promises something
        assert float(margins["A_onestep_row"]) > 0 and float(margins["A_onestep_row_h"]) > 0


def test_theorem_a_hypotheses_allow_a_zero_row():
    # N = 1024, d = 1, λ = 1, K = 1: one row of E cancels its skip term exactly, yet both conditions of Theorem A hold
    n = 1024
    y = torch.cat([torch.ones(768), -torch.ones(256)]).double()[:, None]
    m = torch.zeros(n, n, dtype=F64)
    m[0] = 2.0 / n
    z = y + m @ y @ (-torch.ones(1, 1, dtype=F64))
    assert float(z[0, 0]) == 0.0
    c_m = float(torch.linalg.matrix_norm(m))
    a = th.admissible_rate(1.0, S=1.0, C_M=c_m, mu0=float(mu(y[None])), K=1, N=n, d=1)
    assert not math.isnan(a)
    assert th.theorem_a_b(1.0, S=1.0, C_M=c_m, a=0.9 * a, K=1, N=n, d=1) <= float(mu(y[None])) ** 2
    with pytest.raises(ValueError, match="zero row"):
        rms_normalize(z[None])


def _structured_layers(g, kind, batch, n, d):
    """Layers aimed at the row-wise lemma's proof: uneven or single-row E, cancelling rows, antipodal tokens."""
    y_raw = torch.randn(batch, n, d, generator=g, dtype=F64) + 10 * torch.randn(batch, 1, d, generator=g, dtype=F64) * torch.rand(batch, 1, 1, generator=g, dtype=F64)
    if kind == "antipodal":
        y_raw = torch.randn(batch, 1, d, generator=g, dtype=F64) * torch.where(torch.rand(batch, n, 1, generator=g) < 0.5, -1.0, 1.0).double()
    y = rms_normalize(y_raw)
    lam = torch.where(torch.rand(batch, generator=g) < 0.5, -1.0, 1.0).double() * 10 ** (12 * torch.rand(batch, generator=g, dtype=F64) - 6)
    e_dir = torch.randn(batch, n, d, generator=g, dtype=F64) * 10 ** (-3 * torch.rand(batch, n, 1, generator=g, dtype=F64))
    if kind == "one row":
        e_dir = e_dir * (torch.arange(n) == 0).double()[:, None]
    if kind == "cancel":
        e_dir = -torch.sign(lam)[:, None, None] * y * 2 * torch.rand(batch, n, 1, generator=g, dtype=F64) + 0.01 * e_dir
    h = 10 ** (5 * torch.rand(batch, generator=g, dtype=F64) - 4.5)
    e = e_dir * (h * lam.abs() * math.sqrt(n * d) / torch.linalg.matrix_norm(e_dir))[:, None, None]
    return y, e, lam, torch.linalg.matrix_norm(e) / math.sqrt(n * d)


@pytest.mark.parametrize("kind", ["uneven", "one row", "cancel", "antipodal"])
def test_row_lemma_on_structured_layers(kind):
    g = torch.Generator().manual_seed(11)
    for n, d in [(2, 1), (3, 2), (4, 3)]:
        inst = _structured_layers(g, kind, 300, n, d)
        m = th.proof_margins(*inst, steps=["A3_row_proj", "A_onestep_row_h", "A_onestep_row"])
        for step, margin in m.items():
            assert float(margin.min()) >= -1e-10, (kind, n, d, step)


def test_row_step_search():
    res = th.search_violation("A_onestep_row_h", "free", n=3, d=2, batch=16, iters=20, seed=1, relative=True, promise=0.05)
    assert res["worst"] >= 0.1  # far from tight where the bound promises something


@given(lam=st.floats(min_value=-1e3, max_value=1e3).filter(lambda v: abs(v) > 1e-2), seed=st.integers(0, 10_000))
def test_lemma_b_property(lam, seed):
    g = torch.Generator().manual_seed(seed)
    y = rms_normalize(torch.randn(1, 4, 3, generator=g, dtype=F64))
    e = torch.randn(1, 4, 3, generator=g, dtype=F64) * 10 ** (4 * torch.rand(1, generator=g, dtype=F64) - 2)
    assert float(th.proof_margins(y, e, lam, 1.0, steps=["B"])["B"]) >= -1e-10


# --- depth ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["general", "stochastic", "ssm"])
def test_depth_bounds_hold(family):
    g = torch.Generator().manual_seed(5)
    b, n, d, depth = 64, 4, 3, 6
    lam = 10 ** (1 + 3 * torch.rand(b, generator=g, dtype=F64))
    layers = th.random_stack_layers(family, depth, b, n, d, scale=0.3, generator=g)
    y0 = rms_normalize(torch.randn(b, n, d, generator=g, dtype=F64))
    ys, es, gains = th.rowwise_stack_run(y0, layers, lam)
    assert ys.shape == (depth + 1, b, n, d) and es.shape == (depth, b, n, d) and gains.shape == (depth, b)
    m = th.stack_margins(ys, es, gains, lam)
    applies = ~torch.isnan(m["rate"])
    assert int(applies.sum()) > 0
    assert float(m["A_depth"][applies].min()) >= -1e-10
    assert float(m["C_depth"].min()) >= -1e-10 and float(m["C_depth_chained"].min()) >= -1e-10


def test_bound_curve_softmax():
    torch.manual_seed(0)
    stack = ls.LambdaSkipStack.build("softmax", d_model=8, depth=4, lam=500.0).double()
    x = torch.randn(3, 6, 8, dtype=F64)
    df = th.bound_curve(stack, x)
    assert len(df) == 5 * 3
    assert (df["mu_tilde"] >= df["theorem_c"] - 1e-12).all()
    assert (df["mu_tilde"] >= df["theorem_c_chained"] - 1e-12).all()
    assert (df["theorem_c_chained"] >= df["theorem_c"] - 1e-12).all()
    ok = df["theorem_a"].notna()
    assert ok.any() and (df.loc[ok, "mu_tilde"] >= df.loc[ok, "theorem_a"] - 1e-12).all()
    analytic = th.bound_curve(stack, x, C_M=math.sqrt(6))
    assert analytic.attrs["C_M"] == math.sqrt(6)
    with pytest.raises(ValueError, match="post-norm"):
        th.bound_curve(ls.LambdaSkipStack.build("softmax", d_model=8, depth=2, norm="none").double(), x)
    with pytest.raises(ValueError, match="one λ"):
        th.bound_curve(ls.LambdaSkipStack.build("softmax", d_model=8, depth=2, lam=[1.0, 2.0]).double(), x)
