"""What an engine must do: move plans to sites and replies back, knowing nothing of training.

:mod:`atoll.engines.local` runs the sites in this process; :mod:`atoll.engines.flower` moves
the same messages (:mod:`atoll.federation.protocol`) over Flower's Deployment Engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from atoll.federation.protocol import EvalReport, EvalRequest, RoundPlan, SiteFailure, SiteUpdate


class Engine(Protocol):
    """Moves plans to sites and updates back. Knows nothing about training."""

    def available_sites(self) -> list[str]:
        """Sites that can take a plan now."""
        ...

    def exchange(self, plans: dict[str, RoundPlan], deadline_s: float
                 ) -> Iterator[SiteUpdate | SiteFailure]:
        """Deliver ``plans`` and yield each site's reply as it arrives, until all replied or
        ``deadline_s`` seconds passed (0 = no deadline); a site that did not answer by then
        is reported as a :class:`SiteFailure`."""
        ...

    def evaluate(self, requests: dict[str, EvalRequest], deadline_s: float
                 ) -> Iterator[EvalReport | SiteFailure]:
        """Deliver evaluation requests and yield each site's report as it arrives, like
        :meth:`exchange` (no training update is ever yielded here)."""
        ...

    def sample_features(self, requests: dict[str, Any], deadline_s: float) -> Iterator[Any]:
        """Deliver :class:`~atoll.federation.features.FeatureRequest` s and yield each site's
        ``FeatureReport`` (or a :class:`SiteFailure`) as it arrives, like :meth:`evaluate`."""
        ...

    def release(self, before_round: int) -> None:
        """Rounds before ``before_round`` will not be sent or answered again: drop whatever
        the engine keeps for them (objects in a store)."""
        ...
