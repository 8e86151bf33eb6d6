"""The names of the misbehaviours a site can be told to show (:mod:`atoll.federation.faults`).

Kept apart from the code that applies them so that the command line can list them without
importing torch.
"""

DELTA_FAULTS = ("sign_flip", "scale100", "noise", "zero", "replay", "nan", "shape")
"""Done by the site to its own pseudo-gradient, before it encodes and signs it."""
WIRE_FAULTS = ("stale", "garbage")
"""Done to the message after encoding (a broken site or network)."""
FAULTS = ("", *DELTA_FAULTS, *WIRE_FAULTS)


def check_fault(fault: str) -> None:
    """Refuse a fault name that is not one of :data:`FAULTS`."""
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r} (one of {', '.join(f for f in FAULTS if f)})")
