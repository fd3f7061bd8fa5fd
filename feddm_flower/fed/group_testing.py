"""Which replies make a refused round fail: adaptive group testing over the round's replies.

The last check measures one model per honest round, the candidate global model. Only when it
is refused does the server look for the replies responsible, by binary splitting (Hwang's
adaptive group testing, 1972): a group that fails is halved and each half tested, down to
single replies. A reply is named only if it fails on its own, so a reply whose own model
passes is never dropped. Ours: a few lines over the project's own check, no library needed.

Cost: each level of the search tests at most two halves of each failing group. While only
groups holding a bad reply fail, K bad replies among N cost at most 2·K·⌈log2 N⌉ tests;
whatever the check does, at most 2·(N − 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

Refusal = Callable[[Sequence[int]], "str | None"]


def find_culprits(count: int, refusal: Refusal, reason: str) -> dict[int, str]:
    """The replies among ``range(count)``, which together fail with ``reason``, that fail on
    their own, each with its reason. ``refusal(group)`` is why the model built from that group
    of replies fails the check, or None if it passes."""

    def search(group: Sequence[int], why: str) -> dict[int, str]:
        if len(group) == 1:
            return {group[0]: why}
        half = len(group) // 2
        found: dict[int, str] = {}
        for part in (group[:half], group[half:]):
            if (part_why := refusal(part)) is not None:
                found |= search(part, part_why)
        return found

    return search(range(count), reason) if count else {}


def max_tests(count: int, culprits: int) -> int:
    """The most tests :func:`find_culprits` spends on ``count`` replies of which ``culprits``
    are bad, while only groups holding a bad reply fail."""
    if count <= 1:
        return 0
    return min(2 * culprits * math.ceil(math.log2(count)), 2 * (count - 1))
