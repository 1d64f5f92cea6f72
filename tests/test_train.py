"""Tests of lambdaskip.models, lambdaskip.train and the training grid (CI profile)."""
import csv
import json
import math

import pytest
import torch

from lambdaskip import tasks
from lambdaskip.models import ARCHITECTURES, available_architectures, build_model
from lambdaskip.train import TrainConfig, evaluate, train, warmup_cosine

TINY = dict(d_model=16, depth=2, n_heads=2, batch_size=32, lr=3e-3, log_every=2)


@pytest.fixture(scope="module")
def tiny_mqar():
    return tasks.mqar(128, 32, vocab_size=16, seq_len=16, num_pairs=3, seed=0)


@pytest.fixture(scope="module")
def tiny_digits():
    return tasks.sequential_image("digits", max_train=64, max_test=32, verbose=False)


def test_all_four_architectures_are_available():
    assert set(available_architectures()) == set(ARCHITECTURES)


@pytest.mark.parametrize("arch", available_architectures())
def test_model_shapes_and_layer_mu(arch, tiny_mqar, tiny_digits):
    torch.manual_seed(0)
    m = build_model(arch, tiny_mqar, d_model=16, depth=3, n_heads=2)
    out = m(tiny_mqar.x_train[:5])
    assert out.shape == (5, 16, tiny_mqar.n_outputs)
    mu = m.layer_mu(tiny_mqar.x_test[:4])
    assert mu.shape == (4,) and bool(((mu >= 0) & (mu <= 1)).all())
    assert m.lambdas.shape == (3,)
    c = build_model(arch, tiny_digits, d_model=16, depth=2, n_heads=2)
    assert c(tiny_digits.x_train[:7]).shape == (7, 10)


@pytest.mark.parametrize("arch", available_architectures())
def test_mqar_model_is_causal(arch, tiny_mqar):
    # Changing a late token must not change earlier outputs, or MQAR could be solved by peeking.
    torch.manual_seed(0)
    m = build_model(arch, tiny_mqar, d_model=16, depth=2, n_heads=2).eval()
    x = tiny_mqar.x_train[:2].clone()
    y1 = m(x)
    x[:, -1] = (x[:, -1] + 1) % tiny_mqar.n_inputs
    y2 = m(x)
    assert torch.allclose(y1[:, :-1], y2[:, :-1], atol=1e-5)
    assert not torch.allclose(y1[:, -1], y2[:, -1])


@pytest.mark.parametrize("arch", available_architectures())
def test_learnable_lambda_receives_gradient(arch, tiny_mqar):
    torch.manual_seed(0)
    m = build_model(arch, tiny_mqar, d_model=16, depth=2, n_heads=2, learnable_lambda=True)
    logits = m(tiny_mqar.x_train[:8])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tiny_mqar.y_train[:8].reshape(-1))
    loss.backward()
    lams = [b.lam for b in m.stack.blocks]
    assert all(isinstance(p, torch.nn.Parameter) and p.grad is not None for p in lams)
    assert all(math.isfinite(float(p.grad)) and abs(float(p.grad)) > 0 for p in lams)
    fixed = build_model(arch, tiny_mqar, d_model=16, depth=2, n_heads=2, learnable_lambda=False)
    assert not any(n.endswith(".lam") for n, _ in fixed.named_parameters())


def test_training_decreases_loss_and_moves_learnable_lambda(tiny_mqar):
    r = train(tiny_mqar, TrainConfig(arch="transformer", learnable_lambda=True, epochs=4, **TINY), progress=False)
    losses = [h["train_loss"] for h in r.history[1:]]
    assert losses[-1] < losses[0]
    assert r.history[0]["lambdas"] == [1.0, 1.0]
    assert r.history[-1]["lambdas"] != [1.0, 1.0]  # λ moved: it is trained
    assert len(r.history) == 5 and len(r.history[-1]["mu"]) == 3
    assert r.completed and 0.0 <= r.final_acc <= 1.0 and r.best_acc >= r.final_acc
    assert r.lambda_log[0][0] == 0 and r.lambda_log[-1][0] == r.history[-1]["step"]
    _, acc = evaluate(r.model, tiny_mqar.x_test, tiny_mqar.y_test)
    assert acc == pytest.approx(r.final_acc)


def test_fixed_lambda_other_values(tiny_digits):
    r = train(tiny_digits, TrainConfig(arch="transformer", lam=0.5, epochs=1, **TINY), progress=False)
    assert r.history[-1]["lambdas"] == [0.5, 0.5]


def _strip_time(history):
    return [{k: v for k, v in h.items() if k != "time_s"} for h in history]


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tiny_mqar, tmp_path):
    cfg = TrainConfig(arch="transformer", learnable_lambda=True, epochs=3, **TINY)
    full = train(tiny_mqar, cfg, progress=False)
    ckpt = tmp_path / "run.pt"
    part = train(tiny_mqar, cfg, checkpoint=ckpt, stop_after_epoch=1, progress=False)
    assert not part.completed and len(part.history) == 2 and ckpt.exists()
    resumed = train(tiny_mqar, cfg, checkpoint=ckpt, progress=False)
    assert resumed.completed
    assert _strip_time(resumed.history) == _strip_time(full.history)
    assert resumed.lambda_log == full.lambda_log
    for (n1, p1), (n2, p2) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    # a checkpoint of another configuration is refused, not silently reused
    with pytest.raises(ValueError, match="different run"):
        train(tiny_mqar, cfg, checkpoint=ckpt, progress=False, lr=1e-3)


def test_warmup_cosine_schedule():
    total, warm = 100, 10
    m = [warmup_cosine(s, total, warm, 0.1) for s in range(total + 1)]
    assert m[0] == pytest.approx(0.1) and m[warm - 1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(m[:warm], m[1:warm]))  # rising
    assert all(a >= b - 1e-12 for a, b in zip(m[warm:], m[warm + 1 :]))  # falling
    assert m[-1] == pytest.approx(0.1)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(lr=-1.0), ValueError, "lr must be a positive"),
        (dict(warmup=1.0), ValueError, "warmup"),
        (dict(d_model=30, n_heads=4), ValueError, "divisible"),
        (dict(epochs=0), ValueError, "epochs must be >= 1"),
        (dict(lam=float("nan")), ValueError, "lam must be a finite"),
        (dict(norm="batchnorm"), ValueError, "norm must be one of"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(mixer_kwargs=[1]), TypeError, "mixer_kwargs"),
    ],
)
def test_bad_configurations_fail_clearly(kw, exc, match):
    with pytest.raises(exc, match=match):
        TrainConfig(**kw)


def test_bad_inputs_fail_clearly(tiny_mqar):
    with pytest.raises(ValueError, match="arch must be one of"):
        train(tiny_mqar, TrainConfig(arch="rnn"), progress=False)
    with pytest.raises(TypeError, match="TaskData"):
        train((tiny_mqar.x_train, tiny_mqar.y_train), TrainConfig(), progress=False)
    m = build_model("transformer", tiny_mqar, d_model=16, depth=1, n_heads=2)
    with pytest.raises(TypeError, match="int64"):
        m(tiny_mqar.x_train.float())
    with pytest.raises(ValueError, match="seq_len"):
        m(torch.zeros(1, 17, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape \\(batch, N\\)"):
        m(tiny_mqar.x_train[0])


def test_ci_grid_writes_results_and_resumes(tmp_path, capsys):
    from lambdaskip.experiments import training

    rc = training.main(["--profile", "ci", "--out", str(tmp_path), "--archs", "transformer", "--cache", str(tmp_path / "ck")])
    assert rc == 0
    with open(tmp_path / "training_ci.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4  # 2 tasks x (λ=1, learnable) x 1 seed
    assert {r["setting"] for r in rows} == {"λ=1", "learnable"}
    for r in rows:  # a few steps are enough for the training loss to go down
        assert float(r["last_loss"]) < float(r["first_loss"]), r
    runs, prov = training.load_results("ci", out=str(tmp_path))
    assert len(runs) == 4 and prov["profile"] == "ci" and prov["n_done"] == 4
    assert "lambdaskip.experiments train" in prov["command"]
    assert all(len(run["history"][-1]["mu"]) == 3 for run in runs)
    capsys.readouterr()
    training.main(["--profile", "ci", "--out", str(tmp_path), "--archs", "transformer", "--cache", str(tmp_path / "ck")])
    assert "0 to do" in capsys.readouterr().out
    assert training.main(["--profile", "ci", "--out", str(tmp_path), "--archs", "lstm"]) == 2
    with pytest.raises(FileNotFoundError, match="lambdaskip.experiments train"):
        training.load_results("full", out=str(tmp_path))
    with open(tmp_path / "training_ci_history.json") as f:
        assert json.load(f)["profile"] == "ci"


def test_paired_differences_statistics():
    from lambdaskip.experiments import training

    def rec(arch, learnable, seed, acc):
        return dict(run=dict(task="mqar", arch=arch, lam=1.0, learnable=learnable, seed=seed), data_name="mqar",
                    final_acc=acc, best_acc=acc, chance=0.1, seconds=1.0, history=[dict(lambdas=[1.0])])

    # differences 1, 2, 3 points: mean 2, sd 1, se 1/sqrt(3), t = 2*sqrt(3), dof 2
    runs = [rec("transformer", False, s, 0.5) for s in range(3)]
    runs += [rec("transformer", True, s, 0.5 + (s + 1) / 100) for s in range(3)]
    d = training.paired_differences(runs).iloc[0]
    assert d["n"] == 3 and d["mean_diff"] == pytest.approx(2.0) and d["std_diff"] == pytest.approx(1.0)
    assert d["t"] == pytest.approx(2 * math.sqrt(3))
    # two-sided p of Student's t with 2 dof: 1 - t / sqrt(t^2 + 2)
    assert d["p"] == pytest.approx(1 - d["t"] / math.sqrt(d["t"] ** 2 + 2))
    assert d["ci_low"] < d["mean_diff"] < d["ci_high"]
    table = training.summary_table(runs)
    assert set(table["paper"]) == {"99.60", "98.90"} and table["mean"].round(6).tolist() == [52.0, 50.0]


def test_accuracy_counts_query_positions_only():
    """MQAR accuracy and loss are over the scored (query) positions: a model right at every query and
    wrong everywhere else scores 1.0, one wrong at every query scores 0.0, whatever the filler does."""
    from lambdaskip.tasks import IGNORE_INDEX, make_mqar

    x, y = make_mqar(8, vocab_size=16, seq_len=16, num_pairs=3, num_queries=2, seed=1)
    V = 16

    class Oracle(torch.nn.Module):
        def __init__(self, right: bool):
            super().__init__()
            self.right = right

        def forward(self, xb):  # (b, N) -> (b, N, V): reads the answer from the targets of this batch
            yb = y[: xb.shape[0]]
            pick = torch.where(yb == IGNORE_INDEX, torch.zeros_like(yb), yb if self.right else (yb + 1) % V)
            return torch.nn.functional.one_hot(pick, V).float() * 10

    assert evaluate(Oracle(True), x, y, batch_size=8)[1] == 1.0
    assert evaluate(Oracle(False), x, y, batch_size=8)[1] == 0.0
    assert int((y != IGNORE_INDEX).sum()) == 8 * 2  # 2 scored positions per sequence
