"""atoll: train one language model across many islands of compute and data.

The public surface is small: :class:`~atoll.federation.coordinator.Coordinator` and
:class:`~atoll.federation.site.Site` exchange :class:`~atoll.federation.protocol.RoundPlan`
and :class:`~atoll.federation.protocol.SiteUpdate`; engines move them; :func:`simulate` runs
a whole federation on one machine.
"""

from atoll.federation.coordinator import Coordinator, FederationConfig
from atoll.federation.protocol import RoundPlan, SiteUpdate
from atoll.federation.site import Site

__version__ = "0.1.0"

__all__ = ["Coordinator", "FederationConfig", "RoundPlan", "Site", "SiteUpdate", "__version__"]
