"""A run folder's identity, its lock and its checkpoints.

``run.json`` names the run (its id is what every plan, update and ledger entry carries);
``.lock`` keeps a second process from writing into the same folder; ``checkpoints/``
holds one ``round-NNNNN`` folder per checkpointed round, each made complete under a
temporary name and then renamed, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import IO, Any

from atoll.util.atomic import write_atomic
from atoll.util.round_folders import RoundFolders
from atoll.util.storage import load_state, save_state


class RunFolder:
    """The folder ``out`` of one run, held by this process."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock: IO[str] | None = lock_run_folder(self.out)
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
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        self.checkpoints.prune(keep)
        return final

    def load_checkpoint(self, names: list[str]) -> dict[str, dict[str, Any]] | None:
        """The newest checkpoint's parts (name -> state), or None when there is none."""
        rounds = self.checkpoints.rounds()
        if not rounds:
            return None
        path = self.checkpoints.path(rounds[-1])
        return {name: load_state(path / name) for name in names}

    def release(self) -> None:
        """Let another process take the folder."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def lock_run_folder(out: Path, wait_s: float = 120.0) -> IO[str]:
    """Hold an exclusive lock on the run folder for this process's lifetime.

    A coordinator that died abruptly can leave its ServerApp process alive for a few seconds;
    a resumed one waits for it to go rather than have two writers in one folder."""
    handle = open(out / ".lock", "w")  # noqa: SIM115 - held until the process exits
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{out} is in use by another atoll process") from None
            time.sleep(1.0)
