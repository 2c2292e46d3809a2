"""Benchmark 9: a 4-run ``tlp sweep`` with ``--parallel 2``, against the same with ``--parallel 1``.

Two fresh copies of the project (shrunk params, as in the tests), one per sweep, so neither
finds the other's results in DVC's run cache; one ``tlp server`` for both (as a user runs
it). Each sweep is the grid ``train.learning_rate=0.001,0.003`` x ``train.dropout=0.1,0.3``:
fetch, prepare and backbone once (shared), then train, evaluate and export per run. Whole
processes, one of each (a sweep takes minutes), ``--parallel 1`` first.

* ``sweep_parallel_ratio`` = wall time with ``--parallel 2`` / with ``--parallel 1``
  (goal <= 0.8 on 2 cores).
* details: the stages each sweep served from the shared cache (the table's ``cached``
  column, summed over the runs) out of all stage executions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.common import ROOT, Result, copy_project, env_with_venv, load_average, run_process
from tests.conftest import SHRUNK
from tests.prefect_server import start_server, stop_process

GRID = ["-S", "train.learning_rate=0.001,0.003", "-S", "train.dropout=0.1,0.3"]


def served(output: str) -> tuple[int, int]:
    """(stages served from cache, stage executions) from ``tlp sweep``'s printed table."""
    lines = output[output.index("rank  experiment") :].splitlines()
    column = lines[0].split().index("cached")
    cells = [line.split()[column] for line in lines[1:] if line.split()[:1] != []]
    pairs = [tuple(map(int, cell.split("/"))) for cell in cells if "/" in cell]
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


def run(work: Path, quick: bool) -> list[Result]:
    """Time the two sweeps."""
    changes = {**SHRUNK, "train": {**SHRUNK["train"], "epochs": 1 if quick else 3}}
    projects = {n: copy_project(work / f"parallel-{n}", changes) for n in (1, 2)}
    server = start_server(projects[1], work / "server.log")
    env = env_with_venv({"PREFECT_API_URL": server.api,
                         "PREFECT_API_AUTH_STRING": server.auth or ""})  # fmt: skip
    seconds, cache, load = {}, {}, [load_average()]
    try:
        for n in (1, 2):
            command = [sys.executable, "-m", "flows.cli", "sweep", *GRID, "--parallel", str(n)]
            process = run_process(command, projects[n], {**env, "PYTHONPATH": str(projects[n])})
            process.check(f"tlp sweep --parallel {n}")
            seconds[n], cache[n] = process.seconds, served(process.stdout)
    finally:
        stop_process(server.process)
    load.append(load_average())
    details = {
        "parallel_1_s": round(seconds[1], 1),
        "parallel_2_s": round(seconds[2], 1),
        "served_from_cache": {f"parallel_{n}": f"{c[0]}/{c[1]} stages" for n, c in cache.items()},
        "grid": " ".join(GRID),
        "epochs": changes["train"]["epochs"],
        "load_average": load,
    }
    ratio = round(seconds[2] / seconds[1], 2)
    return [Result("sweep_parallel_ratio", ratio, "<= 0.8", "ratio", details=details)]


if __name__ == "__main__":
    results = run(ROOT / "bench" / "work" / "sweep", "--quick" in sys.argv)
    print(json.dumps([r.to_json() for r in results], indent=2))
