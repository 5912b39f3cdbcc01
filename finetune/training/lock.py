"""One run per output folder: an exclusive `flock` on `output.dir/.finetune.lock`, held for the whole run.

The operating system drops the lock when the process exits in any way (even SIGKILL or a power cut on a local
disk), so a crashed run never leaves a stale lock behind. The file holds who took it, for the message the next
run shows.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from finetune.errors import FinetuneError

LOCK_FILE = ".finetune.lock"


class RunLock:
    """Held by the main process of a run (other ranks write no run files); `release` is idempotent."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_FILE
        self.handle = None

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _holder(handle.read())
            handle.close()
            raise FinetuneError(
                f"output.dir: {self.path.parent} is in use by another run ({holder}). Wait for it to finish, stop it, "
                "or choose another output.dir."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            import fcntl

            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"process {info['pid']} on {info['host']}, started {info['started']}"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "a process that left no details"
