"""ServerApp: validate the run config, drive the strategy, report every round, save the result."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from diffusers import UNet2DModel
from flwr.app import ArrayRecord, Context
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
from feddm_flower.app.dispatch import Architecture
from feddm_flower.app.report import RoundReporter
from feddm_flower.app.resume import restore
from feddm_flower.app.strategy import FedDMStrategy
from feddm_flower.config import RunConfig
from feddm_flower.data.loading import IMAGE_SHAPES
from feddm_flower.evaluation.artifacts import RunDirectory
from feddm_flower.fed.aggregation import InfluenceBound, LossCheck, State
from feddm_flower.fed.downlink import digest
from feddm_flower.protocol import (
    BYTES_DOWN_CUMULATIVE,
    BYTES_UP_CUMULATIVE,
    COMPRESSION_DOWN,
    COMPRESSION_UP,
)
from feddm_flower.task.finetune import (
    add_lora,
    base_state,
    check_space,
    frozen_state,
    load_adapter,
    load_pretrained,
    load_trainable,
    trainable_state,
)
from feddm_flower.task.latents import model_space
from feddm_flower.task.models import build_scheduler, build_unet, count_parameters

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
        "Model: %s U-Net on %s, %d parameters, %d trained and sent",
        cfg.init_from or cfg.model_preset,
        " x ".join(map(str, shape)),
        count_parameters(unet),
        sum(v.numel() for v in trainable_state(unet).values()),
    )
    if vae is not None:
        log.info(
            "Latent diffusion: frozen VAE %s (%d parameters) encodes on the clients and decodes "
            "samples here; only the U-Net travels",
            vae.config._name_or_path,
            count_parameters(vae),
        )
    # Nodes rebuild the start themselves: a seeded preset, or a base they hold (LoRA's seeded).
    # A resumed run's base is still the one it started from (a LoRA model keeps it).
    resumed_whole = state is not None and cfg.trainable == "all" and cfg.init_from
    start = fresh_model(cfg, channels, size, latent=vae is not None) if resumed_whole else unet
    arch = architecture(cfg, start)
    strategy = build_strategy(cfg, seeded_start=state is None, architecture=arch)
    if state is not None:
        restore(strategy, state, run.load_optimizer_state())
        log.info("Resuming after round %d of %d", state["round"], cfg.num_server_rounds)
    initial_arrays = ArrayRecord(trainable_state(unet))  # before the reporter moves it to a GPU
    ema = run.load_ema() if state is not None else None
    reporter = RoundReporter(cfg, run, strategy, unet, vae, ema)
    measured = reporter.eval_inputs is not None
    strategy.loss_check = last_check(cfg, reporter.loss_of if measured else None,
                                     reporter.probe_of)  # fmt: skip
    result = strategy.start(
        grid=grid,
        initial_arrays=initial_arrays,
        num_rounds=cfg.num_server_rounds,
        timeout=cfg.round_timeout,
        evaluate_fn=reporter.evaluate,
        end_round=reporter.end_round,
    )
    reporter.close()
    if len(result.arrays) > 0:
        load_trainable(unet, result.arrays.to_torch_state_dict())
    path = run.save_pipeline(reporter.model, build_scheduler(), vae)
    log.info(
        "Saved the final pipeline (%s) to %s (loading it: README, 'Where results land')",
        "EMA weights" if reporter.ema is not None else "global weights",
        path,
    )
    summary = run.write_summary()
    log.info(
        "Traffic: %d B down (%.2fx less than fp32 FedAvg), %d B up (%.2fx less)",
        summary.get(BYTES_DOWN_CUMULATIVE, 0),
        summary.get(COMPRESSION_DOWN) or 0,
        summary.get(BYTES_UP_CUMULATIVE, 0),
        summary.get(COMPRESSION_UP) or 0,
    )
    log.info("FedDM run finished; results in %s", run.path)


def _starting_point(
    cfg: RunConfig, run: RunDirectory, channels: int, size: int, *, latent: bool
) -> tuple[UNet2DModel, dict[str, object] | None]:
    """The U-Net and strategy state to start from: a resumed run's last checkpoint, else
    the start :func:`fresh_model` gives (so a run that died before its first checkpoint
    restarts exactly as it began)."""
    if cfg.resume and run.has_checkpoint():
        if cfg.trainable == "lora":  # the base again, with the checkpoint's adapter
            unet, state = fresh_model(cfg, channels, size, latent=latent), run.checkpoint_state()
            load_adapter(unet, run.checkpoint_adapter())
        else:
            unet, state = run.load_checkpoint()
        run.truncate_metrics(int(state["round"]))
        return unet, state
    if cfg.resume:
        log.warning("No checkpoint in %s (stopped in round 1): starting it again", run.path)
        run.truncate_metrics(0)
    return fresh_model(cfg, channels, size, latent=latent), None


def fresh_model(cfg: RunConfig, channels: int, size: int, *, latent: bool) -> UNet2DModel:
    """The U-Net ``init-from`` names (checked against the data's space), else the preset's
    from ``seed``; under ``trainable='lora'`` with seeded adapters on its frozen weights."""
    if cfg.init_from:
        unet = load_pretrained(cfg.init_from)
        check_space(unet, channels, size, "latent space" if latent else "dataset")
    else:
        unet = build_unet(cfg.model_preset, size, channels, seed=cfg.seed, latent=latent)
    return add_lora(unet, cfg) if cfg.trainable == "lora" else unet


def architecture(cfg: RunConfig, unet: UNet2DModel) -> Architecture:
    """What nodes build on (dispatch.Architecture): a loaded U-Net's config and weights (the
    base, by digest: sent once to a node that lacks it), the frozen LoRA factors' digest."""
    arch = Architecture()
    if cfg.init_from:
        config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        arch.unet_config = json.dumps(config)
        arch.base = {k: v.detach().clone() for k, v in base_state(unet).items()}
        arch.base_digest = digest(arch.base)
    if cfg.trainable == "lora":
        arch.frozen_digest = digest(frozen_state(unet))
    return arch


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


def build_strategy(
    cfg: RunConfig, seeded_start: bool = False, architecture: Architecture | None = None
) -> FedDMStrategy:
    """The FedDM strategy for the run config: Flower's server optimizer and aggregation rule,
    wrapped with this combination's uplink, downlink, proximal term, bounds and (dp-* keys)
    Flower's differential-privacy wrapper. ``seeded_start``: the run starts from the seeded
    initial weights, which nodes rebuild themselves (on ``architecture``)."""
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
        architecture=architecture,
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


def last_check(
    cfg: RunConfig,
    loss: Callable[[State], float] | None,
    probe: Callable[[State], float] | None = None,
) -> LossCheck | None:
    """The last check under ``max-loss-ratio``: every new global model measured with ``loss``
    (the server's ``global-loss``; None when the server has no data to measure on), each
    reply's own model with ``probe`` (the same on a twentieth of the data)."""
    if not cfg.max_loss_ratio:
        return None
    if loss is None:
        log.warning("max-loss-ratio=%g needs server-eval-examples > 0: new global models are "
                    "checked for finite weights only", cfg.max_loss_ratio)  # fmt: skip
        return None
    return LossCheck(loss, cfg.max_loss_ratio, probe)


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
