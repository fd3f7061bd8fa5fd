"""Datasets on disk, label partitions over clients (flwr-datasets), and in-memory client splits."""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    ShardPartitioner,
)
from torchvision.datasets import FashionMNIST

log = logging.getLogger(__name__)

DEFAULT_DATA_ROOT = Path.home() / ".cache" / "feddm-flower" / "data"
# Where Debian's `dataset-fashion-mnist` package puts the original IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


# (channels, pixels) of each dataset's images as the models see them.
IMAGE_SHAPES = {"fashion-mnist": (1, 28)}


class DataNotFoundError(FileNotFoundError):
    """The dataset is not on disk and could not be fetched; the message says how to get it."""


@dataclass(frozen=True)
class ImageSet:
    """Images scaled to [-1, 1] as float32 (N, C, H, W), with integer labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> ImageSet:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageSet(self.images[idx], self.labels[idx])


def resolve_root(data_root: str) -> Path:
    """The data directory: ``data_root`` if given, else the per-user cache."""
    return Path(data_root).expanduser() if data_root else DEFAULT_DATA_ROOT


def load_dataset(name: str, data_root: str, train: bool = True) -> ImageSet:
    """Load a whole split of dataset ``name`` (cached per process)."""
    if name != "fashion-mnist":
        raise ValueError(f"unknown dataset {name!r}; allowed: 'fashion-mnist'")
    return _load_fashion_mnist(resolve_root(data_root), train)


@lru_cache(maxsize=4)
def _load_fashion_mnist(root: Path, train: bool) -> ImageSet:
    _ensure_fashion_mnist(root)
    ds = FashionMNIST(str(root), train=train, download=False)
    images = ds.data.unsqueeze(1).float().div(127.5).sub(1.0)
    return ImageSet(images, ds.targets.clone())


def _ensure_fashion_mnist(root: Path) -> None:
    """Make ``root/FashionMNIST/raw`` hold the IDX files: already there, Debian's, or downloaded."""
    raw = root / "FashionMNIST" / "raw"
    if all((raw / f).exists() for f in _FASHION_FILES):
        return
    if all((DEBIAN_FASHION_MNIST / f"{f}.gz").exists() for f in _FASHION_FILES):
        log.info("Unpacking FashionMNIST from %s into %s", DEBIAN_FASHION_MNIST, raw)
        raw.mkdir(parents=True, exist_ok=True)
        for f in _FASHION_FILES:
            _gunzip_atomic(DEBIAN_FASHION_MNIST / f"{f}.gz", raw / f)
        return
    try:
        log.info("Downloading FashionMNIST into %s", root)
        FashionMNIST(str(root), train=True, download=True)
    except Exception as exc:  # any network failure ends in the same advice
        raise DataNotFoundError(
            f"FashionMNIST not found in {raw} and the download failed ({exc}). Either install "
            "Debian's package (`apt-get install dataset-fashion-mnist`), or put the four files "
            f"{', '.join(_FASHION_FILES)} (gunzipped) in {raw}, or set run-config "
            "data-root to a directory that holds FashionMNIST/raw/ with them."
        ) from exc


def _gunzip_atomic(src: Path, dst: Path) -> None:
    """Decompress ``src`` to ``dst`` so that concurrent clients never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
    with os.fdopen(fd, "wb") as out, gzip.open(src, "rb") as inp:
        shutil.copyfileobj(inp, out)
    os.replace(tmp, dst)


def make_partitioner(
    scheme: str, num_partitions: int, *, alpha: float, shards_per_client: int, seed: int
) -> Partitioner:
    """The flwr-datasets partitioner for ``scheme`` ('iid', 'dirichlet' or 'shards')."""
    if scheme == "iid":
        return IidPartitioner(num_partitions)
    if scheme == "dirichlet":
        return DirichletPartitioner(
            num_partitions, partition_by="label", alpha=alpha, min_partition_size=10, seed=seed
        )
    if scheme == "shards":
        return ShardPartitioner(
            num_partitions,
            partition_by="label",
            num_shards_per_partition=shards_per_client,
            seed=seed,
        )
    raise ValueError(f"unknown partitioning {scheme!r}; allowed: 'iid', 'dirichlet', 'shards'")


def partition_indices(
    labels: np.ndarray, partitioner: Partitioner, partition_id: int, eval_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of partition ``partition_id``, split into (train, held-out eval).

    The same labels, partitioner settings and seed give the same indices on every node.
    """
    partitioner.dataset = Dataset.from_dict({"label": labels, "index": np.arange(len(labels))})
    if not 0 <= partition_id < partitioner.num_partitions:
        raise ValueError(
            f"partition-id {partition_id} is outside [0, {partitioner.num_partitions - 1}]"
        )
    split = partitioner.load_partition(partition_id).train_test_split(
        test_size=eval_fraction, seed=seed
    )
    return np.asarray(split["train"]["index"]), np.asarray(split["test"]["index"])


def load_client_data(
    dataset: str,
    data_root: str,
    partition_id: int,
    num_partitions: int,
    *,
    partitioning: str,
    alpha: float,
    shards_per_client: int,
    eval_fraction: float,
    seed: int,
) -> tuple[ImageSet, ImageSet]:
    """One client's (train, held-out eval) images from the training split of ``dataset``."""
    full = load_dataset(dataset, data_root, train=True)
    partitioner = make_partitioner(
        partitioning, num_partitions, alpha=alpha, shards_per_client=shards_per_client, seed=seed
    )
    train_idx, eval_idx = partition_indices(
        full.labels.numpy(), partitioner, partition_id, eval_fraction, seed
    )
    return full.subset(train_idx), full.subset(eval_idx)
