"""Every Prefect server the project starts answers only to the project's secret.

The secret lives in ``.tlp/api-auth`` (0600); ``tlp`` uses it by itself (flows/auth.py).
A request without it gets 401, whatever it asks: reading runs, starting a deployment's run
(what another local user did with ``fetch.source`` set to a folder they could not read),
or emitting events over a websocket. ``tlp server``'s dashboard and the temporary server
inside a ``tlp run`` are both checked, against real servers.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import sys
import threading
import uuid
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from flows.auth import AUTH_FILE, AuthFileError, project_auth
from flows.cli import SERVER_FILE, prefect_environment
from tests.conftest import SHRUNK, make_project
from tests.faults import pause_train_after_first_batch
from tests.prefect_server import descendants, spawn, start_server, stop_process, wait_for

PREFECT_SETTINGS = (
    "PREFECT_HOME",
    "PREFECT_API_URL",
    "PREFECT_API_AUTH_STRING",
    "PREFECT_SERVER_API_AUTH_STRING",
    "PREFECT_SERVER_ANALYTICS_ENABLED",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
)


def basic(secret: str) -> dict[str, str]:
    """The header Prefect's basic auth checks: ``Basic`` and the secret in base64."""
    return {"Authorization": f"Basic {base64.b64encode(secret.encode()).decode()}"}


def private(path: Path) -> bool:
    """No permission bit for the group or for other users."""
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def status_codes(api: str, headers: dict[str, str]) -> dict[str, int]:
    """What the API answers to a reader and to someone starting a run, given ``headers``."""
    some_id = uuid.uuid4()
    requests = {
        "list flow runs": ("POST", "/flow_runs/filter", {}),
        "list deployments": ("POST", "/deployments/filter", {}),
        "read a flow run": ("GET", f"/flow_runs/{some_id}", None),
        "start a deployment's run": (
            "POST",
            f"/deployments/{some_id}/create_flow_run",
            {"parameters": {"overrides": {"fetch.source": "/home/someone/private"}}},
        ),
        "create a flow": ("POST", "/flows/", {"name": "intruder"}),
    }
    return {
        what: httpx.request(
            method, f"{api}{path}", json=body, headers=headers, timeout=30
        ).status_code
        for what, (method, path, body) in requests.items()
    }


def websocket_answer(api: str, token: str | None) -> str:
    """``auth_success``, or the close code the events websocket answers a token with."""
    url = api.replace("http://", "ws://") + "/events/in"
    try:
        with connect(url, subprotocols=["prefect"], open_timeout=30) as socket:
            socket.send(json.dumps({"type": "auth", "token": token}))
            return json.loads(socket.recv(timeout=30))["type"]
    except ConnectionClosed as closed:
        return f"closed {closed.rcvd.code if closed.rcvd else '?'}"


def test_the_secret_is_made_once_private_and_refused_when_others_could_read_it(tmp_path):
    secrets: list[str] = []
    barrier = threading.Barrier(4)

    def first_use() -> None:
        barrier.wait()
        secrets.append(project_auth(tmp_path))

    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    path = tmp_path / ".tlp" / AUTH_FILE
    assert len(secrets) == 4 and len(set(secrets)) == 1  # concurrent first uses agree
    assert secrets[0].startswith("tlp:") and len(secrets[0]) > 40
    assert private(path) and path.read_text().strip() == secrets[0]
    assert sorted(p.name for p in path.parent.iterdir()) == [".gitignore", AUTH_FILE]  # no temps

    path.chmod(0o644)
    with pytest.raises(AuthFileError, match="not private to you .* chmod 600"):
        project_auth(tmp_path)
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(AuthFileError, match="cannot read the API secret"):
        project_auth(tmp_path)


def test_the_secret_goes_to_the_projects_own_servers_only(tmp_path, monkeypatch):
    for name in PREFECT_SETTINGS:
        monkeypatch.delenv(name, raising=False)

    assert prefect_environment(tmp_path) is None  # the temporary server: protected, and used
    secret = (tmp_path / ".tlp" / AUTH_FILE).read_text().strip()
    assert os.environ["PREFECT_SERVER_API_AUTH_STRING"] == secret
    assert os.environ["PREFECT_API_AUTH_STRING"] == secret
    assert private(tmp_path / ".tlp" / "prefect")  # its database holds params and logs

    for name in PREFECT_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # a server you chose
    assert prefect_environment(tmp_path) == "http://127.0.0.1:9/api"
    assert "PREFECT_API_AUTH_STRING" not in os.environ

    # A server record whose `tlp server` is gone is not the project's server any more.
    (tmp_path / ".tlp" / SERVER_FILE).write_text(
        json.dumps({"api": "http://127.0.0.1:9/api", "pid": 2**22 + 1})
    )
    assert prefect_environment(tmp_path) == "http://127.0.0.1:9/api"
    assert "PREFECT_API_AUTH_STRING" not in os.environ


@pytest.mark.slow
def test_tlp_server_answers_only_to_the_projects_secret(tmp_path):
    project = make_project(tmp_path / "project")
    server = start_server(project, tmp_path / "server.log")
    try:
        secret = (project / ".tlp" / AUTH_FILE).read_text().strip()
        assert private(project / ".tlp" / AUTH_FILE) and private(project / ".tlp" / "prefect")
        assert secret not in (tmp_path / "server.log").read_text()

        refused = status_codes(server.api, {})
        assert set(refused.values()) == {401}, refused
        wrong = status_codes(server.api, basic("tlp:guessed"))
        assert set(wrong.values()) == {401}, wrong
        flows = httpx.post(f"{server.api}/flows/filter", json={}, headers=basic(secret), timeout=30)
        assert flows.status_code == 200 and flows.json() == []  # nothing got in
        allowed = status_codes(server.api, basic(secret))
        assert allowed["list flow runs"] == allowed["list deployments"] == 200, allowed
        assert allowed["start a deployment's run"] == 404  # past auth: no such deployment
        assert httpx.get(f"{server.api}/health", timeout=30).status_code == 200  # for probes

        assert websocket_answer(server.api, None) == "closed 1008"
        assert websocket_answer(server.api, "tlp:guessed") == "closed 1008"
        assert websocket_answer(server.api, secret) == "auth_success"

        settings = httpx.get(f"{server.url}/ui-settings", timeout=30).json()
        assert settings["auth"] == "BASIC"  # the dashboard asks for the secret on its login page
    finally:
        stop_process(server.process)


@pytest.mark.slow
def test_tlp_run_protects_its_temporary_server_and_still_completes(tmp_path):
    project = make_project(tmp_path / "project", SHRUNK)
    release = tmp_path / "release"
    hook, paused = pause_train_after_first_batch(tmp_path / "hook", project, release)
    env = {"PREFECT_API_URL": "", "PREFECT_HOME": str(project / ".tlp" / "prefect"), **hook}
    log = tmp_path / "run.log"
    process = spawn([sys.executable, "-m", "flows.cli", "run"], project, log, env=env)
    try:
        wait_for(paused.exists, 600, "the train stage to pause after its first batch")
        commands = {pid: _command_line(pid) for pid in descendants(process.pid)}
        servers = [argv for argv in commands.values() if "uvicorn" in argv]
        assert len(servers) == 1, commands  # Prefect's temporary server, a child of the run
        api = f"http://127.0.0.1:{servers[0][servers[0].index('--port') + 1]}/api"
        secret = (project / ".tlp" / AUTH_FILE).read_text().strip()

        refused = status_codes(api, {})
        assert set(refused.values()) == {401}, refused
        runs = httpx.post(f"{api}/flow_runs/filter", json={}, headers=basic(secret), timeout=30)
        assert [run["state"]["type"] for run in runs.json()] == ["RUNNING"]  # this very run
        assert websocket_answer(api, None) == "closed 1008"
        assert not [argv for argv in commands.values() if secret in " ".join(argv)]  # not in `ps`

        release.touch()
        assert process.wait(timeout=900) == 0, log.read_text()[-4000:]
    finally:
        release.touch()
        stop_process(process)
    output = log.read_text()
    assert "tlp: flow run" in output and "Completed" in output
    assert secret not in output


def _command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:  # it exited meanwhile
        return []
