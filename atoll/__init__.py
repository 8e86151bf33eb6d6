"""atoll: train one language model across many islands of compute and data.

The public surface is small: a :class:`~atoll.federation.coordinator.Coordinator` (built
from one :class:`~atoll.federation.settings.CoordinatorConfig`) and
:class:`~atoll.federation.site.Site` exchange a :class:`~atoll.federation.protocol.RunSpec`
once per run, a :class:`~atoll.federation.protocol.RoundPlan` every round and
:class:`~atoll.federation.protocol.SiteUpdate` replies; engines move them; :func:`simulate`
runs a whole federation on one machine. Names are imported on first use, so a thin process (a
Flower ClientApp shim) can import ``atoll`` without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Coordinator": "atoll.federation.coordinator",
    "CoordinatorConfig": "atoll.federation.settings",
    "FederationConfig": "atoll.federation.settings",
    "RunSpec": "atoll.federation.protocol",
    "RoundPlan": "atoll.federation.protocol",
    "SiteUpdate": "atoll.federation.protocol",
    "Site": "atoll.federation.site",
    "simulate": "atoll.app.simulate",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'atoll' has no attribute {name!r}")
