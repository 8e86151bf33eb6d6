"""The Flower engine: RoundPlans to SuperNodes and SiteUpdates back, over Flower's Grid.

Runs inside the ServerApp process on the coordinator host. A site is a SuperNode; its name
is the one its public key was registered under (authenticated federations) or, in insecure
development mode, the name it reports when first asked (a ``query.hello`` message).

Each site gets exactly the payload its plan holds; plans that share one (the same weights,
the same change) share one serialized copy (Flower stores identical objects once; an object
store is written once per distinct payload). Replies are pulled as they arrive; Flower's
error replies (node gone, ClientApp crashed) and undecodable payloads become
:class:`SiteFailure`; whoever has not answered by the deadline is reported as failed and the
round closes without them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from atoll.engines.flower_messages import decode_reply, decode_report, plan_message
from atoll.engines.transport import object_folder, pack, plain_name
from atoll.federation.features import FeatureReport, FeatureRequest, checked_features
from atoll.federation.protocol import (
    EvalReport,
    EvalRequest,
    RoundPlan,
    SiteFailure,
    SiteUpdate,
    header,
    tensor_bytes,
    tensors,
)
from atoll.federation.wire_checks import checked_update

HELLO = "query.hello"
TRAIN = "train"
EVALUATE = "evaluate"
FEATURES = "query.features"
FOLDER_OF = {TRAIN: "round", EVALUATE: "eval", FEATURES: "features"}
"""The store folder of each message type's objects (:func:`object_folder`)."""


class FlowerEngine:
    """:class:`~atoll.federation.engine.Engine` over a Flower ``Grid``."""

    def __init__(self, grid: Grid, *, store: str = "", min_sites: int = 1,
                 allowed: set[str] | None = None, poll_s: float = 0.2,
                 log: Callable[[str], None] = print, max_reply_bytes: int = 0,
                 registered_only: bool = False,
                 on_sites: Callable[[dict[str, int]], None] | None = None) -> None:
        self.grid = grid
        self.store = store
        self.max_reply_bytes = max_reply_bytes  # 0 = no cap on a reply's payload
        # authenticated federations: a site's name is the one its key was registered
        # under, never one it states; a node without one is refused
        self.registered_only = registered_only
        self._folders: dict[int, set[str]] = {}  # round -> store folders written for it
        self.min_sites = min_sites
        self.allowed = allowed or None
        self.poll_s = poll_s
        self.log = log
        self.on_sites = on_sites
        self.names: dict[int, str] = {}  # node id -> site name, as learned
        self.nodes: dict[str, int] = {}  # site name -> node id, online now
        self.node_keys: dict[int, str] = {}  # node id -> its key (it vouches for receipts)
        self._last_seen: set[str] = set()
        self._ignored: set[int | tuple[int, ...]] = set()  # nodes (or clashes) logged

    # -- membership ----------------------------------------------------------------------

    def available_sites(self) -> list[str]:
        """Online sites; waits until at least ``min_sites`` are there."""
        waited = False
        while True:
            self._refresh()
            if len(self.nodes) >= self.min_sites:
                return sorted(self.nodes)
            if not waited:
                self.log(f"waiting for sites: {len(self.nodes)}/{self.min_sites} connected")
                waited = True
            time.sleep(2.0)

    def _refresh(self) -> None:
        infos = [n for n in self.grid.get_nodes() if n.status == "online"]
        online = {n.node_id: n.name for n in infos}
        if self.registered_only:  # keys that authenticated: ledger.receipts checks with them
            self.node_keys = {n.node_id: bytes(n.public_key).decode("latin-1") for n in infos}
        unknown = [nid for nid, name in online.items() if not name and nid not in self.names]
        if unknown and not self.registered_only:
            self._hello(unknown)
        claims: dict[str, list[int]] = {}
        for nid, registered in sorted(online.items()):
            name = registered or ("" if self.registered_only else self.names.get(nid, ""))
            reason = self._refusal(name)
            if reason:
                self._ignore(nid, f"ignoring node {nid}: {reason}")
            elif name:
                claims.setdefault(name, []).append(nid)
        nodes = {}
        for name, nids in claims.items():
            if len(nids) == 1:
                nodes[name] = nids[0]
            else:  # which of them holds the site's key? Trust none of them
                self._ignore(tuple(nids), f"nodes {', '.join(map(str, nids))} all claim site "
                                          f"name {name!r}: none of them takes part")
        self._set_nodes(nodes)

    def _refusal(self, name: str) -> str | None:
        """Why a node serving under ``name`` cannot take part (None: it can)."""
        if not name:
            return "no registered name" if self.registered_only else None
        if not plain_name(name):  # it names folders and log lines
            return f"{name[:100]!r} is not a plain site name"
        if self.allowed is not None and name not in self.allowed:
            return f"site {name!r} is not among the config's [[sites]]"
        return None

    def _ignore(self, key: int | tuple[int, ...], line: str) -> None:
        """Say ``line`` once for ``key`` (a node, or nodes in a clash)."""
        if key not in self._ignored:
            self._ignored.add(key)
            self.log(line)

    def _set_nodes(self, nodes: dict[str, int]) -> None:
        """The sites online now; who joined and who left is logged."""
        self.nodes = nodes
        if set(nodes) != self._last_seen:
            joined = sorted(set(nodes) - self._last_seen)
            left = sorted(self._last_seen - set(nodes))
            if joined:
                self.log(f"sites joined: {', '.join(joined)}")
            if left:
                self.log(f"sites left: {', '.join(left)}")
            self._last_seen = set(nodes)
            if self.on_sites is not None:
                self.on_sites(dict(nodes))

    def _hello(self, node_ids: list[int], timeout_s: float = 30.0) -> None:
        """Ask nodes without a registered name for the name they serve under."""
        msgs = [Message(RecordDict(), dst_node_id=nid, message_type=HELLO, group_id="hello")
                for nid in node_ids]
        for nid, reply in self._push_pull(msgs, timeout_s):
            if reply is not None and not reply.has_error():
                self.names[nid] = str(reply.content.config_records["site"]["name"])

    # -- a round -------------------------------------------------------------------------

    def exchange(self, plans: dict[str, RoundPlan], deadline_s: float = 0.0
                 ) -> Iterator[SiteUpdate | SiteFailure]:
        """Push each connected site its plan; yield replies as they come, failures for the
        rest (not connected, Flower errors, undecodable, past the deadline)."""
        yield from self._deliver(plans, TRAIN, deadline_s)

    def evaluate(self, requests: dict[str, EvalRequest], deadline_s: float = 0.0
                 ) -> Iterator[EvalReport | SiteFailure]:
        """Push each connected site its evaluation request (Flower's ``evaluate`` message
        type); yield reports as they come, failures as :meth:`exchange` does."""
        yield from self._deliver(requests, EVALUATE, deadline_s)

    def sample_features(self, requests: dict[str, FeatureRequest], deadline_s: float = 0.0
                        ) -> Iterator[FeatureReport | SiteFailure]:
        """Push each connected site its feature request (``query.features``); yield the
        reports (their features read from the store like an update) and failures."""
        yield from self._deliver(requests, FEATURES, deadline_s)

    def _deliver(self, plans: dict[str, Any], kind: str, deadline_s: float
                 ) -> Iterator[SiteUpdate | EvalReport | FeatureReport | SiteFailure]:
        if not plans:
            return
        payloads = self._payloads(plans, kind)
        msgs, sites = [], []
        for site, plan in plans.items():
            if site not in self.nodes:
                yield SiteFailure(site, plan.round, "not connected")
                continue
            msgs.append(Message(plan_message(payloads[site][0], plan, self.store),
                                dst_node_id=self.nodes[site], message_type=kind,
                                group_id=f"{kind}-{plan.round}"))
            sites.append(site)
        by_node = {self.nodes[s]: s for s in sites}
        down = {s: payloads[s][1] + len(json.dumps(header(plans[s])).encode()) for s in sites}
        for nid, reply in self._push_pull(msgs, deadline_s):
            site = by_node[nid]
            r = plans[site].round
            folder = self._folder(plans[site].run_id, site, kind, r)
            if reply is None:
                yield SiteFailure(site, r, f"no reply within the {deadline_s:.0f}s deadline")
            elif reply.has_error():
                yield SiteFailure(site, r, f"Flower error {reply.error.code}: "
                                           f"{reply.error.reason}")
            elif kind != EVALUATE:
                yield decode_reply(reply, site, r, down[site], folder,
                                         self.max_reply_bytes, self.node_keys.get(nid, ""),
                                         checked_features if kind == FEATURES else
                                         checked_update)
            else:  # a report carries no payload: nothing to read from the store
                yield decode_report(reply, site, r, down[site])

    def _payloads(self, plans: dict[str, Any], kind: str) -> dict[str, tuple[RecordDict, int]]:
        """Each site's weights payload and its size. Sites whose plans share one payload
        (the same weights, the same change) share one serialized copy; every other site gets
        exactly its own."""
        packed: dict[int, tuple[RecordDict, int]] = {}
        out = {}
        for site, plan in plans.items():
            weights = tensors(plan)
            if id(weights) not in packed:
                blob = tensor_bytes(weights)
                n = len(packed)
                name = "global" if n == 0 else f"global-{n}"
                folder = self._folder(plan.run_id, "coordinator", kind, plan.round)
                packed[id(weights)] = (pack(blob, folder, f"{name}.safetensors"), len(blob))
            out[site] = packed[id(weights)]
        return out

    def _folder(self, run_id: str, writer: str, kind: str, round_: int) -> str:
        """The store folder ``writer``'s objects of ``kind`` for ``round_`` go in ("" with
        no store), remembered so that :meth:`release` can delete it."""
        if not self.store:
            return ""
        folder = object_folder(self.store, run_id, writer, FOLDER_OF[kind], round_)
        self._folders.setdefault(round_, set()).add(folder)
        return folder

    def release(self, before_round: int) -> None:
        """Delete the store's objects of rounds before ``before_round`` (checkpointed, and
        too old for a late update): a store does not grow with the rounds."""
        import fsspec

        for r in sorted(r for r in self._folders if r < before_round):
            for folder in self._folders.pop(r):
                fs, path = fsspec.core.url_to_fs(folder)
                try:
                    fs.rm(path, recursive=True)
                except FileNotFoundError:  # nothing was written there (a site that failed)
                    pass

    def _push_pull(self, msgs: list[Message], timeout_s: float
                   ) -> Iterator[tuple[int, Message | None]]:
        """Push ``msgs``; yield (node id, reply) as replies arrive, (node id, None) for those
        still missing after ``timeout_s`` (0 = wait until every one has answered)."""
        ids = list(self.grid.push_messages(msgs))
        pending = {mid: m.metadata.dst_node_id for mid, m in zip(ids, msgs, strict=True) if mid}
        for mid, m in zip(ids, msgs, strict=True):
            if not mid:
                yield m.metadata.dst_node_id, None
        deadline = time.monotonic() + timeout_s if timeout_s else float("inf")
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                # Error replies made by the SuperLink come from node 1: map by message id.
                nid = pending.pop(reply.metadata.reply_to_message_id, None)
                if nid is not None:
                    yield nid, reply
            if pending:
                time.sleep(self.poll_s)
        for nid in pending.values():
            yield nid, None
