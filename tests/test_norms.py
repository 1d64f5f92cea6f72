"""lambdaskip.norms: the theory's row-wise normalisation and the practical norms."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lambdaskip.norms import RowRMSNorm, make_norm, rms_normalize

F64 = torch.float64


@given(st.integers(1, 6), st.integers(1, 6), st.sampled_from(["sqrt_d", "unit"]))
def test_rows_get_the_promised_norm(n, d, scale):
    z = torch.randn(2, n, d, dtype=F64) + 0.1
    y = rms_normalize(z, scale=scale)
    target = math.sqrt(d) if scale == "sqrt_d" else 1.0
    assert torch.allclose(y.norm(dim=-1), torch.full((2, n), target, dtype=F64), atol=1e-12)
    if scale == "sqrt_d":
        assert torch.allclose(y.pow(2).sum(dim=(-2, -1)), torch.full((2,), float(n * d), dtype=F64))


def test_direction_kept_and_scale_invariant():
    z = torch.randn(3, 5, dtype=F64)
    y = rms_normalize(z)
    assert torch.allclose(rms_normalize(7.0 * z), y, atol=1e-12)
    assert torch.allclose(rms_normalize(-z), -y, atol=1e-12)
    cos = (y * z).sum(-1) / (y.norm(dim=-1) * z.norm(dim=-1))
    assert torch.allclose(cos, torch.ones(3, dtype=F64))


def test_zero_row_raises_by_default_and_maps_to_zero_with_eps():
    z = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=F64)
    with pytest.raises(ValueError, match=r"zero row at index \(1,\)"):
        rms_normalize(z)
    y = rms_normalize(z, eps=1e-12)
    assert torch.equal(y[1], torch.zeros(2, dtype=F64))
    assert torch.isfinite(y).all()


def test_bad_arguments():
    z = torch.randn(3, 2)
    with pytest.raises(ValueError, match="scale must be one of"):
        rms_normalize(z, scale="half")
    with pytest.raises(ValueError, match="eps must be"):
        rms_normalize(z, eps=-1.0)
    with pytest.raises(ValueError, match="norm must be one of"):
        make_norm("batchnorm", 4)
    with pytest.raises(TypeError, match="floating-point"):
        rms_normalize(torch.ones(2, 2, dtype=torch.int32), scale="unit")


def test_make_norm_kinds():
    assert isinstance(make_norm("none", 4), nn.Identity)
    assert isinstance(make_norm("rms", 4), RowRMSNorm)
    assert isinstance(make_norm("layernorm", 4), nn.LayerNorm)
    assert isinstance(make_norm("rmsnorm", 4), nn.RMSNorm)
    # torch's RMSNorm with unit weight = our "sqrt_d" normalisation up to its eps
    z = torch.randn(2, 3, 4, dtype=F64)
    torch_rms = make_norm("rmsnorm", 4).double()
    assert torch.allclose(torch_rms(z), rms_normalize(z), atol=1e-6)


def test_gradient_finite():
    z = torch.randn(2, 4, 3, dtype=F64, requires_grad=True)
    rms_normalize(z).sum().backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_huge_and_tiny_rows_do_not_overflow_or_underflow(dtype):
    """Regression: squaring raw entries overflowed (rows of norm ~1e20 in float32 became zero rows)
    or underflowed (rows of norm ~1e-30 in float32 were reported as zero rows)."""
    info = torch.finfo(dtype)
    big, tiny = info.max / 10, info.tiny * 1e3
    z = torch.tensor([[3.0, 4.0], [3.0 * big / 5, 4.0 * big / 5], [3.0 * tiny, 4.0 * tiny]], dtype=dtype)
    expected = math.sqrt(2) * torch.tensor([0.6, 0.8], dtype=dtype).expand(3, 2)
    for eps in (0.0, 1e-12):
        y = rms_normalize(z, eps=eps)
        assert torch.isfinite(y).all()
        if eps == 0.0:
            assert torch.allclose(y, expected, rtol=1e-6, atol=0)
        else:  # eps only matters for rows whose squared norm is comparable to eps
            assert torch.allclose(y[:2], expected[:2], rtol=1e-6, atol=0)
            assert y[2].abs().max() < 1e-6


def test_eps_formula_matches_the_docstring():
    z = torch.tensor([[1e-3, 2e-3], [0.0, 0.0], [3.0, -4.0]], dtype=F64)
    eps = 1e-6
    expected = math.sqrt(2) * z / (z.pow(2).sum(-1, keepdim=True) + eps).sqrt()
    assert torch.allclose(rms_normalize(z, eps=eps), expected, rtol=1e-14, atol=0)


def test_bad_eps_fails_at_construction():
    with pytest.raises(ValueError, match="eps must be"):
        RowRMSNorm(eps=-1.0)
    with pytest.raises(ValueError, match="eps must be"):
        make_norm("rms", 4, eps=float("nan"))
