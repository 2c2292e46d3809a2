"""One DVC process per flow run, holding DVC's repo lock from the first stage to the last.

The flow opens a :class:`DvcWorker`; it starts ``python -m flows.dvc_worker``, which opens
``dvc.repo.Repo`` and takes DVC's own repo lock (``.dvc/tmp/lock``) until the flow closes
it. A ``dvc repro`` started by hand meanwhile is refused with DVC's lock error, and
cannot run stages between or during the flow's. DVC itself lets go of that lock while a
stage's command runs (``dvc.stage.run.run_stage``, so that a command may call ``dvc``;
ours never do): :class:`HeldLock` keeps it held through that too.

The flow sends requests as JSON lines on the worker's stdin: ``pipeline`` (graph and
status), ``reproduce`` (one stage, as ``dvc repro --single-item``), ``checkout`` (put a
stage's outputs back) and ``save`` (``dvc exp save``, the last request). Each answer is one
JSON line on the worker's stdout; everything DVC and the stage commands print goes to its
stderr, which the flow logs line by line. How a stage's command ended comes from the stage
itself (``tasks.common.run_stage`` writes its exit code and error to ``$TLP_STAGE_RESULT``),
never from DVC's printed English. TensorFlow and DVC stay out of the flow's process, and
the worker dies with it (``PR_SET_PDEATHSIG``), taking the stage command down too.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows.stages import (
    DVC_BUSY_MESSAGE,
    DvcBusyError,
    Pipeline,
    StageFailedError,
    TransientStageError,
    read_pipeline,
)
from tasks.common import EXIT_FAILED, EXIT_TRANSIENT, RESULT_ENV

Emit = Callable[[str], Any]
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class DvcWorker:
    """The flow's end of the worker: start it, send requests, stream its output, stop it.

    Use it as a context manager: entering starts the worker and waits until it holds DVC's
    lock; leaving lets it release the lock and exit (or stops it, stage and all, when the
    block ends with an error).
    """

    def __init__(self, root: Path, emit: Emit):
        self.root = root
        self.emit = emit  # where output lines go unless a request names its own
        self._process: subprocess.Popen | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""

    def __enter__(self) -> DvcWorker:
        bin_dir = str(Path(sys.executable).parent)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "flows.dvc_worker", str(self.root), str(os.getpid())],
            cwd=self.root,
            env={
                **os.environ,
                "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                "PYTHONUNBUFFERED": "1",
            },  # fmt: skip
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: it and the stage stop together
        )
        try:
            self._answer(self.emit)  # the worker holds DVC's lock once it says so
        except BaseException:
            self.close(stop=True)
            raise
        return self

    def __exit__(self, kind: type | None, *_: Any) -> None:
        self.close(stop=kind is not None and not issubclass(kind, Exception))

    def pipeline(self) -> Pipeline:
        """The stage graph and every stage's status (see :func:`flows.stages.read_pipeline`)."""
        return Pipeline.from_json(self._request({"op": "pipeline"}, self.emit))

    def reproduce(self, stage: str, emit: Emit) -> str:
        """Bring one stage up to date, as ``dvc repro --single-item <stage>`` does.

        Args:
            stage: the stage name.
            emit: called with each line DVC and the stage's command print.

        Returns:
            ``ran`` (its command ran), ``restored`` (DVC took its outputs from the run
            cache) or ``cached`` (DVC found it up to date).

        Raises:
            TransientStageError: the command exited 75 (a retry may help).
            StageFailedError: the command failed; the message is the stage's own error.
            DvcBusyError: another DVC process holds a lock on the stage's outputs.
        """
        result = self._request({"op": "reproduce", "stage": stage}, emit)
        if result["outcome"] != "failed":
            return result["outcome"]
        kind = TransientStageError if result["exit_code"] == EXIT_TRANSIENT else StageFailedError
        raise kind(stage, result["error"])

    def checkout(self, stage: str) -> None:
        """Put a stage's outputs back as ``dvc.lock`` records them (``dvc checkout --force``).

        Raises:
            RuntimeError: DVC could not (e.g. the stage never succeeded, nothing is cached).
        """
        self._request({"op": "checkout", "stage": stage}, self.emit)

    def save_experiment(self, name: str | None, include: list[str]) -> str:
        """Record the workspace as a DVC experiment; DVC's lock is released first.

        ``dvc exp save`` opens a second ``Repo`` that takes the lock itself, so this is the
        worker's last request.

        Args:
            name: the experiment name; when it is taken or not valid, DVC picks one.
            include: untracked result files (metrics, plots) to commit with it.

        Returns:
            The experiment's name.
        """
        return self._request({"op": "save", "name": name, "include": include}, self.emit)

    def close(self, stop: bool = False) -> None:
        """Let the worker release DVC's lock and exit; with ``stop``, stop it and its stage.

        Stopping is gentle first: SIGINT is a KeyboardInterrupt in the stage, so its
        ``atomic_path`` blocks remove their temporary files; SIGTERM and SIGKILL follow if
        the process group does not stop in time.
        """
        process, self._process = self._process, None
        if process is None:
            return
        steps = ((signal.SIGINT, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 10))
        if not stop:
            steps = ((None, 60), *steps)
        for sig, wait in steps:
            try:
                if sig is None:
                    process.stdin.close()  # end of requests: it unlocks and exits
                else:
                    os.killpg(process.pid, sig)
                process.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        process.wait()
        for stream in (process.stdout, process.stderr, process.stdin):
            stream.close()

    def _request(self, request: dict[str, Any], emit: Emit) -> Any:
        if self._process is None:
            raise RuntimeError("the DVC worker is not running (use DvcWorker as a context)")
        self._process.stdin.write((json.dumps(request) + "\n").encode())
        self._process.stdin.flush()
        return self._answer(emit)

    def _answer(self, emit: Emit) -> Any:
        """Log the worker's output line by line until its answer comes; return its value."""
        process = self._process
        answer_fd, log_fd = process.stdout.fileno(), process.stderr.fileno()
        answer, log_open = b"", True
        while not answer.endswith(b"\n"):
            ready = select.select([answer_fd, log_fd] if log_open else [answer_fd], [], [])[0]
            if log_fd in ready:
                log_open = self._log(os.read(log_fd, 65536), emit)
            if answer_fd in ready:
                chunk = os.read(answer_fd, 65536)
                if not chunk:
                    code = process.wait()
                    raise RuntimeError(f"the DVC worker exited ({code}) without an answer")
                answer += chunk
        # All it printed before answering is in the pipe already: log that first.
        while log_open and select.select([log_fd], [], [], 0)[0]:
            log_open = self._log(os.read(log_fd, 65536), emit)
        self._log(b"", emit, final=True)
        reply = json.loads(answer)
        if reply["ok"]:
            return reply.get("value")
        error = {"busy": DvcBusyError}.get(reply["kind"], RuntimeError)
        raise error(reply["error"])

    def _log(self, chunk: bytes, emit: Emit, final: bool = False) -> bool:
        """Emit the complete lines of the log so far; return whether the log is still open."""
        text = self._partial + self._decoder.decode(chunk, final=final)
        *lines, self._partial = re.split(r"\r\n|\r|\n", text)  # tqdm's "\r" updates too
        if final:
            lines, self._partial = [*lines, self._partial], ""
        for line in lines:
            if line.strip():
                emit(line.rstrip())
        return bool(chunk)


# -- the worker process ---------------------------------------------------------------------


class HeldLock:
    """DVC's repo lock, taken once and held until :meth:`release`.

    It stands in for ``repo.lock`` (a ``dvc.lock.LockBase``): DVC's own ``lock()`` and
    ``unlock()`` calls, including the release around a stage's command, leave it held.
    """

    def __init__(self, real: Any):
        self.real = real
        real.lock()  # raises dvc.lock.LockError after DVC's usual retries (about 3 s)

    lockfile = property(lambda self: self.real.lockfile)
    files = property(lambda self: getattr(self.real, "files", [self.real.lockfile]))
    is_locked = property(lambda self: True)

    def lock(self) -> None:
        """Already held."""

    def unlock(self) -> None:
        """Stays held until :meth:`release`."""

    def __enter__(self) -> None:
        pass

    def __exit__(self, *_: Any) -> None:
        pass

    def release(self) -> Any:
        """Release the lock for good; return DVC's own lock object."""
        self.real.unlock()
        return self.real


def serve(root: Path, parent: int) -> int:
    """The worker's loop: answer the flow's requests until its stdin closes.

    Args:
        root: the project root.
        parent: the flow's PID; the worker exits if that process is gone.

    Returns:
        The exit code.
    """
    signal.signal(signal.SIGTERM, _stop_group)  # SIGTERM stops the stage command too...
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # ...and the flow's death sends it
    if os.getppid() != parent:  # it died before prctl took effect
        return 1
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever DVC and the stages print is log, not answers
    from dvc.exceptions import DvcException
    from dvc.lock import LockError
    from dvc.repo import Repo

    repo = Repo(str(root))
    try:
        repo.lock = held = HeldLock(repo.lock)
    except LockError:
        _reply(answers, {"ok": False, "kind": "busy", "error": DVC_BUSY_MESSAGE})
        return 1
    _reply(answers, {"ok": True})
    with tempfile.TemporaryDirectory(prefix="tlp-stage-") as scratch:
        handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "pipeline": lambda _: read_pipeline(repo).to_json(),
            "reproduce": lambda r: _reproduce(repo, r["stage"], Path(scratch) / "result.json"),
            "checkout": lambda r: repo.checkout(targets=[r["stage"]], force=True) and None,
            "save": lambda r: _save(repo, held, r["name"], r["include"]),
        }
        for line in sys.stdin:
            request = json.loads(line)
            try:
                answer = {"ok": True, "value": handlers[request["op"]](request)}
            except LockError as exc:
                answer = {
                    "ok": False,
                    "kind": "busy",
                    "error": f"{DVC_BUSY_MESSAGE} ({_text(exc)})",
                }
            except DvcException as exc:
                answer = {"ok": False, "kind": "dvc", "error": _text(exc)}
            sys.stdout.flush()
            sys.stderr.flush()
            _reply(answers, answer)
    if isinstance(repo.lock, HeldLock):
        repo.lock = held.release()
    repo.close()
    return 0


def _reproduce(repo: Any, stage: str, result_file: Path) -> dict[str, Any]:
    from dvc.exceptions import ReproductionError
    from dvc.lock import LockError

    result_file.unlink(missing_ok=True)
    try:
        done = repo.reproduce(stage, single_item=True, run_env={RESULT_ENV: str(result_file)})
    except ReproductionError as exc:
        if isinstance(exc.__cause__, LockError):  # another DVC holds the stage's outputs
            raise exc.__cause__ from None
        own = json.loads(result_file.read_text()) if result_file.exists() else {}
        return {
            "outcome": "failed",
            "exit_code": own.get("exit_code", EXIT_FAILED),
            "error": own.get("error") or _text(exc.__cause__ or exc),
        }
    if result_file.exists():
        return {"outcome": "ran"}
    return {"outcome": "restored" if done else "cached"}


def _save(repo: Any, held: HeldLock, name: str | None, include: list[str]) -> str:
    from dvc.exceptions import DvcException

    repo.lock = held.release()  # exp save's own Repo takes the lock itself
    include = [path for path in include if (Path(repo.root_dir) / path).exists()]
    try:
        rev = repo.experiments.save(name=name, include_untracked=include)
    except DvcException:  # the name is taken or not a valid git ref: let DVC pick one
        if not name:
            raise
        rev = repo.experiments.save(include_untracked=include)
    return repo.experiments.get_exact_name([rev])[rev] or rev[:7]


def _text(exc: BaseException) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # DVC colours its links even in pipes


def _reply(answers: Any, answer: dict[str, Any]) -> None:
    answers.write(json.dumps(answer) + "\n")


def _stop_group(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.killpg(0, signal.SIGTERM)  # the stage command in this process group, then this process


if __name__ == "__main__":
    raise SystemExit(serve(Path(sys.argv[1]), int(sys.argv[2])))
