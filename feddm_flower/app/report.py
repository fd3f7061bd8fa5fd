"""What the server keeps of each round: the global model's loss (and its EMA's), then in a
background thread samples, FID, the metrics line and the checkpoint."""

from __future__ import annotations

import copy
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DModel
from flwr.app import ArrayRecord, MetricRecord

from feddm_flower.app.resume import optimizer_arrays, strategy_state
from feddm_flower.app.strategy import FedDMStrategy
from feddm_flower.config import RunConfig
from feddm_flower.evaluation.artifacts import RunDirectory
from feddm_flower.evaluation.quality import (
    ema_decay,
    ema_update,
    fid_scores,
    global_loss,
    load_eval_inputs,
    probe_inputs,
)
from feddm_flower.evaluation.tensorboard import RunBoard
from feddm_flower.fed.aggregation import State
from feddm_flower.fed.timings import OVERHEAD_KEY, overhead_share
from feddm_flower.protocol import (
    EVAL_LOSS,
    FINAL_EVAL_LOSS,
    GLOBAL_LOSS,
    GLOBAL_LOSS_EMA,
    ROUND_SECONDS,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    WALL_SECONDS,
)
from feddm_flower.task.diffusion import sample
from feddm_flower.task.finetune import load_trainable
from feddm_flower.task.models import build_scheduler, resolve_device

log = logging.getLogger(__name__)


class RoundReporter:
    """Two steps the strategy takes after each round (round 0: the starting point).

    :meth:`evaluate` (Flower's ``evaluate_fn``) takes the EMA's step and measures the global
    model and its EMA (``global-loss``); :meth:`end_round` copies what the round ended with
    and hands it to one background thread that writes samples, FID, the metrics line and the
    checkpoint, so that the next round's messages go out meanwhile (deployed nodes train).
    That thread writes rounds in order; its errors surface at the next :meth:`end_round` or
    at :meth:`close`.

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
        self.losses: dict[str, float] = {}  # evaluate's, until end_round
        self.start = self.round_start = time.perf_counter()
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feddm-report")
        self.pending: Future[None] | None = None
        self.board = RunBoard(run.path, cfg.tensorboard, strategy.first_round)
        self.board.config(cfg.to_dict())

    @property
    def model(self) -> UNet2DModel:
        """What the samples, FID and the final pipeline show: the EMA if kept, else the global
        model."""
        return self.ema if self.ema is not None else self.unet

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """``global-loss`` of ``arrays`` (and ``global-loss-ema`` after the EMA's step)."""
        load_trainable(self.unet, arrays.to_torch_state_dict())
        if self.ema is not None and server_round > 0:
            decay = ema_decay(self.cfg.server_ema, server_round)
            new = ema_update(self.ema.state_dict(), self.unet.state_dict(), decay)
            self.ema.load_state_dict(new)
        self.losses = self._global_losses(ema=server_round > 0)
        return MetricRecord(self.losses) if self.losses else None

    def end_round(self, server_round: int) -> None:
        """Hand the round's samples, FID, metrics line and checkpoint to the writer thread."""
        self.wait()
        self.shown.load_state_dict(self.model.state_dict())
        self.saved.load_state_dict(self.unet.state_dict())
        losses, self.losses = self.losses, {}
        if server_round == 0:  # the starting point, recorded in round 1's line
            self.initial = {f"{k}-initial": v for k, v in losses.items()}
            if losses:
                log.info("Round 0: global-loss %.4f", losses[GLOBAL_LOSS])
            self.pending = self.writer.submit(self._write, 0, None, None)
            return
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
            ROUND_SECONDS: round(round_seconds, 3),
            # The share of the round its clients did not spend training (mean over clients).
            OVERHEAD_KEY: overhead_share(history.get(TRAIN_SECONDS, 0.0), round_seconds),
            WALL_SECONDS: round(now - self.start, 3),
        }
        self.initial, self.round_start = {}, now
        checkpoint = (
            copy.deepcopy(strategy_state(self.strategy, server_round)),
            {k: v.copy() for k, v in optimizer_arrays(self.strategy).items()},
            self.ema.state_dict() if self.ema is not None else None,
        )
        self.pending = self.writer.submit(self._write, server_round, record, checkpoint)

    def wait(self) -> None:
        """Until the last round's samples, metrics line and checkpoint are written."""
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def close(self) -> None:
        """Write what is pending and stop the writer thread."""
        self.wait()
        self.writer.shutdown()
        self.board.close()

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
            self.board.round(server_round, None, images)
            return
        record["sample-grid"] = str(grid_path.relative_to(self.run.path))
        if self._fid_due(server_round):
            record.update(fid_scores(self.shown, self.vae, self.cfg))
        # Metrics first, then the checkpoint: a crash in between is undone by truncate_metrics.
        self.run.append_metrics(record)
        self.board.round(server_round, record, images)
        state, optimizer, ema = checkpoint
        self.run.save_checkpoint(self.saved, state, optimizer, ema)
        log.info(
            "Round %d: train-loss %s, eval-loss %s, global-loss %s, %d B down, %d B up, %.1f s"
            " (%s outside training)",
            server_round,
            _fmt(record.get(TRAIN_LOSS)),
            _fmt(record.get(EVAL_LOSS)),
            _fmt(record.get(GLOBAL_LOSS)),
            record["bytes-down"],
            record["bytes-up"],
            record[ROUND_SECONDS],
            _share(record[OVERHEAD_KEY]),
        )
        if FINAL_EVAL_LOSS in record:
            log.info("Round %d: final model's eval-loss %s", server_round,
                     _fmt(record[FINAL_EVAL_LOSS]))  # fmt: skip

    def loss_of(self, state: dict[str, torch.Tensor]) -> float:
        """``global-loss`` of the weights ``state`` (the strategy's last check)."""
        load_trainable(self.unet, state)
        return global_loss(self.unet, self.eval_inputs, self.cfg.seed)

    def probe_of(self, state: dict[str, torch.Tensor]) -> float:
        """The same loss on the probe's twentieth of the images (one reply's model)."""
        load_trainable(self.unet, state)
        return global_loss(self.unet, probe_inputs(self.eval_inputs), self.cfg.seed)

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
        losses = {GLOBAL_LOSS: loss}
        if ema and self.ema is not None:
            losses[GLOBAL_LOSS_EMA] = global_loss(self.ema, self.eval_inputs, self.cfg.seed)
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
