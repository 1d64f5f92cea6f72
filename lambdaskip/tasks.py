"""Training tasks for chapter 7: multi-query associative recall (MQAR) and sequential image classification.

Both tasks return a :class:`TaskData`: tensors for a train split and a test split plus what a model
needs to know about them (input kind, vocabulary or number of classes, sequence length).

**MQAR** (in the style of the Zoology benchmark of Arora et al., 2023; our own implementation).
Each sequence starts with ``P`` key–value pairs ``k_1 v_1 k_2 v_2 … k_P v_P`` (keys drawn without
replacement from the lower half of the vocabulary, values from the upper half, a fresh random
assignment per sequence); the remaining positions hold zeros except for ``Q`` queries: keys of
the sequence, placed at random positions after the pairs. The target at a query position is the
value that was paired with that key; every other target is ``IGNORE_INDEX``. A causal model must
look back, find the key, and copy the token that followed it. Accuracy counts query positions only.

**Sequential image classification** (LRA "Image"): an image is read pixel by pixel as a sequence of
grey levels, and the class is predicted from the whole sequence. With torchvision and a network
(e.g. on Colab) this is CIFAR-10 in grey scale, 32×32 = 1024 tokens, as in the paper. Offline (CI,
the local book) it is scikit-learn's bundled 8×8 handwritten digits, 64 tokens, which ship inside
the scikit-learn package and need no download. Same code path, same model; a message says which
data is used.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from ._checks import check_choice, check_positive_int

__all__ = [
    "IGNORE_INDEX",
    "TaskData",
    "mqar",
    "make_mqar",
    "sequential_image",
    "load_digits_sequences",
    "load_cifar10_sequences",
    "torchvision_available",
]

IGNORE_INDEX = -100  # the target of positions that are not scored (torch's cross-entropy default)


@dataclass
class TaskData:
    """A train/test pair of a sequence task.

    Attributes:
        name: ``"mqar"``, ``"digits"`` or ``"cifar10"``.
        input_kind: ``"tokens"`` (``x`` holds int64 token ids, shape ``(n, N)``) or ``"pixels"``
            (``x`` holds float32 grey levels, shape ``(n, N)``).
        target_kind: ``"per_token"`` (``y`` is ``(n, N)`` int64 with ``IGNORE_INDEX`` where not
            scored) or ``"sequence"`` (``y`` is ``(n,)`` int64 class labels).
        x_train, y_train, x_test, y_test: the splits.
        n_inputs: vocabulary size for tokens, 1 for pixels.
        n_outputs: number of output classes (vocabulary size for MQAR).
        seq_len: N.
        causal: whether the task needs a causal model (MQAR does: the answer must come from the past).
        chance: accuracy of guessing (uniform over the admissible answers).
        description: one line saying what the data is, for logs and pages.
    """

    name: str
    input_kind: str
    target_kind: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_inputs: int
    n_outputs: int
    seq_len: int
    causal: bool
    chance: float
    description: str
    meta: dict = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    def __repr__(self) -> str:
        return (
            f"TaskData({self.name!r}: {self.n_train} train / {self.n_test} test sequences of {self.seq_len} "
            f"{self.input_kind}, {self.n_outputs} outputs, chance {self.chance:.3f})"
        )


# --------------------------------------------------------------------------------------------- MQAR


def make_mqar(
    n: int,
    *,
    vocab_size: int = 64,
    seq_len: int = 64,
    num_pairs: int = 8,
    num_queries: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate ``n`` MQAR sequences.

    Args:
        n: number of sequences.
        vocab_size: V, even, >= 4; token 0 is the filler, keys come from ``1 … V/2-1`` and values from
            ``V/2 … V-1``.
        seq_len: N, at least ``2·num_pairs + num_queries``.
        num_pairs: P key–value pairs per sequence (P <= V/2 - 1, so keys within a sequence are distinct).
        num_queries: Q queries per sequence (default P: every key is asked once, in random order).
        seed: the generator seed; the same arguments give the same tensors.

    Returns:
        ``(x, y)``: int64 tensors of shape ``(n, N)``. ``y[i, t]`` is the value paired with key
        ``x[i, t]`` at the Q query positions and ``IGNORE_INDEX`` everywhere else.
    """
    check_positive_int(n, "n")
    check_positive_int(vocab_size, "vocab_size", minimum=4)
    check_positive_int(seq_len, "seq_len", minimum=3)
    check_positive_int(num_pairs, "num_pairs")
    if vocab_size % 2:
        raise ValueError(f"vocab_size must be even (half keys, half values), got {vocab_size}")
    n_keys = vocab_size // 2 - 1
    if num_pairs > n_keys:
        raise ValueError(f"num_pairs must be <= vocab_size/2 - 1 = {n_keys} (distinct keys), got {num_pairs}")
    num_queries = num_pairs if num_queries is None else num_queries
    check_positive_int(num_queries, "num_queries")
    if num_queries > num_pairs:
        raise ValueError(f"num_queries must be <= num_pairs={num_pairs} (each key is asked at most once), got {num_queries}")
    if seq_len < 2 * num_pairs + num_queries:
        raise ValueError(
            f"seq_len must be >= 2*num_pairs + num_queries = {2 * num_pairs + num_queries}, got {seq_len}"
        )
    g = torch.Generator().manual_seed(int(seed))
    # Keys: a random subset of size P of the key range, per sequence (argsort of noise = random permutation).
    keys = torch.rand(n, n_keys, generator=g).argsort(dim=1)[:, :num_pairs] + 1
    values = torch.randint(vocab_size // 2, vocab_size, (n, num_pairs), generator=g)
    x = torch.zeros(n, seq_len, dtype=torch.int64)
    y = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.int64)
    x[:, 0 : 2 * num_pairs : 2] = keys
    x[:, 1 : 2 * num_pairs : 2] = values
    # Which pairs are asked (a random subset of size Q, random order) and where (random free slots).
    asked = torch.rand(n, num_pairs, generator=g).argsort(dim=1)[:, :num_queries]
    free = seq_len - 2 * num_pairs
    slots = torch.rand(n, free, generator=g).argsort(dim=1)[:, :num_queries] + 2 * num_pairs
    rows = torch.arange(n).unsqueeze(1)
    x[rows, slots] = keys.gather(1, asked)
    y[rows, slots] = values.gather(1, asked)
    return x, y


def _row_hashes(x: torch.Tensor) -> list[bytes]:
    arr = np.ascontiguousarray(x.numpy())
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in arr]


def mqar(
    n_train: int = 2000,
    n_test: int = 500,
    *,
    vocab_size: int = 64,
    seq_len: int = 64,
    num_pairs: int = 8,
    num_queries: int | None = None,
    seed: int = 0,
) -> TaskData:
    """The MQAR task: a train split and a test split that share no sequence.

    The two splits come from different generator streams (``seed`` and a seed derived from it); any
    test sequence that also occurs in the train split is dropped and replaced, so the splits never
    overlap even for tiny vocabularies. Arguments as in :func:`make_mqar`.
    """
    check_positive_int(n_train, "n_train")
    check_positive_int(n_test, "n_test")
    kw = dict(vocab_size=vocab_size, seq_len=seq_len, num_pairs=num_pairs, num_queries=num_queries)
    x_tr, y_tr = make_mqar(n_train, seed=2 * int(seed), **kw)
    seen = set(_row_hashes(x_tr))
    xs, ys, have, attempt = [], [], 0, 0
    while have < n_test:
        if attempt >= 50:
            raise ValueError(
                "could not draw enough test sequences distinct from the train split; "
                "increase vocab_size or num_pairs, or lower n_test"
            )
        x_c, y_c = make_mqar(n_test, seed=2 * int(seed) + 1 + 1_000_003 * attempt, **kw)
        # Keep a candidate only if neither the train split nor an earlier test sequence holds it
        # (duplicates inside the test split would inflate its apparent size).
        flags = []
        for h in _row_hashes(x_c):
            flags.append(h not in seen)
            seen.add(h)
        keep = torch.tensor(flags, dtype=torch.bool)
        xs.append(x_c[keep])
        ys.append(y_c[keep])
        have += int(keep.sum())
        attempt += 1
    x_te, y_te = torch.cat(xs)[:n_test], torch.cat(ys)[:n_test]
    q = num_pairs if num_queries is None else num_queries
    return TaskData(
        name="mqar",
        input_kind="tokens",
        target_kind="per_token",
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
        n_inputs=vocab_size,
        n_outputs=vocab_size,
        seq_len=seq_len,
        causal=True,
        chance=1.0 / (vocab_size // 2),
        description=(
            f"MQAR: {num_pairs} key-value pairs, {q} queries, vocabulary {vocab_size}, "
            f"{seq_len} tokens (generated, seed {seed})"
        ),
        meta=dict(vocab_size=vocab_size, num_pairs=num_pairs, num_queries=q, seed=int(seed)),
    )


# ---------------------------------------------------------------------------- sequential images


def torchvision_available() -> bool:
    """Whether ``torchvision`` can be imported (it is needed for CIFAR-10 only)."""
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def _standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # One mean and std over all train pixels (not per position), so that the pixel sequence keeps its shape.
    mean, std = float(x_train.mean()), float(x_train.std()) or 1.0
    return (
        torch.from_numpy(((x_train - mean) / std).astype(np.float32)),
        torch.from_numpy(((x_test - mean) / std).astype(np.float32)),
    )


def load_digits_sequences(test_fraction: float = 0.2, split_seed: int = 0, max_train: int | None = None,
                          max_test: int | None = None) -> TaskData:
    """scikit-learn's 8×8 digits (1797 images, bundled with the package) as 64-pixel sequences.

    The split is stratified-free but fixed by ``split_seed`` (the same test set for every training
    seed), pixels are scaled to ``[0, 1]`` and then standardised with the train split's mean and std.
    ``max_train`` / ``max_test`` keep only that many images of a split (quick runs and tests).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the offline image task needs scikit-learn (its 8x8 digits ship inside the package): "
            "pip install scikit-learn"
        ) from err
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = load_digits()
    images = digits.images.reshape(len(digits.images), -1) / 16.0  # (1797, 64), grey levels in [0, 1]
    labels = digits.target.astype(np.int64)
    perm = np.random.default_rng(split_seed).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test, train = perm[:n_test], perm[n_test:]
    if max_train is not None:
        train = train[: check_positive_int(max_train, "max_train")]
    if max_test is not None:
        test = test[: check_positive_int(max_test, "max_test")]
    x_tr, x_te = _standardize(images[train], images[test])
    return TaskData(
        name="digits",
        input_kind="pixels",
        target_kind="sequence",
        x_train=x_tr,
        y_train=torch.from_numpy(labels[train]),
        x_test=x_te,
        y_test=torch.from_numpy(labels[test]),
        n_inputs=1,
        n_outputs=10,
        seq_len=64,
        causal=False,
        chance=0.1,
        description=(
            "offline sequential image task: scikit-learn 8x8 digits as 64 grey-level tokens "
            f"(bundled, no download; {len(train)} train / {len(test)} test)"
        ),
        meta=dict(split_seed=split_seed, test_fraction=test_fraction, max_train=max_train, max_test=max_test),
    )


def load_cifar10_sequences(root: str = "data/cifar10", download: bool = False, limit: int | None = None) -> TaskData:
    """CIFAR-10 in grey scale as 1024-pixel sequences (the paper's LRA Image task).

    Needs ``torchvision`` and, unless the files are already under ``root``, ``download=True`` and a
    network. Grey levels use the ITU-R 601 luma weights; pixels are standardised with the train
    split's mean and std. ``limit`` keeps the first ``limit`` images of each split (for quick runs).

    Raises:
        ImportError: torchvision is not installed (the message says how to get it, or to use the
            offline digits instead).
    """
    if not torchvision_available():
        raise ImportError(
            "CIFAR-10 needs torchvision, which is not installed here (the local torch wheel has no "
            "matching torchvision). Install it (e.g. on Colab it is preinstalled) or use the offline "
            "task: sequential_image(source='digits')."
        )
    import torchvision  # lazy: optional dependency

    def grey(ds) -> tuple[np.ndarray, np.ndarray]:
        data = np.asarray(ds.data, dtype=np.float64) / 255.0  # (n, 32, 32, 3)
        g = data @ np.array([0.299, 0.587, 0.114])
        labels = np.asarray(ds.targets, dtype=np.int64)
        if limit is not None:
            g, labels = g[:limit], labels[:limit]
        return g.reshape(len(g), -1), labels

    train = torchvision.datasets.CIFAR10(root, train=True, download=download)
    test = torchvision.datasets.CIFAR10(root, train=False, download=download)
    (a, la), (b, lb) = grey(train), grey(test)
    x_tr, x_te = _standardize(a, b)
    return TaskData(
        name="cifar10",
        input_kind="pixels",
        target_kind="sequence",
        x_train=x_tr,
        y_train=torch.from_numpy(la),
        x_test=x_te,
        y_test=torch.from_numpy(lb),
        n_inputs=1,
        n_outputs=10,
        seq_len=1024,
        causal=False,
        chance=0.1,
        description="LRA Image: CIFAR-10 in grey scale as 1024 pixel tokens (torchvision)",
        meta=dict(root=root, limit=limit),
    )


IMAGE_SOURCES = ("auto", "digits", "cifar10")


def sequential_image(source: str = "auto", *, root: str = "data/cifar10", download: bool = False, verbose: bool = True, **kw) -> TaskData:
    """The sequential image task from ``source``: ``"cifar10"``, ``"digits"`` or ``"auto"``.

    ``"auto"`` uses CIFAR-10 when torchvision is installed and the data is either on disk or
    ``download=True``; otherwise it falls back to the offline digits. Either way it prints which
    data it uses (``verbose``).
    """
    check_choice(source, "source", IMAGE_SOURCES)
    data = None
    if source in ("auto", "cifar10"):
        if source == "cifar10":
            data = load_cifar10_sequences(root=root, download=download, limit=kw.get("limit"))
        elif torchvision_available():
            try:
                data = load_cifar10_sequences(root=root, download=download, limit=kw.get("limit"))
            except (RuntimeError, OSError) as err:  # not on disk and no download allowed / no network
                if verbose:
                    print(f"[lambdaskip.tasks] CIFAR-10 unavailable ({err}); falling back to the offline digits.")
        elif verbose:
            print("[lambdaskip.tasks] torchvision is not installed: using the offline digits instead of CIFAR-10.")
    if data is None:
        data = load_digits_sequences(
            **{k: v for k, v in kw.items() if k in ("test_fraction", "split_seed", "max_train", "max_test")}
        )
    if verbose:
        print(f"[lambdaskip.tasks] image data: {data.description}")
    return data
