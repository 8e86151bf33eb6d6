"""What each site is sent at the start of a round: the weights whole, one fragment of them, or
their change since the copy it holds, and the run spec when it may not hold that either.

Sites that took part last round hold last round's weights (and every fragment but the one
just synced); with ``comm.down.delta`` they get only the encoded change. Every other site
gets the copy whole. With a grid of paths, a site gets its path's modules only, named as the
base model's parameters. A payload is encoded once per round and shared by the sites it
suits.
"""

from __future__ import annotations

import torch

from atoll.federation.codecs import CodecConfig, encode, round_seed
from atoll.federation.downlink import Downlink
from atoll.federation.fragments import fragment_of_round
from atoll.federation.protocol import RoundPlan, RunSpec
from atoll.paths.assignment import PathAssignment
from atoll.paths.grid import path_name


class Planner:
    """Makes the round's :class:`RoundPlan` for each site."""

    def __init__(self, spec: RunSpec, down: CodecConfig, groups: list[list[str]]) -> None:
        self.spec = spec
        self.down = down
        self.groups = groups  # the fragments of the model (one group unless streaming)
        self.downlink = Downlink(down)  # with comm.down.delta: the sites' copy

    def plans(self, r: int, sites: list[str], weights: dict[str, torch.Tensor], *,
              step: int, steps: int, time_budget_s: float, delivered: set[str],
              spec_holders: set[str], keep_since: int, paths: PathAssignment | None = None
              ) -> dict[str, RoundPlan]:
        """Round ``r``'s plans. ``delivered``: sites whose update for round ``r - 1``
        counted; ``spec_holders``: sites known to hold this run's spec; ``paths``: who
        trains which path of a grid."""
        if paths is not None:
            return self._path_plans(r, sites, weights, paths, step=step, steps=steps,
                                    time_budget_s=time_budget_s, spec_holders=spec_holders,
                                    keep_since=keep_since)
        payloads: dict[bool, dict[str, torch.Tensor]] = {}

        def weights_for(full: bool) -> dict[str, torch.Tensor]:
            if full not in payloads:
                names = weights if full else self.groups[fragment_of_round(r - 1,
                                                                           self.spec.fragments)]
                payloads[full] = encode({n: weights[n] for n in names}, self.down)
            return payloads[full]

        changes = (self.downlink.advance(weights, r, round_seed(self.spec.run_id, r - 1))
                   if self.down.delta else None)
        plans = {}
        for s in sites:
            full = not self.spec.streaming or r == 1 or s not in delivered
            if not self.down.delta:
                down = {"weights": weights_for(full), "codec": self.down.spec}
            elif changes is not None and s in delivered:
                down = {"weights": changes, "codec": self.down.spec, "base": r - 1}
            else:  # no copy yet, or this site may not hold it: the copy, whole
                down = {"weights": self.downlink.whole(), "codec": "fp32"}
            plans[s] = RoundPlan(
                run_id=self.spec.run_id, round=r, site=s, spec_id=self.spec.spec_id,
                step=step, steps=steps, time_budget_s=time_budget_s, full=full,
                keep_since=keep_since, spec=None if s in spec_holders else self.spec, **down)
        return plans

    def _path_plans(self, r: int, sites: list[str], weights: dict[str, torch.Tensor],
                    paths: PathAssignment, *, spec_holders: set[str], **schedule: object
                    ) -> dict[str, RoundPlan]:
        """Each site's path, whole (a site may train another path next round), encoded
        once per path."""
        payloads: dict[str, dict[str, torch.Tensor]] = {}
        plans = {}
        for s in sites:
            path = paths.path_of(s, r)
            name = path_name(path)
            if name not in payloads:
                payloads[name] = encode({n: weights[k] for n, k in paths.names(path).items()},
                                        self.down)
            plans[s] = RoundPlan(
                run_id=self.spec.run_id, round=r, site=s, spec_id=self.spec.spec_id,
                weights=payloads[name], codec=self.down.spec, path=name,
                spec=None if s in spec_holders else self.spec, **schedule)
        return plans
