"""The one thing a site tells the coordinator about its data before a grid trains: features
of a sample of its rows, for fitting the router (DiPaCo's coarse routing).

The coordinator sends every site a :class:`FeatureRequest` (the router's settings); the site
answers with a :class:`FeatureReport`: the features (:func:`atoll.paths.router.
prefix_features`: a unit-length hashed bigram histogram of each row's first tokens) of up to
``sample_rows`` rows drawn from those its contributors' consent allows, and how many such
rows it holds. No text and no token ids leave the site; the features do say something about
its text's statistics (the threat model names them). From the report the coordinator also
estimates the site's tokens on each path (:mod:`atoll.paths.assignment`).

A report is hostile input like any reply: every field is checked, and the features must be
the shape asked for, finite, non-negative and of length at most one, so one site can move
the fitted centroids by no more than its ``sample_rows`` rows can.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atoll.consent.pool import allowed_sources
from atoll.data.reader import TokenDataset, allowed_mask
from atoll.federation.answers import answers
from atoll.federation.engine import Engine
from atoll.federation.protocol import (
    WIRE_VERSION,
    carries,
    from_parts,
    header,
    tensor_bytes,
)
from atoll.federation.site_state import data_seed
from atoll.paths.router_config import RouterConfig
from atoll.paths.site_rows import sample_features
from atoll.util.errors import WireError


@carries(None)
@dataclass
class FeatureRequest:
    """Coordinator -> site, before a grid's first round: features of your rows, please."""

    run_id: str
    site: str
    router: dict[str, Any]
    """The :class:`RouterConfig` (as a dict) the features are made with."""
    seq_len: int
    purpose: str
    """Consent applies: only rows allowed for it are sampled or counted."""
    seed: int
    """The run's seed: with the site's name, it fixes which rows are drawn."""
    round: int = 0


@carries("features")
@dataclass
class FeatureReport:
    """Site -> coordinator: features of a sample of its allowed rows, and how many it holds."""

    run_id: str
    site: str
    rows: int
    """Training rows (of ``seq_len`` tokens) consent allows for the purpose."""
    features: dict[str, torch.Tensor] = field(repr=False)
    """``{"features": float32 [n, dim]}``, n at most ``sample_rows``."""
    round: int = 0
    bytes_up: int = 0
    """Filled in by the engine: serialized size of this report."""
    bytes_down: int = 0
    """Filled in by the engine: serialized size of the request."""


def feature_requests(run_id: str, sites: list[str], cfg: RouterConfig, seq_len: int,
                     purpose: str, seed: int) -> dict[str, FeatureRequest]:
    """One request per site."""
    return {s: FeatureRequest(run_id=run_id, site=s, router=asdict(cfg), seq_len=seq_len,
                              purpose=purpose, seed=seed) for s in sites}


def answer_features(name: str, data_dir: Path, request: FeatureRequest
                    ) -> tuple[dict[str, Any], bytes]:
    """What site ``name`` answers: the report's header and its features' bytes."""
    if request.site != name:
        raise WireError(f"feature request for site {request.site!r} reached site {name!r}")
    dataset = TokenDataset(data_dir, "train", request.seq_len)
    allowed = allowed_sources(data_dir, request.purpose)
    allow = None if allowed is None else allowed.__contains__
    rows = len(dataset) if allow is None else int(
        allowed_mask(dataset.source_of(np.arange(len(dataset))), allow).sum())
    if rows == 0:
        raise ValueError(f"site {name}: no row in {data_dir} is allowed for "
                         f"{request.purpose!r}")
    cfg = RouterConfig(**request.router)
    x = sample_features(dataset, cfg, data_seed(request.seed, name), allow)
    report = FeatureReport(run_id=request.run_id, site=name, rows=rows,
                           features={"features": torch.from_numpy(x)})
    return header(report), tensor_bytes(report.features)


def checked_features(head: dict[str, Any], blob: bytes, sender: str) -> FeatureReport:
    """A report from the node of site ``sender``, its fields of their types;
    :class:`WireError` naming what is wrong."""
    if head.get("v") != WIRE_VERSION or head.get("type") != FeatureReport.__name__:
        raise WireError(f"expected a FeatureReport (wire v{WIRE_VERSION})")
    expected = {"run_id", "site", "rows", "round", "bytes_up", "bytes_down"}
    if set(head) - expected - {"v", "type"}:
        raise WireError(f"unexpected report field {sorted(set(head) - expected)[0]!r:.40}")
    for name in ("run_id", "site"):
        if type(head.get(name)) is not str or len(head[name]) > 4096:
            raise WireError(f"report field {name!r} must be a short string")
    if type(head.get("rows")) is not int or head["rows"] < 1:
        raise WireError("report field 'rows' must be an integer >= 1")
    if head["site"] != sender:
        raise WireError(f"claims to be site {head['site']!r:.80}, but was sent by the node "
                        f"of site {sender!r}")
    return from_parts({**head, "bytes_up": 0, "bytes_down": 0}, blob, FeatureReport)


def check_against_request(report: FeatureReport, request: FeatureRequest) -> str | None:
    """Why ``report`` does not answer ``request`` (or None)."""
    if (report.run_id, report.site) != (request.run_id, request.site):
        return "answers another run or site"
    x = report.features.get("features")
    if set(report.features) != {"features"} or x is None:
        return "holds tensors other than 'features'"
    cfg = RouterConfig(**request.router)
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != cfg.dim:
        return f"features are {x.dtype} {tuple(x.shape)}, expected float32 [n, {cfg.dim}]"
    if not 1 <= len(x) <= min(cfg.sample_rows, report.rows):
        return (f"{len(x)} feature rows: between 1 and sample_rows = {cfg.sample_rows} "
                f"(and no more than the {report.rows} rows it holds)")
    if not torch.isfinite(x).all() or (x < 0).any() or \
            (x.norm(dim=1) > 1 + 1e-3).any():
        return "features must be finite, non-negative and of length at most 1"
    return None


@dataclass
class FeatureOutcome:
    """What the sites sent for fitting the router."""

    features: dict[str, np.ndarray] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0


def collect_features(engine: Engine, requests: dict[str, FeatureRequest],
                     deadline_s: float) -> FeatureOutcome:
    """Send ``requests``; keep each report that answers its request. A site that fails or
    lies is refused with the reason and never stops the others."""
    out = FeatureOutcome()
    for reply in answers(engine.sample_features(requests, deadline_s), requests,
                         check_against_request, out):
        out.features[reply.site] = reply.features["features"].numpy()
        out.rows[reply.site] = reply.rows
    return out
