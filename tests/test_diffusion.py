"""The diffusion task: the training step learns, evaluation is deterministic, sampling works."""

from __future__ import annotations

import pytest
import torch

from feddm_flower.data import load_dataset
from feddm_flower.diffusion import denoising_loss, proximal_term, sample, train_local
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


def _flat(unet: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in unet.parameters()])


def test_proximal_term_is_zero_at_the_start_and_its_gradient_is_mu_times_drift() -> None:
    unet = build_unet("tiny", 28, 1)
    anchor = [p.detach().clone() for p in unet.parameters()]
    assert proximal_term(unet, anchor, mu=0.5).item() == 0.0
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p))
    unet.zero_grad()
    term = proximal_term(unet, anchor, mu=0.5)
    term.backward()
    drift = [p.detach() - a for p, a in zip(unet.parameters(), anchor, strict=True)]
    expected = 0.25 * sum((d**2).sum() for d in drift)  # (mu/2)·||w - w_g||², squared norm
    torch.testing.assert_close(term.detach(), expected)
    for p, d in zip(unet.parameters(), drift, strict=True):
        torch.testing.assert_close(p.grad, 0.5 * d)
    assert all(a.grad is None for a in anchor)  # the global copy is detached


def test_mu_zero_is_bit_identical_to_vanilla(batch: torch.Tensor) -> None:
    a, b = build_unet("tiny", 28, 1), build_unet("tiny", 28, 1)
    kwargs = {"batch_size": 16, "lr": 2e-3, "steps": 5, "seed": 3}
    train_local(a, build_scheduler(), batch, **kwargs)
    train_local(b, build_scheduler(), batch, proximal_mu=0.0, **kwargs)
    assert torch.equal(_flat(a), _flat(b))


def test_larger_mu_keeps_the_local_model_closer_to_the_global_one(batch: torch.Tensor) -> None:
    start = _flat(build_unet("tiny", 28, 1))
    drift = {}
    for mu in (0.0, 5.0):
        unet = build_unet("tiny", 28, 1)
        train_local(
            unet, build_scheduler(), batch, batch_size=16, lr=2e-3, steps=20, proximal_mu=mu, seed=1
        )
        drift[mu] = (_flat(unet) - start).norm().item()
    assert drift[5.0] < 0.8 * drift[0.0]
