"""Replies to requests that are not training (evaluation, routing features), checked alike.

Each site is asked once; its reply counts only if it answers the request it was sent, once,
and passes the request's own check. A site that fails, answers twice, was never asked, or
sends what the check refuses is recorded with the reason; one that never answers is "no
reply". None of it ever stops the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from atoll.federation.protocol import SiteFailure


class Tally(Protocol):
    """Where the refusals and the bytes of the replies are kept (an outcome)."""

    refused: dict[str, str]
    bytes_up: int
    bytes_down: int


def answers(replies: Iterable[Any], requests: dict[str, Any],
            check: Callable[[Any, Any], str | None], out: Tally) -> Iterator[Any]:
    """The replies that answer their request, each once; everything else goes into
    ``out.refused`` with the reason (after the replies run out: "no reply" for the rest)."""
    counted: set[str] = set()
    for reply in replies:
        if isinstance(reply, SiteFailure):
            out.refused[reply.site] = reply.reason
            continue
        out.bytes_up += reply.bytes_up
        out.bytes_down += reply.bytes_down
        request = requests.get(reply.site)
        reason = ("was not asked (or answered twice)" if request is None or
                  reply.site in counted or reply.site in out.refused
                  else check(reply, request))
        if reason:
            out.refused[reply.site] = reason
            continue
        counted.add(reply.site)
        yield reply
    for site in requests:
        if site not in counted:
            out.refused.setdefault(site, "no reply")
