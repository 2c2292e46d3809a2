"""Small helpers shared by the stages: atomic outputs, logging, progress, stage entry points."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tasks.params import ParamsError

log = logging.getLogger("tlp")


def setup_logging() -> None:
    """Log ``INFO`` lines to stderr, once, in the form Prefect and ``dvc repro`` both show."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    """A tqdm progress bar on stderr that stays readable in logs (not only on terminals)."""
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("mininterval", 1.0 if sys.stderr.isatty() else 5.0)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("disable", os.environ.get("TLP_NO_PROGRESS") == "1")
    return tqdm(iterable, **kwargs)


@contextlib.contextmanager
def atomic_path(target: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; move it onto ``target`` only if the block succeeds.

    The temporary path lives in the same folder as ``target`` so the final rename is
    atomic on POSIX. On error the temporary file or folder is removed and ``target`` is
    left as it was: a later run never trusts a half-written output.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A killed earlier run may have left its temporary sibling; only one writer runs at a
    # time (DVC's repo lock and tlp's run lock), so any such leftover is stale.
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        remove(stale)
    umask = os.umask(0)
    os.umask(umask)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        tmp.chmod(0o777 & ~umask)
    else:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
        tmp.chmod(0o666 & ~umask)
    try:
        yield tmp
        if directory:
            if target.exists() or target.is_symlink():
                old = target.with_name(f".{target.name}.old")
                remove(old)
                target.rename(old)
                tmp.rename(target)
                remove(old)
            else:
                tmp.rename(target)
        else:
            os.replace(tmp, target)
    except BaseException:
        remove(tmp)
        raise


def remove(path: str | Path) -> None:
    """Delete a file, link or folder if it exists."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can hold


def save_model(model: Any, target: str | Path) -> None:
    """Save a Keras model to ``target`` whole or not at all, with bytes that depend on it only.

    Keras insists on the ``.keras`` extension, so Keras writes ``.<stem>.tmp.keras`` beside
    ``target`` (a fixed name: a file left by a killed save is never read, and the next save
    overwrites it), which is then rewritten to ``target`` through :func:`atomic_path`.

    ``model.save`` records the save date (in ``metadata.json`` and in the zip entries) and
    object ids (``shared_object_id`` in ``config.json``); both change on every run, so an
    unchanged model would look changed to DVC and re-run everything downstream. They are
    rewritten: no date, fixed entry times, ids numbered in order of appearance (Keras uses
    them only to match shared objects within the file).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    keras_path = target.with_name(f".{target.stem}.tmp.keras")
    try:
        model.save(keras_path)
        with (
            atomic_path(target) as tmp,
            zipfile.ZipFile(keras_path) as source,
            zipfile.ZipFile(tmp, "w") as rewritten,
        ):
            for info in source.infolist():
                entry = zipfile.ZipInfo(info.filename, date_time=_ZIP_EPOCH)
                entry.compress_type = info.compress_type
                if info.filename in ("metadata.json", "config.json"):
                    rewritten.writestr(entry, _stable_json(source.read(info)))
                    continue
                big = info.file_size >= zipfile.ZIP64_LIMIT
                with source.open(info) as reader, rewritten.open(entry, "w", force_zip64=big) as writer:  # fmt: skip
                    shutil.copyfileobj(reader, writer, 1 << 20)
    finally:
        keras_path.unlink(missing_ok=True)


def _stable_json(data: bytes) -> str:
    ids: dict[int, int] = {}

    def renumber(node: Any) -> Any:
        if isinstance(node, dict):
            node.pop("date_saved", None)
            if isinstance(node.get("shared_object_id"), int):
                node["shared_object_id"] = ids.setdefault(node["shared_object_id"], len(ids) + 1)
            for value in node.values():
                renumber(value)
        elif isinstance(node, list):
            for value in node:
                renumber(value)
        return node

    return json.dumps(renumber(json.loads(data)))


def write_json(path: str | Path, data: Any, *, sort_keys: bool = True) -> None:
    """Write JSON atomically, indented (and sorted, unless the order matters) for readable diffs."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def model_digest(path: str | Path) -> bytes:
    """A digest of a saved Keras model's content: config and weights, not its save date.

    A ``.keras`` archive holds ``metadata.json`` with the time it was saved, so the same
    model saved twice (``dvc repro -f backbone``) differs byte-wise; its other entries do not.
    Any other file is digested whole.
    """
    digest = hashlib.sha256()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for name in sorted(archive.namelist()):
                if name != "metadata.json":
                    digest.update(name.encode() + b"\0" + archive.read(name))
    else:
        digest.update(Path(path).read_bytes())
    return digest.digest()


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# Exit codes of a stage's command (``python -m tasks.<stage>``): the contract between the
# stages and whatever runs them (``dvc repro``, the Prefect flow). Never the message text.
EXIT_OK = 0
EXIT_FAILED = 1  # the stage cannot go on with these inputs or params; retrying will not help
EXIT_TRANSIENT = 75  # EX_TEMPFAIL (sysexits.h): a passing failure (network); retry later
# Stopped by SIGINT (Ctrl-C, or `tlp run` stopping) or SIGTERM: 128 + the signal number
# (130, 143), as shells report.
EXIT_INTERRUPTED = 128
# When set, the stage writes {"stage", "exit_code", "error"} as JSON to this path before it
# exits: how the flow learns that the command ran and how it ended (DVC's Python API does not
# pass the exit code on).
RESULT_ENV = "TLP_STAGE_RESULT"


class StageError(RuntimeError):
    """A stage cannot go on; the message says why and what to do."""


class TransientError(StageError):
    """A failure a later attempt may not have (a download that kept failing); exit 75."""


def run_stage(name: str, body: Callable[[], Any]) -> int:
    """Run a stage's ``main`` body, turning expected errors into one clear line and exit 1.

    The error is printed once, as ``ERROR: <stage>: <message>``. When ``$TLP_STAGE_RESULT``
    names a file, the outcome is written there as JSON instead (``{"stage", "exit_code",
    "error"}``), for the runner to report; also for an unexpected exception, which is then
    raised again for its traceback. SIGINT (Ctrl-C) and SIGTERM stop the body the same way
    (``KeyboardInterrupt``: temporary files are removed on the way out, complete ones kept)
    and end in one line, no traceback, and exit code 128 + the signal number.

    Args:
        name: the stage name, used as the prefix of the error line.
        body: the work; it may raise :class:`StageError`, :class:`ParamsError` or ``ValueError``.

    Returns:
        The process exit code: :data:`EXIT_OK`, :data:`EXIT_FAILED`,
        :data:`EXIT_TRANSIENT` for a :class:`TransientError`, or :data:`EXIT_INTERRUPTED`
        plus the signal number.
    """
    setup_logging()
    code, error = EXIT_OK, ""
    received: list[int] = []
    previous = _on_sigterm(received)
    try:
        body()
    except (StageError, ParamsError, ValueError, OSError) as exc:
        code = EXIT_TRANSIENT if isinstance(exc, TransientError) else EXIT_FAILED
        error = str(exc)
    except KeyboardInterrupt:  # its atomic_path blocks have removed their temporaries
        number = received[0] if received else signal.SIGINT
        code = EXIT_INTERRUPTED + number
        error = (
            f"stopped by {signal.Signals(number).name}; the files it wrote are complete ones "
            "only (the train stage's backup included): run it again to go on"
        )
    except BaseException as exc:
        _write_result(name, EXIT_FAILED, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if code and not os.environ.get(RESULT_ENV):  # else whoever asked for the result reports it
        print(f"ERROR: {name}: {error}", file=sys.stderr)
    _write_result(name, code, error)
    return code


def _on_sigterm(received: list[int]) -> Any:
    """Make SIGTERM raise ``KeyboardInterrupt``, as Ctrl-C does; return the old handler."""

    def interrupt(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return None  # only the main thread may set handlers (a stage runs in it)
    return signal.signal(signal.SIGTERM, interrupt)


def _write_result(stage: str, exit_code: int, error: str) -> None:
    if os.environ.get(RESULT_ENV):
        write_json(os.environ[RESULT_ENV], {"stage": stage, "exit_code": exit_code, "error": error})


def set_determinism(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow and ask TensorFlow for deterministic kernels."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    with contextlib.suppress(Exception):  # only possible before the first op runs
        tf.config.experimental.enable_op_determinism()
