"""Attacks against defences: ``python -m feddm_flower.tools.attack_table`` writes the table of
docs/robustness.md.

Each cell is one federation run in this process: the real :class:`FedDMStrategy` with its
real round loop, guard, bounds and last check, built from the run-config as the ServerApp
builds it, and real nodes (:mod:`feddm_flower.app.node_tasks` on FashionMNIST partitions) behind
a :class:`LocalGrid` that delivers their replies in the order the attack chooses. K of the N
nodes are hostile (:mod:`feddm_flower.fed.attacks`). A cell reports the final ``global-loss``
relative to the all-honest run under the same defence and seed, and how far the final model
is from the all-honest one, in units of the honest training distance.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, Metadata, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from feddm_flower import configure_logging
from feddm_flower.app.compat import SUPERLINK_NODE_ID, act_as_server_app, assign_message_id
from feddm_flower.app.hostile import hostile_reply
from feddm_flower.app.node_tasks import receive, run_task
from feddm_flower.app.server_app import build_strategy, last_check
from feddm_flower.config import RunConfig
from feddm_flower.evaluation.quality import global_loss, load_eval_inputs
from feddm_flower.fed.attacks import (
    ATTACKS,
    answers,
    skips_training,
)
from feddm_flower.fed.timings import Stopwatch
from feddm_flower.task.models import build_unet

DEFENCES = {
    "mean": {},
    "median": {"aggregation": "median"},
    "trimmed-mean": {"aggregation": "trimmed-mean"},
    "krum": {"aggregation": "krum"},
}
# "off": no norm or count bound and no last check; the rule alone.
BOUNDS = {"on": {}, "off": {"norm-bound": 0.0, "weight-bound": 0.0, "max-loss-ratio": 0.0}}
BASE = {"fraction-evaluate": 0.0}


class LocalGrid(Grid):
    """N real nodes in this process; nodes ``0..colluders-1`` run ``attack``.

    ``pull_messages`` answers only the message whose turn it is: fast attackers first, then
    the honest nodes, slow attackers last, so the strategy sees the replies in that order.
    Honest replies are cached by (node, model digest, round): a cell that sends a node the same
    model as an earlier cell (every cell's round 1) gets the same reply without training again.
    """

    def __init__(self, run_config: dict[str, Any], num_nodes: int, attack: str, colluders: int,
                 cache: dict[tuple, RecordDict]) -> None:  # fmt: skip
        self.node_ids = list(range(10, 10 + num_nodes))
        self.contexts = {
            node: Context(
                1,
                node,
                {"partition-id": i, "num-partitions": num_nodes},
                RecordDict(),
                dict(run_config),
            )  # fmt: skip
            for i, node in enumerate(self.node_ids)
        }
        self.hostile = set(self.node_ids[:colluders]) if attack != "none" else set()
        self.attack, self.cache = attack, cache
        self.pushed: dict[str, Message] = {}
        self.turns: list[str] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        first, middle, last = [], [], []
        for msg in messages:
            message_id = f"m{len(self.pushed)}"
            assign_message_id(msg, message_id)
            self.pushed[message_id] = msg
            when = answers(self.attack) if msg.metadata.dst_node_id in self.hostile else ""
            {"first": first, "last": last}.get(when, middle).append(message_id)
        self.turns = first + self.turns + middle + last
        return first + middle + last

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        if not self.turns or self.turns[0] not in set(message_ids):
            return []
        msg = self.pushed.pop(self.turns.pop(0))
        return [self._reply(msg)]

    def _reply(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        context = self.contexts[node]
        honest = None
        if node not in self.hostile or not skips_training(self.attack):
            honest = self._honest(msg, context)
        content = honest if node not in self.hostile else (
            hostile_reply(self.attack, msg.content, context, honest))  # fmt: skip
        metadata = Metadata(
            run_id=1, message_id=f"r-{msg.metadata.message_id}", src_node_id=node,
            dst_node_id=SUPERLINK_NODE_ID, reply_to_message_id=msg.metadata.message_id,
            group_id=msg.metadata.group_id, created_at=time.time(), ttl=60.0,
            message_type=msg.metadata.message_type,
        )  # fmt: skip
        return Message(metadata=metadata, content=content)

    def _honest(self, msg: Message, context: Context) -> RecordDict:
        config = msg.content["config"]
        key = (context.node_id, str(config["model-digest"]), int(config["server-round"]),
               json.dumps(context.run_config, sort_keys=True))  # fmt: skip
        if key in self.cache:
            receive(msg.content, context)  # the node still keeps the model as its copy
            return self.cache[key]
        status, content = run_task("train", msg.content, context, Stopwatch(time.time()))
        assert status == "ok", content
        self.cache[key] = content
        return content

    # Unused by FedDMStrategy's round loop; Grid's abstract interface.
    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def send_and_receive(self, *args: Any, **kwargs: Any) -> Iterable[Message]:
        raise NotImplementedError

    def set_run(self, run_id: int) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError


def run_cell(
    run_config: dict[str, Any], nodes: int, attack: str, colluders: int,
    cache: dict[tuple, RecordDict],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:  # fmt: skip
    """One federation run: its initial and final global weights and final ``global-loss``."""
    cfg = RunConfig.from_mapping(run_config)
    act_as_server_app()  # as a ServerApp process, before the strategy builds messages
    unet = build_unet(cfg.model_preset, 28, 1, seed=cfg.seed)
    initial = {k: v.clone() for k, v in unet.state_dict().items()}
    inputs = load_eval_inputs(cfg, None)

    def loss_of(state: dict[str, torch.Tensor]) -> float:
        unet.load_state_dict(state)
        return global_loss(unet, inputs, cfg.seed)

    strategy = build_strategy(cfg, seeded_start=True)
    strategy.dispatch.poll_interval = 0.0
    strategy.loss_check = last_check(cfg, loss_of)
    grid = LocalGrid(run_config, nodes, attack, colluders, cache)
    result: Result = strategy.start(grid, ArrayRecord(initial), cfg.num_server_rounds)
    final = result.arrays.to_torch_state_dict() if len(result.arrays) else initial
    return initial, final, loss_of(final)


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum())
                         for k in a if a[k].is_floating_point()))  # fmt: skip


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (defence, bounds, attack, seed), written to ``--out`` as it completes."""
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        cache: dict[tuple, RecordDict] = {}
        for defence in args.defences:
            for bounds in args.bounds:
                config = {**BASE, **args.set, **DEFENCES[defence], **BOUNDS[bounds], "seed": seed}
                init, honest, honest_loss = run_cell(config, args.nodes, "none", 0, cache)
                moved = _distance(honest, init)
                for attack in args.attacks:
                    begun = time.monotonic()
                    _, final, loss = run_cell(config, args.nodes, attack, args.colluders, cache)
                    rows.append({
                        "defence": defence, "bounds": bounds, "attack": attack, "seed": seed,
                        "nodes": args.nodes, "colluders": args.colluders,
                        "global-loss": loss, "honest-global-loss": honest_loss,
                        "relative-loss": loss / honest_loss,
                        "distance-to-honest": _distance(final, honest) / moved,
                        "seconds": round(time.monotonic() - begun, 1),
                    })  # fmt: skip
                    print(json.dumps(rows[-1]), flush=True)
                    if args.out:
                        report = {"config": vars_text(args), "rows": rows}
                        args.out.write_text(json.dumps(report, indent=1))
    return rows


def vars_text(args: argparse.Namespace) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def _cell(rows: list[dict[str, Any]]) -> str:
    """Mean relative loss (and distance in honest training distances) over seeds."""
    rel = [r["relative-loss"] for r in rows]
    dist = [r["distance-to-honest"] for r in rows]
    if not all(math.isfinite(x) for x in rel):
        return f"NaN ({len(rows)})"
    spread = f" ±{statistics.stdev(rel):.2f}" if len(rel) > 1 else ""
    return f"{statistics.mean(rel):.2f}{spread} / {statistics.mean(dist):.1f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    """Attacks as rows, defences x bounds as columns."""
    columns = sorted({(r["defence"], r["bounds"]) for r in rows},
                     key=lambda c: (list(DEFENCES).index(c[0]), c[1] != "on"))  # fmt: skip
    attacks = [a for a in ATTACKS if any(r["attack"] == a for r in rows)]
    seeds = sorted({r["seed"] for r in rows})
    head = "| attack | " + " | ".join(f"{d}, bounds {b}" for d, b in columns) + " |"
    lines = [head, "|---" * (len(columns) + 1) + "|"]
    for attack in attacks:
        cells = [_cell([r for r in rows if r["attack"] == attack
                        and (r["defence"], r["bounds"]) == c]) for c in columns]  # fmt: skip
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    n, k = rows[0]["nodes"], rows[0]["colluders"]
    lines.append("")
    lines.append(f"Each cell: final global-loss / the all-honest run's under the same defence "
                 f"(mean ± sd over {len(seeds)} seeds {seeds}) / distance of the final model "
                 f"from the all-honest one, in honest training distances. {k} hostile nodes "
                 f"of {n}.")  # fmt: skip
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m feddm_flower.tools.attack_table",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--nodes", type=int, default=7)
    parser.add_argument("--colluders", type=int, default=2, help="hostile nodes (K)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--attacks", nargs="+", choices=list(ATTACKS), default=list(ATTACKS))
    parser.add_argument("--defences", nargs="+", choices=list(DEFENCES), default=list(DEFENCES))
    parser.add_argument("--bounds", nargs="+", choices=list(BOUNDS), default=list(BOUNDS))
    parser.add_argument("--set", type=json.loads, default={"num-server-rounds": 2,
                        "local-steps": 20, "batch-size": 32, "server-eval-examples": 200},
                        help="run-config keys for every cell, as JSON")  # fmt: skip
    parser.add_argument("--out", type=Path, help="JSON file, rewritten after every cell")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--render", type=Path, nargs="+", metavar="JSON",
                        help="run nothing: the table of these --out files together")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    configure_logging()
    args = build_parser().parse_args(argv)
    if args.render:
        rows = [row for path in args.render for row in json.loads(path.read_text())["rows"]]
    else:
        RunConfig.from_mapping({**BASE, **args.set})  # a bad key fails here, before any run
        rows = measure(args)
    table = markdown(rows)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
