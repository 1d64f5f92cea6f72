"""lambdaskip.blocks extensions: gating, MLP sub-block, every mixer inside a λ-skip stack."""
import math

import pytest
import torch
from torch import nn

from lambdaskip.blocks import LambdaSkipBlock, LambdaSkipStack
from lambdaskip.mixers import available_mixers, make_mixer
from lambdaskip.norms import rms_normalize

F64 = torch.float64


def mixer64(name="softmax", d=4, **kw):
    return make_mixer(name, d, **kw).to(F64)


def zero_output(mixer):
    """Make a softmax mixer contribute nothing (its output projection is zero)."""
    with torch.no_grad():
        mixer.w_o.weight.zero_()
    return mixer


def test_lambda_zero_without_norm_is_the_mixer_alone():
    mixer = mixer64("s6")
    x = torch.randn(2, 5, 4, dtype=F64)
    for position in ("post", "pre"):
        block = LambdaSkipBlock(mixer, 0.0, norm="none", norm_position=position).to(F64)
        assert torch.allclose(block(x), mixer(x), atol=1e-14)


@pytest.mark.parametrize("lam", [2.5, -0.7])
def test_no_mixer_contribution_leaves_the_skip(lam):
    mixer = zero_output(mixer64("softmax"))
    x = torch.randn(2, 5, 4, dtype=F64)
    post = LambdaSkipBlock(mixer, lam, norm="rms").to(F64)
    assert torch.allclose(post(x), math.copysign(1.0, lam) * rms_normalize(x), atol=1e-12)
    pre = LambdaSkipBlock(mixer, lam, norm="rms", norm_position="pre").to(F64)
    assert torch.allclose(pre(x), lam * x, atol=1e-12)


@pytest.mark.parametrize("position", ["post", "pre"])
def test_gate_is_applied_to_the_mixer_branch_before_the_skip(position):
    mixer = mixer64("ssd")
    block = LambdaSkipBlock(mixer, 1.5, norm="rms", norm_position=position, gate=True).to(F64)
    x = torch.randn(3, 6, 4, dtype=F64)
    silu = nn.functional.silu
    if position == "post":
        expected = rms_normalize(1.5 * x + silu(block.gate_proj(x)) * mixer(x))
    else:
        u = rms_normalize(x)
        expected = 1.5 * x + silu(block.gate_proj(u)) * mixer(u)
    assert torch.allclose(block(x), expected, atol=1e-12)
    assert block.gate_proj.weight.shape == (4, 4)


@pytest.mark.parametrize("position", ["post", "pre"])
def test_mlp_sub_block_uses_the_same_lambda_and_norm_placement(position):
    mixer = mixer64("linear")
    block = LambdaSkipBlock(mixer, -2.0, norm="layernorm", norm_position=position, mlp=True, mlp_ratio=3).to(F64)
    x = torch.randn(2, 5, 4, dtype=F64)
    if position == "post":
        h = block.norm(-2.0 * x + mixer(x))
        expected = block.mlp_norm(-2.0 * h + block.mlp(h))
    else:
        h = -2.0 * x + mixer(block.norm(x))
        expected = -2.0 * h + block.mlp(block.mlp_norm(h))
    assert torch.allclose(block(x), expected, atol=1e-12)
    assert block.mlp[0].out_features == 12
    assert block.mlp_norm is not block.norm  # its own LayerNorm parameters


def test_learnable_lambda_receives_gradient_through_gate_and_mlp():
    stack = LambdaSkipStack.build("s4d", d_model=4, depth=3, lam=[1.0, 2.0, 3.0], learnable_lambda=True,
                                  gate=True, mlp=True).to(F64)
    y = stack(torch.randn(2, 5, 4, dtype=F64))
    (y * torch.randn_like(y)).sum().backward()
    for block in stack.blocks:
        assert isinstance(block.lam, nn.Parameter)
        assert block.lam.grad is not None and block.lam.grad.abs().item() > 0
    assert torch.equal(stack.lambdas, torch.tensor([1.0, 2.0, 3.0], dtype=F64))


def test_shared_weights_share_mixer_gate_and_mlp():
    shared = LambdaSkipStack.build("rglru", d_model=4, depth=4, shared_weights=True, gate=True, mlp=True)
    independent = LambdaSkipStack.build("rglru", d_model=4, depth=4, gate=True, mlp=True)
    first = shared.blocks[0]
    for block in shared.blocks[1:]:
        assert block.mixer is first.mixer and block.gate_proj is first.gate_proj and block.mlp is first.mlp
    n_shared = sum(p.numel() for p in shared.parameters())
    n_indep = sum(p.numel() for p in independent.parameters())
    assert n_indep == 4 * n_shared  # rms norms and fixed λ have no parameters


@pytest.mark.parametrize("name", sorted(available_mixers()))
@pytest.mark.parametrize("position", ["post", "pre"])
def test_every_mixer_runs_in_a_stack(name, position):
    stack = LambdaSkipStack.build(name, d_model=4, depth=3, lam=2.0, norm="rms", norm_position=position,
                                  gate=True, mlp=True, mlp_ratio=2).to(F64)
    out = stack(torch.randn(2, 7, 4, dtype=F64), return_all=True)
    assert out.shape == (4, 2, 7, 4) and bool(torch.isfinite(out).all())
    if position == "post":  # every layer sits on the sphere of radius √d
        assert torch.allclose(out.norm(dim=-1), torch.full((4, 2, 7), 2.0, dtype=F64), atol=1e-12)


def test_existing_build_arguments_still_work():
    stack = LambdaSkipStack.build("ssd", d_model=4, depth=2, lam=(0.5, -1.5), mixer_kwargs={"fixed_decay": 0.9, "n_heads": 1})
    assert stack.depth == 2 and stack.blocks[0].mixer.fixed_decay == 0.9
    assert stack.blocks[0].gate_proj is None and stack.blocks[0].mlp is None
    assert torch.equal(stack.lambdas, torch.tensor([0.5, -1.5]))


def test_bad_configurations_fail_at_construction():
    with pytest.raises(ValueError, match="unknown mixer"):
        LambdaSkipStack.build("mamba3", d_model=4, depth=2)
    with pytest.raises(ValueError, match="lam"):
        LambdaSkipStack.build("softmax", d_model=4, depth=2, lam=float("nan"))
    with pytest.raises(ValueError, match="lam"):
        LambdaSkipStack.build("softmax", d_model=4, depth=2, lam=[1.0, float("inf")])
    with pytest.raises(ValueError, match="depth"):
        LambdaSkipStack.build("softmax", d_model=4, depth=0)
    with pytest.raises(ValueError, match="divisible"):
        LambdaSkipStack.build("softmax", d_model=6, depth=2, mixer_kwargs={"n_heads": 4})
    with pytest.raises(TypeError, match="gate"):
        LambdaSkipBlock(mixer64(), 1.0, gate="yes")
    with pytest.raises(ValueError, match="mlp_ratio"):
        LambdaSkipBlock(mixer64(), 1.0, mlp=True, mlp_ratio=0)
    with pytest.raises(ValueError, match="norm_position"):
        LambdaSkipBlock(mixer64(), 1.0, norm_position="middle")
