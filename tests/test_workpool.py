"""A sweep on a Prefect work pool: two workers, each in its own clone, one DVC remote.

A real Prefect server (``tlp server``), a real process work pool, ``prefect deploy --all``
from prefect.yaml, and two ``prefect worker start`` processes, each in its own git clone of
the project (as on two machines). ``tlp sweep --deployment`` sends every run to the pool;
whichever worker is free runs it and pushes the experiment (git refs to ``origin``, outputs
to the DVC remote, a local folder here). A fresh clone then gets a finished run's model
with ``dvc exp pull`` + ``dvc pull``, and ``dvc repro`` runs nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import SHRUNK, make_project, run
from tests.prefect_server import spawn, start_server, stop_process, tlp

pytestmark = pytest.mark.slow


def experiments_in(clone: Path) -> set[str]:
    """The DVC experiments saved in a clone (``dvc exp ls``: one name per line)."""
    listed = run([sys.executable, "-m", "dvc", "exp", "ls", "--name-only"], clone).stdout
    return set(listed.split())


def test_two_workers_run_a_sweep_and_a_fresh_clone_pulls_a_result(tmp_path):
    origin = make_project(tmp_path / "origin", SHRUNK)
    run(["dvc", "remote", "add", "--default", "store", str(tmp_path / "remote")], origin)
    run(["git", "commit", "-qam", "the DVC remote"], origin)
    server = start_server(origin, tmp_path / "server.log")
    env = {"PREFECT_API_URL": server.api, "PREFECT_API_AUTH_STRING": server.auth}
    prefect = [sys.executable, "-m", "prefect"]
    workers, clones = [], []
    try:
        home = {"PREFECT_HOME": str(origin / ".tlp" / "prefect")}
        run([*prefect, "work-pool", "create", "tlp", "--type", "process"], origin,
            env={**env, **home})  # fmt: skip
        run([*prefect, "deploy", "--all"], origin, env={**env, **home})  # both, from prefect.yaml
        for name in ("worker-1", "worker-2"):
            clone = tmp_path / name
            run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
            clones.append(clone)
            command = [*prefect, "worker", "start", "--pool", "tlp", "--work-queue", "default",
                       "--limit", "1", "--name", name]  # fmt: skip
            worker_env = {**env, "TLP_PROJECT_DIR": str(clone),
                          "PREFECT_HOME": str(tmp_path / f"{name}-home")}  # fmt: skip
            workers.append(spawn(command, clone, tmp_path / f"{name}.log", env=worker_env))
        done = tlp(origin, "sweep", "-S", "train.learning_rate=0.001,0.003",
                   "--deployment", "tlp-pipeline/tlp-pipeline", "--parallel", "2",
                   api=server.api, timeout=1200)  # fmt: skip
        sweep_deployment = server.get("/deployments/name/tlp-sweep/tlp-sweep")
    finally:
        for worker in workers:
            stop_process(worker)
        stop_process(server.process)
    logs = "\n".join((tmp_path / f"{n}.log").read_text()[-2000:] for n in ("worker-1", "worker-2"))
    assert sweep_deployment["work_queue_name"] == "sweeps"

    # Each run ran on exactly one of the workers, which pushed it into the project's git.
    ran_on = [experiments_in(clone) for clone in clones]
    assert not ran_on[0] & ran_on[1]
    everything = ran_on[0] | ran_on[1]
    assert len(everything) == 2 and experiments_in(origin) == everything, logs

    # A fresh clone: the best run's model from the DVC remote, and nothing to reproduce.
    lines = done.stdout[done.stdout.index("rank  experiment") :].splitlines()
    best = lines[1].split()[1]
    assert best in everything
    fresh = tmp_path / "fresh"
    run(["git", "clone", "-q", str(origin), str(fresh)], tmp_path)
    run([sys.executable, "-m", "dvc", "exp", "pull", "origin", best], fresh)
    run([sys.executable, "-m", "dvc", "exp", "apply", best], fresh)
    run([sys.executable, "-m", "dvc", "pull"], fresh)
    assert (fresh / "models" / "model.onnx").stat().st_size > 0
    assert json.loads(run(["dvc", "status", "--json"], fresh).stdout) == {}
    before = (fresh / "dvc.lock").read_text(), (fresh / "models" / "model.onnx").stat().st_mtime_ns
    run(["dvc", "repro"], fresh)  # nothing to run: the lock file and the model stay as pulled
    assert (
        (fresh / "dvc.lock").read_text(),
        (fresh / "models" / "model.onnx").stat().st_mtime_ns,
    ) == before
