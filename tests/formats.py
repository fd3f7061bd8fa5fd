"""Writers of tiny datasets in their real on-disk formats (CIFAR-10, CelebA, LSUN LMDB)."""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import lmdb
import numpy as np
from PIL import Image

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes "
    "No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling "
    "Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace "
    "Wearing_Necktie Young"
).split()
RED, GREEN = (200, 0, 0), (0, 200, 0)


def write_cifar(root: Path, per_batch: int = 200, test: int = 50) -> np.ndarray:
    """cifar-10-batches-py/ as in cifar-10-python.tar.gz; returns all labels (train, then test).

    Image i has R = 25 * label, G = i % 256 and B = 7, so a wrong reshape or order shows.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 5 * per_batch + test)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    start = 0
    for name in names:
        n = test if name == "test_batch" else per_batch
        idx = np.arange(start, start + n)
        planes = [np.repeat(c[:, None], 1024, axis=1) for c in (25 * labels[idx], idx % 256)]
        data = np.concatenate([*planes, np.full((n, 1024), 7)], axis=1).astype(np.uint8)
        batch = {
            "batch_label": f"batch {name}",
            "labels": labels[idx].tolist(),
            "data": data,
            "filenames": [f"img_{i}.png" for i in idx],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        start += n
    meta = {"num_cases_per_batch": per_batch, "label_names": [f"c{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps({**meta, "num_vis": 3072}, protocol=2))
    return labels


def write_celeba(root: Path, n: int = 240) -> tuple[np.ndarray, np.ndarray]:
    """celeba/ as torchvision and the release lay it out; returns (attributes ±1, split).

    The 140x140 centre of each 178x218 face is green (blue = 10 * (i % 20)), the rest red.
    """
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(1)
    attrs = rng.choice([-1, 1], size=(n, 40))
    split = np.array([2 if i % 5 == 4 else 1 if i % 5 == 3 else 0 for i in range(n)])
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        img = np.full((218, 178, 3), RED, dtype=np.uint8)
        img[39:179, 19:159] = (0, 200, 10 * (i % 20))
        Image.fromarray(img).save(folder / "img_align_celeba" / name, quality=95, subsampling=0)
    rows = [
        f"{name} " + " ".join(f"{v:2d}" for v in a) for name, a in zip(names, attrs, strict=True)
    ]
    (folder / "list_attr_celeba.txt").write_text(
        "\n".join([str(n), " ".join(CELEBA_ATTRIBUTES) + " ", *rows]) + "\n"
    )
    parts = [f"{name} {s}" for name, s in zip(names, split, strict=True)]
    (folder / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    return attrs, split


def framed(width: int, height: int, inner: tuple[int, int, int]) -> Image.Image:
    """``inner`` on the largest centred square, red outside it (what a centre crop removes)."""
    img = np.full((height, width, 3), RED, dtype=np.uint8)
    side = min(width, height)
    top, left = (height - side) // 2, (width - side) // 2
    img[top : top + side, left : left + side] = inner
    return Image.fromarray(img)


def write_lsun(root: Path, images: list[Image.Image]) -> list[bytes]:
    """lsun/church_outdoor_train_lmdb: hex-id keys to webp bytes, as in the official dumps.

    Returns the keys in the database's (sorted) order.
    """
    db = root / "lsun" / "church_outdoor_train_lmdb"
    db.mkdir(parents=True)
    env = lmdb.open(str(db), map_size=1 << 26)
    keys = []
    with env.begin(write=True) as txn:
        for i, img in enumerate(images):
            buf = io.BytesIO()
            img.save(buf, format="webp", quality=90)
            key = hashlib.sha1(str(i).encode()).hexdigest().encode("ascii")
            txn.put(key, buf.getvalue())
            keys.append(key)
    env.close()
    return sorted(keys)


def colour_groups(per_group: int = 30) -> tuple[list[Image.Image], np.ndarray]:
    """Noisy images of three base colours: the clusters a thumbnail k-means must find."""
    rng = np.random.default_rng(2)
    bases = np.array([(200, 40, 40), (40, 200, 40), (40, 40, 200)])
    group = np.repeat(np.arange(3), per_group)
    rng.shuffle(group)
    images = []
    for g in group:
        pixels = bases[g] + rng.integers(-20, 21, (256, 256, 3))
        images.append(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)))
    return images, group
