"""One DVC process per flow run, holding DVC's repo lock from the first stage to the last.

:class:`DvcWorker` starts ``python -m flows.dvc_worker``, which opens ``dvc.repo.Repo`` and
holds DVC's own repo lock until the flow closes it: a ``dvc repro`` started by hand meanwhile
is refused with DVC's lock error instead of running stages in between. DVC lets go of that
lock while a stage's command runs (so that the command may call ``dvc``; ours never do);
:class:`HeldLock` keeps it held then too. Requests go to the worker's stdin and answers come
back on its stdout, one JSON line each; what DVC and the stage commands print comes on its
stderr and is logged line by line. How a command ended is its exit code and error, which
``tasks.common.run_stage`` writes to ``$TLP_STAGE_RESULT``: never DVC's printed English.
TensorFlow and DVC stay out of the flow's process; the worker dies with it
(``PR_SET_PDEATHSIG``) and takes the stage command along. When a run fails or is
interrupted, the worker stops the stage it runs and puts ``dvc.lock`` and the outputs of
every stage it reproduced back as they were (:mod:`flows.rollback`).
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dvc.lock import LockBase, LockError, LockNoop

from flows.logs import verbose
from flows.rollback import Snapshot
from flows.stages import (
    DVC_BUSY_MESSAGE,
    DvcBusyError,
    Pipeline,
    StageFailedError,
    TransientStageError,
    read_pipeline,
    top_level_metrics,
)
from tasks.common import EXIT_FAILED, EXIT_TRANSIENT, RESULT_ENV

Emit = Callable[[str], Any]
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# The flow's request to stop the stage command. Not SIGINT: DVC ignores SIGINT in its own
# process while a command runs (the terminal sends it to the command directly).
STOP_STAGE = signal.SIGUSR1
STAGE_GRACE_S = 5.0  # after SIGINT or SIGTERM, a stage that is still running is killed
ANSWER_AFTER_STOP_S = 30.0  # a stopped stage's answer comes within this, or the worker goes


class DvcWorker:
    """The flow's end: start the worker, send it requests, log its output, stop it.

    Entering returns once the worker holds DVC's lock (or raises ``DvcBusyError``);
    leaving lets it release the lock and exit, or stops it and its stage if interrupted.
    """

    def __init__(self, root: Path, emit: Emit):
        self.root, self.emit = root, emit  # emit: where output goes between stages
        self._process: subprocess.Popen | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""
        self._answer_so_far = b""
        self._pending = False  # a request was sent and its answer has not come yet

    def __enter__(self) -> DvcWorker:
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        self._process = subprocess.Popen(
            [sys.executable, "-m", "flows.dvc_worker", str(self.root), str(os.getpid())],
            cwd=self.root,
            env={**os.environ, "PATH": path, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: it and the stage stop together
        )
        try:
            self._answer(self.emit)  # "ready": it holds DVC's lock
        except BaseException:
            self.close(stop=True)
            raise
        return self

    def __exit__(self, kind: type | None, *_: Any) -> None:
        self.close(stop=kind is not None and not issubclass(kind, Exception))

    def snapshot(self) -> None:
        """Remember ``dvc.lock`` and the uncached outputs, for :meth:`roll_back`."""
        self._request({"op": "snapshot"}, self.emit)

    def roll_back(self) -> list[str]:
        """Stop the stage that runs, if any, then put ``dvc.lock`` and the outputs of every
        stage this worker reproduced back as they were at :meth:`snapshot`.

        A second Ctrl-C or SIGTERM meanwhile waits for it (it takes seconds, bounded).

        Returns:
            Outputs that could not be put back (no longer in the DVC cache), if any.

        Raises:
            RuntimeError: the worker did not answer (then it is stopped, and nothing is
                put back).
        """
        with _signals_deferred(self.emit):
            if self._pending:  # interrupted while waiting for a stage
                os.kill(self._process.pid, STOP_STAGE)
                self._answer(self.emit, timeout=ANSWER_AFTER_STOP_S, check=False)
            return self._request({"op": "rollback"}, self.emit)

    def pipeline(self) -> Pipeline:
        """The stage graph and every stage's status (:func:`flows.stages.read_pipeline`)."""
        return Pipeline.from_json(self._request({"op": "pipeline"}, self.emit))

    def reproduce(self, stage: str, emit: Emit) -> str:
        """Bring one stage up to date, as ``dvc repro --single-item <stage>`` does.

        Args:
            stage: the stage name.
            emit: called with each line DVC and the stage's command print.

        Returns:
            ``ran`` (its command ran), ``restored`` (from DVC's run cache) or ``cached``.

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
        """Put a stage's outputs back as ``dvc.lock`` records them (``dvc checkout --force``);
        RuntimeError if DVC cannot (e.g. the stage never succeeded here)."""
        self._request({"op": "checkout", "stage": stage}, self.emit)

    def save_experiment(self, name: str, message: str | None = None) -> str:
        """Record the workspace as a DVC experiment (``dvc exp save``); return its name.

        The untracked metrics and plots go in too, so that experiments compare. DVC picks
        the name when ``name`` is taken or not valid. ``dvc exp save`` opens a second
        ``Repo`` that takes DVC's lock itself, so the worker lets go of the lock first:
        this is the last request. RuntimeError if DVC cannot (e.g. no git commit).
        """
        return self._request({"op": "save", "name": name, "message": message}, self.emit)

    def close(self, stop: bool = False) -> None:
        """Let the worker release DVC's lock and exit; with ``stop``, stop it and its stage
        (SIGINT first: the stage's ``atomic_path`` blocks then remove their temporaries)."""
        process, self._process = self._process, None
        if process is None:
            return
        process.stdin.close()  # no more requests: once idle, it releases the lock and exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=0 if stop and self._pending else 60)
        for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 10), (signal.SIGKILL, None)):
            if process.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(process.pid, sig)
                process.wait(timeout=wait)
        process.stdout.close()
        process.stderr.close()

    def _request(self, request: dict[str, Any], emit: Emit) -> Any:
        self._process.stdin.write(json.dumps(request).encode() + b"\n")
        self._process.stdin.flush()
        self._pending = True
        return self._answer(emit)

    def _answer(self, emit: Emit, timeout: float | None = None, check: bool = True) -> Any:
        """Log the worker's output line by line until its answer comes; return its value.

        An interrupted wait can be resumed: what came of the answer so far is kept. With
        ``check=False`` a failure answer is returned, not raised.
        """
        answer_fd, log_fd = self._process.stdout.fileno(), self._process.stderr.fileno()
        deadline = None if timeout is None else time.monotonic() + timeout
        log_open = True
        while not self._answer_so_far.endswith(b"\n"):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            fds = [answer_fd, log_fd] if log_open else [answer_fd]
            ready = select.select(fds, [], [], left)[0]
            if not ready and left == 0.0:
                raise RuntimeError(f"the DVC worker did not answer within {timeout:.0f} s")
            if log_fd in ready:
                log_open = self._log(os.read(log_fd, 65536), emit)
            if answer_fd in ready:
                chunk = os.read(answer_fd, 65536)
                if not chunk:
                    code = self._process.wait()
                    raise RuntimeError(f"the DVC worker exited ({code}) without an answer")
                self._answer_so_far += chunk
        while log_open and select.select([log_fd], [], [], 0)[0]:  # printed before answering
            log_open = self._log(os.read(log_fd, 65536), emit)
        self._log(b"", emit, final=True)
        reply, self._answer_so_far, self._pending = json.loads(self._answer_so_far), b"", False
        if reply["ok"] or not check:
            return reply.get("value")
        raise (DvcBusyError if reply["kind"] == "busy" else RuntimeError)(reply["error"])

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


@contextlib.contextmanager
def _signals_deferred(emit: Emit) -> Iterator[None]:
    """SIGINT and SIGTERM wait for the block (the first one is already being handled)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    note = lambda signum, frame: emit("stopping: putting the workspace back first")  # noqa: E731
    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- the worker process ---------------------------------------------------------------------


class HeldLock(LockNoop):
    """DVC's repo lock, taken once and held until :meth:`release`, standing in for
    ``repo.lock``: DVC's own ``lock()``/``unlock()`` calls leave it held."""

    def __init__(self, real: LockBase):
        real.lock()  # dvc.lock.LockError after DVC's usual retries (about 3 s)
        super().__init__()
        self._lock, self.real = True, real

    def unlock(self) -> None:
        """Held until :meth:`release`."""

    def release(self) -> LockBase:
        """Let go of the lock for good; return DVC's own lock object."""
        self.real.unlock()
        return self.real


def serve(root: Path, parent: int) -> int:
    """The worker: answer the flow's requests until its stdin closes; return the exit code.

    Args:
        root: the project root.
        parent: the flow's PID; the worker exits if that process is already gone.
    """
    signal.signal(signal.SIGTERM, _stop_group)  # SIGTERM stops the stage command too...
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # ...and the flow's death sends it
    signal.signal(STOP_STAGE, _stop_stage)
    if os.getppid() != parent:  # the flow died before prctl
        return 1
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # what DVC and the stages print is log, not answers
    import logging

    from dvc.repo import Repo

    if not verbose():  # "Running stage", the command, "Updating lock file", `git add` hints
        logging.getLogger("dvc").setLevel(logging.WARNING)
    repo = Repo(str(root))
    try:
        repo.lock = held = HeldLock(repo.lock)
    except LockError:
        answers.write(json.dumps({"ok": False, "kind": "busy", "error": DVC_BUSY_MESSAGE}) + "\n")
        return 1
    answers.write('{"ok": true}\n')
    snapshot, touched = Snapshot(root, root / ".tlp" / "rollback"), set()

    def reproduce(stage: str, result: Path) -> dict[str, Any]:
        touched.add(stage)
        return _reproduce(repo, stage, result)

    with tempfile.TemporaryDirectory(prefix="tlp-stage-") as scratch:
        handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "pipeline": lambda _: read_pipeline(repo).to_json(),
            "snapshot": lambda _: snapshot.take(_uncached_outs(repo)),
            "reproduce": lambda r: reproduce(r["stage"], Path(scratch) / "result.json"),
            "checkout": lambda r: repo.checkout(targets=[r["stage"]], force=True) and None,
            "rollback": lambda _: snapshot.restore(repo, touched),
            "save": lambda r: _save(repo, held, r["name"], r.get("message")),
        }
        for line in sys.stdin:
            request = json.loads(line)
            try:
                answer = {"ok": True, "value": handlers[request["op"]](request)}
            except Exception as exc:  # noqa: BLE001 (sent to the flow, which raises it)
                kind = "busy" if isinstance(exc, LockError) else type(exc).__name__
                error = f"{DVC_BUSY_MESSAGE} ({_text(exc)})" if kind == "busy" else _text(exc)
                answer = {"ok": False, "kind": kind, "error": error}
            sys.stdout.flush()
            sys.stderr.flush()
            answers.write(json.dumps(answer) + "\n")
    snapshot.discard()
    if repo.lock is held:
        repo.lock = held.release()
    repo.close()
    return 0


def _uncached_outs(repo: Any) -> list[str]:
    """The outputs of the pipeline's stages that DVC does not cache (metrics, plots...)."""
    return [out.def_path for stage in repo.index.stages for out in stage.outs
            if not out.use_cache]  # fmt: skip


def _reproduce(repo: Any, stage: str, result_file: Path) -> dict[str, Any]:
    from dvc.exceptions import ReproductionError

    result_file.unlink(missing_ok=True)
    try:
        done = repo.reproduce(stage, single_item=True, run_env={RESULT_ENV: str(result_file)})
    except ReproductionError as exc:
        if isinstance(exc.__cause__, LockError):  # another DVC holds the stage's outputs
            raise exc.__cause__ from None
        own = json.loads(result_file.read_text()) if result_file.exists() else {}
        error = own.get("error") or _text(exc.__cause__ or exc)
        return {"outcome": "failed", "exit_code": own.get("exit_code", EXIT_FAILED), "error": error}
    if result_file.exists():  # the stage's command ran and wrote how it ended
        return {"outcome": "ran"}
    return {"outcome": "restored" if done else "cached"}


def _save(repo: Any, held: HeldLock, name: str, message: str | None) -> str:
    from dvc.exceptions import DvcException
    from dvc.scm import NoSCM

    if isinstance(repo.scm, NoSCM) or repo.scm.no_commits:
        raise ValueError("the project is not a git repo with a commit to attach it to")
    outs = [out for stage in repo.index.stages for out in stage.outs]
    shown = top_level_metrics(Path(repo.root_dir))
    include = [o.def_path for o in outs if (o.metric or o.plot or o.def_path in shown)
               and not o.use_cache and o.exists]  # fmt: skip
    repo.lock = held.release()  # exp save's own Repo takes the lock itself
    try:
        rev = repo.experiments.save(name=name, include_untracked=include, message=message)
    except DvcException:  # the name is taken or not a valid git ref: let DVC pick one
        rev = repo.experiments.save(include_untracked=include, message=message)
    return repo.experiments.get_exact_name([rev])[rev] or rev[:7]


def _text(exc: BaseException) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # DVC colours its links even in pipes


def _stop_stage(signum: int, frame: Any) -> None:
    """SIGINT to the stage command (its ``atomic_path`` blocks clean up), SIGKILL after a grace."""
    import psutil

    stage = psutil.Process().children(recursive=True)
    for process in stage:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGINT)

    def kill() -> None:  # no waiting here: DVC itself must reap its command, for its status
        for process in stage:
            with contextlib.suppress(psutil.Error):
                process.kill()

    timer = threading.Timer(STAGE_GRACE_S, kill)
    timer.daemon = True
    timer.start()


def _stop_group(signum: int, frame: Any) -> None:
    """SIGTERM to the stage command, SIGKILL to what is left of it after a grace; then exit.

    Also what the flow's death sends (``PR_SET_PDEATHSIG``): nobody else is left then to make
    sure the stage goes, and a command may not stop on SIGTERM (a TensorFlow process can
    hang on its way out), so this process waits for it, a bounded time, before it goes too.
    """
    import psutil

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stage = psutil.Process().children(recursive=True)
    os.killpg(0, signal.SIGTERM)  # the stage command: it is in this process group
    deadline = time.monotonic() + STAGE_GRACE_S
    while any(map(_running, stage)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if any(map(_running, stage)):
        os.killpg(0, signal.SIGKILL)  # the rest of the stage, and this process
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _running(process: Any) -> bool:
    """Whether a ``psutil.Process`` still runs: an exited one waiting to be reaped does not."""
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:  # gone (or reused: not ours any more)
        return False


if __name__ == "__main__":
    raise SystemExit(serve(Path(sys.argv[1]), int(sys.argv[2])))
