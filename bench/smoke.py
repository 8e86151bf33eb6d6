"""``--smoke`` for every benchmark: the same code paths at tiny sizes, in seconds.

``tests/test_bench.py`` runs each benchmark this way, so a change that breaks one fails the
test suite instead of waiting for the next person who wants its figure. A smoke run prints
the same kind of figures as a real one; at these sizes they mean nothing.
"""

from __future__ import annotations

import argparse


def parse(ap: argparse.ArgumentParser, smoke: dict[str, object],
          argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; with ``--smoke``, ``smoke`` (destination -> value) replaces
    the defaults, and a flag given explicitly still wins over it."""
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes, seconds of work: checks that the benchmark runs (its "
                         "figures then mean nothing)")
    args = ap.parse_args(argv)
    unknown = set(smoke) - set(vars(args))
    if unknown:  # a typo here would silently run the full-size benchmark in the tests
        raise ValueError(f"smoke settings for options that do not exist: {sorted(unknown)}")
    if args.smoke:
        ap.set_defaults(**smoke)
        args = ap.parse_args(argv)
    return args
