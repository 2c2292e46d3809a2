"""The temporary Prefect server of one ``tlp run``, started and stopped by tlp itself.

Without an API URL, Prefect would start its own temporary ("ephemeral") server as a child
in the run's process group. A Ctrl-C in the terminal then stops that server too, while the
flow still has states and logs to report (it retried ``Connection refused`` for minutes),
and a SIGTERM or SIGKILL to ``tlp run`` left it running, orphaned. This module runs the same
server command, but in its own session (a Ctrl-C in the terminal does not reach it), tied to
``tlp run`` by ``PR_SET_PDEATHSIG`` (it stops when ``tlp run`` dies, even killed), and stops
it only after Prefect has sent its last logs and events (at interpreter exit, after Prefect's
own services drained, as Prefect does for its own server).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from flows.locking import tlp_dir

LOG_FILE = "temporary-server.log"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STOP_TIMEOUT_S = 10


class ServerStartError(RuntimeError):
    """The temporary server did not answer in time, or exited."""


def start_temporary_server(root: Path) -> str:
    """Start the server on a free port of 127.0.0.1; return its API URL once it answers.

    It is stopped at interpreter exit (or when this process dies). Its output goes to
    ``.tlp/temporary-server.log``.

    Raises:
        ServerStartError: it exited, or did not answer within
            ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` (default 120).
    """
    port = _free_port()
    log_path = tlp_dir(root) / LOG_FILE
    # What Prefect's own temporary server runs (prefect.server.api.server.SubprocessASGIServer).
    command = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
               "--lifespan", "on"]  # fmt: skip
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1"}  # fmt: skip
    parent = os.getpid()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal is for tlp run, not for it
            preexec_fn=lambda: _die_with(parent),
        )
    atexit.register(stop, process)
    api = f"http://127.0.0.1:{port}/api"
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 120))
    deadline = time.monotonic() + timeout
    while not _answers(api):
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise ServerStartError(f"the temporary Prefect server exited ({process.returncode}):"
                                   f"\n{tail}")  # fmt: skip
        if time.monotonic() > deadline:
            stop(process)
            raise ServerStartError(
                f"the temporary Prefect server did not answer within {timeout:.0f} s (raise "
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or start `tlp server` in "
                f"another terminal); its log: {log_path}"
            )
        time.sleep(0.2)
    return api


def stop(process: subprocess.Popen) -> None:
    """Stop the server and whatever it started: SIGTERM, then SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, None)):
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(process.pid, sig)
            process.wait(timeout=wait)


def _die_with(parent: int) -> None:
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # tlp run died before prctl
        os._exit(1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(api: str) -> bool:
    """Whether the server answers at all (a 401 of a server with basic auth counts)."""
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False
