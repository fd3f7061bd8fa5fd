"""The diffusion task: the training step learns, evaluation is deterministic, sampling works."""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterator

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from feddm_flower.config import RunConfig
from feddm_flower.data.loading import load_dataset
from feddm_flower.task import diffusion
from feddm_flower.task.diffusion import (
    denoising_loss,
    diffusion_loss,
    proximal_term,
    sample,
    train_local,
)
from feddm_flower.task.models import build_scheduler, build_unet, compile_unet


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


def test_mean_loss_and_logged_losses_are_means_of_the_step_losses(
    batch: torch.Tensor, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Losses stay on the device during training; what is read back is each step's loss."""
    losses: list[float] = []

    def recorded(*args: object, **kwargs: object) -> torch.Tensor:
        loss = diffusion_loss(*args, **kwargs)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(diffusion, "diffusion_loss", recorded)
    with caplog.at_level(logging.INFO, logger=diffusion.__name__):
        result = train_local(
            build_unet("tiny", 28, 1), build_scheduler(), batch, batch_size=16, lr=2e-3, steps=7,
            log_every=3,
        )  # fmt: skip
    assert len(losses) == 7 and len(set(losses)) == 7
    assert result.mean_loss == pytest.approx(statistics.fmean(losses), rel=1e-12)
    logged = [r.getMessage().split(", loss ")[1].split(",")[0] for r in caplog.records]
    windows = (losses[0:3], losses[3:6], losses[4:7])  # steps 3, 6 and the last 3 at step 7
    assert logged == [f"{statistics.fmean(w):.4f}" for w in windows]


def test_compile_unet_no_is_the_module_itself_and_a_mode_shares_its_weights() -> None:
    unet = build_unet("tiny", 28, 1)
    assert compile_unet(unet, "no") is unet
    compiled = compile_unet(unet, "default")  # compiles lazily, on the first call
    assert compiled is not unet
    assert all(a is b for a, b in zip(compiled.parameters(), unet.parameters(), strict=True))
    with pytest.raises(ValueError, match="compile mode 'fast': allowed are no, default"):
        compile_unet(unet, "fast")


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
    assert proximal_term(list(unet.parameters()), anchor, mu=0.5).item() == 0.0
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p))
    unet.zero_grad()
    term = proximal_term(list(unet.parameters()), anchor, mu=0.5)
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


@pytest.fixture
def steps_seen() -> Iterator[list[dict]]:
    """What each optimiser step of a train_local call saw: optimiser, learning rate, grad norm."""
    seen: list[dict] = []

    def record(opt: torch.optim.Optimizer, *_: object) -> None:
        params = [p for group in opt.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        seen.append(
            {
                "optimizer": type(opt).__name__,
                "lr": opt.param_groups[0]["lr"],
                "momentum": opt.param_groups[0].get("momentum"),
                "grad_norm": torch.nn.utils.get_total_norm(grads).item(),
            }
        )

    handle = register_optimizer_step_pre_hook(record)
    yield seen
    handle.remove()


def test_sgd_with_momentum_trains(batch: torch.Tensor, steps_seen: list[dict]) -> None:
    unet, scheduler = build_unet("tiny", 28, 1), build_scheduler()
    start = _flat(unet)
    before = denoising_loss(unet, scheduler, batch)
    train_local(
        unet, scheduler, batch, batch_size=32, lr=0.1, steps=30, optimizer="sgd", grad_clip=1.0
    )
    assert [(s["optimizer"], s["momentum"]) for s in steps_seen] == [("SGD", 0.9)] * 30
    assert not torch.equal(_flat(unet), start)
    assert denoising_loss(unet, scheduler, batch) < 0.8 * before


def test_unknown_optimizer_is_an_error(batch: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="optimizer 'adam': allowed are adamw, sgd"):
        train_local(
            build_unet("tiny", 28, 1),
            build_scheduler(),
            batch,
            batch_size=8,
            lr=1e-3,
            steps=1,
            optimizer="adam",
        )


def test_warmup_ramps_the_learning_rate_linearly(
    batch: torch.Tensor, steps_seen: list[dict]
) -> None:
    kwargs = {"batch_size": 8, "lr": 1e-3, "steps": 6}
    train_local(build_unet("tiny", 28, 1), build_scheduler(), batch, warmup_steps=4, **kwargs)
    assert [s["lr"] for s in steps_seen] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    steps_seen.clear()
    train_local(build_unet("tiny", 28, 1), build_scheduler(), batch, warmup_steps=0, **kwargs)
    assert [s["lr"] for s in steps_seen] == [1e-3] * 6


@pytest.mark.parametrize("mixed_precision", ["no", "fp16"])
def test_grad_clip_bounds_the_gradient_norm_the_optimiser_sees(
    batch: torch.Tensor, steps_seen: list[dict], mixed_precision: str
) -> None:
    kwargs = {"batch_size": 8, "lr": 1e-3, "steps": 2, "mixed_precision": mixed_precision}
    train_local(build_unet("tiny", 28, 1), build_scheduler(), batch, **kwargs)
    assert min(s["grad_norm"] for s in steps_seen) > 0.05  # unclipped: well above the clip
    steps_seen.clear()
    train_local(build_unet("tiny", 28, 1), build_scheduler(), batch, grad_clip=0.01, **kwargs)
    # Exactly the clip: neither unclipped nor clipped while still loss-scaled (fp16), which
    # would leave the optimiser a gradient of clip / scale.
    assert steps_seen and all(s["grad_norm"] == pytest.approx(0.01, rel=1e-3) for s in steps_seen)


def test_the_paper_preset_learns_with_its_defaults() -> None:
    """Issue 12: tiny's lr 3e-3 barely moved the 28 px paper U-Net; its own defaults do."""
    cfg = RunConfig.from_mapping({"model-preset": "paper"})
    images = load_dataset("fashion-mnist", "").images
    train, held_out = images[:512], images[-32:]
    unet, scheduler = build_unet("paper", 28, 1), build_scheduler()
    before = denoising_loss(unet, scheduler, held_out)
    train_local(
        unet,
        scheduler,
        train,
        batch_size=8,
        steps=12,
        lr=cfg.learning_rate,
        optimizer=cfg.client_optimizer,
        warmup_steps=cfg.warmup_steps,
        grad_clip=cfg.grad_clip,
    )
    assert denoising_loss(unet, scheduler, held_out) < 0.5 * before
