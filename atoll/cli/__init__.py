"""The ``atoll`` command line: a thin layer over the app, deploy and data packages."""

from atoll.cli.main import main

__all__ = ["main"]
