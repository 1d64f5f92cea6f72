"""Tests of lambdaskip.tasks: the MQAR generator's structure, splits, shapes, and the image data paths."""
import pytest
import torch

from lambdaskip import tasks
from lambdaskip.tasks import IGNORE_INDEX


def _pairs(x_row: torch.Tensor, num_pairs: int) -> dict[int, int]:
    keys, values = x_row[0 : 2 * num_pairs : 2].tolist(), x_row[1 : 2 * num_pairs : 2].tolist()
    return dict(zip(keys, values))


@pytest.mark.parametrize("vocab,seq_len,pairs,queries", [(64, 64, 8, None), (16, 20, 4, 2), (8, 9, 3, 3)])
def test_mqar_every_query_answer_is_its_keys_value(vocab, seq_len, pairs, queries):
    x, y = tasks.make_mqar(200, vocab_size=vocab, seq_len=seq_len, num_pairs=pairs, num_queries=queries, seed=3)
    q = pairs if queries is None else queries
    assert x.shape == y.shape == (200, seq_len) and x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x, y):
        table = _pairs(row_x, pairs)
        assert len(table) == pairs  # keys distinct within a sequence
        assert all(1 <= k < vocab // 2 for k in table) and all(vocab // 2 <= v < vocab for v in table.values())
        scored = (row_y != IGNORE_INDEX).nonzero().flatten().tolist()
        assert len(scored) == q and min(scored) >= 2 * pairs  # queries come after the pairs
        for t in scored:
            assert table[int(row_x[t])] == int(row_y[t])
        # non-query positions after the pairs hold the filler token 0
        rest = [t for t in range(2 * pairs, seq_len) if t not in scored]
        assert all(int(row_x[t]) == 0 for t in rest)
        assert len({int(row_x[t]) for t in scored}) == q  # each key asked at most once


def test_mqar_deterministic_and_seed_dependent():
    a = tasks.make_mqar(50, seed=7)
    b = tasks.make_mqar(50, seed=7)
    c = tasks.make_mqar(50, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_mqar_splits_never_overlap_even_for_a_tiny_vocabulary():
    # vocab 8, 2 pairs, 1 query, 6 tokens: only 6 key orders x 16 value pairs x 4 query layouts = 384
    # distinct sequences, so random train and test draws would surely collide without the filter
    data = tasks.mqar(150, 100, vocab_size=8, seq_len=6, num_pairs=2, num_queries=1, seed=0)
    train_rows = {tuple(r) for r in data.x_train.tolist()}
    test_rows = [tuple(r) for r in data.x_test.tolist()]
    assert data.n_test == 100
    assert not train_rows.intersection(test_rows)
    assert len(set(test_rows)) == len(test_rows)
    big = tasks.mqar(500, 200, seed=1)
    assert not {tuple(r) for r in big.x_train.tolist()}.intersection(tuple(r) for r in big.x_test.tolist())
    assert big.causal and big.target_kind == "per_token" and big.chance == pytest.approx(1 / 32)


def test_mqar_impossible_test_split_fails_clearly():
    with pytest.raises(ValueError, match="distinct from the train split"):
        tasks.mqar(2000, 2000, vocab_size=4, seq_len=3, num_pairs=1, num_queries=1)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(vocab_size=63), "vocab_size must be even"),
        (dict(vocab_size=16, num_pairs=8), "num_pairs must be <="),
        (dict(seq_len=20, num_pairs=8), "seq_len must be >="),
        (dict(num_pairs=4, num_queries=5), "num_queries must be <="),
        (dict(vocab_size=2), "vocab_size must be >= 4"),
    ],
)
def test_mqar_bad_configurations_fail_clearly(kw, match):
    with pytest.raises(ValueError, match=match):
        tasks.make_mqar(4, **kw)


def test_mqar_bad_types():
    with pytest.raises(TypeError, match="n must be an int"):
        tasks.make_mqar(2.5)
    with pytest.raises(TypeError, match="num_pairs"):
        tasks.make_mqar(3, num_pairs="8")


def test_digits_offline_shapes_dtypes_and_split():
    data = tasks.load_digits_sequences()
    assert data.name == "digits" and data.input_kind == "pixels" and data.target_kind == "sequence"
    assert data.x_train.shape == (data.n_train, 64) and data.x_test.shape == (data.n_test, 64)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.n_train + data.n_test == 1797 and data.n_test == round(0.2 * 1797)
    assert set(data.y_train.unique().tolist()) == set(range(10))
    assert abs(float(data.x_train.mean())) < 1e-4 and abs(float(data.x_train.std()) - 1) < 1e-3
    again = tasks.load_digits_sequences()
    assert torch.equal(data.x_test, again.x_test)  # the split is fixed
    small = tasks.load_digits_sequences(max_train=100, max_test=30)
    assert small.n_train == 100 and small.n_test == 30
    with pytest.raises(ValueError, match="test_fraction"):
        tasks.load_digits_sequences(test_fraction=1.5)


def test_sequential_image_says_which_data_it_uses(capsys):
    data = tasks.sequential_image("digits", max_train=64, max_test=16)
    out = capsys.readouterr().out
    assert "8x8 digits" in out and data.seq_len == 64
    with pytest.raises(ValueError, match="source must be one of"):
        tasks.sequential_image("mnist")


@pytest.mark.skipif(tasks.torchvision_available(), reason="torchvision installed: the no-torchvision path cannot be tested")
def test_cifar_without_torchvision_fails_clearly_and_auto_falls_back(capsys):
    with pytest.raises(ImportError, match="torchvision"):
        tasks.load_cifar10_sequences()
    with pytest.raises(ImportError, match="offline"):
        tasks.sequential_image("cifar10")
    data = tasks.sequential_image("auto", max_train=32, max_test=8)
    assert data.name == "digits"
    assert "torchvision is not installed" in capsys.readouterr().out


@pytest.mark.skipif(not tasks.torchvision_available(), reason="torchvision not installed")
def test_cifar_without_files_and_without_download_fails(tmp_path):  # never downloads in tests
    with pytest.raises(RuntimeError):
        tasks.load_cifar10_sequences(root=str(tmp_path), download=False)
