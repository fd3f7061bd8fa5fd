"""TensorBoard event files beside metrics.jsonl, through torch's ``SummaryWriter``.

Per round: every number of the round's metrics line as a scalar (global, train and eval loss,
bytes down and up, the overhead share, FID/KID when computed, epsilon under DP, ...), the
count of rejected replies, and the sample grid as an image; once, the run's config as text.
``tensorboard --logdir <runs root>`` then compares runs. Without the ``tensorboard`` package
(the GPU kit does not carry it) a warning says so and no event file is written: every scalar
is in metrics.jsonl as well.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from torchvision.utils import make_grid

log = logging.getLogger(__name__)

REJECTED = "replies-rejected"  # the scalar counting the round's rejected replies


class RunBoard:
    """One run's event files in ``path``; ``enabled`` False (``tensorboard=false``) writes
    none. ``first_round`` > 1 (a resumed run) drops events the interrupted run logged for it
    and later rounds."""

    def __init__(self, path: Path, enabled: bool, first_round: int = 1) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is not installed
            log.warning("tensorboard is not installed: no event files (metrics.jsonl has "
                        "every scalar; tensorboard=false silences this)")  # fmt: skip
            return
        purge = first_round if first_round > 1 else None
        self.writer = SummaryWriter(log_dir=str(path), purge_step=purge)

    def config(self, config: dict[str, object]) -> None:
        """The run's validated config, as a JSON block of text."""
        if self.writer is not None:
            text = json.dumps(config, indent=2)
            self.writer.add_text("run-config", f"```json\n{text}\n```", global_step=0)

    def round(
        self, server_round: int, record: dict[str, object] | None, images: torch.Tensor
    ) -> None:
        """Round ``server_round``'s sample grid (``images`` in [0, 1]) and, from its metrics
        line ``record`` (none for round 0), every finite number and the rejected replies."""
        if self.writer is None:
            return
        grid = make_grid(images.float().cpu(), nrow=math.ceil(math.sqrt(len(images))), padding=1)
        self.writer.add_image("samples", grid, global_step=server_round)
        for key, value in (record or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                if math.isfinite(value):
                    self.writer.add_scalar(key, value, global_step=server_round)
        if record is not None:
            rejected = record.get("rejected")
            count = len(rejected) if isinstance(rejected, list) else 0
            self.writer.add_scalar(REJECTED, count, global_step=server_round)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
