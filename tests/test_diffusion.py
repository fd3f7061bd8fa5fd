"""The diffusion task: the training step learns, evaluation is deterministic, sampling works."""

from __future__ import annotations

import pytest
import torch

from feddm_flower.data import load_dataset
from feddm_flower.diffusion import denoising_loss, sample, train_local
from feddm_flower.models import build_scheduler, build_unet


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return load_dataset("fashion-mnist", "").images[:64]


def test_loss_falls_on_a_fixed_batch(batch: torch.Tensor) -> None:
    unet, scheduler = build_unet("tiny", 28, 1), build_scheduler()
    before = denoising_loss(unet, scheduler, batch)
    result = train_local(unet, scheduler, batch, batch_size=32, lr=2e-3, steps=30)
    after = denoising_loss(unet, scheduler, batch)
    assert result.steps == 30 and result.examples == 30 * 32
    assert after < 0.6 * before


def test_epochs_count_passes_over_the_data(batch: torch.Tensor) -> None:
    unet = build_unet("tiny", 28, 1)
    result = train_local(unet, build_scheduler(), batch[:50], batch_size=16, lr=1e-3, epochs=2)
    assert result.steps == 2 * 4 and result.examples == 100


def test_denoising_loss_is_deterministic(batch: torch.Tensor) -> None:
    unet, scheduler = build_unet("tiny", 28, 1), build_scheduler()
    assert denoising_loss(unet, scheduler, batch, seed=1) == denoising_loss(
        unet, scheduler, batch, seed=1
    )


def test_samples_are_seeded_images_in_unit_range() -> None:
    unet, scheduler = build_unet("tiny", 28, 1), build_scheduler()
    a = sample(unet, scheduler, 3, steps=4, seed=0)
    b = sample(unet, scheduler, 3, steps=4, seed=0)
    assert a.shape == (3, 1, 28, 28) and torch.equal(a, b)
    assert 0.0 <= a.min() and a.max() <= 1.0


def test_empty_training_set_is_an_error() -> None:
    with pytest.raises(ValueError, match="no training images"):
        train_local(
            build_unet("tiny", 28, 1),
            build_scheduler(),
            torch.empty(0, 1, 28, 28),
            batch_size=8,
            lr=1e-3,
        )
