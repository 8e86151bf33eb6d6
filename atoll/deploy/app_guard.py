"""A site runs atoll's ClientApp and nothing else.

A Flower SuperNode runs whatever app the SuperLink's runs name, next to the site's
private data. The fleet gate already keeps strangers from starting runs; this is the
site's own check, for the day the coordinator's host is not what it should be. Flower
starts each ClientApp process by the name ``flwr-clientapp`` found on ``PATH``; ``atoll
site`` puts a ``flwr-clientapp`` of its own first on the SuperNode's ``PATH``. It is
Flower's program with one step added: before the app bundle (FAB) is unpacked, it must
be atoll's, that is hold only its ``pyproject.toml`` (and Flower's content list), name
the ``atoll`` publisher and app, atoll's ClientApp, and no dependencies. Its code then
comes from the atoll installed on this machine, never from the bundle. Anything else is
refused before a byte of it is written or imported; the SuperNode answers the run with
the error and the site's log says why.
"""

from __future__ import annotations

import hashlib
import io
import stat
import sys
import tomllib
import zipfile
from pathlib import Path

from atoll.deploy.flower_cli import APP_NAME

CLIENTAPP = "atoll.engines.flower_client:client_app"
MEMBERS = {"pyproject.toml", ".info/CONTENT"}
MAX_FAB_BYTES = 1 << 20


class AppRefused(RuntimeError):
    """The app bundle a run asked this site to execute is not atoll's."""


def check_fab(content: bytes) -> None:
    """Raise :class:`AppRefused` unless ``content`` is atoll's own app bundle."""
    if len(content) > MAX_FAB_BYTES:
        raise AppRefused(f"app bundle of {len(content)} bytes (atoll's is under 2 KB)")
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as z:
            names = set(z.namelist())
            if names != MEMBERS:
                raise AppRefused(f"app bundle holds {sorted(names - MEMBERS) or 'too little'}"
                                 f"; atoll's holds only pyproject.toml")
            if any(i.file_size > 64 << 10 for i in z.infolist()):
                raise AppRefused("app bundle has an oversized member")
            pyproject, listed = z.read("pyproject.toml"), z.read(".info/CONTENT")
    except zipfile.BadZipFile as e:
        raise AppRefused(f"app bundle is not a zip file: {e}") from None
    digest = hashlib.sha256(pyproject).hexdigest()
    if not listed.decode("utf-8", "replace").startswith(f"pyproject.toml,{digest},"):
        raise AppRefused("app bundle's content list does not match its pyproject.toml")
    _check_project(pyproject)


def _check_project(pyproject: bytes) -> None:
    try:
        meta = tomllib.loads(pyproject.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise AppRefused(f"app bundle's pyproject.toml does not parse: {e}") from None
    project = meta.get("project", {})
    app = meta.get("tool", {}).get("flwr", {}).get("app", {})
    found = {"name": project.get("name"), "publisher": app.get("publisher"),
             "clientapp": app.get("components", {}).get("clientapp"),
             "dependencies": project.get("dependencies")}
    wanted = {"name": APP_NAME, "publisher": "atoll", "clientapp": CLIENTAPP,
              "dependencies": []}
    wrong = [f"{k} = {found[k]!r}" for k in wanted if found[k] != wanted[k]]
    if wrong:
        raise AppRefused(f"not atoll's app: {', '.join(wrong)}")


def install(folder: Path) -> Path:
    """Write the guarded ``flwr-clientapp`` into ``folder`` (to go first on ``PATH``)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "flwr-clientapp"
    script.write_text(f"#!{sys.executable}\nimport sys\n"
                      "from atoll.deploy.app_guard import main\nsys.exit(main())\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


def main() -> int:
    """Flower's ``flwr-clientapp``, refusing any app bundle but atoll's before it is
    installed (Flower's own error path then answers the run)."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    flower_install = runtime.install_from_fab

    def guarded_install(content: bytes, *args: object, **kwargs: object) -> object:
        try:
            check_fab(content)
        except AppRefused as e:
            print(f"atoll site: refused to run an app: {e}", file=sys.stderr, flush=True)
            raise
        return flower_install(content, *args, **kwargs)

    runtime.install_from_fab = guarded_install
    flwr_clientapp()
    return 0
