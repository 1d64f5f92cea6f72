"""The ablation sweeps (lambdaskip.experiments.ablations): grid, per-layer statistics, NaN honesty,
resumability, the command line and its provenance."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from lambdaskip.experiments import ablations as A

TINY = dict(archs=("softmax attention",), norms=("none", "rms-post"), gates=(False,), mlps=(False,),
            depth=4, n_inputs=32, n_tokens=6, d_model=8, lambdas=(-1.0, 0.0, 1.0, 10.0))


def test_grid_and_profiles():
    for profile in ("ci", "book", "full"):
        sizes = A.sizes_for(profile)
        assert sizes["n_inputs"] >= 32
        assert any(lam < 0 for lam in sizes["lambdas"])
    full = A.sizes_for("full")
    assert full["depth"] == 64 and len(full["archs"]) == 5
    assert len(A.configurations(full)) == 5 * 3 * 2 * 2
    with pytest.raises(ValueError, match="profile"):
        A.sizes_for("huge")


def test_run_configuration_statistics():
    df = A.run_configuration(dict(arch="softmax attention", norm="rms-post", gate=False, mlp=False), TINY)
    assert list(df.columns) == A.SYNTH_COLUMNS
    assert len(df) == len(TINY["lambdas"]) * (TINY["depth"] + 1)
    assert ((df["mean"] >= 0) & (df["mean"] <= 1)).all()
    assert (df["n"] + df["n_nan"] == TINY["n_inputs"]).all()
    # same weights and inputs for every λ: layer 0 (the normalised input) does not depend on λ
    assert df[df.layer == 0]["mean"].nunique() == 1
    # the mean/std are those of mu_over_depth on the same stack (recomputed independently)
    from lambdaskip.blocks import LambdaSkipStack
    from lambdaskip.experiments import mu_over_depth

    cfg = dict(arch="softmax attention", norm="rms-post", gate=False, mlp=False)
    torch.manual_seed(A._config_seed(cfg, 0))
    stack = LambdaSkipStack.build("softmax", d_model=8, depth=4, norm="rms", lam=10.0).double()
    x = A._inputs(TINY, 0, torch.float64, "cpu")
    curves = mu_over_depth(stack, x)
    got = df[df.lam == 10.0].sort_values("layer")
    np.testing.assert_allclose(got["mean"], curves.mean(1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(got["std"], curves.std(1).numpy(), rtol=1e-12)


def test_overflow_is_reported_not_hidden():
    # without normalisation, λ = 10 grows activations like 10^k: float32 overflows before layer 45
    sizes = dict(TINY, depth=45, lambdas=(10.0,))
    df = A.run_configuration(dict(arch="softmax attention", norm="none", gate=False, mlp=False), sizes,
                             dtype=torch.float32)
    last = df[df.layer == 45].iloc[0]
    assert last["n_nan"] == TINY["n_inputs"] and np.isnan(last["mean"])
    assert df[df.layer == 1].iloc[0]["n_nan"] == 0


def test_bad_configuration():
    with pytest.raises(ValueError, match="arch"):
        A.run_configuration(dict(arch="rnn", norm="none", gate=False, mlp=False), TINY)
    with pytest.raises(ValueError, match="norm"):
        A.run_configuration(dict(arch="softmax attention", norm="batch", gate=False, mlp=False), TINY)


def test_sweep_resumes(tmp_path):
    out = tmp_path / "r.csv"
    first = A.run_sweep(TINY, out_csv=out, progress=False)
    assert len(first) == 2 * len(TINY["lambdas"]) * (TINY["depth"] + 1)
    saved = pd.read_csv(out)
    assert len(saved) == len(first)
    # interrupted after the first configuration: keep only its rows, then resume
    saved[saved.norm == "none"].to_csv(out, index=False)
    resumed = A.run_sweep(TINY, out_csv=out, progress=False)
    again = pd.read_csv(out).sort_values(["norm", "lam", "layer"]).reset_index(drop=True)
    ref = saved.sort_values(["norm", "lam", "layer"]).reset_index(drop=True)
    assert len(resumed) == len(first)
    pd.testing.assert_frame_equal(again, ref)
    # nothing left to do: the file does not change
    A.run_sweep(TINY, out_csv=out, progress=False)
    assert len(pd.read_csv(out)) == len(first)


def test_missing_mixer_is_noted(tmp_path, monkeypatch):
    monkeypatch.setitem(A.ARCHS, "imaginary", "no-such-mixer")
    errors = []
    df = A.run_sweep(dict(TINY, archs=("imaginary",)), progress=False, errors=errors)
    assert df.empty and any("no-such-mixer" in e for e in errors)


def test_cli_writes_results_and_provenance(tmp_path, monkeypatch):
    monkeypatch.setitem(A.SIZES, "ci", dict(TINY))
    rc = A.main(["--profile", "ci", "--out", str(tmp_path), "--only", "synthetic", "--no-progress"])
    assert rc == 0
    meta = json.loads((tmp_path / "ablations_ci.json").read_text())
    for key in ("command", "profile", "seed", "device", "package_version", "date_utc", "runs", "dtype"):
        assert key in meta
    assert meta["profile"] == "ci" and len(meta["runs"]) == 1
    synth, pre, meta2 = A.load_results("ci", directory=tmp_path)
    assert pre is None and len(synth) == 2 * 4 * 5 and meta2 == meta
    with pytest.raises(FileNotFoundError, match="--profile book"):
        A.load_results("book", directory=tmp_path)


def test_dispatcher_reaches_ablations(tmp_path, monkeypatch):
    from lambdaskip.experiments.__main__ import main

    monkeypatch.setitem(A.SIZES, "ci", dict(TINY, norms=("none",), lambdas=(1.0,)))
    assert main(["ablations", "--profile", "ci", "--out", str(tmp_path), "--only", "synthetic", "--no-progress"]) == 0
    assert (tmp_path / "ablations_ci.csv").is_file()


def test_helpers_select_final_and_asymmetry():
    df = A.run_configuration(dict(arch="softmax attention", norm="rms-post", gate=False, mlp=False), TINY)
    last = A.final_layer(df)
    assert set(last.layer) == {TINY["depth"]} and len(last) == len(TINY["lambdas"])
    assert len(A.select(df, lam=[0.0, 1.0], layer=0)) == 2
    with pytest.raises(ValueError, match="column"):
        A.select(df, colour="red")
    asym = A.sign_asymmetry(df)
    assert list(asym.abs_lam) == [1.0]  # only |λ| = 1 appears with both signs in TINY
    row = asym.iloc[0]
    want_neg = last[last.lam == -1.0]["mean"].item()
    want_pos = last[last.lam == 1.0]["mean"].item()
    assert row.mu_neg == want_neg and row.mu_pos == want_pos and row["diff"] == want_neg - want_pos
    import matplotlib

    matplotlib.use("Agg")
    ax = A.plot_curves(df)
    assert len(ax.lines) == len(TINY["lambdas"])


def test_mu_layers_keeps_the_other_inputs_when_one_overflows():
    from lambdaskip.blocks import LambdaSkipStack
    from lambdaskip.experiments import mu_over_depth

    torch.manual_seed(0)
    stack = LambdaSkipStack.build("softmax", d_model=8, depth=6, norm="none", lam=10.0)
    x = torch.randn(3, 5, 8)
    x[1] *= 1e36  # float32: this input overflows after a couple of layers, the others never do
    curves = A.mu_layers(stack, x)
    assert curves.shape == (7, 3)
    assert torch.isfinite(curves[:, [0, 2]]).all()
    assert torch.isnan(curves[-1, 1]) and torch.isfinite(curves[0, 1])
    # where nothing overflows it agrees with the package's mu_over_depth
    ok = x[[0, 2]]
    torch.testing.assert_close(A.mu_layers(stack, ok), mu_over_depth(stack, ok).double(), rtol=1e-6, atol=1e-7)
