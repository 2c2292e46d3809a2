"""``tlp run`` that fails or is stopped leaves the workspace as it was before the run.

Real runs of the shrunken pipeline, on a copy of the session's built project, with the
temporary Prefect server ``tlp run`` starts itself (no ``tlp server``): a run that fails
at ``backbone`` after ``prepare`` ran on new params, and ``tlp run`` stopped by SIGINT (a
Ctrl-C, sent to its process group as a terminal does) or SIGTERM (to the process alone)
while the train stage runs. Kills happen on an event (the train stage's pause marker,
tests/faults.py), never after a sleep.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run
from tests.faults import pause_train_after_first_batch
from tests.prefect_server import descendants, spawn, wait_for, wait_gone

pytestmark = pytest.mark.slow

OUTPUTS = ("data/raw", "data/prepared", "models", "metrics", "plots", "dvclive")
EXIT_WITHIN_S = 10  # the guarantee: a stopped `tlp run` is gone this soon after the signal


@pytest.fixture
def project(built_project: Path, tmp_path: Path) -> Path:
    """A copy of the session's built project (every stage up to date, no Prefect state)."""
    copy = tmp_path / "project"
    shutil.copytree(built_project, copy, symlinks=True)
    shutil.rmtree(copy / ".tlp" / "prefect", ignore_errors=True)
    assert clean_status(copy)
    return copy


def clean_status(project: Path) -> bool:
    """`dvc status`: nothing to reproduce."""
    return json.loads(run(["dvc", "status", "--json"], project).stdout) == {}


def workspace_state(project: Path) -> dict[str, str]:
    """params.yaml, dvc.lock and every output file, by path: a sha256 of each."""
    files = [project / "params.yaml", project / "dvc.lock"]
    for name in OUTPUTS:
        files += sorted(p for p in (project / name).rglob("*") if p.is_file())
    return {str(p.relative_to(project)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def tlp_env(project: Path, **extra: str) -> dict[str, str]:
    """No `tlp server`, no PREFECT_API_URL: `tlp run` starts its temporary server."""
    return {"PREFECT_API_URL": "", "PREFECT_HOME": str(project / ".tlp" / "prefect"), **extra}


def closed_port() -> int:
    """A port on 127.0.0.1 that refuses connections."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_run_failing_at_backbone_leaves_params_outputs_and_dvc_status_as_before(
    project: Path, tmp_path: Path
):
    before = workspace_state(project)
    # New prepare params, then a backbone whose ImageNet weights cannot be downloaded: an
    # HTTPS proxy that refuses connections stands for "no network", whatever the machine.
    refused = f"http://127.0.0.1:{closed_port()}"
    env = tlp_env(project, https_proxy=refused, HTTPS_PROXY=refused,
                  NO_PROXY="127.0.0.1,localhost", KERAS_HOME=str(tmp_path / "keras"))  # fmt: skip
    overrides = ["-S", "prepare.image_size=[32, 32]", "-S", "backbone.arch=mobilenet_v2",
                 "-S", "backbone.weights=imagenet", "-S", "train.pooling=avg"]  # fmt: skip
    command = [sys.executable, "-m", "flows.cli", "run", *overrides]

    failed = run(command, project, check=False, env=env, timeout=900)

    output = failed.stdout + failed.stderr
    assert failed.returncode == 1, output[-4000:]
    assert output.count("could not download the imagenet weights of mobilenet_v2") == 1, output
    assert "ERROR: stage backbone failed: could not download" in failed.stderr
    assert "Traceback" not in output  # quiet: the error, once, without Prefect's tracebacks
    assert workspace_state(project) == before  # params.yaml, dvc.lock, data/prepared...
    assert clean_status(project)

    # What the failed run computed stays in DVC's cache: the same params again restore
    # prepare's output from DVC's run cache instead of running it.
    again = run(command, project, check=False, env=env, timeout=900)
    assert again.returncode == 1
    assert "[2/8] prepare: restored in " in again.stdout + again.stderr
    assert workspace_state(project) == before


@pytest.mark.parametrize(
    ("sig", "to_group"),
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["ctrl-c-to-the-process-group", "sigterm-to-tlp-run"],
)
def test_a_stopped_run_exits_at_once_leaves_no_process_and_the_workspace_as_before(
    project: Path, tmp_path: Path, sig: signal.Signals, to_group: bool
):
    before = workspace_state(project)
    # Orphans become our children, so we can reap them and see they are gone.
    ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
    hook, paused = pause_train_after_first_batch(tmp_path / "hook", project)
    log = tmp_path / "tlp-run.log"
    command = [sys.executable, "-m", "flows.cli", "run", "-S", "train.epochs=4"]
    process = spawn(command, project, log, env=tlp_env(project, **hook))
    try:
        wait_for(paused.exists, 600, "the train stage to pause after its first batch")
        below = descendants(process.pid)  # the server, the DVC worker, the stage command
        started = time.monotonic()
        if to_group:  # a Ctrl-C in the terminal reaches the whole foreground group
            os.killpg(process.pid, sig)
        else:
            os.kill(process.pid, sig)
        code = process.wait(timeout=120)
        took = time.monotonic() - started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
    output = log.read_text()
    print(f"tlp run exited {code}, {took:.1f} s after {sig.name}")  # shown with pytest -rP
    assert code == 128 + sig, output[-4000:]
    assert took <= EXIT_WITHIN_S, (took, output[-3000:])
    assert f"stopped by {sig.name}" in output
    commands = [Path(f"/proc/{pid}/cmdline") for pid in below]
    assert len(below) >= 3, commands  # there was a server, a worker and a stage to stop
    wait_gone(below, 30, "every process of the run to exit")
    assert workspace_state(project) == before
    assert clean_status(project)
    assert "Traceback" not in output
