"""lambdaskip.metrics: hand-computed values, the properties of theory.md §2, batching, gradients, errors."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lambdaskip import metrics as M

F64 = torch.float64


def matrices(min_n=1, max_n=6, max_d=5):
    """Hypothesis strategy: a float64 (N, d) tensor with moderate entries."""

    @st.composite
    def build(draw):
        n = draw(st.integers(min_n, max_n))
        d = draw(st.integers(1, max_d))
        values = draw(st.lists(st.floats(-10, 10, allow_nan=False, width=64), min_size=n * d, max_size=n * d))
        return torch.tensor(values, dtype=F64).reshape(n, d)

    return build()


# ---- hand-computed values -------------------------------------------------------------------

def test_mu_two_tokens_by_hand():
    # tokens (1, 0) and (3, 0): mean (2, 0); deviations (∓1, 0) -> mu = sqrt(2)
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=F64)
    assert M.mu(x).item() == pytest.approx(math.sqrt(2), abs=1e-15)
    assert M.normalized_mu(x).item() == pytest.approx(math.sqrt(2) / math.sqrt(10), abs=1e-15)


def test_collapsed_matrix_has_mu_zero_and_rank_one():
    x = torch.tensor([[1.0, 2.0, 3.0]] * 4, dtype=F64)
    assert M.mu(x).item() == 0.0
    assert M.normalized_mu(x).item() == 0.0
    assert M.stable_rank(x).item() == pytest.approx(1.0, abs=1e-12)
    assert M.effective_rank(x).item() == pytest.approx(1.0, abs=1e-6)
    assert M.token_cosine(x).item() == pytest.approx(1.0, abs=1e-12)
    assert M.dong_residual_norm(x).item() == 0.0


def test_orthonormal_tokens_rank_and_cosine():
    x = torch.eye(3, dtype=F64)
    assert M.stable_rank(x).item() == pytest.approx(3.0)
    assert M.effective_rank(x).item() == pytest.approx(3.0)
    assert M.token_cosine(x).item() == pytest.approx(0.0, abs=1e-15)
    # mu(I_3)^2 = ||I - 11ᵀ/3||_F^2 = 3 - 1 = 2
    assert M.mu(x).item() == pytest.approx(math.sqrt(2), abs=1e-15)


def test_composite_norm_by_hand():
    x = torch.tensor([[1.0, -2.0], [3.0, 4.0]], dtype=F64)
    # ||x||_1 = max col sum = max(4, 6) = 6 ; ||x||_inf = max row sum = max(3, 7) = 7
    assert M.composite_norm(x).item() == pytest.approx(math.sqrt(42))


def test_zero_matrix_is_collapsed_not_nan():
    x = torch.zeros(4, 3, dtype=F64)
    for f in (M.mu, M.normalized_mu, M.stable_rank, M.effective_rank):
        assert f(x).item() == 0.0


# ---- properties (theory.md §2) -------------------------------------------------------------

@given(matrices(), matrices())
def test_mu_is_a_seminorm(a, b):
    if a.shape != b.shape:
        b = torch.randn_like(a)
    assert M.mu(a + b) <= M.mu(a) + M.mu(b) + 1e-9
    assert M.mu(a + b) >= M.mu(a) - torch.linalg.norm(b) - 1e-9
    assert torch.allclose(M.mu(2.5 * a), 2.5 * M.mu(a), atol=1e-9)


@given(matrices())
def test_mu_sign_shift_invariance_and_bound(x):
    shift = torch.randn(x.shape[-1], dtype=F64) * 5
    assert torch.allclose(M.mu(-x), M.mu(x), atol=1e-12)
    assert torch.allclose(M.mu(x + shift), M.mu(x), atol=1e-9)
    assert M.mu(x) <= torch.linalg.norm(x) + 1e-12
    assert 0.0 <= M.normalized_mu(x).item() <= 1.0 + 1e-12


@given(matrices())
def test_mu_is_min_over_common_offsets(x):
    # mu(X) = min_c ||X - 1cᵀ||_F: any other offset gives at least as much
    c = torch.randn(x.shape[-1], dtype=F64)
    assert M.mu(x) <= torch.linalg.norm(x - c) + 1e-12
    assert torch.allclose(M.mu(x), torch.linalg.norm(M.dong_residual(x)), atol=1e-12)


@given(matrices(min_n=2))
def test_rank_measures_in_range(x):
    if torch.linalg.norm(x) == 0:
        return
    r = min(x.shape)
    assert 1 - 1e-9 <= M.stable_rank(x).item() <= r + 1e-9
    assert 1 - 1e-9 <= M.effective_rank(x).item() <= r + 1e-9
    assert -1 - 1e-12 <= M.token_cosine(x).item() <= 1 + 1e-12


def test_mean_token_is_within_factor_two_in_composite_norm():
    torch.manual_seed(1)
    x = torch.randn(5, 3, dtype=F64)
    best = min(M.composite_norm(x - torch.randn(3, dtype=F64) * s).item() for s in (0.0, 0.1, 1.0) for _ in range(50))
    assert M.dong_residual_norm(x).item() <= 2 * best + 1e-12


# ---- batching, dtypes, gradients -------------------------------------------------------------

@pytest.mark.parametrize("fn", [M.mu, M.normalized_mu, M.stable_rank, M.effective_rank, M.token_cosine, M.composite_norm, M.dong_residual_norm])
def test_batch_matches_loop(fn):
    x = torch.randn(2, 3, 5, 4, dtype=F64)
    batched = fn(x)
    assert batched.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert torch.allclose(batched[i, j], fn(x[i, j]), atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fn", [M.mu, M.normalized_mu, M.stable_rank, M.effective_rank, M.token_cosine, M.dong_residual_norm])
def test_gradients_are_finite(fn, dtype):
    x = torch.randn(3, 6, 4, dtype=dtype, requires_grad=True)
    fn(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert fn(x).dtype == dtype


def test_gradient_at_collapsed_input_is_finite():
    x = torch.ones(4, 3, dtype=F64, requires_grad=True)
    M.mu(x).backward()
    assert torch.isfinite(x.grad).all()
    z = torch.zeros(4, 3, dtype=F64, requires_grad=True)
    M.normalized_mu(z).backward()
    assert torch.isfinite(z.grad).all()


def test_mu_gradcheck():
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(M.mu, (x,))
    assert torch.autograd.gradcheck(M.normalized_mu, (x,))


# ---- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [M.mu, M.normalized_mu, M.stable_rank, M.effective_rank, M.token_cosine, M.composite_norm])
def test_error_paths(fn):
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fn([[1.0, 2.0]])
    with pytest.raises(TypeError, match="floating-point"):
        fn(torch.ones(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., N, d\)"):
        fn(torch.ones(3))
    with pytest.raises(ValueError, match="N >= "):
        fn(torch.ones(0, 3))
    with pytest.raises(ValueError, match="d >= 1"):
        fn(torch.ones(3, 0))
    with pytest.raises(ValueError, match="NaN or Inf"):
        fn(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        fn(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]))


def test_token_cosine_needs_two_tokens():
    with pytest.raises(ValueError, match="N >= 2"):
        M.token_cosine(torch.ones(1, 3))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_huge_and_tiny_matrices_do_not_overflow(dtype):
    """Regression: a finite float32 matrix with entries ~1e20 (the unnormalised skip path of a deep stack
    with |λ| = 10) gave mu = inf and normalized_mu = NaN, because the squares overflowed."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, dtype=F64)
    info = torch.finfo(dtype)
    for factor in (info.max ** 0.5 * 16, info.max / 64, info.tiny * 64):
        scaled = (x * factor).to(dtype)
        assert torch.isfinite(scaled).all() and (scaled != 0).all()
        for fn in (M.normalized_mu, M.stable_rank, M.effective_rank, M.token_cosine):
            assert torch.allclose(fn(scaled).double(), fn(x), rtol=1e-4, atol=1e-6), fn.__name__
        mu_scaled = M.mu(scaled).double()
        assert torch.isfinite(mu_scaled).all()
        assert torch.allclose(mu_scaled / factor, M.mu(x), rtol=1e-4)


def test_rescaling_is_exact_in_the_normal_range():
    """The power-of-two rescaling changes no bit of the results for ordinary inputs."""
    torch.manual_seed(1)
    x = torch.randn(4, 6, 5, dtype=F64) * 3.7
    centred = x - x.mean(dim=-2, keepdim=True)
    assert torch.equal(M.mu(x), centred.pow(2).sum(dim=(-2, -1)).sqrt())
    assert torch.equal(M.normalized_mu(x), M.mu(x) / x.pow(2).sum(dim=(-2, -1)).sqrt())
