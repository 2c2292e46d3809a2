"""One writer per workspace: a file lock under ``.tlp/`` held for a whole flow run.

The lock is an OS file lock (``flock`` through :mod:`filelock`), released when its holder
exits, even if it is killed. Who holds it (PID, host, since when, which run) is written
beside it, so a second run can say whom it is waiting for instead of just "busy".
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock
from filelock import Timeout as LockTimeout

LOCK_FILE = "run.lock"
HOLDER_FILE = "run.lock.json"


class WorkspaceBusyError(RuntimeError):
    """Another run (or another DVC command) is writing to this workspace."""


def tlp_dir(root: str | Path) -> Path:
    """The project's ``.tlp/`` folder (locks, Prefect home, downloads), kept out of git.

    The ``.gitignore`` inside it ignores the folder itself, so projects whose own
    ``.gitignore`` does not list ``.tlp`` (e.g. fresh test projects) stay clean too.
    """
    path = Path(root) / ".tlp"
    path.mkdir(parents=True, exist_ok=True)
    if not (path / ".gitignore").exists():
        (path / ".gitignore").write_text("# tlp's local state; never commit it\n*\n")
    return path


@contextlib.contextmanager
def workspace_lock(root: str | Path, what: str) -> Iterator[None]:
    """Hold the workspace lock for the duration of the block, or fail at once.

    Args:
        root: the project root (the folder holding ``dvc.yaml``).
        what: who holds it, shown to whoever is refused (e.g. ``"flow run 'cheerful-tortoise'"``).

    Raises:
        WorkspaceBusyError: another process holds the lock; the message names it.
    """
    folder = tlp_dir(root)
    lock = FileLock(str(folder / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except LockTimeout:
        raise WorkspaceBusyError(_busy_message(folder)) from None
    since = datetime.now(UTC).isoformat(timespec="seconds")
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": since, "what": what}
    try:
        (folder / HOLDER_FILE).write_text(json.dumps(holder))
        yield
    finally:
        (folder / HOLDER_FILE).unlink(missing_ok=True)
        lock.release()


def current_holder(root: str | Path) -> dict[str, Any] | None:
    """Who holds the workspace lock now, or ``None`` if nobody does (never blocks)."""
    folder = Path(root) / ".tlp"
    if not (folder / LOCK_FILE).exists():
        return None
    lock = FileLock(str(folder / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except LockTimeout:
        return _read_holder(folder)
    lock.release()
    return None


def _read_holder(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / HOLDER_FILE).read_text())
    except (OSError, ValueError):  # the holder is between taking the lock and writing this
        return {}


def _busy_message(folder: Path) -> str:
    holder = _read_holder(folder)
    pid = holder.get("pid", "unknown")
    who = f"{holder.get('what', 'another tlp run')} (PID {pid} on {holder.get('host', '?')}, "
    return (
        f"this workspace is busy: {who}since {holder.get('since', '?')}) holds "
        f"{folder / LOCK_FILE}. Two runs in one workspace would overwrite each other's "
        f"outputs; wait for it to finish (or stop it: kill {pid}) and run again."
    )
