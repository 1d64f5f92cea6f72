"""λ-skip blocks and stacks (foundation part): semantics, shapes, λ handling, errors."""
import math

import pytest
import torch

from lambdaskip import LambdaSkipBlock, LambdaSkipStack, make_mixer
from lambdaskip.experiments import collapse_sweep, mu_over_depth, query_key_grad_norms
from lambdaskip.metrics import normalized_mu
from lambdaskip.norms import rms_normalize

F64 = torch.float64


class ZeroMixer(torch.nn.Module):
    """A mixer that contributes nothing: isolates the skip path."""

    d_model = 4

    def forward(self, x):
        return torch.zeros_like(x)


def test_softmax_attention_matches_its_mixing_matrix():
    for causal in (False, True):
        mixer = make_mixer("softmax", 8, n_heads=2, causal=causal).double()
        x = torch.randn(3, 5, 8, dtype=F64)
        m = mixer.mixing_matrix(x)
        assert m.shape == (3, 2, 5, 5)
        assert torch.allclose(m.sum(-1), torch.ones(3, 2, 5, dtype=F64), atol=1e-12)
        assert (mixer(x) - mixer.forward_via_matrix(x)).abs().max() < 1e-10
        if causal:
            assert torch.equal(m, m.tril())


def test_post_norm_block_formula():
    torch.manual_seed(0)
    mixer = make_mixer("softmax", 6).double()
    block = LambdaSkipBlock(mixer, lam=2.5, norm="rms").double()
    x = torch.randn(2, 4, 6, dtype=F64)
    expected = rms_normalize(2.5 * x + mixer(x))
    assert torch.allclose(block(x), expected, atol=1e-12)


def test_pre_norm_block_formula():
    mixer = make_mixer("softmax", 6).double()
    block = LambdaSkipBlock(mixer, lam=-1.5, norm="rms", norm_position="pre").double()
    x = torch.randn(2, 4, 6, dtype=F64)
    assert torch.allclose(block(x), -1.5 * x + mixer(rms_normalize(x)), atol=1e-12)


def test_zero_mixer_and_lambda():
    x = torch.randn(2, 3, 4, dtype=F64)
    # no mixer contribution, no norm: the block is multiplication by λ
    assert torch.allclose(LambdaSkipBlock(ZeroMixer(), lam=3.0, norm="none").double()(x), 3.0 * x)
    # λ = 0 and no mixer contribution: everything is zero, and the rms norm refuses zero rows
    with pytest.raises(ValueError, match="zero row"):
        LambdaSkipBlock(ZeroMixer(), lam=0.0, norm="rms")(x)
    # λ = 0 with a real mixer: output is the mixer's alone
    mixer = make_mixer("softmax", 4).double()
    assert torch.allclose(LambdaSkipBlock(mixer, lam=0.0, norm="none").double()(x), mixer(x))


def test_learnable_lambda_gets_gradient_and_fixed_does_not():
    mixer = make_mixer("softmax", 4)
    block = LambdaSkipBlock(mixer, lam=1.0, learnable_lambda=True)
    assert isinstance(block.lam, torch.nn.Parameter)
    block(torch.randn(2, 3, 4)).pow(2).sum().backward()
    assert block.lam.grad is not None and torch.isfinite(block.lam.grad) and block.lam.grad != 0
    fixed = LambdaSkipBlock(make_mixer("softmax", 4), lam=1.0)
    assert "lam" not in dict(fixed.named_parameters())


def test_stack_shapes_per_layer_lambda_and_shared_weights():
    stack = LambdaSkipStack.build("softmax", d_model=8, depth=3, lam=[0.0, 1.0, 2.0]).double()
    x = torch.randn(2, 5, 8, dtype=F64)
    ys = stack(x, return_all=True)
    assert ys.shape == (4, 2, 5, 8)
    assert torch.allclose(ys[-1], stack(x))
    assert torch.allclose(ys[0], rms_normalize(x))
    assert stack.lambdas.tolist() == [0.0, 1.0, 2.0]
    shared = LambdaSkipStack.build("softmax", d_model=8, depth=3, shared_weights=True)
    assert shared.blocks[0].mixer is shared.blocks[2].mixer
    assert sum(p.numel() for p in shared.parameters()) == 4 * 8 * 8


def test_bad_configurations_fail_at_construction():
    with pytest.raises(ValueError, match="unknown mixer"):
        LambdaSkipStack.build("nope", d_model=8, depth=2)
    with pytest.raises(ValueError, match="lam must be finite"):
        LambdaSkipStack.build("softmax", d_model=8, depth=2, lam=float("inf"))
    with pytest.raises(ValueError, match="depth must be >= 1"):
        LambdaSkipStack.build("softmax", d_model=8, depth=0)
    with pytest.raises(ValueError, match="divisible"):
        LambdaSkipStack.build("softmax", d_model=8, depth=2, mixer_kwargs={"n_heads": 3})
    with pytest.raises(ValueError, match="sequence of depth=2"):
        LambdaSkipStack.build("softmax", d_model=8, depth=2, lam=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="norm must be one of"):
        LambdaSkipStack.build("softmax", d_model=8, depth=2, norm="batch")
    with pytest.raises(ValueError, match=r"x must have shape \(batch, N, d_model=8\)"):
        LambdaSkipStack.build("softmax", d_model=8, depth=1)(torch.randn(2, 3, 7))


def test_mu_over_depth_matches_direct_computation_and_flags_overflow():
    stack = LambdaSkipStack.build("softmax", d_model=8, depth=4, lam=1.0).double()
    x = torch.randn(3, 6, 8, dtype=F64)
    curves = mu_over_depth(stack, x)
    assert curves.shape == (5, 3)
    ys = stack(x, return_all=True)
    assert torch.allclose(curves, normalized_mu(ys))
    # without normalisation a huge λ overflows float32: those layers are NaN, not invented numbers
    big = LambdaSkipStack.build("softmax", d_model=8, depth=12, lam=1e6, norm="none")
    c = mu_over_depth(big, torch.randn(2, 6, 8))
    assert torch.isnan(c[-1]).all() and torch.isfinite(c[0]).all()


def test_collapse_sweep_claims_of_chapter_one_at_small_size():
    df = collapse_sweep(lambdas=[0.0, 10.0], norms=["rms", "none"], depth=16, n_inputs=8, n_tokens=16, d_model=16)
    assert len(df) == 2 * 2 * 17 * 8
    last = df[df.layer == 16].groupby(["norm", "lam"]).mu_tilde.mean()
    assert last[("none", 0.0)] < 1e-6      # no skip: collapse
    assert last[("rms", 10.0)] > 0.5       # large λ with normalisation: no collapse


def test_query_key_gradients_vanish_without_skip():
    x = torch.randn(4, 16, 16, dtype=F64)
    torch.manual_seed(0)
    no_skip = LambdaSkipStack.build("softmax", d_model=16, depth=12, lam=0.0, norm="rms").double()
    torch.manual_seed(0)
    skip = LambdaSkipStack.build("softmax", d_model=16, depth=12, lam=10.0, norm="rms").double()
    g0 = query_key_grad_norms(no_skip, x)
    g1 = query_key_grad_norms(skip, x)
    assert list(g0.layer) == list(range(1, 13))
    # collapse reaches the deep layers first: their query weights get (numerically) no gradient
    assert g0.grad_wq.iloc[-1] < 1e-9 * g1.grad_wq.iloc[-1]
    assert g0.grad_wk.iloc[-1] < 1e-9 * g1.grad_wk.iloc[-1]
    assert g1.grad_wq.min() > 0.1


def test_forward_reports_overflow_clearly():
    big = LambdaSkipStack.build("softmax", d_model=8, depth=12, lam=1e6, norm="none")
    with pytest.raises(FloatingPointError, match="overflowed"):
        big(torch.randn(2, 6, 8))


def test_lambda_accepts_numpy_scalars_and_rejects_strings_clearly():
    """Regression: np.float32 (not a float subclass) was treated as a sequence and failed obscurely."""
    import numpy as np

    stack = LambdaSkipStack.build("softmax", d_model=4, depth=3, lam=np.float32(2.5))
    assert torch.allclose(stack.lambdas, torch.full((3,), 2.5))
    stack = LambdaSkipStack.build("softmax", d_model=4, depth=2, lam=np.array([1.0, -3.0]))
    assert torch.allclose(stack.lambdas, torch.tensor([1.0, -3.0]))
    with pytest.raises(TypeError, match="lam must be a real number or a sequence"):
        LambdaSkipStack.build("softmax", d_model=4, depth=2, lam="ten")
    with pytest.raises(TypeError, match="lam must be a real number or a sequence"):
        LambdaSkipStack.build("softmax", d_model=4, depth=2, lam=None)


def test_mu_over_depth_float32_large_but_finite_layers_are_not_nan():
    """Regression: in float32 without normalisation, λ = 10 makes ‖Y^k‖ ~ 10^k; from k ≈ 19 the squares in
    μ overflowed and μ̃ was reported as NaN ("blew up") although every layer was still finite."""
    torch.manual_seed(0)
    # an LTI mixer is linear, so the layers stay finite up to float32's ~3e38 (attention's scores overflow sooner)
    stack = LambdaSkipStack.build("s4d", d_model=8, depth=25, lam=10.0, norm="none")
    x = torch.randn(2, 6, 8)
    with torch.no_grad():
        ys = stack(x, return_all=True)
    assert torch.isfinite(ys).all() and ys[-1].abs().max() > 1e20
    curves = mu_over_depth(stack, x)
    assert torch.isfinite(curves).all()
    assert (curves[-1] > 0.5).all()  # a large λ keeps the tokens apart


def test_mu_over_depth_keeps_inputs_that_do_not_overflow():
    torch.manual_seed(0)
    stack = LambdaSkipStack.build("softmax", d_model=8, depth=6, lam=1e30, norm="none").double()
    small = torch.randn(1, 5, 8, dtype=F64) * 1e-200   # stays finite over 6 layers
    large = torch.randn(1, 5, 8, dtype=F64) * 1e200    # overflows within the first layers
    curves = mu_over_depth(stack, torch.cat([small, large]))
    assert torch.isfinite(curves[:, 0]).all()
    assert torch.isnan(curves[-1, 1]) and torch.isfinite(curves[0, 1])
