"""What the apps load: a dataset split, or one client's (train, held-out) images, as uint8."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from feddm_flower.data.datasets import (
    IMAGE_SHAPES,
    DataNotFoundError,
    ImageSource,
    open_source,
    resolve_root,
)
from feddm_flower.data.partitioning import make_partitioner, partition_indices, partition_labels

__all__ = [
    "IMAGE_SHAPES",
    "DataNotFoundError",
    "ImageSet",
    "class_rows",
    "load_client_data",
    "load_dataset",
]


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 (N, C, H, W) in 0..255, with class labels (N,), -1 where there are none.

    uint8 keeps a partition 4x smaller than float32; training converts each minibatch
    (``diffusion.to_model_range``).
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def _image_set(source: ImageSource, indices: np.ndarray) -> ImageSet:
    labels = source.labels[indices] if source.labels is not None else np.full(len(indices), -1)
    return ImageSet(source.read(indices), torch.as_tensor(labels, dtype=torch.long))


def load_dataset(
    name: str,
    data_root: str,
    train: bool = True,
    limit: int | None = None,
    classes: tuple[int, ...] = (),
) -> ImageSet:
    """The first ``limit`` images (default: all) of the train or test split of ``name``, of
    the ``classes`` given (default: all).

    CelebA and LSUN decode image by image: bound them with ``limit`` (LSUN's 126k training
    images are 25 GB as uint8).
    """
    source = open_source(name, resolve_root(data_root), train)
    rows = class_rows(source, classes)
    return _image_set(source, rows if limit is None else rows[:limit])


def class_rows(source: ImageSource, classes: tuple[int, ...]) -> np.ndarray:
    """The rows of ``source`` whose label is one of ``classes`` (every row for ())."""
    if not classes:
        return np.arange(source.size)
    if source.labels is None:
        raise ValueError("classes: this dataset has no class labels")
    return np.flatnonzero(np.isin(source.labels, classes))


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
    partition_by: str = "auto",
    celeba_attribute: str = "Smiling",
    num_clusters: int = 10,
    classes: tuple[int, ...] = (),
) -> tuple[ImageSet, ImageSet]:
    """One client's (train, held-out eval) images from the training split of ``dataset``
    (its ``classes`` only, if given: they are partitioned as the whole set would be).

    The partition is computed from labels, attributes or thumbnails alone; only its own images
    are decoded.
    """
    source = open_source(dataset, resolve_root(data_root), True)
    rows = class_rows(source, classes)
    labels = partition_labels(
        source,
        partitioning,
        partition_by,
        celeba_attribute=celeba_attribute,
        num_clusters=num_clusters,
        seed=seed,
    )
    partitioner = make_partitioner(
        partitioning, num_partitions, alpha=alpha, shards_per_client=shards_per_client, seed=seed
    )
    train_idx, eval_idx = partition_indices(
        labels[rows], partitioner, partition_id, eval_fraction, seed
    )
    return _image_set(source, rows[train_idx]), _image_set(source, rows[eval_idx])
