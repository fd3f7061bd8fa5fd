"""The last check in an honest round measures one model; a refused round is searched for the
replies that fail on their own, which are rejected, and the round is combined again."""

from __future__ import annotations

import torch
from flwr.app import RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from feddm_flower.app.local_grid import node_reply, train_metrics
from feddm_flower.app.records import to_record
from feddm_flower.app.strategy import FedDMStrategy
from feddm_flower.fed.aggregation import InfluenceBound, LossCheck
from feddm_flower.fed.group_testing import find_culprits, max_tests
from feddm_flower.protocol import ARRAYS, METRICS

GLOBAL = {"w": torch.zeros(4, 8), "steps": torch.tensor([3])}


@given(
    count=st.integers(1, 64),
    data=st.data(),
)
def test_the_search_names_exactly_the_bad_replies_within_its_bound(count: int, data) -> None:
    """A group fails when it holds a bad reply: the search names exactly the bad ones, each
    with its own reason, in at most 2·K·⌈log2 N⌉ tests, and what is left passes."""
    bad = data.draw(st.sets(st.integers(0, count - 1), min_size=1, max_size=count))
    tests: list[list[int]] = []

    def refusal(group) -> str | None:
        tests.append(list(group))
        worst = [i for i in group if i in bad]
        return f"reply {worst[0]} is bad" if worst else None

    found = find_culprits(count, refusal, "the round fails")
    assert set(found) == bad
    assert all(found[i] == f"reply {i} is bad" for i in found if count > 1)
    assert len(tests) <= max_tests(count, len(bad))
    assert refusal([i for i in range(count) if i not in found]) is None


@given(count=st.integers(2, 32), data=st.data())
def test_a_reply_that_passes_alone_is_never_named(count: int, data) -> None:
    """Whatever the check does with groups (here: a group fails by chance), a reply is named
    only if its own model fails, and the search never exceeds 2·(N − 1) tests."""
    alone_bad = data.draw(st.sets(st.integers(0, count - 1), max_size=count))
    tests = 0

    def refusal(group) -> str | None:
        nonlocal tests
        tests += 1
        if len(group) == 1:
            return "bad" if group[0] in alone_bad else None
        return "unlucky" if data.draw(st.booleans()) else None

    found = find_culprits(count, refusal, "the round fails")
    assert set(found) <= alone_bad and tests <= 2 * (count - 1)


def _reply(node: int, shift: float):
    state = {"w": GLOBAL["w"] + shift, "steps": GLOBAL["steps"]}
    return node_reply(node, RecordDict({ARRAYS: to_record(state), METRICS: train_metrics(10)}))


@settings(max_examples=25, deadline=None)
@given(honest=st.integers(1, 12), data=st.data())
def test_a_refused_round_drops_its_bad_replies_and_keeps_every_honest_one(
    honest: int, data
) -> None:
    """The real strategy, bounds off, loss = mean squared distance from a target the honest
    replies move towards: an honest round costs one evaluation; with K bad replies (far
    away) among them, the round is refused, exactly the bad nodes are rejected with their
    reason, every honest reply is kept, the model moves, and the evaluations stay within
    1 + 2·K·⌈log2 N⌉ + 1."""
    bad = data.draw(st.integers(0, 6))
    count = honest + bad
    order = data.draw(st.permutations(range(count)))
    bad_nodes = {order[i] + 1 for i in range(bad)}
    target = torch.full_like(GLOBAL["w"], 1.0)
    check = LossCheck(lambda s: float(((s["w"] - target) ** 2).mean()), 1.5)
    check.current = check.loss(GLOBAL)
    strategy = FedDMStrategy(bound=InfluenceBound(0, 0), loss_check=check)
    strategy.global_state = {k: v.clone() for k, v in GLOBAL.items()}
    replies = [_reply(n, 50.0 if n in bad_nodes else 0.5) for n in range(1, count + 1)]
    arrays, _ = strategy.aggregate_train(1, replies)
    history = strategy.history[1]
    rejected = {int(r["node"]): r["reason"] for r in history.get("rejected", [])}
    assert set(rejected) == bad_nodes
    assert all(r.startswith("its model's global-loss") for r in rejected.values())
    assert arrays is not None and "aggregate-rejected" not in history
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], GLOBAL["w"] + 0.5)
    if bad:
        assert history["server-evaluations"] <= 2 + max_tests(count, bad)
    else:
        assert history["server-evaluations"] == 1


def test_the_probe_rejects_a_grossly_bad_reply_as_it_arrives_at_one_probe_each() -> None:
    """With a probe, each reply's own model is measured on it (plus the current model once
    per model): a reply far off is rejected before it is folded in; the new model is then
    evaluated once, and the next round probes against it."""
    target = torch.full_like(GLOBAL["w"], 1.0)

    def loss(s: dict[str, torch.Tensor]) -> float:
        return float(((s["w"] - target) ** 2).mean())

    check = LossCheck(loss, 1.5, probe=loss)
    check.current = loss(GLOBAL)
    strategy = FedDMStrategy(loss_check=check)
    strategy.global_state = {k: v.clone() for k, v in GLOBAL.items()}
    replies = [_reply(1, 0.5), _reply(2, 50.0), _reply(3, 0.5)]
    arrays, _ = strategy.aggregate_train(1, replies)
    history = strategy.history[1]
    assert [(r["node"], r["reason"][:25]) for r in history["rejected"]] == [
        ("2", "its model's probe-loss 24")
    ]
    assert history["server-probes"] == 4 and history["server-evaluations"] == 1
    assert arrays is not None and check.current_probe is None  # the model moved: re-probe
