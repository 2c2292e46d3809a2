"""The flow's DVC worker against a real DVC repo with one small stage (no Prefect, no TensorFlow).

The stage is a ``tasks.common.run_stage`` body whose behaviour ``params.yaml`` picks: write
its output, fail, fail transiently, crash, or wait for the test to let it finish.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import yaml

from flows.dvc_worker import DvcWorker
from flows.stages import DvcBusyError, StageFailedError, TransientStageError
from tests.conftest import ROOT, run
from tests.prefect_server import descendants, reaped, wait_for

STAGE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from tasks.common import StageError, TransientError, run_stage
    from tasks.params import read_yaml

    def body():
        how = read_yaml("params.yaml")["toy"]["how"]
        print(f"toy says {how}")
        if how == "transient":
            raise TransientError("the server kept failing; try again later")
        if how == "error":
            raise StageError("bad input; fix it")
        if how == "crash":
            raise RuntimeError("a bug")
        if how == "wait":
            Path("started").touch()
            for _ in range(1200):  # at most two minutes
                if Path("go").exists():
                    break
                time.sleep(0.1)
        Path("out.txt").write_text(how)

    sys.exit(run_stage("toy", body))
    """
)


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git + DVC repo whose one stage, ``toy``, does what ``toy.how`` says."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the worker and the stage import tasks/flows
    (tmp_path / "toy.py").write_text(STAGE)
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  toy:\n    cmd: python toy.py\n    deps: [toy.py]\n"
        "    params: [toy]\n    outs: [out.txt]\n"
    )
    set_how(tmp_path, "ok")
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "test@example.com"],
        ["git", "config", "user.name", "test"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.analytics", "false"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "init"],
    ):
        run(cmd, tmp_path)
    return tmp_path


def set_how(project: Path, how: str) -> None:
    """Choose what the toy stage does on its next run."""
    (project / "params.yaml").write_text(yaml.safe_dump({"toy": {"how": how}}))


def test_outcomes_and_failures_are_typed_and_the_stage_output_is_streamed(toy):
    lines: list[str] = []
    with DvcWorker(toy, emit=lines.append) as dvc:
        assert dvc.pipeline().names == ["toy"]
        assert dvc.reproduce("toy", emit=lines.append) == "ran"
        assert "toy says ok" in lines  # the command's own output, line by line
        assert dvc.reproduce("toy", emit=lines.append) == "cached"
        set_how(toy, "again")
        assert dvc.reproduce("toy", emit=lines.append) == "ran"
        set_how(toy, "ok")
        assert dvc.reproduce("toy", emit=lines.append) == "restored"  # DVC's run cache
        assert (toy / "out.txt").read_text() == "ok"

        set_how(toy, "transient")  # exit 75
        with pytest.raises(TransientStageError, match="kept failing; try again later"):
            dvc.reproduce("toy", emit=lines.append)
        set_how(toy, "error")  # exit 1
        with pytest.raises(StageFailedError, match="stage toy failed: bad input; fix it") as err:
            dvc.reproduce("toy", emit=lines.append)
        assert type(err.value) is StageFailedError
        set_how(toy, "crash")
        with pytest.raises(StageFailedError, match="RuntimeError: a bug"):
            dvc.reproduce("toy", emit=lines.append)

        assert not (toy / "out.txt").exists()  # DVC removed it before running the stage
        dvc.checkout("toy")
        assert (toy / "out.txt").read_text() == "ok"  # as dvc.lock records it
    assert yaml.safe_load((toy / "dvc.lock").read_text())["stages"]["toy"]["params"] == {
        "params.yaml": {"toy": {"how": "ok"}}
    }


def test_dvc_repro_by_hand_is_refused_while_a_stage_command_runs(toy):
    set_how(toy, "wait")
    done: list[str] = []
    with DvcWorker(toy, emit=lambda line: None) as dvc:
        runner = threading.Thread(target=lambda: done.append(dvc.reproduce("toy", print)))
        runner.start()
        try:
            wait_for(lambda: (toy / "started").exists(), 120, "the stage command to start")
            # DVC itself lets go of its repo lock while a command runs; the worker does not.
            by_hand = run(["dvc", "repro"], toy, check=False, timeout=120)
        finally:
            (toy / "go").touch()
            runner.join(timeout=120)
        assert done == ["ran"]
        assert by_hand.returncode != 0
        assert "Unable to acquire lock" in by_hand.stderr  # DVC's own error
    assert run(["dvc", "status", "--json"], toy).stdout.strip() == "{}"


def test_a_worker_cannot_start_while_another_dvc_process_holds_the_lock(toy):
    from dvc.repo import Repo

    with Repo(str(toy)) as repo, repo.lock, pytest.raises(DvcBusyError, match="held by another"):
        DvcWorker(toy, emit=print).__enter__()


def test_the_worker_and_the_stage_command_die_with_the_flow(toy):
    set_how(toy, "wait")
    flow = subprocess.Popen(  # a stand-in for `tlp run`: it reproduces the stage, then hangs
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from flows.dvc_worker import DvcWorker\n"
            "with DvcWorker(Path(sys.argv[1]), print) as dvc: dvc.reproduce('toy', print)",
            str(toy),
        ],
        cwd=toy,
        env={
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        },
    )
    try:
        wait_for(lambda: (toy / "started").exists(), 120, "the stage command to start")
        below = descendants(flow.pid)  # the worker, the shell, the stage command
    finally:
        os.kill(flow.pid, signal.SIGKILL)
        flow.wait(timeout=60)
    assert len(below) >= 2, below
    wait_for(lambda: all(reaped(pid) for pid in below), 60, "the worker and the stage to exit")
    assert not (toy / "out.txt").exists()  # the stage never finished
