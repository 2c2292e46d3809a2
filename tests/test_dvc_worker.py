"""The flow's DVC worker against a real DVC repo with one small stage (no Prefect, no TensorFlow).

The stage is a ``tasks.common.run_stage`` body whose behaviour ``params.yaml`` picks: write
its output, fail, fail transiently, crash, or wait for the test to let it finish (also
ignoring SIGTERM meanwhile).
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
from tests.prefect_server import descendants, reaped, wait_for, wait_gone

STAGE = textwrap.dedent(
    """
    import signal, sys, time
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
        if how == "stubborn":  # as a process that hangs on its way out
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if how in ("wait", "stubborn"):
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


@pytest.mark.parametrize("how", ["wait", "stubborn"], ids=["stage", "stage-ignoring-sigterm"])
def test_the_worker_and_the_stage_command_die_with_the_flow(toy, how):
    set_how(toy, how)
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
    # A stage that ignores SIGTERM gets SIGKILL after the worker's grace (5 s), well within.
    wait_gone(below, 60, "the worker and the stage to exit")
    assert not (toy / "out.txt").exists()  # the stage never finished


# -- putting the workspace back after a failed or interrupted run ---------------------------

STEP = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from tasks.common import StageError, run_stage
    from tasks.params import read_yaml

    def body():
        name = sys.argv[1]
        how = read_yaml("params.yaml")[name]
        if how == "fail":
            raise StageError(f"{name} cannot go on; fix it")
        if how == "wait":
            Path("started").touch()
            for _ in range(1200):  # at most two minutes; the test stops it long before
                time.sleep(0.1)
        Path("out").mkdir(exist_ok=True)
        Path(f"out/{name}.txt").write_text(f"{name}={how}")
        Path(f"{name}.json").write_text(json.dumps({"how": how}))

    sys.exit(run_stage(sys.argv[1], body))
    """
)


@pytest.fixture
def chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git + DVC repo with stages ``a`` -> ``b``: each writes a cached output and an
    uncached metrics file from its params value ("fail" fails it, "wait" waits)."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    (tmp_path / "step.py").write_text(STEP)
    stages = {
        name: {
            "cmd": f"python step.py {name}",
            "deps": ["step.py", *(["out/a.txt"] if name == "b" else [])],
            "params": [name],
            "outs": [f"out/{name}.txt"],
            "metrics": [{f"{name}.json": {"cache": False}}],
        }
        for name in ("a", "b")
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"a": "one", "b": "one"}))
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "test@example.com"],
        ["git", "config", "user.name", "test"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.analytics", "false"],
        ["dvc", "repro", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "init"],
    ):
        run(cmd, tmp_path)
    return tmp_path


def workspace(project: Path) -> dict[str, bytes]:
    """Every file the stages and DVC write, by path."""
    paths = ["dvc.lock", "a.json", "b.json", "out/a.txt", "out/b.txt"]
    return {path: (project / path).read_bytes() for path in paths if (project / path).exists()}


def test_a_failed_run_puts_back_dvc_lock_and_the_outputs_of_every_stage_it_ran(chain):
    before = workspace(chain)
    (chain / "params.yaml").write_text(yaml.safe_dump({"a": "two", "b": "fail"}))
    with DvcWorker(chain, emit=print) as dvc:
        dvc.snapshot()
        assert dvc.reproduce("a", emit=print) == "ran"
        with pytest.raises(StageFailedError, match="b cannot go on"):
            dvc.reproduce("b", emit=print)
        assert (chain / "out/a.txt").read_text() == "a=two"  # the run changed a's outputs
        assert dvc.roll_back() == []
    assert workspace(chain) == before  # dvc.lock, cached and uncached outputs, byte for byte
    assert not (chain / ".tlp/rollback").exists()

    (chain / "params.yaml").write_text(yaml.safe_dump({"a": "one", "b": "one"}))
    assert run(["dvc", "status", "--json"], chain).stdout.strip() == "{}"
    # What the failed run computed stays in DVC's run cache: a retry restores it.
    (chain / "params.yaml").write_text(yaml.safe_dump({"a": "two", "b": "one"}))
    with DvcWorker(chain, emit=print) as dvc:
        assert dvc.reproduce("a", emit=print) == "restored"


def test_a_stage_that_never_ran_before_leaves_no_output_behind(chain):
    (chain / "dvc.lock").unlink()
    for path in ("out/a.txt", "out/b.txt", "a.json", "b.json"):
        (chain / path).unlink()
    (chain / "params.yaml").write_text(yaml.safe_dump({"a": "two", "b": "fail"}))
    with DvcWorker(chain, emit=print) as dvc:
        dvc.snapshot()
        dvc.reproduce("a", emit=print)
        with pytest.raises(StageFailedError):
            dvc.reproduce("b", emit=print)
        dvc.roll_back()
    assert workspace(chain) == {}


def test_an_interrupted_run_stops_its_stage_and_puts_everything_back(chain):
    before = workspace(chain)
    (chain / "params.yaml").write_text(yaml.safe_dump({"a": "two", "b": "wait"}))

    def interrupt_when_b_starts() -> None:  # as Ctrl-C in the terminal would, on an event
        wait_for(lambda: (chain / "started").exists(), 120, "stage b to start")
        os.kill(os.getpid(), signal.SIGINT)

    with DvcWorker(chain, emit=print) as dvc:
        dvc.snapshot()
        dvc.reproduce("a", emit=print)
        threading.Thread(target=interrupt_when_b_starts, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            dvc.reproduce("b", emit=print)  # waiting for b's answer when Ctrl-C comes
        below = descendants(dvc._process.pid)
        commands = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in below]
        assert [b"step.py", b"b"] in [command[1:3] for command in commands]  # b still runs
        dvc.roll_back()
        assert all(reaped(pid) for pid in below)  # the stage was stopped
    assert workspace(chain) == before
