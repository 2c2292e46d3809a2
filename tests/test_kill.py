"""SIGKILL for real: a download cut by a killed ``tasks.fetch``, and ``dvc repro`` killed mid-stage.

A killed process runs no cleanup code, so what these tests prove is that the *next* run
recovers from whatever was on disk at the moment of the kill: a partial download (never
trusted), DVC's rwlock entries of a dead process, outputs DVC deleted before running the stage.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from tasks.download import cache_name
from tasks.fetch import fetch
from tasks.params import with_changes
from tests.conftest import BIN, PARAMS, run, set_params, write_params
from tests.faults import pause_train_after_first_batch
from tests.httpserver import FileServer

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE_BYTES = 12 * 100_000  # random, so gzip cannot shrink it: the download takes time
THROTTLE_BPS = 400_000  # about 3 s for the whole archive
KILL_AT_BYTES = 300_000


def env_for(cwd: Path) -> dict[str, str]:
    """The environment conftest.run uses: the venv's tools first, the project importable."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(cwd),
        "TLP_NO_PROGRESS": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }


def wait_for(condition: Callable[[], object], what: str, timeout_s: float, proc=None) -> object:
    """Poll ``condition`` until it is truthy; fail after ``timeout_s`` or if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process exited ({proc.returncode}) before {what}")
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def group_members(pgid: int) -> dict[int, str]:
    """Live processes of a process group: PID -> command line (Linux /proc)."""
    members = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                members[int(entry.name)] = (
                    (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                )
        except (OSError, ValueError, IndexError):
            continue  # it exited meanwhile
    return members


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with ``start_new_session=True`` and all of its children."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    wait_for(lambda: not group_members(proc.pid), "the killed group to be gone", 10)


def tree_digest(folder: Path) -> str:
    """One sha256 over every file's relative path and bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


# -- 1. kill during a download --------------------------------------------------------------


def write_archive(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w:gz") as tar:
        for index in range(ARCHIVE_BYTES // 100_000):
            data = rng.bytes(100_000)
            info = tarfile.TarInfo(f"{('cat', 'dog')[index % 2]}/{index}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("after_kill", ["unchanged", "server_file_changed"])
def test_sigkill_during_download(tmp_path: Path, after_kill: str) -> None:
    www = tmp_path / "www"
    www.mkdir()
    archive = www / "data.tar.gz"
    write_archive(archive, seed=1)
    work = tmp_path / "work"
    work.mkdir()
    out, cache = work / "data" / "raw", work / "downloads"

    with FileServer(www, throttle_bps=THROTTLE_BPS) as server:
        url = server.url("data.tar.gz")
        write_params(work / "params.yaml", {"fetch": {"source": url}})
        final = cache / cache_name(url)

        def partial() -> list[Path]:  # the temporary file tasks.common.atomic_path writes
            return list(cache.glob(f".{final.name}.*.tmp")) if cache.is_dir() else []

        command = [sys.executable, "-m", "tasks.fetch", "--out", str(out), "--cache", str(cache)]
        command += ["--params", str(work / "params.yaml")]
        with open(tmp_path / "fetch.log", "w") as log:
            proc = subprocess.Popen(
                command, cwd=ROOT, env=env_for(ROOT), stdout=log, stderr=log, start_new_session=True
            )
            try:
                wait_for(
                    lambda: any(p.stat().st_size >= KILL_AT_BYTES for p in partial()),
                    "half of the download",
                    60,
                    proc,
                )
            finally:
                kill_group(proc)
        assert proc.returncode == -signal.SIGKILL
        [leftover] = partial()
        assert 0 < leftover.stat().st_size < archive.stat().st_size
        assert not out.exists() and not final.exists()  # nothing trusted: no final name

        if after_kill == "server_file_changed":
            time.sleep(0.01)  # a new mtime, so a new ETag
            write_archive(archive, seed=2)
        server.throttle_bps = None
        before = len(server.requests)
        rerun = subprocess.run(
            command, cwd=ROOT, env=env_for(ROOT), capture_output=True, text=True, timeout=120
        )
        assert rerun.returncode == 0, rerun.stderr
        statuses = [(r.range, r.status) for r in server.requests[before:] if r.method == "GET"]

        # A clean, uninterrupted fetch of what the server holds now, for comparison.
        params = with_changes(PARAMS.fetch, source=url)
        fetch(params, tmp_path / "clean" / "raw", tmp_path / "clean" / "downloads")

    assert statuses == [(None, 200)]  # the whole file again, never the partial bytes
    assert tree_digest(out) == tree_digest(tmp_path / "clean" / "raw")
    assert (
        json.loads((out / "source.json").read_text())["sha256"]
        == hashlib.sha256(archive.read_bytes()).hexdigest()
    )
    assert partial() == [] and final.read_bytes() == archive.read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["raw"]  # no temporary folders left


# -- 3. kill dvc repro mid-stage ------------------------------------------------------------


def start_repro(project: Path, log: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen(
            ["dvc", "repro", *args],
            cwd=project,
            env={**env_for(project), **(env or {})},
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the stage's processes too
        )


def rwlock(project: Path) -> dict:
    path = project / ".dvc" / "tmp" / "rwlock"
    return json.loads(path.read_text()) if path.is_file() else {}


def rwlock_pids(project: Path) -> set[int]:
    lock = rwlock(project)
    pids = {info["pid"] for info in lock.get("write", {}).values()}
    return pids | {info["pid"] for infos in lock.get("read", {}).values() for info in infos}


@pytest.mark.slow
def test_sigkill_dvc_repro_while_train_runs(built_project: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(built_project, project, symlinks=True)
    lock_before = (project / "dvc.lock").read_bytes()
    locked = yaml.safe_load(lock_before)["stages"]["train"]["params"]["params.yaml"]
    epochs = locked["train.epochs"]  # the train stage lists its train keys one by one
    set_params(project, {"train": {"epochs": epochs + 2}})
    env, paused = pause_train_after_first_batch(tmp_path / "hooks", project)

    log = tmp_path / "killed-repro.log"
    proc = start_repro(project, log, env=env)
    try:
        wait_for(paused.is_file, "the train stage's first batch", 300, proc)
        train_pid = int(paused.read_text())
        members = group_members(proc.pid)
        assert "tasks.train" in members.get(train_pid, ""), (members, log.read_text()[-3000:])
    finally:
        kill_group(proc)

    # The lock file was not touched: DVC writes a stage's entry only after it succeeds.
    assert (project / "dvc.lock").read_bytes() == lock_before
    # The dead run's rwlock entries are still on disk (nothing ran to remove them) ...
    assert proc.pid in {info["pid"] for info in rwlock(project).get("write", {}).values()}
    status = json.loads(run(["dvc", "status", "--json"], project).stdout)
    assert "train" in status, status
    assert {"changed deps": {"params.yaml": {"train.epochs": "modified"}}} in status["train"]

    # ... and the next run, whose outputs they lock, goes ahead anyway (DVC sees that PID is
    # dead and drops them), completes, and the lock records the new params.
    run(["dvc", "repro"], project)
    lock_after = yaml.safe_load((project / "dvc.lock").read_text())
    train = lock_after["stages"]["train"]
    assert train["params"]["params.yaml"]["train.epochs"] == epochs + 2
    assert lock_after["stages"]["fetch"] == yaml.safe_load(lock_before)["stages"]["fetch"]
    assert json.loads(run(["dvc", "status", "--json"], project).stdout) == {}
    # DVC drops a dead PID's entries lazily, only where they would block the run; what may
    # be left are read entries of inputs, which block no reader and are dropped the same way
    # before anything writes there.
    assert proc.pid not in {info["pid"] for info in rwlock(project).get("write", {}).values()}


def test_rwlock_of_a_killed_repro_with_a_reused_pid_needs_removing(tmp_path: Path) -> None:
    """What a user must do when the dead run's PID was reused before the next run."""
    project = tmp_path / "tiny"
    project.mkdir()
    run(["dvc", "init", "--no-scm", "-q"], project)
    # The stage says it started, then waits until the file "go" exists (bounded: the test
    # gives up long before), so the kill lands mid-stage however fast the machine.
    cmd = (
        "touch started; i=0; while [ ! -f go ] && [ $i -lt 3000 ]; do sleep 0.1; i=$((i+1)); "
        "done; echo done > out.txt"
    )
    stage = {"cmd": cmd, "outs": ["out.txt"]}
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"slow": stage}}))
    proc = start_repro(project, tmp_path / "repro.log")
    try:
        wait_for((project / "started").is_file, "the stage to start", 60, proc)
    finally:
        kill_group(proc)
    assert rwlock_pids(project) == {proc.pid}
    (project / "go").touch()  # from now on the stage finishes at once wherever it runs

    # Simulate PID reuse: the entry now names a live process (one this test owns).
    squatter = subprocess.Popen(["sleep", "600"])
    try:
        path = project / ".dvc" / "tmp" / "rwlock"
        path.write_text(path.read_text().replace(f'"pid": {proc.pid}', f'"pid": {squatter.pid}'))
        refused = run(["dvc", "repro"], project, check=False)
        # DVC cannot tell the live process from the dead run: it refuses, runs nothing and
        # leaves the entry alone.
        assert refused.returncode != 0
        assert not (project / "out.txt").exists()
        assert rwlock_pids(project) == {squatter.pid}
        # The fix DVC asks for: remove its rwlock file; the run then completes.
        path.unlink()
        run(["dvc", "repro"], project, timeout=120)
        assert (project / "out.txt").read_text() == "done\n"
        assert squatter.poll() is None  # nothing was done to the live process
    finally:
        squatter.kill()
        squatter.wait()
