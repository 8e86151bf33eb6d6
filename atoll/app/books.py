"""The run's books: every update's signed report checked and valued, every round written down.

:class:`Books` sits beside the coordinator. Its :meth:`Books.audit` is the coordinator's last
check of an update (a report that is unsigned, signed by a key this site did not use before,
or that disagrees with the update refuses it); :meth:`Books.close_round` appends the round to
the ledger: one ``update`` entry per counted update (the site's signed report, its
aggregation weight, alignment and value, :mod:`atoll.ledger.credit`) and one ``round`` entry
(who counted, who was refused and why, the SHA-256 of the new global weights).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from atoll.federation.coordinator import RoundOutcome
from atoll.federation.protocol import SiteUpdate
from atoll.ledger.chain import Ledger, verify_ledger
from atoll.ledger.credit import ValidationGradient, alignment
from atoll.ledger.receipts import check_receipt
from atoll.ledger.signing import Signer
from atoll.util.hashing import tensors_digest

LEDGER = "ledger.sqlite"
KEY = "ledger.key"
KEYS_ENV = "ATOLL_LEDGER_KEYS"
"""Where the coordinator keeps its ledger keys (default ``~/.config/atoll/ledger-keys``)."""


class LedgerError(ValueError):
    """A ledger that cannot be appended to: it does not verify."""


def ledger_key_path(out: Path, run_id: str) -> Path:
    """The private key that signs run ``run_id``'s ledger: outside the run folder it signs
    (whoever can rewrite the folder must not also hold the key). A key an older atoll left in
    the run folder is moved there."""
    keys = Path(os.environ.get(KEYS_ENV) or Path.home() / ".config" / "atoll" / "ledger-keys")
    keys.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = keys / f"{run_id}.key"
    if (out / KEY).exists() and not path.exists():
        shutil.move(out / KEY, path)
    return path
RULE = ("value = w * <grad L_val(theta), theta - theta_site>, w = the update's share of the "
        "round's aggregation weight; share = mean over rounds of max(value, 0) / the round's "
        "sum of positive values, split within a site by tokens read")


class Books:
    """Keeps the contribution ledger of the run in ``out``."""

    def __init__(self, out: Path, run_id: str, purpose: str,
                 state: Callable[[], tuple[int, dict[str, torch.Tensor]]],
                 probe: ValidationGradient | None, staleness_exponent: float = 1.0) -> None:
        self.run_id = run_id
        self.purpose = purpose
        self._state = state  # (the open round, the global weights)
        self.probe = probe
        self.staleness_exponent = staleness_exponent
        self.signer = Signer.load_or_create(ledger_key_path(out, run_id),
                                            public_copy=out / f"{KEY}.pub")
        path = out / LEDGER
        self.ledger = Ledger(path, self.signer)
        self.entries = self._verified(path) if not self.ledger.empty else []
        self.pinned = {e.body["site"]: e.body["signer"] for e in self.entries
                       if e.kind == "update"}
        self._pending: dict[tuple[str, int], dict[str, Any]] = {}
        self._grad: tuple[int, dict[str, torch.Tensor]] | None = None

    def _verified(self, path: Path) -> list:
        """The entries of a ledger being reopened, once its chain and head check out against
        this coordinator's key: nothing is appended to a history that was rewritten."""
        verdict = verify_ledger(path, self.signer.public)
        if not verdict.ok:
            raise LedgerError(f"{path}: {verdict}; refusing to append to it (see atoll "
                              f"ledger verify)")
        return verdict.read

    def start(self, name: str, config_sha256: str) -> None:
        """The genesis entry of a new run: who signs, what for, by which rule."""
        if self.ledger.empty:
            self._append("genesis", 0, {
                "run_id": self.run_id, "name": name, "purpose": self.purpose,
                "coordinator_key": self.signer.public, "config_sha256": config_sha256,
                "credit_rule": RULE, "started": time.time()})

    def resumed_at(self, round_: int, privacy_change: dict[str, Any] | None = None) -> None:
        """A restart from the checkpoint of ``round_``: rounds written after it never took
        effect and are run again; say so rather than rewrite anything. Privacy settings
        other than the checkpoint's are written too (``privacy``: from, to)."""
        if privacy_change:
            self._append("privacy", round_, dict(privacy_change))
        done = {e.round for e in self.entries if e.kind in ("update", "round")}
        for e in self.entries:
            if e.kind == "void":
                done -= set(e.body["rounds"])
        lost = sorted(r for r in done if r > round_)
        if lost:
            self._append("void", round_, {"rounds": lost, "reason": f"the coordinator "
                                          f"restarted from its checkpoint of round {round_}"})

    def audit(self, update: SiteUpdate, delta: dict[str, torch.Tensor]) -> str | None:
        """Check ``update``'s signed report and value it; a reason to refuse, or None."""
        reason = check_receipt(update, self.run_id, self.purpose, self.pinned.get(update.site))
        if reason is not None:
            return reason
        value = alignment(self._gradient(), delta) if self.probe else None
        self._pending[(update.site, update.round)] = {
            "site": update.site, "trained_in": update.round, "tokens": update.tokens,
            "alignment": value if value is not None and math.isfinite(value) else None,
            "receipt": update.receipt, "receipt_signature": update.receipt_signature,
            "signer": update.signer}
        if update.node_key:  # which registered key vouched for the receipt key, checkably
            self._pending[(update.site, update.round)] |= {
                "node_key": update.node_key, "signer_binding": update.signer_binding}
        modules = sorted({k.partition("/")[0] for k in delta if "/" in k})
        if modules:  # a grid of paths: the modules this update trained
            self._pending[(update.site, update.round)]["modules"] = modules
        return None

    def _gradient(self) -> dict[str, torch.Tensor]:
        """The validation gradient at the weights of the open round (once per round)."""
        r, weights = self._state()
        if self._grad is None or self._grad[0] != r:
            self._grad = (r, self.probe(weights))
        return self._grad[1]

    def close_round(self, out: RoundOutcome, weights: dict[str, torch.Tensor]) -> None:
        """Write round ``out.round`` into the ledger (after the outer step)."""
        counted = [(s, out.round) for s in out.accepted]
        counted += [k for k in self._pending if k[0] in out.late and k[1] < out.round]
        bodies = [self._pending[k] for k in counted if k in self._pending]
        for b in bodies:
            lag = out.round - b["trained_in"]
            b["late"] = lag > 0
            b["weight"] = b["tokens"] / (1 + lag) ** self.staleness_exponent
        total = sum(b["weight"] for b in bodies) or 1.0
        for b in sorted(bodies, key=lambda b: (b["site"], b["trained_in"])):
            b["weight"] /= total
            b["value"] = None if b["alignment"] is None else b["weight"] * b["alignment"]
            self._append("update", out.round, b)
            self.pinned.setdefault(b["site"], b["signer"])
        self._append("round", out.round, {
            "accepted": out.accepted, "late": out.late, "rejected": out.rejected,
            "applied": out.applied, "tokens": out.tokens, "model_sha256": tensors_digest(weights)})
        self._pending.clear()

    def _append(self, kind: str, round_: int, body: dict[str, Any]) -> None:
        self.entries.append(self.ledger.append(kind, round_, body))

    def close(self) -> None:
        """Close the ledger file (every entry is already written)."""
        self.ledger.close()
