"""Test helpers: a real Prefect server (``tlp server``: 127.0.0.1, SQLite) and its REST API.

One server and one pipeline project, built by one ``tlp run``, are shared by every test
module of the session (tests/test_flow.py, test_dashboard.py, test_cli.py): a full run
costs about a minute here, so it is made once, lazily, by whichever test needs it first.
Every wait is bounded; every process started here is stopped at the end of the session.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SHRUNK, make_project, run

STAGES = [  # dvc.yaml's order; the tests that count or list stages import this
    "fetch",
    "prepare",
    "backbone",
    "train",
    "train_other",
    "evaluate",
    "export_other",
    "export",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def stop_process(process: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it started."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGINT)  # Prefect shuts down cleanly on Ctrl-C
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout)
        except ProcessLookupError:
            pass


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, read from /proc (deepest last)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def reaped(pid: int) -> bool:
    """Whether ``pid`` has exited (and, if it became our child, has been reaped)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child: gone, or another's
        return not Path(f"/proc/{pid}").exists()
    return done == pid


def wait_gone(pids: list[int], timeout: float, what: str) -> None:
    """Wait until every one of ``pids`` has exited (:func:`reaped`); fail after ``timeout``
    seconds, naming the state and command line of each one still there."""
    try:
        wait_for(lambda: all(reaped(pid) for pid in pids), timeout, what)
    except AssertionError as exc:
        import psutil

        left = {}
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                left[pid] = f"[{process.status()}] {' '.join(process.cmdline())}"
        raise AssertionError(f"{exc}; still there: {left}") from None


def spawn(
    cmd: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start a long-running command in its own process group, output to ``log``."""
    full_env = {**os.environ, "PYTHONPATH": str(cwd), **(env or {})}
    bin_dir = str(Path(sys.executable).parent)
    full_env["PATH"] = f"{bin_dir}{os.pathsep}{full_env.get('PATH', '')}"
    with log.open("w") as handle:
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@dataclass
class PrefectServer:
    """A running ``tlp server`` and a small client for its REST API.

    Every request carries the project's API secret (``auth``, from ``.tlp/api-auth``).
    """

    url: str
    process: subprocess.Popen
    log: Path
    auth: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        """The ``Authorization`` header Prefect's basic auth expects (none without ``auth``)."""
        if self.auth is None:
            return {}
        return {"Authorization": f"Basic {base64.b64encode(self.auth.encode()).decode()}"}

    @property
    def api(self) -> str:
        """The API base URL (``PREFECT_API_URL``)."""
        return f"{self.url}/api"

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """POST to the API and return the decoded JSON."""
        response = httpx.post(
            f"{self.api}{path}", json=body or {}, headers=self.headers, timeout=30
        )
        response.raise_for_status()
        return response.json()

    def get(self, path: str) -> Any:
        """GET from the API and return the decoded JSON."""
        response = httpx.get(f"{self.api}{path}", headers=self.headers, timeout=30)
        response.raise_for_status()
        return response.json()

    def flow_run(self, flow_run_id: str) -> dict[str, Any]:
        """One flow run."""
        return self.get(f"/flow_runs/{flow_run_id}")

    def task_runs(self, flow_run_id: str) -> list[dict[str, Any]]:
        """The flow run's task runs, in the order they started."""
        runs = self.post(
            "/task_runs/filter",
            {"flow_runs": {"id": {"any_": [flow_run_id]}}, "sort": "EXPECTED_START_TIME_ASC"},
        )
        return sorted(runs, key=lambda r: r["start_time"] or r["expected_start_time"] or "")

    def artifacts(self, flow_run_id: str) -> dict[str, dict[str, Any]]:
        """The flow run's artifacts, by key."""
        found = self.post(
            "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
        )
        return {a["key"]: a for a in found if a.get("key")}

    def logs(self, flow_run_id: str, task_run_id: str | None = None) -> list[str]:
        """The messages logged in a flow run (or one of its task runs), oldest first."""
        body: dict[str, Any] = {
            "logs": {"flow_run_id": {"any_": [flow_run_id]}},
            "sort": "TIMESTAMP_ASC",
            "limit": 200,
        }
        if task_run_id:
            body["logs"]["task_run_id"] = {"any_": [task_run_id]}
        messages: list[str] = []
        while True:
            page = self.post("/logs/filter", {**body, "offset": len(messages)})
            messages += [entry["message"] for entry in page]
            if len(page) < body["limit"]:
                return messages


def start_server(project: Path, log: Path, timeout: float = 240) -> PrefectServer:
    """Start ``tlp server`` in ``project`` on a free port; wait until its API answers."""
    port = free_port()
    process = spawn(
        [sys.executable, "-m", "flows.cli", "server", "--port", str(port)],
        project,
        log,
        env={"PREFECT_HOME": str(project / ".tlp" / "prefect"), "PREFECT_API_URL": ""},
    )
    server = PrefectServer(f"http://127.0.0.1:{port}", process, log)

    def healthy() -> bool:
        if process.poll() is not None:
            raise AssertionError(
                f"tlp server exited {process.returncode}:\n{log.read_text()[-4000:]}"
            )
        try:
            return httpx.get(f"{server.api}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, timeout, "the Prefect server to answer", interval=1)
    server.auth = (project / ".tlp" / "api-auth").read_text().strip()  # made before it started
    return server


def tlp(
    project: Path, *args: str, api: str | None, check: bool = True, timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run ``tlp <args>`` in ``project``; ``api=None`` lets tlp find the running server itself."""
    env = {"PREFECT_API_URL": api or "", "PREFECT_HOME": str(project / ".tlp" / "prefect")}
    return run(
        [sys.executable, "-m", "flows.cli", *args], project, check=check, env=env, timeout=timeout
    )


def flow_run_id(output: str) -> str:
    """The flow run id that ``tlp run`` prints at the end."""
    found = re.findall(r"tlp: flow run ([0-9a-f-]{36}) ", output)
    assert found, f"no flow run id in the output of tlp run:\n{output[-3000:]}"
    return found[-1]


def experiments(project: Path) -> dict[str, dict[str, Any]]:
    """``dvc exp show --json``: each saved experiment's params and metrics, by name."""
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    found: dict[str, dict[str, Any]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if (
                node.get("name")
                and isinstance(node.get("data"), dict)
                and node.get("rev") != "workspace"
            ):
                data = node["data"]
                if data.get("metrics"):
                    found[node["name"]] = {
                        "params": data.get("params", {}).get("params.yaml", {}).get("data", {}),
                        "metrics": {p: m.get("data", {}) for p, m in data["metrics"].items()},
                    }
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(shown)
    return found


@dataclass
class SharedPipeline:
    """The session's pipeline project, its ``tlp server``, and its first ``tlp run``."""

    project: Path
    server: PrefectServer
    first_run_id: str
    first_run_output: str


_SHARED: dict[str, Any] = {}


def shared_pipeline(
    config: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> SharedPipeline:
    """The session's shared project and server, started and built on first use."""
    if "pipeline" in _SHARED:
        return _SHARED["pipeline"]
    if "error" in _SHARED:
        pytest.fail(f"the shared pipeline could not be built: {_SHARED['error']}")
    base = tmp_path_factory.mktemp("flow")
    project = make_project(base / "project", SHRUNK)
    server = start_server(project, base / "server.log")
    config.add_cleanup(lambda: stop_process(server.process))
    try:
        first = tlp(project, "run", api=None)  # finds the running server through .tlp/server.json
    except AssertionError as exc:
        _SHARED["error"] = str(exc)[:4000]
        raise
    output = first.stdout + first.stderr
    _SHARED["pipeline"] = SharedPipeline(project, server, flow_run_id(output), output)
    return _SHARED["pipeline"]
