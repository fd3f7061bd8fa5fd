"""Real FashionMNIST on disk, flwr-datasets partitions over clients, and the missing-data error."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from feddm_flower.config import parse_classes
from feddm_flower.data import datasets
from feddm_flower.data.loading import DataNotFoundError, load_client_data, load_dataset
from feddm_flower.data.partitioning import make_partitioner, partition_indices
from feddm_flower.evaluation.quality import load_eval_images


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return load_dataset("fashion-mnist", "").labels.numpy()


def _parts(labels: np.ndarray, scheme: str, n: int, seed: int = 0, alpha: float = 0.5):
    out = []
    for pid in range(n):
        p = make_partitioner(scheme, n, alpha=alpha, shards_per_client=2, seed=seed)
        out.append(partition_indices(labels, p, pid, 0.1, seed))
    return out


def test_real_fashion_mnist_loads() -> None:
    train, test = load_dataset("fashion-mnist", ""), load_dataset("fashion-mnist", "", train=False)
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert train.images.dtype == torch.uint8  # 4x smaller than float32; scaled per minibatch
    assert train.images.min() == 0 and train.images.max() == 255
    assert torch.bincount(train.labels).tolist() == [6000] * 10


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partitions_are_disjoint_and_split_for_evaluation(labels: np.ndarray, scheme: str) -> None:
    parts = _parts(labels, scheme, 4)
    every = np.concatenate([np.concatenate(p) for p in parts])
    assert len(every) == len(np.unique(every))  # no image on two clients or in both splits
    for train_idx, eval_idx in parts:
        share = len(eval_idx) / (len(train_idx) + len(eval_idx))
        assert 0.08 <= share <= 0.12
    if scheme != "dirichlet":  # iid and shards cover the whole training split
        assert len(every) == len(labels)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_same_seed_same_partition(labels: np.ndarray, scheme: str) -> None:
    a, b = _parts(labels, scheme, 3, seed=5), _parts(labels, scheme, 3, seed=5)
    for (ta, ea), (tb, eb) in zip(a, b, strict=True):
        assert np.array_equal(ta, tb) and np.array_equal(ea, eb)
    c = _parts(labels, scheme, 3, seed=6)
    assert not np.array_equal(a[0][0], c[0][0])


def _max_class_share(labels: np.ndarray, idx: np.ndarray) -> float:
    return np.bincount(labels[idx], minlength=10).max() / len(idx)


def test_label_skew_grows_as_alpha_shrinks(labels: np.ndarray) -> None:
    iid = np.mean([_max_class_share(labels, t) for t, _ in _parts(labels, "iid", 5)])
    mild = np.mean([_max_class_share(labels, t) for t, _ in _parts(labels, "dirichlet", 5, 0, 10)])
    skew = np.mean([_max_class_share(labels, t) for t, _ in _parts(labels, "dirichlet", 5, 0, 0.1)])
    assert iid < 0.13  # close to 1/10
    assert iid < mild < skew
    assert skew > 0.3  # far from the uniform 0.1


def test_shards_give_few_classes_per_client(labels: np.ndarray) -> None:
    for train_idx, _ in _parts(labels, "shards", 10):
        counts = np.bincount(labels[train_idx], minlength=10)
        assert (counts > 0.05 * len(train_idx)).sum() <= 4  # 2 shards, each spans <= 2 classes


def test_partition_id_out_of_range(labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="partition-id 4 is outside"):
        partition_indices(
            labels, make_partitioner("iid", 4, alpha=1, shards_per_client=1, seed=0), 4, 0.1, 0
        )


def test_client_data_are_the_partition_images() -> None:
    train, held_out = load_client_data(
        "fashion-mnist",
        "",
        1,
        3,
        partitioning="iid",
        alpha=1.0,
        shards_per_client=2,
        eval_fraction=0.1,
        seed=0,
    )
    assert len(train) + len(held_out) == 20000
    assert train.images.shape[1:] == (1, 28, 28)


def test_classes_restrict_the_clients_and_the_servers_images() -> None:
    """classes='5-9': the clients' partitions split those classes' 30000 training images, the
    server's test subset and FID's real images are theirs alone; '' changes nothing."""
    classes = parse_classes("5-9")
    options = {"partitioning": "dirichlet", "alpha": 0.5, "shards_per_client": 2,
               "eval_fraction": 0.1, "seed": 0}  # fmt: skip
    seen = 0
    for pid in range(2):
        train, held_out = load_client_data("fashion-mnist", "", pid, 2, **options, classes=classes)
        for part in (train, held_out):
            assert set(part.labels.tolist()) <= set(classes)
            seen += len(part)
    assert seen == 30000
    whole = load_client_data("fashion-mnist", "", 1, 2, **options)[0]
    assert torch.equal(whole.images, load_client_data("fashion-mnist", "", 1, 2, **options,
                                                      classes=())[0].images)  # fmt: skip
    test = load_dataset("fashion-mnist", "", train=False, limit=50, classes=classes)
    assert len(test) == 50 and set(test.labels.tolist()) <= set(classes)
    images = load_eval_images("fashion-mnist", "", 100, 0, classes)
    assert len(images) == 100
    everything = load_eval_images("fashion-mnist", "", 100, 0)
    assert torch.equal(everything, load_eval_images("fashion-mnist", "", 100, 0, ()))


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) in the IDX format, gzipped, as the Debian package ships it."""
    magic = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(magic + array.astype(np.uint8).tobytes())


def test_unpacks_the_debian_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    debian = tmp_path / "debian"
    debian.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 5)):
        _write_idx(debian / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(debian / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", debian)
    root = tmp_path / "root"
    loaded = load_dataset("fashion-mnist", str(root))
    assert loaded.images.shape == (12, 1, 28, 28)
    assert (root / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").exists()


def test_missing_data_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")

    def offline(*args: object, **kwargs: object) -> None:
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(datasets, "FashionMNIST", offline)
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", str(tmp_path / "empty"))
