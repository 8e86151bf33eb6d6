"""The ``atoll`` command line: a thin layer over the library.

Every command turns bad input into one line on stderr (``error: <where>: <what>``) and a
non-zero exit status. The commands live by audience: :mod:`atoll.cli.local` (this machine),
:mod:`atoll.cli.deploy` (a federation across machines), :mod:`atoll.cli.contrib` (the
people whose data trains the model).
"""

from __future__ import annotations

import argparse
import os
import sys

from atoll.cli import contrib, deploy, generate, local, plan
from atoll.cli.fail import fail
from atoll.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``atoll`` command; each sets ``func``, the function to run."""
    p = argparse.ArgumentParser(prog="atoll", description="Federated pre-training of language "
                                "models across islands of compute and data.")
    sub = p.add_subparsers(dest="command", required=True)
    local.add_parsers(sub)
    deploy.add_parsers(sub)
    contrib.add_parsers(sub)
    plan.add_parser(sub)
    generate.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command in ``argv`` (default: the process's arguments); its exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (argparse leaves those over) or, with
    # --resume, land in the CONFIG slot.
    if any(not ("=" in e and not e.startswith("-")) for e in extra) or \
            (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if getattr(args, "config", None) and "=" in args.config and not args.config.endswith(".toml"):
        args.overrides = [args.config, *args.overrides]
        args.config = None
    from atoll.data.sources import DataError
    from atoll.util.storage import StateError

    try:
        return args.func(args)
    except (ConfigError, DataError, StateError, FileExistsError, FileNotFoundError,
            ValueError, RuntimeError, TimeoutError) as e:
        if os.environ.get("ATOLL_DEBUG"):
            raise
        return fail(str(e))
    except KeyboardInterrupt:
        print("\ninterrupted; resume with --resume (the last finished round is kept)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
