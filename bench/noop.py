"""Benchmark 6: a ``tlp run`` with every stage cached, against a no-op ``dvc repro``.

A copy of the project (shrunk params, as in the tests) is built once with ``dvc repro``;
then, alternately, a no-op ``dvc repro`` and a ``tlp run`` that finds every stage cached.
``tlp run`` is timed twice: against a running local Prefect server (``tlp server``, which
``tlp run`` finds by itself) and in Prefect's embedded mode (no server: a temporary one is
started inside the run). Whole processes; medians.

* ``noop_rerun_ratio`` = ``tlp run`` (server) / ``dvc repro`` (goal <= 5).
* ``noop_rerun_ratio_embedded`` = the same in embedded mode (no goal; reported).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.common import (
    BIN,
    ROOT,
    Result,
    copy_project,
    env_with_venv,
    load_average,
    median,
    run_process,
)
from tests.prefect_server import start_server, stop_process

SHRUNK = {
    "train": {"epochs": 1, "early_stopping_patience": 0},
    "prepare": {"image_size": [16, 16]},
    "backbone": {"simple_cnn": {"filters": [8, 16]}},
    "export": {"max_parity_images": 100},
}


def tlp_command() -> list[str]:
    """``tlp`` as installed, else the same entry point through ``python -m flows.cli``."""
    tlp = BIN / "tlp"
    return [str(tlp)] if tlp.exists() else [sys.executable, "-m", "flows.cli"]


def run(work: Path, quick: bool) -> list[Result]:
    """Time the no-op reruns."""
    repeats = 1 if quick else 3
    project = copy_project(work / "project", SHRUNK)
    env = env_with_venv(cwd=project)
    env.pop("PREFECT_API_URL", None)
    run_process(["dvc", "repro"], project, env).check("first dvc repro")
    tlp_run = [*tlp_command(), "run"]  # nothing runs, so no experiment is saved either
    load_before = load_average()
    run_process(tlp_run, project, env).check("tlp run (warm-up, embedded)")

    dvc_times, embedded_times, server_times = [], [], []
    for _ in range(repeats):
        lock = (project / "dvc.lock").stat().st_mtime_ns
        process = run_process(["dvc", "repro"], project, env).check("no-op dvc repro")
        if (project / "dvc.lock").stat().st_mtime_ns != lock:  # a stage ran and was recorded
            raise RuntimeError(f"dvc repro was not a no-op:\n{process.stdout[-2000:]}")
        dvc_times.append(process.seconds)
        embedded_times.append(
            run_process(tlp_run, project, env).check("tlp run (embedded)").seconds
        )

    server = start_server(project, work / "server.log")  # `tlp server`, as a user starts it
    api = server.api
    try:
        run_process(tlp_run, project, env).check("tlp run (server, warm-up)")
        outputs = []
        for _ in range(repeats):
            process = run_process(tlp_run, project, env).check("tlp run (server)")
            outputs.append(process.stdout + process.stderr)
            server_times.append(process.seconds)
    finally:
        stop_process(server.process)
    load_after = load_average()
    if not any(api in text for text in outputs):
        raise RuntimeError(f"tlp run did not use the server at {api}:\n{outputs[-1][-2000:]}")
    dvc, embedded, server_s = median(dvc_times), median(embedded_times), median(server_times)
    details = {
        "dvc_repro_s": round(dvc, 2),
        "tlp_run_server_s": round(server_s, 2),
        "tlp_run_embedded_s": round(embedded, 2),
        "all_s": {"dvc": dvc_times, "server": server_times, "embedded": embedded_times},
        "command": " ".join(Path(c).name for c in tlp_run),
        "repeats": repeats,
        "load_average": [load_before, load_after],
    }
    return [
        Result("noop_rerun_ratio", round(server_s / dvc, 2), "<= 5", "x", details=details),
        Result("noop_rerun_ratio_embedded", round(embedded / dvc, 2), None, "x", details=details),
    ]


if __name__ == "__main__":
    print(
        json.dumps(
            [r.to_json() for r in run(ROOT / "bench" / "work" / "noop", "--quick" in sys.argv)],
            indent=2,
        )
    )
