"""CIFAR-10, CelebA and LSUN church on tiny files in their real on-disk formats (formats.py).

Each loader is checked for shape, dtype, range, labels/attributes, crop and resize, and for the
error that names the expected layout; partitions are checked per dataset for disjointness,
coverage, determinism and actual skew.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from formats import (
    CELEBA_ATTRIBUTES,
    GREEN,
    colour_groups,
    framed,
    write_celeba,
    write_cifar,
    write_lsun,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from feddm_flower.data import datasets
from feddm_flower.data.datasets import open_source, thumbnails
from feddm_flower.data.loading import DataNotFoundError, load_client_data, load_dataset
from feddm_flower.data.partitioning import (
    kmeans,
    make_partitioner,
    partition_indices,
    partition_labels,
)
from feddm_flower.task.diffusion import denoising_loss, to_model_range, train_local
from feddm_flower.task.models import build_scheduler, build_unet


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach torchvision's downloads."""

    def no_network(*args: object, **kwargs: object) -> None:
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(datasets, "CIFAR10", no_network)
    monkeypatch.setattr(datasets, "CelebA", no_network)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    root = tmp_path_factory.mktemp("cifar")
    return root, write_cifar(root)


@pytest.fixture(scope="module")
def celeba_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    root = tmp_path_factory.mktemp("celeba")
    return (root, *write_celeba(root))


@pytest.fixture(scope="module")
def lsun_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """An LMDB of three colour groups; returns the group of each image in database order."""
    root = tmp_path_factory.mktemp("lsun")
    images, group = colour_groups()
    keys = write_lsun(root, images)
    unsorted = [
        hashlib.sha1(str(i).encode()).hexdigest().encode("ascii") for i in range(len(group))
    ]
    by_key = dict(zip(unsorted, group, strict=True))
    return root, np.array([by_key[k] for k in keys])


# Loaders ------------------------------------------------------------------------------------


def test_cifar10_reads_the_python_batches(cifar_root: tuple[Path, np.ndarray]) -> None:
    root, labels = cifar_root
    train = load_dataset("cifar10", str(root))
    test = load_dataset("cifar10", str(root), train=False)
    assert train.images.shape == (1000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (50, 3, 32, 32)
    assert train.labels.tolist() == labels[:1000].tolist()
    assert test.labels.tolist() == labels[1000:].tolist()
    # Channel-major rows: R plane, then G, then B, each 32x32.
    assert torch.equal(train.images[:, 0, 5, 9].long(), train.labels * 25)
    assert train.images[:, 1, 31, 0].long().tolist() == [i % 256 for i in range(1000)]
    assert (test.images[:, 2] == 7).all()
    assert len(load_dataset("cifar10", str(root), limit=10)) == 10


def test_cifar10_missing_names_the_layout_and_the_download_error(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("cifar10", str(tmp_path))
    message = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "test_batch" in message
    assert "network unreachable" in message


def test_celeba_crops_the_face_and_reads_split_and_attributes(
    celeba_root: tuple[Path, np.ndarray, np.ndarray],
) -> None:
    root, attrs, split = celeba_root
    train = load_dataset("celeba", str(root))
    test = load_dataset("celeba", str(root), train=False)
    train_rows, test_rows = np.flatnonzero(split == 0), np.flatnonzero(split == 2)
    assert train.images.shape == (len(train_rows), 3, 64, 64) and train.images.dtype == torch.uint8
    assert len(test) == len(test_rows) and (train.labels == -1).all()  # no classes
    # Only the green 140x140 centre is left: a crop any wider or off-centre would show red.
    images = train.images.float()
    assert images[:, 0].mean() < 5 and images[:, 0].max() < 60
    assert images[:, 1].mean() > 190
    blue = train.images[:, 2, 32, 32].long()
    assert (blue - torch.as_tensor(10 * (train_rows % 20))).abs().max() <= 4  # order kept
    source = open_source("celeba", root, True)
    for name in ("Smiling", "Male", "5_o_Clock_Shadow", "Young"):
        column = attrs[train_rows, CELEBA_ATTRIBUTES.index(name)]
        assert source.attributes[name].tolist() == ((column + 1) // 2).tolist()
    by = partition_labels(
        source, "dirichlet", "auto", celeba_attribute="Male", num_clusters=2, seed=0
    )
    assert by.tolist() == source.attributes["Male"].tolist()


def test_celeba_unknown_attribute_names_the_allowed_ones(
    celeba_root: tuple[Path, np.ndarray, np.ndarray],
) -> None:
    source = open_source("celeba", celeba_root[0], True)
    with pytest.raises(ValueError, match="'Smile' is not a CelebA attribute") as err:
        partition_labels(source, "shards", "auto", celeba_attribute="Smile", num_clusters=2, seed=0)
    assert all(name in str(err.value) for name in CELEBA_ATTRIBUTES)


def test_celeba_missing_names_the_layout_and_the_download_error(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("celeba", str(tmp_path))
    message = str(err.value)
    assert str(tmp_path / "celeba" / "img_align_celeba") in message
    assert "list_attr_celeba.txt" in message and "list_eval_partition.txt" in message
    assert "network unreachable" in message


def test_lsun_lmdb_resizes_the_shorter_side_and_centre_crops(tmp_path: Path) -> None:
    # Landscape, portrait and a larger image: each must come out as its green centre square.
    write_lsun(
        tmp_path, [framed(340, 256, GREEN), framed(256, 300, GREEN), framed(512, 400, GREEN)]
    )
    church = load_dataset("lsun-church", str(tmp_path))
    assert church.images.shape == (3, 3, 256, 256) and church.images.dtype == torch.uint8
    images = church.images.float()
    # Resizing before cropping and webp's 4:2:0 chroma may tint the outermost pixels.
    assert images[:, 0].mean() < 5 and images[:, 0, 2:-2, 2:-2].max() < 60
    assert images[:, 1].mean() > 190
    assert (church.labels == -1).all()


def test_lsun_image_folder_of_any_nesting(tmp_path: Path) -> None:
    folder = tmp_path / "lsun-church"
    (folder / "a" / "b").mkdir(parents=True)
    (folder / "c").mkdir()
    framed(300, 256, (0, 200, 0)).save(folder / "a" / "b" / "x.jpg", quality=95)
    framed(256, 256, (0, 0, 200)).save(folder / "c" / "y.png")
    framed(256, 320, (200, 200, 0)).save(folder / "z.WEBP", quality=95)
    (folder / "notes.txt").write_text("not an image")
    church = load_dataset("lsun-church", str(tmp_path))
    assert church.images.shape == (3, 3, 256, 256)
    mean = church.images.float().mean(dim=(2, 3))  # sorted by path: a/b/x, c/y, z
    expected = torch.tensor([[0, 200, 0], [0, 0, 200], [200, 200, 0]]).float()
    assert (mean - expected).abs().max() < 8


def test_lsun_missing_names_both_layouts(tmp_path: Path) -> None:
    (tmp_path / "lsun-church").mkdir()  # present but holding no images
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("lsun-church", str(tmp_path))
    message = str(err.value)
    assert str(tmp_path / "lsun" / "church_outdoor_train_lmdb") in message
    assert str(tmp_path / "lsun-church") in message


def test_unknown_dataset_lists_the_allowed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'cifar10', 'celeba', 'lsun-church'"):
        load_dataset("imagenet", str(tmp_path))


def test_a_client_decodes_only_its_partition(
    lsun_root: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, group = lsun_root
    opened = []
    real_open = Image.open

    def counting_open(fp: object, *args: object, **kwargs: object) -> Image.Image:
        opened.append(fp)
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    train, held_out = load_client_data(
        "lsun-church",
        str(root),
        1,
        4,
        partitioning="quantity",
        alpha=1.0,
        shards_per_client=1,
        eval_fraction=0.1,
        seed=0,
    )
    assert len(opened) == len(train) + len(held_out) < len(group) / 2
    assert train.images.shape[1:] == (3, 256, 256) and train.images.dtype == torch.uint8


# Partitions ---------------------------------------------------------------------------------


def _partitions(source, scheme: str, n: int, seed: int = 0, alpha: float = 0.5, **kw):
    labels = partition_labels(
        source,
        scheme,
        kw.get("partition_by", "auto"),
        celeba_attribute=kw.get("attribute", "Smiling"),
        num_clusters=kw.get("clusters", 3),
        seed=seed,
    )
    parts = []
    for pid in range(n):
        p = make_partitioner(scheme, n, alpha=alpha, shards_per_client=2, seed=seed)
        parts.append(partition_indices(labels, p, pid, 0.1, seed))
    return labels, parts


def _source(name: str, cifar_root, celeba_root, lsun_root):
    root = {"cifar10": cifar_root, "celeba": celeba_root, "lsun-church": lsun_root}[name][0]
    return open_source(name, root, True)


@pytest.mark.parametrize("name", ["cifar10", "celeba", "lsun-church"])
@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards", "quantity"])
def test_partitions_are_disjoint_cover_and_repeat_per_seed(
    name: str, scheme: str, cifar_root, celeba_root, lsun_root
) -> None:
    source = _source(name, cifar_root, celeba_root, lsun_root)
    _, parts = _partitions(source, scheme, 3, seed=4)
    every = np.concatenate([np.concatenate(p) for p in parts])
    assert len(every) == len(np.unique(every))
    # ShardPartitioner drops the remainder of size / (clients x shards) rows; the rest cover.
    assert len(every) == (source.size // 6 * 6 if scheme == "shards" else source.size)
    _, again = _partitions(source, scheme, 3, seed=4)
    for (ta, ea), (tb, eb) in zip(parts, again, strict=True):
        assert np.array_equal(ta, tb) and np.array_equal(ea, eb)


@pytest.mark.parametrize("name", ["cifar10", "celeba", "lsun-church"])
def test_small_alpha_gives_clients_different_label_mixes(
    name: str, cifar_root, celeba_root, lsun_root
) -> None:
    """Dirichlet over class (CIFAR-10), 'Smiling' (CelebA) or colour cluster (LSUN)."""
    source = _source(name, cifar_root, celeba_root, lsun_root)

    labels, _ = _partitions(source, "dirichlet", 2, seed=1)  # the label dirichlet goes by
    k = labels.max() + 1

    def spread(scheme: str, alpha: float) -> float:
        _, parts = _partitions(source, scheme, 2, seed=1, alpha=alpha)
        mixes = [
            np.bincount(labels[np.concatenate(p)], minlength=k) / sum(map(len, p)) for p in parts
        ]
        return float(np.abs(mixes[0] - mixes[1]).sum() / 2)  # total variation distance

    iid, skewed = spread("iid", 1.0), spread("dirichlet", 0.1)
    assert iid < 0.15 and skewed > 0.4


def test_quantity_skew_gives_growing_sizes(cifar_root) -> None:
    source = open_source("cifar10", cifar_root[0], True)
    _, parts = _partitions(source, "quantity", 4)
    sizes = [len(t) + len(e) for t, e in parts]
    assert sizes == sorted(sizes) and sizes[-1] >= 3.5 * sizes[0]  # 1 : 2 : 3 : 4


def test_lsun_clusters_are_the_colour_groups_and_are_cached(lsun_root, monkeypatch) -> None:
    root, group = lsun_root
    source = open_source("lsun-church", root, True)
    clusters = partition_labels(
        source, "shards", "auto", celeba_attribute="", num_clusters=3, seed=0
    )
    # One cluster per colour group, whatever its number.
    assert len({(g, c) for g, c in zip(group, clusters, strict=True)}) == 3
    assert source.thumbnail_cache is not None and source.thumbnail_cache.exists()
    monkeypatch.setattr(Image, "open", None)  # a second computation would have to decode
    assert np.array_equal(thumbnails(source), thumbnails(source))
    again = partition_labels(source, "shards", "auto", celeba_attribute="", num_clusters=3, seed=0)
    assert np.array_equal(clusters, again)


def test_clusters_split_a_labelled_dataset_too(cifar_root) -> None:
    source = open_source("cifar10", cifar_root[0], True)
    clusters = partition_labels(
        source, "dirichlet", "clusters", celeba_attribute="", num_clusters=4, seed=0
    )
    assert clusters.shape == (source.size,) and set(clusters.tolist()) == {0, 1, 2, 3}


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(60, 400),
    classes=st.integers(1, 6),
    clients=st.integers(2, 5),
    scheme=st.sampled_from(["iid", "shards", "quantity"]),
    seed=st.integers(0, 2**16),
)
def test_label_free_and_shard_partitions_cover_disjointly(
    n: int, classes: int, clients: int, scheme: str, seed: int
) -> None:
    labels = np.random.default_rng(seed).integers(0, classes, n)

    def parts() -> list[np.ndarray]:
        out = []
        for pid in range(clients):
            p = make_partitioner(scheme, clients, alpha=1.0, shards_per_client=2, seed=seed)
            out.append(np.concatenate(partition_indices(labels, p, pid, 0.2, seed)))
        return out

    first = parts()
    every = np.concatenate(first)
    assert len(every) == len(np.unique(every))
    shards = 2 * clients
    assert len(every) == (n // shards * shards if scheme == "shards" else n)
    assert all(np.array_equal(a, b) for a, b in zip(first, parts(), strict=True))


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(2, 5),
    per=st.integers(3, 30),
    dim=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_kmeans_finds_separated_blobs_deterministically(k: int, per: int, dim: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.arange(k, dtype=torch.float64).unsqueeze(1).expand(k, dim) * 1000
    blob = torch.arange(k).repeat_interleave(per)
    x = centres[blob] + torch.rand(k * per, dim, generator=gen, dtype=torch.float64)
    found = kmeans(x, k, seed)
    assert len({(b, f) for b, f in zip(blob.tolist(), found.tolist(), strict=True)}) == k
    assert torch.equal(found, kmeans(x, k, seed))


def test_kmeans_needs_as_many_points_as_clusters() -> None:
    with pytest.raises(ValueError, match="cannot form 5 clusters from 3 images"):
        kmeans(torch.zeros(3, 2, dtype=torch.float64), 5, 0)


# The training path on uint8 images ----------------------------------------------------------


def test_to_model_range_scales_uint8_and_passes_floats() -> None:
    images = torch.tensor([0, 255, 128], dtype=torch.uint8)
    assert to_model_range(images).tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)
    latents = torch.randn(2, 4)
    assert to_model_range(latents) is latents


def test_client_data_trains_the_tiny_unet(cifar_root) -> None:
    train, held_out = load_client_data(
        "cifar10",
        str(cifar_root[0]),
        0,
        2,
        partitioning="dirichlet",
        alpha=0.5,
        shards_per_client=2,
        eval_fraction=0.1,
        seed=0,
    )
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (3, 32, 32)
    unet, scheduler = build_unet("tiny", 32, 3), build_scheduler()
    result = train_local(unet, scheduler, train.images, batch_size=8, lr=1e-3, steps=2)
    assert result.steps == 2 and np.isfinite(result.mean_loss) and result.mean_loss > 0
    loss = denoising_loss(unet, scheduler, held_out.images[:16])
    assert loss == denoising_loss(unet, scheduler, to_model_range(held_out.images[:16]))
