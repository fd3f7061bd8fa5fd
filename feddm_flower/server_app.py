"""ServerApp: validate the run config, drive the strategy, report every round, save the result."""

from __future__ import annotations

import logging
import time

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from . import configure_logging
from .artifacts import RunDirectory
from .config import RunConfig
from .data import IMAGE_SHAPES
from .diffusion import sample
from .models import build_scheduler, build_unet, count_parameters
from .strategies import FedDMProx, FedDMQuant, FedDMVanilla

log = logging.getLogger(__name__)
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` of the configured FedDM strategy."""
    configure_logging()
    cfg = RunConfig.from_mapping(context.run_config)
    run = RunDirectory.create(cfg.output_dir, cfg.strategy)
    run.write_config(cfg.to_dict())
    log.info("FedDM run (%s) writing to %s", cfg.strategy, run.path)

    channels, size = IMAGE_SHAPES[cfg.dataset]
    unet = build_unet(cfg.model_preset, size, channels, seed=cfg.seed)
    log.info("Model: %s U-Net, %d parameters", cfg.model_preset, count_parameters(unet))
    strategy = build_strategy(cfg)
    reporter = RoundReporter(cfg, run, strategy, unet)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(unet.state_dict()),
        num_rounds=cfg.num_server_rounds,
        timeout=cfg.round_timeout,
        evaluate_fn=reporter,
    )
    if len(result.arrays) > 0:
        unet.load_state_dict(result.arrays.to_torch_state_dict())
    path = run.save_pipeline(unet, build_scheduler())
    log.info("Saved DDPMPipeline to %s (load with DDPMPipeline.from_pretrained)", path)
    summary = run.write_summary(reporter.last)
    log.info(
        "Traffic: %d B down (%.2fx less than fp32 FedAvg), %d B up (%.2fx less)",
        summary.get("bytes-down-cumulative", 0),
        summary.get("compression-down") or 0,
        summary.get("bytes-up-cumulative", 0),
        summary.get("compression-up") or 0,
    )
    log.info("FedDM run finished; results in %s", run.path)


def build_strategy(cfg: RunConfig) -> FedDMVanilla:
    """The strategy named by run-config ``strategy``, with its keys from the run config."""
    common = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": cfg.min_nodes,
        "min_evaluate_nodes": cfg.min_nodes,
        "min_available_nodes": cfg.min_nodes,
        "downlink_dtype": cfg.downlink_dtype,
        "min_replies": cfg.min_replies,
    }
    if cfg.strategy == "prox":
        return FedDMProx(proximal_mu=cfg.proximal_mu, **common)
    if cfg.strategy == "quant":
        return FedDMQuant(
            bits=cfg.quant_bits,
            block_size=cfg.quant_block_size,
            stochastic=cfg.quant_stochastic,
            error_feedback=cfg.error_feedback,
            **common,
        )
    return FedDMVanilla(**common)


class RoundReporter:
    """Flower ``evaluate_fn``: after each round, write samples, checkpoint and metrics line."""

    def __init__(
        self, cfg: RunConfig, run: RunDirectory, strategy: FedDMVanilla, unet: object
    ) -> None:
        self.cfg, self.run, self.strategy, self.unet = cfg, run, strategy, unet
        self.scheduler = build_scheduler()
        self.start = self.round_start = time.perf_counter()
        self.last: dict[str, object] = {}  # the latest metrics line

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        self.unet.load_state_dict(arrays.to_torch_state_dict())
        images = sample(
            self.unet,
            self.scheduler,
            self.cfg.grid_samples,
            steps=self.cfg.sample_steps,
            seed=self.cfg.seed,
        )
        grid_path = self.run.save_grid(images, server_round)
        if server_round == 0:
            return None
        self.run.save_checkpoint(self.unet)
        now = time.perf_counter()
        record = {
            "round": server_round,
            "strategy": self.cfg.strategy,
            **self.strategy.history.get(server_round, {}),
            **self.strategy.ledger.round_summary(server_round),
            "round-seconds": round(now - self.round_start, 3),
            "wall-seconds": round(now - self.start, 3),
            "sample-grid": str(grid_path.relative_to(self.run.path)),
        }
        self.round_start, self.last = now, record
        self.run.append_metrics(record)
        log.info(
            "Round %d: train-loss %s, eval-loss %s, %d B down, %d B up, %.1f s",
            server_round,
            _fmt(record.get("train-loss")),
            _fmt(record.get("eval-loss")),
            record["bytes-down"],
            record["bytes-up"],
            record["round-seconds"],
        )
        return None


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "n/a"
