"""The names of the misbehaviours a site can be told to show (:mod:`atoll.federation.faults`).

Kept apart from the code that applies them so that the command line can list them without
importing torch. A fault spec is one name, or several separated by commas: round ``r`` then
shows the ``r``-th of them, in turn (one hostile site mounts several attacks in one run).
``header_wrong_site=NAME`` names the site the header claims to be.
"""

DELTA_FAULTS = ("sign_flip", "scale100", "noise", "zero", "replay", "nan", "shape",
                "update_poison")
"""Done by the site to its own pseudo-gradient, before it encodes and signs it."""
WIRE_FAULTS = ("stale", "garbage")
"""Done to the message after encoding (a broken site or network)."""
HEADER_FAULTS = ("header_nan", "header_bad_type", "header_huge_tokens", "header_huge_steps",
                 "header_wrong_round", "header_wrong_site", "header_deep_json",
                 "header_unbound_signer", "header_node_key")
"""Done to the reply's header: a hostile site lying about what it did, or trying to crash
the coordinator's parser."""
EVAL_FAULTS = ("eval_nan", "eval_huge_tokens", "eval_wrong_round")
"""Done to an evaluation report (:mod:`atoll.federation.evaluation`): a NaN loss, a
thousand times the held-out tokens, another round's number. Training stays honest."""
FEATURE_FAULTS = ("features_poison",)
"""Done to a grid's routing features (:mod:`atoll.federation.features`): every row's
features 1000 long, to drag the router's centroids its way. Training stays honest."""
FAULTS = ("", *DELTA_FAULTS, *WIRE_FAULTS, *HEADER_FAULTS, *EVAL_FAULTS, *FEATURE_FAULTS)


def parse_faults(spec: str) -> list[tuple[str, str]]:
    """The (kind, argument) of each fault of ``spec``, in round order; ``[]`` for none.
    Raises ValueError naming an unknown kind."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, arg = item.partition("=")
        if kind not in FAULTS or (arg and kind != "header_wrong_site"):
            raise ValueError(f"unknown fault {item!r} (one of "
                             f"{', '.join(f for f in FAULTS if f)}; several: a,b,c)")
        out.append((kind, arg))
    return out


def check_fault(fault: str) -> None:
    """Refuse a fault spec naming a kind that is not one of :data:`FAULTS`."""
    parse_faults(fault)
