"""How long a round may wait for a site when the config sets no deadline of its own.

A deployed round must end even if a site vanishes without a word. With a time budget the
round cannot legitimately take much longer than that budget (twice it, plus ten minutes for
loading, the transfer and the coordinator's step); with a fixed step count atoll cannot know
how long a big model's steps take, so the bound is Flower's own message lifetime (12 hours),
after which Flower drops the reply anyway.
"""

from __future__ import annotations

FLOWER_MESSAGE_TTL_S = 43200.0
"""Flower's default time-to-live of a message (``flwr.app.constants.DEFAULT_TTL``)."""
SLACK_S = 600.0
"""Added to twice the time budget: model loading, transfers, the coordinator's step."""


def round_deadline_s(time_budget_s: float) -> float:
    """The longest a round with ``time_budget_s`` (0 = a fixed step count) may wait."""
    if time_budget_s > 0:
        return min(2 * time_budget_s + SLACK_S, FLOWER_MESSAGE_TTL_S)
    return FLOWER_MESSAGE_TTL_S
