"""What each update taught the model, and each contributor's share of it.

The value of site i's update in a round is its first-order share of the drop in validation
loss that the round's outer step brings::

    alignment_i = < grad L_val(theta), Delta_i >      Delta_i = theta - theta_i
    value_i     = w_i * alignment_i                   w_i = the update's aggregation weight

``L(theta - Delta_i) ~= L(theta) - alignment_i``: alignment is how much the validation loss
would fall if this update alone were applied, and the values of a round add up to the fall
the weighted mean update predicts (the Shapley values of this linear utility). It costs one
forward and backward pass over a few validation batches per round, at the coordinator, on
data that never leaves it. An update that moves the model away from the validation data
(garbage, poisoned) gets a value near zero or below.

A contributor's share of the model counts every round the same::

    round share of site i = max(value_i, 0) / sum_j max(value_j, 0)
    share of contributor c = sum over rounds of (round share of each site x the fraction of
                             that site's tokens in the round that were c's) / rounds

Rounds count the same because the raw loss drop is front-loaded: in the first rounds any
text, even shuffled bytes, teaches letter frequencies and earns most of all the value there
will ever be, and those rounds would otherwise decide everyone's share. A negative value
earns nothing and takes nothing from the others.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from atoll.ledger.chain import Entry
from atoll.util.weights import load_weights


@dataclass
class CreditConfig:
    """How updates are valued for the contribution ledger."""

    batches: int = 1
    """Validation batches per evaluation set for the gradient (0 = value by tokens only)."""


class ValidationGradient:
    """``grad L_val`` at given weights, over validation batches read afresh at each call
    (``batches()``: consent may have changed which rows can be read)."""

    def __init__(self, model: torch.nn.Module,
                 batches: Callable[[], list[torch.Tensor]]) -> None:
        self.model = model
        self.read_batches = batches

    def __call__(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batches = self.read_batches()
        load_weights(self.model, weights)
        params = dict(self.model.named_parameters())
        was_training = self.model.training
        self.model.eval()  # no dropout: the same weights give the same gradient
        self.model.zero_grad(set_to_none=True)
        count = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
        for b in batches:  # token-weighted mean loss, as validation_loss computes it
            n = b.shape[0] * (b.shape[1] - 1)
            (self.model(input_ids=b, labels=b).loss * (n / count)).backward()
        self.model.train(was_training)
        grads = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
        self.model.zero_grad(set_to_none=True)
        return grads


def alignment(grad: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> float:
    """``<grad, delta>`` over the tensors ``delta`` holds (all, or one streaming fragment)."""
    return float(sum(torch.dot(grad[n].reshape(-1).double(), d.reshape(-1).double())
                     for n, d in delta.items() if n in grad))


@dataclass
class Share:
    """One contributor's credit in a run: sites, tokens trained, value and share of the model."""

    contributor: str
    sites: list[str]
    tokens: int
    value: float
    share: float


def shares(entries: Iterable[Entry]) -> list[Share]:
    """Each contributor's share of the model from a ledger's ``update`` entries.

    Rounds voided by a restart (a ``void`` entry) count only from their re-run. With no
    positive value anywhere (e.g. no validation data), shares follow tokens."""
    kept: list[Entry] = []
    for e in entries:
        if e.kind == "void":
            voided = set(e.body["rounds"])
            kept = [k for k in kept if k.round not in voided]
        elif e.kind == "update":
            kept.append(e)
    tokens: dict[str, int] = defaultdict(int)
    value: dict[str, float] = defaultdict(float)
    credit: dict[str, float] = defaultdict(float)
    sites: dict[str, set[str]] = defaultdict(set)
    positive: dict[int, float] = defaultdict(float)  # round -> sum of positive values
    for e in kept:
        positive[e.round] += max(e.body.get("value") or 0.0, 0.0)
    for e in kept:
        b = e.body
        contribs = b["receipt"]["contributions"].values()
        total = sum(c["tokens"] for c in contribs) or 1
        gain = max(b.get("value") or 0.0, 0.0)
        for c in contribs:
            who, part = c["contributor"], c["tokens"] / total
            tokens[who] += c["tokens"]
            sites[who].add(b["site"])
            value[who] += (b.get("value") or 0.0) * part
            if positive[e.round] > 0:
                credit[who] += gain / positive[e.round] * part
    basis = credit if sum(credit.values()) > 0 else {k: float(v) for k, v in tokens.items()}
    whole = sum(basis.values()) or 1.0
    out = [Share(who, sorted(sites[who]), tokens[who], value[who], basis[who] / whole)
           for who in tokens]
    return sorted(out, key=lambda s: (-s.share, s.contributor))
