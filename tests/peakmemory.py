"""Run a command and read its peak resident memory from the kernel (``wait4``'s ``ru_maxrss``).

The command is started by a tiny launcher (``python -I -S``), which forks and execs it and
reports the rusage of that one child and the children it waited for. Reading
``RUSAGE_CHILDREN`` from pytest would not do: it is the largest of *every* child pytest ever
waited for, and a child forked straight from pytest keeps pytest's high-water mark across
its exec.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import BIN

# The measured command runs as the launcher's own child (a forked child would inherit the
# parent's resident pages, which the kernel's high-water mark keeps); started with -I -S,
# the launcher holds a few MiB at the fork. bench/common.py uses it too.
LAUNCHER = """
import json, os, sys, time
report, command = sys.argv[1], sys.argv[2:]
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(command[0], command)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - started
with open(report, "w") as handle:
    json.dump({"seconds": seconds, "maxrss_kib": usage.ru_maxrss}, handle)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


@dataclass
class Measured:
    """A finished command, its output and its peak resident memory in bytes."""

    returncode: int
    stdout: str
    stderr: str
    peak_bytes: int


def run_measured(cmd: list[str], cwd: Path, timeout: float = 600) -> Measured:
    """Run ``cmd`` in ``cwd`` (venv first on PATH, ``cwd`` importable) and measure it.

    ``timeout`` only guards against a hang (the test then fails); nothing is timed.
    """
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(cwd)}
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "usage.json"
        launcher = [sys.executable, "-I", "-S", "-c", LAUNCHER, str(report)]
        result = subprocess.run(
            [*launcher, *map(str, cmd)],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        peak = json.loads(report.read_text())["maxrss_kib"] * 1024 if report.exists() else 0
    return Measured(result.returncode, result.stdout, result.stderr, peak)
