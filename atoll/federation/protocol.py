"""What travels between the coordinator and a site, and what an engine must do to move it.

Plain dataclasses: a :class:`RunSpec` goes down once per run (the model, the training and
codec settings), a :class:`RoundPlan` every round (the global weights or their change, the
schedule position, how long to train), and a :class:`SiteUpdate` comes back (the
pseudo-gradient and what it cost). On the wire each is one safetensors blob whose metadata
holds the non-tensor fields as JSON, so a message is self-describing and its size is the real
number of bytes that crosses the network.

Engines implement :class:`~atoll.federation.engine.Engine`; the coordinator and the site
never see how messages move.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from atoll.util.errors import WireError

WIRE_VERSION = 2


@dataclass
class RunSpec:
    """Coordinator -> site, once per run: what to build, how to train and how to answer.

    It travels inside the first plan a site gets (and again whenever the coordinator cannot
    be sure the site holds it); later plans name it by :attr:`spec_id` and the site uses its
    cached copy (:mod:`atoll.federation.site_state`)."""

    run_id: str
    seed: int
    """Seed of the sites' data order for this run."""
    purpose: str
    """What the run trains for; a site reads only data whose consent covers it."""
    model_config: dict[str, Any]
    """Hugging Face config of the model (the site builds it on first contact)."""
    inner: dict[str, Any]
    """The :class:`~atoll.train.inner.InnerConfig` every site trains with, as a dict."""
    seq_len: int
    total_steps: int
    """Length of the learning-rate schedule, in inner steps."""
    codec_up: str = "fp32"
    """How the site must encode its pseudo-gradient (:func:`atoll.federation.codecs.parse_spec`)."""
    error_feedback: bool = True
    """Whether the site carries what ``codec_up`` dropped into its next update."""
    feedback_decay: float = 1.0
    """What the carried residual is scaled by before it joins the next update."""
    fragments: int = 1
    """Streaming sync: the model is cut into this many fragments, one synced per round."""
    overlap_steps: int = 0
    """Steps the site trains on before merging the fragment (it was on the wire meanwhile)."""
    merge_alpha: float = 0.5
    """After overlap: ``local = alpha * local + (1 - alpha) * global``."""
    keep_weights: bool = False
    """Delta downlink: keep the received weights, the next plans send changes against them."""
    paths: dict[str, Any] = field(default_factory=dict)
    """A grid of paths (:func:`atoll.paths.spec.paths_spec`: its levels and the fitted
    router, by which a site routes its rows); empty for a dense model."""

    @property
    def spec_id(self) -> str:
        """A short fingerprint of the whole spec: what later plans name it by."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def build_key(self) -> str:
        """A fingerprint of what a site's model, trainer and data order are built from: saved
        site state is reused only under the same key (a resumed run that only extends its
        schedule keeps it)."""
        parts = [self.run_id, self.model_config, self.inner, self.seq_len, self.seed,
                 self.codec_up] + ([self.paths] if self.paths else [])
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()
                              ).hexdigest()

    @property
    def streaming(self) -> bool:
        """Whether rounds sync fragments (or overlap), rather than the whole model at once."""
        return self.fragments > 1 or self.overlap_steps > 0


@dataclass
class RoundPlan:
    """Coordinator -> site, every round: from these weights, train this long."""

    run_id: str
    round: int
    """1-based number of the round this plan belongs to."""
    site: str
    spec_id: str
    """The :class:`RunSpec` the site trains under (``spec`` holds it when it may not)."""
    step: int
    """Global schedule position (inner steps since the run began) at the start of the round."""
    steps: int
    """Inner steps to take; 0 = train for ``time_budget_s`` instead."""
    time_budget_s: float
    weights: dict[str, torch.Tensor] = field(repr=False)
    """The global weights (or their change, or one fragment), encoded with ``codec``."""
    codec: str = "fp32"
    """How ``weights`` are encoded."""
    base: int = 0
    """> 0: ``weights`` is the change to add to the weights received for round ``base``
    (which this site must hold); 0: the weights themselves."""
    full: bool = True
    """``weights`` hold the whole model (replace); else only last round's fragment (merge)."""
    keep_since: int = 0
    """The coordinator's last checkpoint: it may restart from there and repeat later rounds,
    so the site keeps the state it would need to repeat them."""
    spec: RunSpec | None = None
    """The run spec itself, for a site that may not hold it yet."""
    path: str = ""
    """With a grid of paths: the path (``p0-1``) whose weights these are and that the site
    trains this round, on the rows routed to it."""
    ledger_head: dict[str, Any] | None = None
    """The coordinator's signed ledger head as the round starts (:mod:`atoll.ledger.heads`:
    the site keeps it as evidence of the history)."""


@dataclass
class SiteUpdate:
    """Site -> coordinator: the pseudo-gradient ``theta - theta_site`` (encoded with
    ``codec``) and what it took."""

    run_id: str
    round: int
    site: str
    delta: dict[str, torch.Tensor] = field(repr=False)
    tokens: int
    steps: int
    train_loss: float
    seconds: float
    compute_seconds: float
    codec: str = "fp32"
    """How ``delta`` is encoded."""
    receipt: dict[str, Any] = field(default_factory=dict)
    """What the site says it trained on (:mod:`atoll.ledger.receipts`), signed by it."""
    receipt_signature: str = ""
    signer: str = ""
    """The site's Ed25519 public key (hex)."""
    signer_binding: str = ""
    """The site's node key vouching for ``signer`` (:func:`atoll.ledger.receipts.bind_signer`;
    authenticated federations)."""
    node_key: str = field(default="", repr=False)
    """Filled in by the engine: the public key the sender's node authenticated with (never
    taken from the reply; empty without node authentication)."""
    bytes_up: int = 0
    """Filled in by the engine: serialized size of this update."""
    bytes_down: int = 0
    """Filled in by the engine: serialized size of the plan that produced it."""


@dataclass
class EvalRequest:
    """Coordinator -> site, every ``eval.every`` rounds: the loss of these global weights on
    your own held-out rows, please (:mod:`atoll.federation.evaluation`)."""

    run_id: str
    round: int
    """The round whose outer step made ``weights`` (0: the initial weights)."""
    site: str
    weights: dict[str, torch.Tensor] = field(repr=False)
    """The global weights, whole and in fp32: every site measures the same model."""
    model_config: dict[str, Any] = field(default_factory=dict)
    seq_len: int = 128
    purpose: str = ""
    """Consent applies to held-out rows as it does to training rows."""
    batch_size: int = 16
    max_batches: int = 8
    """Held-out batches to use (0 = the whole validation split)."""
    path: str = ""
    """A grid of paths: ``weights`` are this path's, to be measured on the held-out rows
    that route to it (0 tokens when none do)."""
    paths: dict[str, Any] = field(default_factory=dict)
    """With ``path``: the grid and its router (the run spec's ``paths``)."""


@dataclass
class EvalReport:
    """Site -> coordinator: the loss of the requested weights on the site's held-out rows
    (nats per predicted token) and the number of tokens it was measured on."""

    run_id: str
    round: int
    site: str
    loss: float
    tokens: int
    seconds: float
    bytes_up: int = 0
    """Filled in by the engine: serialized size of this report."""
    bytes_down: int = 0
    """Filled in by the engine: serialized size of the request."""


@dataclass
class SiteFailure:
    """An engine's report that a site did not answer usably (crash, timeout, garbage)."""

    site: str
    round: int
    reason: str


_TENSOR_FIELD: dict[type, str | None] = {RoundPlan: "weights", SiteUpdate: "delta",
                                          EvalRequest: "weights", EvalReport: None}
Message = Any  # a RoundPlan, SiteUpdate, EvalRequest, EvalReport or a registered message


def carries(tensor_field: str | None) -> Any:
    """Class decorator: a message type defined elsewhere (:mod:`atoll.federation.features`),
    whose ``tensor_field`` (None: no tensors) travels as the safetensors payload."""
    def register(cls: type) -> type:
        _TENSOR_FIELD[cls] = tensor_field
        return cls
    return register


_NOT_SENT = {"node_key"}
"""Fields the receiving side fills in and a message never carries."""


def header(msg: Message) -> dict[str, Any]:
    """The non-tensor fields of a message, tagged with its type and the wire version."""
    tensor_field = _TENSOR_FIELD.get(type(msg))
    fields = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)
              if f.name != tensor_field and f.name not in _NOT_SENT}
    if isinstance(fields.get("spec"), RunSpec):
        fields["spec"] = dataclasses.asdict(fields["spec"])
    return {"v": WIRE_VERSION, "type": type(msg).__name__, **fields}


def tensors(msg: Message) -> dict[str, torch.Tensor]:
    """The tensors a message carries (a plan's weights, an update's pseudo-gradient; an
    evaluation report carries none)."""
    name = _TENSOR_FIELD.get(type(msg))
    return getattr(msg, name) if name else {}


def tensor_bytes(named: dict[str, torch.Tensor]) -> bytes:
    """A safetensors blob of ``named`` (the same weights give the same bytes)."""
    return st_save({k: v.contiguous() for k, v in named.items()})


def to_bytes(msg: RoundPlan | SiteUpdate) -> bytes:
    """Serialize a plan or an update into one safetensors blob (header in its metadata)."""
    contiguous = {k: v.contiguous() for k, v in tensors(msg).items()}
    return st_save(contiguous, metadata={"atoll": json.dumps(header(msg))})


def from_bytes(blob: bytes, expect: type) -> Any:
    """Decode what :func:`to_bytes` wrote; raises :class:`WireError` on anything else."""
    try:
        head = json.loads(_metadata(blob)["atoll"])
    except (KeyError, ValueError, TypeError) as e:
        raise WireError(f"not an atoll message ({type(e).__name__}: {e})") from None
    return from_parts(head, blob, expect)


def from_parts(head: dict[str, Any], blob: bytes, expect: type) -> Any:
    """A message from its header and a safetensors blob of its tensors."""
    try:
        named = st_load(blob)
    except (SafetensorError, ValueError, TypeError) as e:
        raise WireError(f"not an atoll message ({type(e).__name__}: {e})") from None
    head = dict(head)
    if head.pop("v", None) != WIRE_VERSION or head.pop("type", None) != expect.__name__:
        raise WireError(f"expected a {expect.__name__} (wire v{WIRE_VERSION})")
    if _TENSOR_FIELD.get(expect):
        head[_TENSOR_FIELD[expect]] = named
    try:
        if isinstance(head.get("spec"), dict):
            head["spec"] = RunSpec(**head["spec"])
        return expect(**head)
    except TypeError as e:
        raise WireError(f"malformed {expect.__name__}: {e}") from None


def _metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` table of a safetensors blob (8-byte length + JSON header)."""
    n = int.from_bytes(blob[:8], "little")
    if n <= 0 or n > len(blob) - 8:
        raise ValueError("truncated header")
    return json.loads(blob[8 : 8 + n])["__metadata__"]
