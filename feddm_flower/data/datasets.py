"""Datasets on disk: where each one lives, how to fetch it, and how to decode any subset of it.

Images are decoded to uint8 (N, C, H, W) at the dataset's model resolution. File-backed datasets
(CelebA, LSUN) are opened as an index plus metadata, so a client decodes only its own partition.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.datasets import CIFAR10, CelebA, FashionMNIST

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
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CELEBA_CROP = 140  # center crop of the aligned 178x218 faces before resizing (as in DDPM/NCSN)
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
THUMBNAIL_PIXELS = 8

# (channels, pixels) of each dataset's images as the models see them.
IMAGE_SHAPES = {
    "fashion-mnist": (1, 28),
    "cifar10": (3, 32),
    "celeba": (3, 64),
    "lsun-church": (3, 256),
}

Decoder = Callable[[np.ndarray, int], torch.Tensor]


class DataNotFoundError(FileNotFoundError):
    """The dataset is not on disk and could not be fetched; the message says how to get it."""


@dataclass(frozen=True, eq=False)
class ImageSource:
    """One split of a dataset on disk: its size, its metadata and a decoder for any subset."""

    name: str
    size: int
    decode: Decoder  # (indices, pixels) -> uint8 (n, C, pixels, pixels)
    labels: np.ndarray | None = None  # class per image (FashionMNIST, CIFAR-10)
    attributes: dict[str, np.ndarray] | None = None  # CelebA: 0/1 per image, by attribute name
    thumbnail_cache: Path | None = None  # file-backed sources keep their thumbnails here

    def read(self, indices: np.ndarray, pixels: int | None = None) -> torch.Tensor:
        """Images ``indices`` as uint8 (n, C, pixels, pixels); default: the model resolution."""
        pixels = pixels or IMAGE_SHAPES[self.name][1]
        return self.decode(np.asarray(indices, dtype=np.int64).reshape(-1), pixels)


def resolve_root(data_root: str) -> Path:
    """The data directory: ``data_root`` if given, else the per-user cache."""
    return Path(data_root).expanduser() if data_root else DEFAULT_DATA_ROOT


@lru_cache(maxsize=8)
def open_source(name: str, root: Path, train: bool = True) -> ImageSource:
    """Split ``train`` (else test) of dataset ``name`` under ``root`` (cached per process)."""
    openers = {
        "fashion-mnist": _fashion_mnist,
        "cifar10": _cifar10,
        "celeba": _celeba,
        "lsun-church": _lsun_church,
    }
    if name not in openers:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(map(repr, openers))}")
    return openers[name](root, train)


def thumbnails(source: ImageSource, chunk: int = 1024) -> np.ndarray:
    """Every image of ``source`` as a uint8 (N, C, 8, 8) thumbnail: cheap clustering features.

    File-backed sources decode every image once for this, so the result is kept in
    ``source.thumbnail_cache`` and reused by every client that finds it there.
    """
    cache = source.thumbnail_cache
    if cache is not None and cache.exists():
        cached = np.load(cache)
        if len(cached) == source.size:
            return cached
    log.info("Computing %d thumbnails of %s", source.size, source.name)
    parts = [
        source.read(np.arange(i, min(i + chunk, source.size)), THUMBNAIL_PIXELS).numpy()
        for i in range(0, source.size, chunk)
    ]
    thumbs = np.concatenate(parts)
    if cache is not None:
        try:
            _write_atomic(cache, lambda f: np.save(f, thumbs))
        except OSError as exc:  # a read-only data directory only costs the recomputation
            log.warning("Could not cache thumbnails in %s: %s", cache, exc)
    return thumbs


def _write_atomic(dst: Path, write: Callable[[object], None]) -> None:
    """Write ``dst`` through a temporary file, so that concurrent clients never see it partial."""
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _array_decoder(images: torch.Tensor) -> Decoder:
    """Decoder over images already in memory; other sizes (thumbnails) by area averaging."""

    def decode(indices: np.ndarray, pixels: int) -> torch.Tensor:
        x = images[torch.from_numpy(indices)]
        if x.shape[-1] != pixels:
            x = F.interpolate(x.float(), size=(pixels, pixels), mode="area").round().byte()
        return x

    return decode


def _file_decoder(
    open_image: Callable[[int], Image.Image], fit: Callable[[Image.Image, int], Image.Image]
) -> Decoder:
    """Decoder that opens image ``i`` with ``open_image`` and crops/resizes it with ``fit``."""

    def decode(indices: np.ndarray, pixels: int) -> torch.Tensor:
        out = torch.empty((len(indices), 3, pixels, pixels), dtype=torch.uint8)
        for row, i in enumerate(indices):
            with open_image(int(i)) as img:
                fitted = fit(img.convert("RGB"), pixels)
            out[row] = torch.from_numpy(np.array(fitted)).permute(2, 0, 1)
        return out

    return decode


# FashionMNIST -------------------------------------------------------------------------------


def _fashion_mnist(root: Path, train: bool) -> ImageSource:
    _ensure_fashion_mnist(root)
    ds = FashionMNIST(str(root), train=train, download=False)
    images = ds.data.unsqueeze(1).contiguous()
    return ImageSource("fashion-mnist", len(images), _array_decoder(images), ds.targets.numpy())


def _ensure_fashion_mnist(root: Path) -> None:
    """Make ``root/FashionMNIST/raw`` hold the IDX files: already there, Debian's, or downloaded."""
    raw = root / "FashionMNIST" / "raw"
    if all((raw / f).exists() for f in _FASHION_FILES):
        return
    if all((DEBIAN_FASHION_MNIST / f"{f}.gz").exists() for f in _FASHION_FILES):
        log.info("Unpacking FashionMNIST from %s into %s", DEBIAN_FASHION_MNIST, raw)
        raw.mkdir(parents=True, exist_ok=True)
        for f in _FASHION_FILES:
            with gzip.open(DEBIAN_FASHION_MNIST / f"{f}.gz", "rb") as inp:
                _write_atomic(raw / f, lambda out, inp=inp: shutil.copyfileobj(inp, out))
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


# CIFAR-10 -----------------------------------------------------------------------------------


def _cifar10(root: Path, train: bool) -> ImageSource:
    """CIFAR-10's python pickles, read directly: torchvision's CIFAR10 refuses any file whose
    md5 differs from the release's, so it only downloads here (and the tests can use tiny files
    in the same format)."""
    folder = root / "cifar-10-batches-py"
    files = _CIFAR_TRAIN if train else ("test_batch",)
    if not all((folder / f).exists() for f in files):
        try:
            log.info("Downloading CIFAR-10 into %s", root)
            CIFAR10(str(root), train=train, download=True)
        except Exception as exc:
            raise DataNotFoundError(
                f"CIFAR-10 not found in {folder} and the download failed ({exc}). Put the "
                "python-version batches there (cifar-10-python.tar.gz unpacked: "
                f"{', '.join(_CIFAR_TRAIN)}, test_batch, batches.meta), or set run-config "
                "data-root to a directory that holds cifar-10-batches-py/."
            ) from exc
    images, labels = [], []
    for f in files:
        with open(folder / f, "rb") as inp:
            batch = pickle.load(inp, encoding="latin1")  # Python 2 pickles, str keys
        images.append(torch.from_numpy(np.asarray(batch["data"], dtype=np.uint8)))
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
    data = torch.cat(images).reshape(-1, 3, 32, 32)
    return ImageSource("cifar10", len(data), _array_decoder(data), np.concatenate(labels))


# CelebA -------------------------------------------------------------------------------------


def _celeba(root: Path, train: bool) -> ImageSource:
    """CelebA's aligned JPEGs with their attribute and split lists, read directly: torchvision's
    CelebA checks every list file's md5 against the release, so it only downloads here."""
    folder = root / "celeba"
    images = folder / "img_align_celeba"
    lists = (folder / "list_attr_celeba.txt", folder / "list_eval_partition.txt")
    if not (images.is_dir() and all(p.exists() for p in lists)):
        try:
            log.info("Downloading CelebA into %s", root)
            CelebA(str(root), split="all", download=True)
        except Exception as exc:
            raise DataNotFoundError(
                f"CelebA not found in {folder} and the download failed ({exc}). Put the aligned "
                f"images in {images}/ (000001.jpg ...) beside list_attr_celeba.txt and "
                f"list_eval_partition.txt in {folder}/, or set run-config data-root to a "
                "directory that holds celeba/."
            ) from exc
    split = {}
    for line in lists[1].read_text().splitlines():
        if line.strip():
            filename, part = line.split()
            split[filename] = int(part)
    lines = lists[0].read_text().splitlines()
    names = lines[1].split()
    rows = [line.split() for line in lines[2:] if line.strip()]
    want = 0 if train else 2  # list_eval_partition: 0 train, 1 valid, 2 test
    rows = [r for r in rows if split[r[0]] == want]
    files = [r[0] for r in rows]
    values = (np.array([r[1:] for r in rows], dtype=np.int8).reshape(-1, len(names)) + 1) // 2
    return ImageSource(
        "celeba",
        len(files),
        _file_decoder(lambda i: Image.open(images / files[i]), _center_crop_resize),
        attributes={n: values[:, k] for k, n in enumerate(names)},
        thumbnail_cache=folder / f"thumbnails_{'train' if train else 'test'}.npy",
    )


def _center_crop_resize(img: Image.Image, pixels: int) -> Image.Image:
    return TF.resize(TF.center_crop(img, [_CELEBA_CROP]), [pixels, pixels])


# LSUN Church Outdoors -----------------------------------------------------------------------


def _lsun_church(root: Path, train: bool) -> ImageSource:
    """LSUN church_outdoor from its LMDB (key -> encoded image, as in the official dumps) or,
    failing that, from a folder of image files (any nesting).

    LSUN has one split used for training; as in the DDPM papers, FID compares against training
    images, so ``train=False`` reads the same images.
    """
    db = root / "lsun" / "church_outdoor_train_lmdb"
    folder = root / "lsun-church"
    if (db / "data.mdb").exists():
        return _lsun_lmdb(db)
    files = (
        sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
        if folder.is_dir()
        else []
    )
    if not files:
        raise DataNotFoundError(
            f"LSUN church_outdoor not found: expected the LMDB {db}/ (data.mdb, from "
            "`python download.py -c church_outdoor` of github.com/fyu/lsun, unzipped) or image "
            f"files (.jpg/.png/.webp, any nesting) under {folder}/. Set run-config data-root "
            "to a directory that holds lsun/church_outdoor_train_lmdb/ or lsun-church/."
        )
    return ImageSource(
        "lsun-church",
        len(files),
        _file_decoder(lambda i: Image.open(files[i]), _resize_center_crop),
        thumbnail_cache=root / "lsun-church-thumbnails.npy",
    )


def _lsun_lmdb(db: Path) -> ImageSource:
    """The LMDB read directly: torchvision's LSUNClass pickles the key list into the current
    working directory under a name made from the path's letters, which goes stale when a
    database is replaced at the same path."""
    import lmdb  # only needed for LSUN

    env = lmdb.open(str(db), readonly=True, lock=False, readahead=False, meminit=False)
    with env.begin() as txn:
        keys = list(txn.cursor().iternext(keys=True, values=False))

    def open_image(i: int) -> Image.Image:
        with env.begin() as txn:
            return Image.open(io.BytesIO(txn.get(keys[i])))

    return ImageSource(
        "lsun-church",
        len(keys),
        _file_decoder(open_image, _resize_center_crop),
        thumbnail_cache=db.parent / f"{db.name}-thumbnails.npy",
    )


def _resize_center_crop(img: Image.Image, pixels: int) -> Image.Image:
    return TF.center_crop(TF.resize(img, pixels), [pixels])
