"""A run folder's identity, its lock and its checkpoints.

``run.json`` names the run (its id is what every plan, update and ledger entry carries);
``.lock`` keeps a second process from writing into the same folder; ``checkpoints/``
holds one ``round-NNNNN`` folder per checkpointed round, each made complete under a
temporary name and then renamed, so a crash never leaves half a checkpoint. The lock is
taken before anything is written into the folder.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from atoll.util.atomic import replace_directory, write_atomic
from atoll.util.round_folders import RoundFolders
from atoll.util.storage import StateError, load_state, save_state


class RunFolder:
    """The folder ``out`` of one run, held by this process."""

    def __init__(self, out: Path, wait_s: float = 120.0,
                 log: Callable[[str], None] = lambda line: None) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock: IO[str] | None = lock_run_folder(self.out, wait_s)
        self.log = log
        self.checkpoints = RoundFolders(self.out / "checkpoints")

    def identity(self, name: str, resume: bool) -> str:
        """The run id: read back on ``resume``, else made and written to ``run.json``."""
        path = self.out / "run.json"
        if resume:
            if not path.exists():
                raise FileNotFoundError(f"{self.out} is not a run folder (no run.json)")
            return json.loads(path.read_text())["run_id"]
        if path.exists():
            raise FileExistsError(f"{self.out} already holds a run: use --resume, or another --out")
        run_id = uuid.uuid4().hex[:12]
        write_atomic(path, json.dumps({"run_id": run_id, "name": name,
                                       "started": time.time()}).encode())
        return run_id

    def save_checkpoint(self, round_: int, parts: dict[str, dict[str, Any]], keep: int) -> Path:
        """Save ``parts`` (name -> state) as round ``round_``'s checkpoint; keep the newest
        ``keep``."""
        final = self.checkpoints.path(round_)
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for name, state in parts.items():
            save_state(state, tmp / name)
        replace_directory(tmp, final)
        self.checkpoints.prune(keep)
        return final

    def load_checkpoint(self, names: list[str]) -> dict[str, dict[str, Any]] | None:
        """The newest checkpoint that loads whole (name -> state), or None when there is none.

        A damaged newest checkpoint (truncated tensors, a bad ``state.json``, a part missing)
        is passed over for the one before it, with one line saying so; when checkpoints exist
        but none loads, :class:`StateError` says so."""
        rounds = self.checkpoints.rounds()
        if not rounds:
            return None
        problems = []
        for r in reversed(rounds):
            path = self.checkpoints.path(r)
            try:
                parts = {name: load_state(path / name) for name in names}
            except StateError as e:
                problems.append(str(e))
                continue
            if problems:
                self.log(f"checkpoint of round {rounds[-1]} is damaged ({problems[0]}); "
                         f"resuming from round {r} instead")
            return parts
        raise StateError(f"{self.checkpoints.root}: no checkpoint loads (newest: {problems[0]})")

    def release(self) -> None:
        """Let another process take the folder."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def lock_run_folder(out: Path, wait_s: float = 120.0, name: str = ".lock") -> IO[str]:
    """Hold an exclusive lock on the run folder for this process's lifetime.

    A coordinator that died abruptly can leave its ServerApp process alive for a few seconds;
    a resumed one waits for it to go rather than have two writers in one folder. ``name``
    picks the lock: ``.lock`` for the process that runs the rounds, ``.coordinator.lock``
    for the ``atoll coordinator`` process that starts it (and writes ``config.toml`` and
    ``flower/`` first)."""
    handle = open(out / name, "w")  # noqa: SIM115 - held until the process exits
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{out} is in use by another atoll process") from None
            time.sleep(1.0)
