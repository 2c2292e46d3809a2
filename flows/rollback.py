"""Put the workspace back as it was before a run that failed or was interrupted.

A run changes ``dvc.lock`` and the outputs of every stage it reproduces. DVC's cache holds
each cached output a stage ever wrote, so putting ``dvc.lock`` back and checking out the
stages the run touched (``dvc checkout --force``) restores theirs, and what the failed run
computed stays in the cache (and in DVC's run cache: retrying the same params restores it
at once). Outputs with ``cache: false`` (metrics, plots, training curves, the feature cache)
are not in the cache: when the run starts they are kept as hard links under
``.tlp/rollback/`` (no copy: the stages replace files, never rewrite them in place, and DVC
deletes the others before a stage runs) and moved back. A stage that had no ``dvc.lock``
entry before the run had no outputs DVC knew of: its cached outputs are removed.

:class:`Snapshot` runs in the DVC worker (:mod:`flows.dvc_worker`), which holds DVC's lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tasks.common import remove

LOCK_FILE = "dvc.lock"
MISSING = "missing.json"  # the uncached outputs that did not exist when the run started


class Snapshot:
    """``dvc.lock`` and the uncached outputs as they were when the run started.

    Args:
        root: the project root.
        folder: where the uncached outputs are kept (``.tlp/rollback``).
    """

    def __init__(self, root: Path, folder: Path):
        self.root, self.folder = root, folder
        self.lock: bytes | None = None

    def take(self, uncached: Iterable[str]) -> None:
        """Remember ``dvc.lock`` and hard-link the uncached outputs (paths relative to the
        root) into the snapshot folder; a leftover of a killed run is replaced."""
        lock = self.root / LOCK_FILE
        self.lock = lock.read_bytes() if lock.exists() else None
        remove(self.folder)
        self.folder.mkdir(parents=True)
        missing = []
        for path in uncached:
            source = self.root / path
            if source.is_dir():
                shutil.copytree(source, self.folder / path, copy_function=_link, symlinks=True)
            elif source.exists():
                (self.folder / path).parent.mkdir(parents=True, exist_ok=True)
                _link(source, self.folder / path)
            else:
                missing.append(path)
        (self.folder / MISSING).write_text(json.dumps(missing))

    def restore(self, repo: Any, stages: Iterable[str]) -> list[str]:
        """Put ``dvc.lock`` back, then the outputs of ``stages`` (names in ``dvc.yaml``).

        Args:
            repo: the open ``dvc.repo.Repo``, its lock held.
            stages: the stages the run asked DVC to reproduce, in any order.

        Returns:
            The outputs that could not be put back (not in the DVC cache any more), if any.
        """
        from dvc.exceptions import CheckoutError

        lock = self.root / LOCK_FILE
        if self.lock is None:
            lock.unlink(missing_ok=True)
        else:
            _write(lock, self.lock)
        wanted = set(stages)
        touched = [s for s in repo.index.stages if getattr(s, "name", None) in wanted]
        locked = _lock_entries(lock)
        failed: list[str] = []
        targets = [stage.name for stage in touched if stage.name in locked]
        if targets:
            try:  # @locked: DVC re-reads dvc.yaml and the dvc.lock just written
                repo.checkout(targets=targets, force=True)
            except CheckoutError as exc:
                failed += [str(path) for path in exc.target_infos]
        missing = set(json.loads((self.folder / MISSING).read_text()))
        for stage in touched:
            for out in stage.outs:
                path = out.def_path
                if not out.use_cache:
                    self._put_back(path, path in missing)
                elif stage.name not in locked:
                    remove(self.root / path)
        return failed

    def discard(self) -> None:
        """Drop the snapshot (the run succeeded)."""
        remove(self.folder)

    def _put_back(self, path: str, was_missing: bool) -> None:
        target, kept = self.root / path, self.folder / path
        remove(target)
        if was_missing or not (kept.exists() or kept.is_symlink()):
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(kept, target)


def _link(source: str | Path, target: str | Path) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:  # another file system, or links not allowed: copy
        shutil.copy2(source, target, follow_symlinks=False)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.rollback.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _lock_entries(lock: Path) -> set[str]:
    from dvc.utils.serialize import load_yaml

    with contextlib.suppress(FileNotFoundError):
        return set((load_yaml(lock) or {}).get("stages", {}))
    return set()
