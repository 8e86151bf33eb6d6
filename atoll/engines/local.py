"""The local engine: every site in this process, deterministic for a seed.

By default sites run one after another (bit-for-bit reproducible). With ``parallel=True``
they run at the same time in threads, as separate machines would: the round's deadline is
then real, and a site still training when it passes is reported as failed for that round;
its update, when it comes, is handed over during a later exchange (the coordinator decides
whether a late update still counts).

Messages always go through their wire form (a JSON header and a safetensors blob, as on
Flower), so the byte counts are the real serialized sizes and the local engine exercises the
same encoding as a real federation; a site that misbehaves on purpose is a
:class:`~atoll.federation.faults.FaultySite`, on either engine. A site that raises is
reported as a failure; the others go on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from atoll.federation.evaluation import checked_report
from atoll.federation.features import FeatureReport, FeatureRequest, checked_features
from atoll.federation.protocol import (
    EvalReport,
    EvalRequest,
    RoundPlan,
    SiteFailure,
    SiteUpdate,
    WireError,
    header,
    tensor_bytes,
    tensors,
)
from atoll.federation.site import Site
from atoll.federation.wire_checks import checked_update, parse_header

StepCallback = Callable[[str, int, int, float], None]  # site, round, step, loss


class LocalEngine:
    """Runs :class:`Site` objects in-process."""

    def __init__(self, sites: list[Site], on_step: StepCallback | None = None,
                 parallel: bool = False) -> None:
        self.sites = {s.name: s for s in sites}
        self.on_step = on_step
        self.parallel = parallel
        self._pool = ThreadPoolExecutor(max_workers=len(sites)) if parallel else None
        self._late: dict[Future, str] = {}  # futures that missed their round's deadline

    def available_sites(self) -> list[str]:
        """Every site that is not still busy with an earlier round."""
        busy = set(self._late.values())  # a site still on an old round is not free
        return [s for s in self.sites if s not in busy]

    def _run_site(self, name: str, plan: RoundPlan | EvalRequest
                  ) -> SiteUpdate | EvalReport | SiteFailure:
        """What a site's machine does with a plan (or an evaluation request): the wire form
        in, the wire form out, checked as the coordinator checks every reply."""
        head, blob = json.dumps(header(plan)), tensor_bytes(tensors(plan))
        callback = None
        if self.on_step is not None and isinstance(plan, RoundPlan):
            def callback(step: int, loss: float) -> None:
                self.on_step(name, plan.round, step, loss)
        try:
            up_head, up_blob = self.sites[name].answer(json.loads(head), blob, callback)
            up_head = json.dumps(up_head)
            if isinstance(plan, EvalRequest):
                reply = checked_report(parse_header(up_head), sender=name)
            elif isinstance(plan, FeatureRequest):
                reply = checked_features(parse_header(up_head), up_blob, sender=name)
            else:
                reply = checked_update(parse_header(up_head), up_blob, sender=name)
        except WireError as e:
            return SiteFailure(site=name, round=plan.round, reason=str(e))
        except Exception as e:  # noqa: BLE001 - one misbehaving site never stops the others
            return SiteFailure(site=name, round=plan.round, reason=f"{type(e).__name__}: {e}")
        reply.bytes_down = len(blob) + len(head.encode())
        reply.bytes_up = len(up_blob) + len(up_head.encode())
        return reply

    def evaluate(self, requests: dict[str, EvalRequest], deadline_s: float = 0.0
                 ) -> Iterator[EvalReport | SiteFailure]:
        """Each requested site evaluates, one after another (a few forward passes each;
        sites still training a late round are never asked: see :meth:`available_sites`)."""
        for name, request in requests.items():
            yield self._run_site(name, request)

    def sample_features(self, requests: dict[str, FeatureRequest], deadline_s: float = 0.0
                        ) -> Iterator[FeatureReport | SiteFailure]:
        """Each requested site sends its feature sample, one after another."""
        for name, request in requests.items():
            yield self._run_site(name, request)

    def exchange(self, plans: dict[str, RoundPlan], deadline_s: float = 0.0
                 ) -> Iterator[SiteUpdate | SiteFailure]:
        """Run each planned site (in turn, or in threads) and yield its reply."""
        if not self.parallel:
            for name, plan in plans.items():
                yield self._run_site(name, plan)
            return
        start = time.monotonic()
        futures = {self._pool.submit(self._run_site, n, p): n for n, p in plans.items()}
        # updates that missed an earlier deadline are handed over whenever they arrive
        pending = set(futures) | set(self._late)
        while set(futures) & pending:
            left = deadline_s - (time.monotonic() - start) if deadline_s else None
            if left is not None and left <= 0:
                break
            done, pending = wait(pending, timeout=left, return_when=FIRST_COMPLETED)
            for fut in done:
                self._late.pop(fut, None)
                yield fut.result()
        for fut in set(futures) & pending:
            self._late[fut] = futures[fut]
            round_ = plans[futures[fut]].round
            yield SiteFailure(futures[fut], round_, f"no reply within the {deadline_s:g}s "
                                                    "deadline")

    def release(self, before_round: int) -> None:
        """Nothing to drop: messages stay in this process."""

    def close(self) -> None:
        """Wait for sites still training in threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
