"""lambdaskip.mixers: every mixer equals its materialised mixing matrix applied to its values."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lambdaskip.mixers import (
    MIXER_FORMULAS,
    available_mixers,
    equivalence_table,
    frobenius_per_head,
    make_mixer,
)
from lambdaskip.mixers._ssm import diag_recurrence, segsum_exp

F64 = torch.float64

# (name, kwargs, needs d divisible by 2)
CONFIGS = [
    ("softmax", {"n_heads": 1}),
    ("softmax", {"n_heads": 1, "causal": True}),
    ("linear", {"n_heads": 1}),
    ("linear", {"n_heads": 1, "chunk_size": 3}),  # several chunks and a ragged last chunk
    ("s4d", {}),
    ("s4d", {"init": "real", "d_skip": True}),
    ("s6", {}),
    ("s6", {"d_state": 3, "d_skip": True}),
    ("ssd", {}),
    ("ssd", {"value_proj": True, "d_skip": True, "d_state": 5}),
    ("ssd", {"fixed_decay": 0.8}),
    ("rglru", {}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in CONFIGS]


def build(name, d, **kw):
    return make_mixer(name, d, **kw).to(F64)


def test_registry_has_the_fixed_names():
    assert set(available_mixers()) >= {"softmax", "linear", "s4d", "s6", "ssd", "rglru"}
    assert set(MIXER_FORMULAS) == set(available_mixers())


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
@settings(max_examples=6)
@given(b=st.integers(1, 2), n=st.sampled_from([1, 2, 5, 9]), d=st.sampled_from([1, 3, 4]))
def test_forward_equals_matrix_times_values(name, kw, b, n, d):
    mixer = build(name, d, **kw)
    x = torch.randn(b, n, d, dtype=F64)
    m = mixer.mixing_matrix(x)
    assert m.shape[0] == b and m.shape[-2:] == (n, n)
    out = mixer(x)
    assert out.shape == x.shape
    assert (out - mixer.combine(m @ mixer.values(x))).abs().max().item() < 1e-10
    assert (out - mixer.forward_via_matrix(x)).abs().max().item() < 1e-10
    if mixer.causal:
        assert bool((m.triu(1) == 0).all()), "a causal mixer must give a lower-triangular M"


@pytest.mark.parametrize("name", ["softmax", "linear"])
def test_attention_rows_are_stochastic(name):
    for causal in (False, True) if name == "softmax" else (True,):
        kw = {"causal": causal} if name == "softmax" else {}
        m = build(name, 6, n_heads=3, **kw).mixing_matrix(torch.randn(2, 7, 6, dtype=F64))
        assert m.shape == (2, 3, 7, 7)
        assert torch.allclose(m.sum(-1), torch.ones(2, 3, 7, dtype=F64), atol=1e-12)
        assert bool((m >= 0).all())


def test_bidirectional_softmax_is_not_triangular():
    m = build("softmax", 4).mixing_matrix(torch.randn(1, 5, 4, dtype=F64))
    above = torch.ones(5, 5, dtype=torch.bool).triu(1)
    assert m[..., above].min().item() > 0  # softmax weights are strictly positive everywhere


def test_s4d_is_toeplitz_and_input_independent():
    mixer = build("s4d", 3)
    m1 = mixer.mixing_matrix(torch.randn(2, 8, 3, dtype=F64))
    m2 = mixer.mixing_matrix(5 * torch.randn(2, 8, 3, dtype=F64))
    assert torch.equal(m1, m2) and torch.equal(m1[0], m1[1])
    for lag in range(8):
        diag = torch.diagonal(m1, offset=-lag, dim1=-2, dim2=-1)
        assert torch.allclose(diag, diag[..., :1].expand_as(diag), atol=0, rtol=0)
    # the kernel agrees with the ZOH recurrence run on a unit impulse
    impulse = torch.zeros(1, 8, 3, dtype=F64)
    impulse[0, 0] = 1.0
    assert torch.allclose(mixer(impulse)[0].T, mixer.kernel(8), atol=1e-13)


def test_s4d_kernel_matches_zoh_recurrence():
    mixer = build("s4d", 2, d_state=4)
    a = torch.complex(-mixer.log_a_real.exp(), mixer.a_imag).detach()
    dt = mixer.log_dt.exp().detach().unsqueeze(-1)
    b = torch.view_as_complex(mixer.b.detach().contiguous())
    c = torch.view_as_complex(mixer.c.detach().contiguous())
    a_bar, b_bar = torch.exp(dt * a), (torch.exp(dt * a) - 1) / a * b
    # B̄ is the zero-order hold ∫_0^Δ e^{sA} ds B: the top-right entry of exp([[ΔA, ΔB], [0, 0]])
    for ch in range(2):
        for k in range(4):
            block = torch.zeros(2, 2, dtype=torch.complex128)
            block[0, 0], block[0, 1] = dt[ch, 0] * a[ch, k], dt[ch, 0] * b[ch, k]
            zoh = torch.linalg.matrix_exp(block)
            assert torch.allclose(zoh[0, 0], a_bar[ch, k], atol=1e-14)
            assert torch.allclose(zoh[0, 1], b_bar[ch, k], atol=1e-14)
    h = b_bar.clone()  # state after an impulse at t = 0
    for t in range(6):
        expected = 2 * (c * h).sum(-1).real
        assert torch.allclose(mixer.kernel(6)[:, t], expected, atol=1e-13)
        h = a_bar * h


def test_s6_matrix_matches_entrywise_formula():
    mixer = build("s6", 3, d_state=2)
    x = torch.randn(1, 5, 3, dtype=F64)
    m = mixer.mixing_matrix(x)
    dt, bm, cm = (t[0] for t in mixer.ssm_params(x))
    A = mixer.A.detach()
    for c in range(3):
        for i in range(5):
            for j in range(i + 1):
                decay = torch.exp(dt[j + 1 : i + 1, c].sum() * A[c])
                assert torch.allclose(m[0, c, i, j], (cm[i] * decay * dt[j, c] * bm[j]).sum(), atol=1e-13)


def test_ssd_matrix_is_masked_attention():
    mixer = build("ssd", 4, n_heads=2, d_state=3)
    x = torch.randn(2, 6, 4, dtype=F64)
    log_a, b_bar, c = mixer.ssm_params(x)
    a = log_a.exp()
    L = torch.zeros(2, 2, 6, 6, dtype=F64)
    for i in range(6):  # L_ij = Π_{k=j+1..i} a_k, built by running products
        prod = torch.ones(2, 2, dtype=F64)
        for j in range(i, -1, -1):
            L[:, :, i, j] = prod
            prod = prod * a[:, :, j]
    assert torch.allclose(mixer.mixing_matrix(x), L * (c @ b_bar.transpose(-1, -2)), atol=1e-13)


def test_ssd_fixed_decay_is_assumption_4_1():
    alpha, d = 0.7, 4
    mixer = build("ssd", d, n_heads=1, fixed_decay=alpha, d_state=d)
    y = torch.randn(1, 5, d, dtype=F64)
    i = torch.arange(5)
    L = torch.where(i[:, None] >= i[None, :], alpha ** (i[:, None] - i[None, :]).clamp(min=0).to(F64), 0.0)
    wb, wc = mixer.w_b.weight, mixer.w_c.weight  # (n, d): B_t = W_B y_t
    expected = L * (y[0] @ wc.T @ wb @ y[0].T)
    m = mixer.mixing_matrix(y)
    assert m.shape == (1, 1, 5, 5)
    assert torch.allclose(m[0, 0], expected, atol=1e-13)
    # C_V = I: the output is exactly M(Y) Y, and M is quadratic in Y
    assert torch.allclose(mixer(y)[0], m[0, 0] @ y[0], atol=1e-12)
    assert torch.allclose(mixer.mixing_matrix(3 * y), 9 * m, atol=1e-12)


def test_rglru_matrix_matches_formula_and_is_bounded():
    mixer = build("rglru", 3)
    x = torch.randn(1, 6, 3, dtype=F64)
    log_a, gain = mixer.gates(x)
    a = log_a.exp()
    assert bool(((a > 0) & (a < 1)).all())
    m = mixer.mixing_matrix(x)
    for i in range(6):
        for j in range(i + 1):
            expected = a[0, j + 1 : i + 1].prod(0) * torch.sqrt(1 - a[0, j] ** 2) * torch.sigmoid(mixer.w_x(x))[0, j]
            assert torch.allclose(m[0, :, i, j], expected, atol=1e-13)


def test_helpers_agree():
    log_a = -torch.rand(2, 7, dtype=F64)
    L = segsum_exp(log_a)
    u = torch.randn(2, 7, dtype=F64)
    assert torch.allclose(diag_recurrence(log_a, u), (L @ u.unsqueeze(-1)).squeeze(-1), atol=1e-13)
    assert torch.allclose(torch.diagonal(L, dim1=-2, dim2=-1), torch.ones(2, 7, dtype=F64))


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_gradients_flow_through_mixing_matrix(name, kw):
    mixer = build(name, 4, **kw)
    x = torch.randn(2, 5, 4, dtype=F64, requires_grad=True)
    m = mixer.mixing_matrix(x)
    (m * torch.randn_like(m)).sum().backward()
    grads = [p.grad for p in mixer.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    if name != "s4d":  # the LTI matrix ignores the input; every other M depends on it
        assert x.grad is not None and x.grad.abs().sum().item() > 0
    else:
        assert x.grad is None or x.grad.abs().sum().item() == 0


def test_frobenius_per_head():
    x = torch.randn(3, 9, 6, dtype=F64)
    for name, kw in [("softmax", {"n_heads": 2}), ("s6", {}), ("ssd", {"n_heads": 3})]:
        mixer = build(name, 6, **kw)
        f = frobenius_per_head(mixer, x)
        m = mixer.mixing_matrix(x)
        assert f.shape == m.shape[:2]
        assert torch.allclose(f, torch.linalg.matrix_norm(m), atol=1e-12)
    assert frobenius_per_head(build("softmax", 6, n_heads=2), x).max().item() <= math.sqrt(9) + 1e-12
    with pytest.raises(TypeError, match="TokenMixer"):
        frobenius_per_head(torch.nn.Linear(2, 2), x)


def test_equivalence_table():
    table = equivalence_table(batch=1, n_tokens=6, d_model=4)
    assert len(table) >= len(available_mixers())
    assert set(table["name"]) == set(available_mixers())
    assert (table["max |forward − M·V|"] < 1e-10).all()
    assert table.loc[table["causal"], "lower-triangular"].all()


def test_float32_default_dtype_runs():
    x = torch.randn(2, 33, 8)
    for name in available_mixers():
        mixer = make_mixer(name, 8)
        out = mixer(x)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert (out - mixer.forward_via_matrix(x)).abs().max().item() < 1e-4


def test_bad_configurations_fail_clearly():
    with pytest.raises(ValueError, match="unknown mixer"):
        make_mixer("transformer", 8)
    for name in ("softmax", "linear", "ssd"):
        with pytest.raises(ValueError, match="divisible"):
            make_mixer(name, 6, n_heads=4)
    with pytest.raises(ValueError, match="fixed_decay"):
        make_mixer("ssd", 4, fixed_decay=1.5)
    with pytest.raises(ValueError, match="fixed_decay"):
        make_mixer("ssd", 4, fixed_decay=float("nan"))
    with pytest.raises(ValueError, match="init"):
        make_mixer("s4d", 4, init="legs")
    with pytest.raises(TypeError, match="d_model"):
        make_mixer("s6", 4.0)
    with pytest.raises(ValueError, match="d_model=4"):
        make_mixer("rglru", 4)(torch.randn(2, 3, 5))


@pytest.mark.parametrize("name", ["s6", "ssd", "rglru"])
def test_reference_loop_and_scan_kernel_agree(name, monkeypatch):
    """The forward uses lambdaskip.scan when importable and a plain loop otherwise: both must equal M·V."""
    import importlib

    module = importlib.import_module(f"lambdaskip.mixers.{name}")
    mixer = build(name, 4, **({"d_skip": True} if name != "rglru" else {}))
    x = torch.randn(2, 11, 4, dtype=F64)
    expected = mixer.forward_via_matrix(x)
    fast = mixer(x)
    monkeypatch.setattr(module, "scan_module", lambda: None)
    slow = mixer(x)
    assert (fast - expected).abs().max().item() < 1e-10
    assert (slow - expected).abs().max().item() < 1e-10


def test_command_line_table(capsys):
    from lambdaskip.mixers.__main__ import main

    assert main(["--batch", "1", "--tokens", "5", "--d-model", "4"]) == 0
    out = capsys.readouterr().out
    for name in available_mixers():
        assert name in out
    assert "largest error over all mixers" in out


def test_rglru_gates_follow_griffin():
    """a_t = σ(Λ)^{c r_t} with c = 8, input multiplier √(1 − a_t²) σ(W_x x_t + b_x), and a^c uniform in
    [0.9, 0.999] at initialisation (De et al., 2024)."""
    torch.manual_seed(0)
    mixer = build("rglru", 512)
    assert mixer.c == 8.0
    a_pow_c = torch.sigmoid(mixer.lam_param.detach()) ** mixer.c
    assert a_pow_c.min().item() >= 0.9 - 1e-9 and a_pow_c.max().item() <= 0.999 + 1e-9
    assert a_pow_c.min().item() < 0.91 and a_pow_c.max().item() > 0.99  # spread over the interval
    x = torch.randn(2, 4, 512, dtype=F64)
    log_a, gain = mixer.gates(x)
    with torch.no_grad():
        a_t = torch.sigmoid(mixer.lam_param) ** (mixer.c * torch.sigmoid(mixer.w_a(x)))
        assert torch.allclose(log_a.exp(), a_t, atol=1e-14)
        assert torch.allclose(gain, torch.sqrt(1 - a_t**2) * torch.sigmoid(mixer.w_x(x)), atol=1e-12)


def test_s6_and_ssd_initialisation_follow_mamba():
    torch.manual_seed(0)
    s6 = build("s6", 32, d_state=4)
    assert torch.allclose(s6.A[0], -torch.arange(1.0, 5.0, dtype=F64))  # S4D-Real: A = −(1..n)
    assert s6.dt_rank == 2  # ⌈32/16⌉
    dt0 = torch.nn.functional.softplus(s6.dt_proj.bias.detach())
    assert dt0.min().item() >= 1e-4 and dt0.max().item() <= 0.1 + 1e-12
    ssd = build("ssd", 32)
    assert ssd.n_heads == 2 and ssd.head_dim == 16
    a = ssd.a_log.detach().exp()
    assert a.min().item() >= 1.0 and a.max().item() <= 16.0


def test_equivalence_table_formula_of_the_fixed_decay_row():
    """Regression: the fixed-decay SSD row showed the selective formula (with Δ), which it does not use."""
    table = equivalence_table(batch=1, n_tokens=4, d_model=4).set_index("mixer")
    fixed = [label for label in table.index if "fixed decay" in label]
    assert fixed and all("Assumption 4.1" in table.loc[label, "formula"] for label in fixed)
    assert "Δ" not in table.loc[fixed[0], "formula"] and "Δ" in table.loc["ssd", "formula"]
