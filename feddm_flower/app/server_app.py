"""ServerApp: validate the run config, drive the strategy, report every round, save the result."""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DModel
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from feddm_flower import configure_logging
from feddm_flower.app.resume import optimizer_arrays, restore, strategy_state
from feddm_flower.app.strategy import FedDMStrategy
from feddm_flower.config import RunConfig
from feddm_flower.data.loading import IMAGE_SHAPES
from feddm_flower.evaluation.artifacts import RunDirectory
from feddm_flower.evaluation.quality import (
    ema_decay,
    ema_update,
    fid_scores,
    global_loss,
    load_eval_inputs,
)
from feddm_flower.fed.aggregation import InfluenceBound, LossCheck, State
from feddm_flower.fed.timings import OVERHEAD_KEY, overhead_share
from feddm_flower.protocol import EVAL_LOSS, TRAIN_LOSS, TRAIN_SECONDS
from feddm_flower.task.diffusion import sample
from feddm_flower.task.latents import model_space
from feddm_flower.task.models import build_scheduler, build_unet, count_parameters, resolve_device

log = logging.getLogger(__name__)
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` of the configured FedDM strategy."""
    configure_logging()
    cfg = RunConfig.from_mapping(context.run_config)
    if cfg.resume:
        run = RunDirectory(Path(cfg.resume).expanduser().resolve())
        cfg = _resumed_config(cfg, run)
    else:
        run = RunDirectory.create(cfg.output_dir, cfg.label)
    vae, channels, size = model_space(cfg.autoencoder, IMAGE_SHAPES[cfg.dataset])
    unet, state = _starting_point(cfg, run, channels, size, latent=vae is not None)
    run.write_config(cfg.to_dict())
    log.info("FedDM run (%s) writing to %s", cfg.label, run.path)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    log.info(
        "Model: %s U-Net on %s, %d parameters",
        cfg.model_preset,
        " x ".join(map(str, shape)),
        count_parameters(unet),
    )
    if vae is not None:
        log.info(
            "Latent diffusion: frozen VAE %s (%d parameters) encodes on the clients and decodes "
            "samples here; only the U-Net travels",
            vae.config._name_or_path,
            count_parameters(vae),
        )
    strategy = build_strategy(cfg, seeded_start=state is None)
    if state is not None:
        restore(strategy, state, run.load_optimizer_state())
        log.info("Resuming after round %d of %d", state["round"], cfg.num_server_rounds)
    initial_arrays = ArrayRecord(unet.state_dict())  # before the reporter moves it to a GPU
    ema = run.load_ema() if state is not None else None
    reporter = RoundReporter(cfg, run, strategy, unet, vae, ema)
    strategy.loss_check = last_check(cfg, reporter.loss_of if reporter.eval_inputs is not None
                                     else None)  # fmt: skip
    result = strategy.start(
        grid=grid,
        initial_arrays=initial_arrays,
        num_rounds=cfg.num_server_rounds,
        timeout=cfg.round_timeout,
        evaluate_fn=reporter,
    )
    reporter.close()
    if len(result.arrays) > 0:
        unet.load_state_dict(result.arrays.to_torch_state_dict())
    path = run.save_pipeline(reporter.model, build_scheduler(), vae)
    log.info(
        "Saved the final pipeline (%s) to %s (loading it: README, 'Where results land')",
        "EMA weights" if reporter.ema is not None else "global weights",
        path,
    )
    summary = run.write_summary()
    log.info(
        "Traffic: %d B down (%.2fx less than fp32 FedAvg), %d B up (%.2fx less)",
        summary.get("bytes-down-cumulative", 0),
        summary.get("compression-down") or 0,
        summary.get("bytes-up-cumulative", 0),
        summary.get("compression-up") or 0,
    )
    log.info("FedDM run finished; results in %s", run.path)


def _starting_point(
    cfg: RunConfig, run: RunDirectory, channels: int, size: int, *, latent: bool
) -> tuple[UNet2DModel, dict[str, object] | None]:
    """The U-Net and strategy state to start from: a resumed run's last checkpoint, else
    fresh weights from ``seed`` (so a run that died before its first checkpoint restarts
    exactly as it began)."""
    if cfg.resume and run.has_checkpoint():
        unet, state = run.load_checkpoint()
        run.truncate_metrics(int(state["round"]))
        return unet, state
    if cfg.resume:
        log.warning("No checkpoint in %s (stopped in round 1): starting it again", run.path)
        run.truncate_metrics(0)
    return build_unet(cfg.model_preset, size, channels, seed=cfg.seed, latent=latent), None


def _resumed_config(given: RunConfig, run: RunDirectory) -> RunConfig:
    """The resumed run's own config; only ``num-server-rounds`` may change on resume."""
    saved_file = run.path / "run_config.json"
    if not saved_file.exists():
        raise FileNotFoundError(
            f"resume={str(run.path)!r} is not a feddm-flower run directory (no run_config.json)"
        )
    saved = RunConfig.from_mapping(json.loads(saved_file.read_text()))
    ignored = {
        k: v
        for k, v in given.to_dict().items()
        if v != saved.to_dict()[k] and k not in ("num-server-rounds", "resume", "output-dir")
    }
    if ignored:
        log.warning("Resuming with the run's saved config; ignoring overrides %s", ignored)
    return replace(saved, num_server_rounds=given.num_server_rounds, resume=given.resume)


# The server learning rate "0" means: Flower's 1.0 for FedAvgM (a plain FedAvg step), and
# 0.01 for the adaptive optimizers, whose step moves every weight by about eta per round
# (Flower's default 0.1 is far more than a round of local diffusion training moves one).
ADAPTIVE_DEFAULT_LR = 0.01


def build_strategy(cfg: RunConfig, seeded_start: bool = False) -> FedDMStrategy:
    """The FedDM strategy for the run config: Flower's server optimizer and aggregation rule,
    wrapped with this combination's uplink, downlink, proximal term, bounds and (dp-* keys)
    Flower's differential-privacy wrapper. ``seeded_start``: the run starts from the seeded
    initial weights, which nodes rebuild themselves."""
    feedback = cfg.sparse_feedback if cfg.uplink == "sparse" else cfg.error_feedback
    codec = {
        "quant-block-size": cfg.quant_block_size,
        "quant-stochastic": cfg.quant_stochastic,
        "error-feedback": feedback,
        "sparse-fraction": cfg.sparse_fraction,
        "sparse-bits": cfg.sparse_bits,
    }
    return FedDMStrategy(
        optimizer=build_optimizer(cfg),
        aggregator=build_aggregator(cfg),
        proximal_mu=cfg.proximal_mu,
        uplink=cfg.uplink,
        downlink=cfg.downlink,
        codec=codec,
        lossless=cfg.lossless,
        seeded_start=seeded_start,
        bound=InfluenceBound(norm_bound=cfg.norm_bound, weight_bound=cfg.weight_bound),
        dp_clip_norm=cfg.dp_clip_norm,
        dp_noise_multiplier=cfg.dp_noise_multiplier,
        dp_delta=cfg.dp_delta,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_nodes=cfg.min_nodes,
        min_replies=cfg.min_replies,
        seed=cfg.seed,
    )


def last_check(cfg: RunConfig, loss: Callable[[State], float] | None) -> LossCheck | None:
    """The last check of every new global model under ``max-loss-ratio``, measuring it with
    ``loss`` (the server's ``global-loss``; None when the server has no data to measure on)."""
    if not cfg.max_loss_ratio:
        return None
    if loss is None:
        log.warning("max-loss-ratio=%g needs server-eval-examples > 0: new global models are "
                    "checked for finite weights only", cfg.max_loss_ratio)  # fmt: skip
        return None
    return LossCheck(loss, cfg.max_loss_ratio)


def build_optimizer(cfg: RunConfig) -> FedAvg:
    """Flower's server optimizer named by ``server-optimizer``, with its keys."""
    name = cfg.server_optimizer
    if name == "none":
        return FedAvg()
    if name == "fedavgm":
        lr = cfg.server_lr or 1.0
        return FedAvgM(server_learning_rate=lr, server_momentum=cfg.server_momentum)
    lr, tau = cfg.server_lr or ADAPTIVE_DEFAULT_LR, cfg.server_tau
    if name == "fedadagrad":
        return FedAdagrad(eta=lr, tau=tau)
    kind = {"fedadam": FedAdam, "fedyogi": FedYogi}[name]
    return kind(eta=lr, beta_1=cfg.server_momentum, beta_2=cfg.server_beta2, tau=tau)


def build_aggregator(cfg: RunConfig) -> Strategy | None:
    """Flower's rule for ``aggregation``; None for the streamed weighted ``mean``."""
    return {
        "mean": lambda: None,
        "median": FedMedian,
        "trimmed-mean": lambda: FedTrimmedAvg(beta=cfg.trim_fraction),
        "krum": Krum,
    }[cfg.aggregation]()


class RoundReporter:
    """Flower ``evaluate_fn``: after each round, measure the global model (``global-loss``) and
    its EMA, then write samples, FID, the metrics line and the checkpoint.

    The measurement happens in the call; the writing in one background thread, so that the
    next round's messages go out while it runs (deployed nodes train meanwhile). That thread
    works on copies taken in the call (weights, strategy state), writes rounds in order, and
    its errors surface at the next call or at :meth:`close`.

    With ``server-ema`` the server keeps the EMA of the global weights (:func:`ema_update`),
    which the samples, FID and the saved pipeline show.
    """

    def __init__(
        self,
        cfg: RunConfig,
        run: RunDirectory,
        strategy: FedDMStrategy,
        unet: UNet2DModel,
        vae: AutoencoderKL | None = None,
        ema: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.cfg, self.run, self.strategy = cfg, run, strategy
        device = resolve_device(cfg.device)
        self.unet = unet.to(device)
        self.vae = vae.to(device) if vae is not None else None
        self.ema = copy.deepcopy(self.unet) if cfg.server_ema else None
        if self.ema is not None and ema is not None:  # resumed
            self.ema.load_state_dict(ema)
        # What the writer thread reads: the model shown (EMA or global) and the global one.
        self.shown = copy.deepcopy(self.model)
        self.saved = copy.deepcopy(self.unet) if self.ema is not None else self.shown
        examples = cfg.server_eval_examples
        self.eval_inputs = load_eval_inputs(cfg, self.vae, device) if examples else None
        self.scheduler = build_scheduler()
        self.initial: dict[str, float] = {}
        self.start = self.round_start = time.perf_counter()
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feddm-report")
        self.pending: Future[None] | None = None

    @property
    def model(self) -> UNet2DModel:
        """What the samples, FID and the final pipeline show: the EMA if kept, else the global
        model."""
        return self.ema if self.ema is not None else self.unet

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        self.wait()
        self.unet.load_state_dict(arrays.to_torch_state_dict())
        if self.ema is not None and server_round > 0:
            decay = ema_decay(self.cfg.server_ema, server_round)
            new = ema_update(self.ema.state_dict(), self.unet.state_dict(), decay)
            self.ema.load_state_dict(new)
        losses = self._global_losses(ema=server_round > 0)
        self.shown.load_state_dict(self.model.state_dict())
        self.saved.load_state_dict(self.unet.state_dict())
        if server_round == 0:  # the starting point, recorded in round 1's line
            self.initial = {f"{k}-initial": v for k, v in losses.items()}
            if losses:
                log.info("Round 0: global-loss %.4f", losses["global-loss"])
            self.pending = self.writer.submit(self._write, 0, None, None)
            return None
        now = time.perf_counter()
        history = self.strategy.history.get(server_round, {})
        round_seconds = now - self.round_start
        record = {
            "round": server_round,
            "strategy": self.cfg.label,
            **copy.deepcopy(history),
            **self.strategy.book.ledger.round_summary(server_round),
            **self.initial,
            **losses,
            "round-seconds": round(round_seconds, 3),
            # The share of the round its clients did not spend training (mean over clients).
            OVERHEAD_KEY: overhead_share(history.get(TRAIN_SECONDS, 0.0), round_seconds),
            "wall-seconds": round(now - self.start, 3),
        }
        self.initial, self.round_start = {}, now
        checkpoint = (
            copy.deepcopy(strategy_state(self.strategy, server_round)),
            {k: v.copy() for k, v in optimizer_arrays(self.strategy).items()},
            self.ema.state_dict() if self.ema is not None else None,
        )
        self.pending = self.writer.submit(self._write, server_round, record, checkpoint)
        return MetricRecord(losses) if losses else None

    def wait(self) -> None:
        """Until the last round's samples, metrics line and checkpoint are written."""
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def close(self) -> None:
        """Write what is pending and stop the writer thread."""
        self.wait()
        self.writer.shutdown()

    def _write(
        self,
        server_round: int,
        record: dict[str, object] | None,
        checkpoint: tuple[dict[str, object], dict[str, np.ndarray], State | None] | None,
    ) -> None:
        """Samples, FID, metrics line and checkpoint of ``server_round`` (the writer thread)."""
        images = self._sample(self.cfg.grid_samples, seed=self.cfg.seed)
        grid_path = self.run.save_grid(images, server_round)
        if record is None or checkpoint is None:
            return
        record["sample-grid"] = str(grid_path.relative_to(self.run.path))
        if self._fid_due(server_round):
            record.update(fid_scores(self.shown, self.vae, self.cfg))
        # Metrics first, then the checkpoint: a crash in between is undone by truncate_metrics.
        self.run.append_metrics(record)
        state, optimizer, ema = checkpoint
        self.run.save_checkpoint(self.saved, state, optimizer, ema)
        log.info(
            "Round %d: train-loss %s, eval-loss %s, global-loss %s, %d B down, %d B up, %.1f s"
            " (%s outside training)",
            server_round,
            _fmt(record.get(TRAIN_LOSS)),
            _fmt(record.get(EVAL_LOSS)),
            _fmt(record.get("global-loss")),
            record["bytes-down"],
            record["bytes-up"],
            record["round-seconds"],
            _share(record[OVERHEAD_KEY]),
        )

    def loss_of(self, state: dict[str, torch.Tensor]) -> float:
        """``global-loss`` of the weights ``state`` (the strategy's last check)."""
        self.unet.load_state_dict(state)
        return global_loss(self.unet, self.eval_inputs, self.cfg.seed)

    def _global_losses(self, ema: bool) -> dict[str, float]:
        """``global-loss`` of the global model and, if kept and asked for, ``global-loss-ema``
        of its EMA, on the fixed test subset (none with ``server-eval-examples=0``). The last
        check already measured the model it let through: that figure is reused."""
        if self.eval_inputs is None:
            return {}
        check = self.strategy.loss_check
        if check is None or check.current is None:
            loss = global_loss(self.unet, self.eval_inputs, self.cfg.seed)
            if check is not None:
                check.current = loss
        else:
            loss = check.current
        losses = {"global-loss": loss}
        if ema and self.ema is not None:
            losses["global-loss-ema"] = global_loss(self.ema, self.eval_inputs, self.cfg.seed)
        return losses

    def _sample(self, num: int, seed: int) -> torch.Tensor:
        """``num`` DDIM samples of the shown model as images in [0, 1] (latents decoded)."""
        return sample(
            self.shown,
            self.scheduler,
            num,
            steps=self.cfg.sample_steps,
            seed=seed,
            batch_size=self.cfg.batch_size,
            vae=self.vae,
        )

    def _fid_due(self, server_round: int) -> bool:
        every = self.cfg.eval_every
        return every > 0 and (
            server_round % every == 0 or server_round == self.cfg.num_server_rounds
        )


def _share(value: float | None) -> str:
    return f"{value:.0%}" if value is not None else "n/a"


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "n/a"
