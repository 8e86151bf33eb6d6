"""Federated evaluation: every site measures the global weights on its own held-out rows.

On a real federation the coordinator holds no data, so nobody but the sites can say how good
the model is. Every ``eval.every`` rounds (and after round 0 and the last) the coordinator
sends each available site an :class:`~atoll.federation.protocol.EvalRequest` with the
global weights, whole and in fp32, so that every site measures the same model whatever the
downlink codec; the site evaluates them on the first rows of its validation split that its
contributors' consent allows for the run's purpose (read afresh each time) and answers with
an :class:`~atoll.federation.protocol.EvalReport`: one loss and the tokens it was measured
on. The site's domain is its name.

What a report reveals: how well the model fits the site's held-out data, and how many
held-out tokens it has (at most ``max_batches x batch_size x (seq_len - 1)``). It is the
site's word: a site can lie about its own loss (nothing else), and the loss feeds only the
metrics and the report, never the weights or the credit.

A report is hostile input like any reply: its header is parsed with the wire limits and each
field checked (:func:`checked_report`), and it must answer the request that was sent
(:func:`check_against_request`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from atoll.federation.answers import answers
from atoll.federation.engine import Engine
from atoll.federation.protocol import (
    WIRE_VERSION,
    EvalReport,
    EvalRequest,
    header,
)
from atoll.train.evaluate import held_out_batches, loss_and_tokens
from atoll.util.errors import WireError

MAX_LOSS = 1e4
"""No cross-entropy a real model reports is near this (a uniform guess over 2^32 ids is 22)."""


def eval_requests(run_id: str, round_: int, sites: list[str],
                  weights: dict[str, torch.Tensor], model_config: dict[str, Any],
                  seq_len: int, purpose: str, batch_size: int, max_batches: int,
                  path: str = "", paths: dict[str, Any] | None = None
                  ) -> dict[str, EvalRequest]:
    """One request per site, all holding the same weights (an engine serializes them once;
    a grid: one path's, measured on the rows that route to it)."""
    return {s: EvalRequest(run_id=run_id, round=round_, site=s, weights=weights,
                           model_config=model_config, seq_len=seq_len, purpose=purpose,
                           batch_size=batch_size, max_batches=max_batches, path=path,
                           paths=paths or {}) for s in sites}


# -- at the coordinator ---------------------------------------------------------------------

def checked_report(head: dict[str, Any], sender: str) -> EvalReport:
    """A report from the node of site ``sender``, each field of its type (integers that
    are not booleans, finite numbers, short strings); :class:`WireError` naming the field."""
    if head.get("v") != WIRE_VERSION or head.get("type") != EvalReport.__name__:
        raise WireError(f"expected an EvalReport (wire v{WIRE_VERSION})")
    fields = {k: v for k, v in head.items() if k not in ("v", "type")}
    expected = {"run_id", "round", "site", "loss", "tokens", "seconds"}
    if set(fields) - expected - {"bytes_up", "bytes_down"} or expected - set(fields):
        raise WireError(f"report fields are {sorted(fields)}, expected {sorted(expected)}")
    for name in ("round", "tokens"):
        if type(fields[name]) is not int or fields[name] < 0:
            raise WireError(f"report field {name!r} must be an integer >= 0")
    for name in ("loss", "seconds"):
        v = fields[name]
        if type(v) not in (int, float) or not math.isfinite(v) or v < 0:
            raise WireError(f"report field {name!r} must be a finite number >= 0")
    for name in ("run_id", "site"):
        if type(fields[name]) is not str or len(fields[name]) > 4096:
            raise WireError(f"report field {name!r} must be a short string")
    if fields["site"] != sender:
        raise WireError(f"claims to be site {fields['site']!r:.80}, but was sent by the "
                        f"node of site {sender!r}")
    return EvalReport(**{k: fields[k] for k in expected})


def check_against_request(report: EvalReport, request: EvalRequest) -> str | None:
    """Why ``report`` does not answer ``request`` (or None): another run, round or site, no
    tokens, a count that is not whole rows or exceeds what was asked for, an absurd loss."""
    if (report.run_id, report.round, report.site) != (request.run_id, request.round,
                                                      request.site):
        return (f"answers run {report.run_id!r:.80} round {report.round} site "
                f"{report.site!r:.80}, the request was for round {request.round}")
    per_row = request.seq_len - 1
    most = request.max_batches * request.batch_size * per_row
    if report.tokens == 0 and request.path:  # none of its held-out rows route to the path
        return None
    if report.tokens <= 0 or report.tokens % per_row or (most and report.tokens > most):
        bound = f"at most {most}" if most else "some"
        return (f"reports {report.tokens} tokens, not whole rows of {per_row} ({bound} were "
                f"asked for)")
    if report.loss > MAX_LOSS:
        return f"reports a loss of {report.loss:.4g}, above {MAX_LOSS:g}"
    return None


def merge_reports(reports: list[EvalReport]) -> tuple[dict[str, float], dict[str, int]]:
    """Loss and tokens per domain (a site's domain is its name; several reports of one
    domain are combined as a token-weighted mean)."""
    total: dict[str, float] = {}
    tokens: dict[str, int] = {}
    for r in (r for r in reports if r.tokens):
        total[r.site] = total.get(r.site, 0.0) + r.loss * r.tokens
        tokens[r.site] = tokens.get(r.site, 0) + r.tokens
    return {d: total[d] / tokens[d] for d in sorted(total)}, {d: tokens[d] for d in sorted(total)}


@dataclass
class EvalOutcome:
    """What the sites said about one round's weights."""

    losses: dict[str, float] = field(default_factory=dict)
    """Domain -> loss (nats per token)."""
    tokens: dict[str, int] = field(default_factory=dict)
    """Domain -> held-out tokens it was measured on."""
    refused: dict[str, str] = field(default_factory=dict)
    """Site -> why its report is not counted (failed, refused, no reply)."""
    bytes_up: int = 0
    bytes_down: int = 0


def ask_sites(engine: Engine, requests: dict[str, EvalRequest], deadline_s: float
              ) -> EvalOutcome:
    """Send ``requests``, check every report against its request, merge the good ones; one
    site that fails or lies never stops the others."""
    out = EvalOutcome()
    reports = list(answers(engine.evaluate(requests, deadline_s), requests,
                           check_against_request, out))
    out.losses, out.tokens = merge_reports(reports)
    return out


# -- at the site ----------------------------------------------------------------------------

def routed_to(batches: list[torch.Tensor], path: str, paths: dict[str, Any]
              ) -> list[torch.Tensor]:
    """The rows of ``batches`` that the grid's router sends to ``path``, in batches of the
    same size (in their order)."""
    from atoll.paths.assignment import from_spec
    from atoll.paths.grid import parse_path
    from atoll.paths.site_rows import batches_by_path

    cfg, router = from_spec(paths)
    return batches_by_path(batches, router, cfg).get(parse_path(path, cfg), [])


class SiteEvaluator:
    """Answers evaluation requests for one site with a model of its own, built once per
    model config, so the site's training state (its weights, optimizer, the steps it may
    be training ahead) is never touched: evaluation costs one more copy of the weights."""

    def __init__(self, name: str, data_dir: str | Path, device: torch.device) -> None:
        self.name = name
        self.data_dir = Path(data_dir)
        self.device = device
        self._model: torch.nn.Module | None = None
        self._key = ""

    def answer(self, request: EvalRequest) -> tuple[dict[str, Any], bytes]:
        """The report's header for ``request`` (a report carries no tensors)."""
        if request.site != self.name:
            raise WireError(f"evaluation request for site {request.site!r} reached site "
                            f"{self.name!r}")
        start = time.perf_counter()
        batches = held_out_batches(self.data_dir, request.seq_len, request.batch_size,
                                   request.max_batches, request.purpose)
        if not batches:
            raise ValueError(f"site {self.name}: no held-out rows in {self.data_dir} that "
                             f"consent allows for {request.purpose!r}")
        if request.path:
            batches = routed_to(batches, request.path, request.paths)
            if not batches:
                report = EvalReport(run_id=request.run_id, round=request.round,
                                    site=self.name, loss=0.0, tokens=0,
                                    seconds=time.perf_counter() - start)
                return header(report), b""
        model = self._model_for(request.model_config)
        with torch.no_grad():
            params = dict(model.named_parameters())
            if set(params) - set(request.weights):
                missing = sorted(set(params) - set(request.weights))[0]
                raise WireError(f"evaluation weights lack {missing!r}")
            for n, w in request.weights.items():
                if n not in params or params[n].shape != w.shape:
                    raise WireError(f"evaluation weights hold {n!r:.80} {tuple(w.shape)}, "
                                    f"which the model has not")
                params[n].copy_(w)
        loss, tokens = loss_and_tokens(model, batches)
        report = EvalReport(run_id=request.run_id, round=request.round, site=self.name,
                            loss=loss, tokens=tokens, seconds=time.perf_counter() - start)
        return header(report), b""

    def _model_for(self, model_config: dict[str, Any]) -> torch.nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        key = json.dumps(model_config, sort_keys=True, default=str)
        if self._model is None or key != self._key:
            cfg = AutoConfig.for_model(**model_config)
            with self.device:
                self._model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
            self._key = key
        return self._model
