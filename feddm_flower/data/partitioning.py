"""Who gets which images: flwr-datasets partitioners over labels, attributes or feature clusters."""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    LinearPartitioner,
    Partitioner,
    ShardPartitioner,
)

from feddm_flower.config import PARTITIONINGS
from feddm_flower.data.datasets import ImageSource, thumbnails


def make_partitioner(
    scheme: str, num_partitions: int, *, alpha: float, shards_per_client: int, seed: int
) -> Partitioner:
    """The flwr-datasets partitioner for ``scheme`` (one of :data:`PARTITIONINGS`).

    'dirichlet' and 'shards' skew the label mix; 'quantity' skews sizes (client i gets a share
    proportional to i + 1) and ignores labels, like 'iid'.
    """
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
    if scheme == "quantity":
        return LinearPartitioner(num_partitions)
    raise ValueError(
        f"unknown partitioning {scheme!r}; allowed: {', '.join(map(repr, PARTITIONINGS))}"
    )


def partition_indices(
    labels: np.ndarray, partitioner: Partitioner, partition_id: int, eval_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of partition ``partition_id``, split into (train, held-out eval).

    The same labels, partitioner settings and seed give the same indices on every node.
    """
    rows = Dataset.from_dict({"label": labels, "index": np.arange(len(labels))})
    if isinstance(partitioner, LinearPartitioner):
        rows = rows.shuffle(seed=seed)  # size partitioners cut consecutive rows
    partitioner.dataset = rows
    if not 0 <= partition_id < partitioner.num_partitions:
        raise ValueError(
            f"partition-id {partition_id} is outside [0, {partitioner.num_partitions - 1}]"
        )
    split = partitioner.load_partition(partition_id).train_test_split(
        test_size=eval_fraction, seed=seed
    )
    # [:] reads a column at once; converting datasets' lazy Column reads it row by row (1 s).
    return np.asarray(split["train"]["index"][:]), np.asarray(split["test"]["index"][:])


def partition_labels(
    source: ImageSource,
    scheme: str,
    partition_by: str,
    *,
    celeba_attribute: str,
    num_clusters: int,
    seed: int,
) -> np.ndarray:
    """The label each image of ``source`` is partitioned by.

    ``partition_by='auto'``: the class label, else the CelebA attribute, else (LSUN, no labels)
    the feature cluster; ``'clusters'``: the feature cluster on any dataset. 'iid' and
    'quantity' look at no label, so none is computed for them.
    """
    if scheme in ("iid", "quantity"):
        return np.zeros(source.size, dtype=np.int64)
    if partition_by == "clusters":
        return feature_clusters(source, num_clusters, seed)
    if partition_by != "auto":
        raise ValueError(f"unknown partition-by {partition_by!r}; allowed: 'auto', 'clusters'")
    if source.labels is not None:
        return source.labels
    if source.attributes is not None:
        if celeba_attribute not in source.attributes:
            raise ValueError(
                f"celeba-attribute {celeba_attribute!r} is not a CelebA attribute; allowed: "
                f"{', '.join(source.attributes)}"
            )
        return source.attributes[celeba_attribute].astype(np.int64)
    return feature_clusters(source, num_clusters, seed)


def feature_clusters(source: ImageSource, num_clusters: int, seed: int) -> np.ndarray:
    """Cluster id per image: k-means of its 8x8 colour thumbnail."""
    features = torch.from_numpy(thumbnails(source)).flatten(1).double()
    return kmeans(features, num_clusters, seed).numpy()


def kmeans(x: torch.Tensor, k: int, seed: int, iterations: int = 30) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding; the cluster id (0..k-1) of each row of ``x``.

    Deterministic for a given seed: every node must find the same clusters. Hence float64 and
    direct (not matmul) distances, whose rounding leaves ties between centres practically
    impossible.
    """
    if len(x) < k:
        raise ValueError(f"cannot form {k} clusters from {len(x)} images")
    gen = torch.Generator().manual_seed(seed)

    def distances(centres: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x, centres, compute_mode="donot_use_mm_for_euclid_dist")

    centres = x[torch.randint(len(x), (1,), generator=gen)]
    for _ in range(1, k):
        d2 = distances(centres).min(dim=1).values.square()
        weights = d2 if d2.sum() > 0 else torch.ones_like(d2)  # all points equal: pick any
        centres = torch.cat([centres, x[torch.multinomial(weights, 1, generator=gen)]])
    for _ in range(iterations):
        assign = distances(centres).argmin(dim=1)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
        if torch.equal(updated, centres):
            break
        centres = updated
    return distances(centres).argmin(dim=1)
