"""``tlp sweep``: a grid of pipeline runs, each in its own clone of the project, one DVC cache.

The grid is the cartesian product of ``-S key=v1,v2`` options, parsed by DVC's own parser
for ``dvc exp run --queue -S`` (Hydra's sweep syntax: ``0.1,0.3``, ``range(1,4)``...).
Each combination runs as the pipeline flow (:mod:`flows.pipeline`: one Prefect task per
stage, a child flow run of the sweep's) in an isolated workspace: a git clone of the
project at ``HEAD`` plus the workspace's uncommitted files (``params.yaml``, ``dvc.lock``),
configured to use the project's DVC cache (``cache.dir``), hence its run cache too.

Stages that no swept key reaches (fetch, prepare and backbone for a ``train.*`` grid) are
brought up to date once, first, in a clone of their own; every run then restores them from
DVC's run cache instead of computing them again. The train stage's feature cache is one
folder that every clone links to (dvc.yaml says why it is a cache, not an output). A
finished run is saved as a DVC experiment in its clone and pushed into the project's git
(``dvc exp push``: refs only, the data is already in the shared cache), so ``dvc exp show``
and ``tlp runs`` list it and ``dvc exp apply`` restores it. The project's own
``params.yaml`` and outputs are never written (unless ``apply_best``). Concurrency is
Prefect's: a thread-pool task runner of ``parallel`` workers, one task per run; a failed
run is a row of the table, not the end of the sweep.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.dvc_worker import DvcWorker
from flows.locking import tlp_dir, workspace_lock
from flows.logs import CONSOLE
from flows.pipeline import pipeline
from flows.workspace import PARAMS_FILE, lookup, parse_set_options, preflight, project_root
from tasks.params import ParamsError, read_yaml

SWEEP_FLOW = "tlp-sweep"
MAX_RUNS = 1000  # a grid past this is a typo (a range without a step), not a plan
# The train stage's --features folder (dvc.yaml): a cache keyed by its inputs, shared.
SHARED_CACHE = ".tlp/features"
_PROJECT_LOCK = threading.Lock()  # one DVC command on the project's git at a time


@dataclass
class SweepRun:
    """One run of a sweep, as its table row shows it.

    Attributes:
        index: its place in the grid, from 1.
        overrides: the params it ran with (dotted keys).
        state: the child flow run's state name (``Completed``, ``Failed``...).
        experiment: the DVC experiment it was saved as ("" if none).
        metric: the ranking metric's value (``None`` if the run failed or has none).
        outcomes: each stage's outcome (``ran``, ``restored``, ``cached``).
        error: why it failed ("" if it did not).
    """

    index: int
    overrides: dict[str, Any]
    state: str = "Pending"
    experiment: str = ""
    metric: float | None = None
    outcomes: dict[str, str] = field(default_factory=dict)
    error: str = ""


def expand_grid(options: Sequence[str]) -> list[dict[str, Any]]:
    """The runs of a grid: one dict of overrides per combination, in DVC's order.

    Args:
        options: ``-S`` options, e.g. ``["train.learning_rate=0.001,0.003", "train.dropout=0.1"]``.

    Raises:
        ParamsError: an option does not parse, or the grid is over :data:`MAX_RUNS` runs.
    """
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import get_hydra_sweeps
    from hydra.errors import HydraException

    if not options:
        raise ParamsError(
            "tlp sweep needs at least one -S key=v1,v2 (e.g. -S train.dropout=0.1,0.3)"
        )
    for option in options:
        parse_set_options([option])  # key=value, in bounds: the same checks as tlp run -S
    try:
        sweeps = get_hydra_sweeps({PARAMS_FILE: list(options)})
    except (InvalidArgumentError, HydraException) as exc:
        raise ParamsError(
            f"-S: {exc}; write values as dvc exp run --queue does, e.g. -S train.dropout=0.1,0.3"
        ) from None
    if len(sweeps) > MAX_RUNS:
        raise ParamsError(f"the grid has {len(sweeps)} runs, over {MAX_RUNS}: sweep fewer values")
    return [parse_set_options(sweep[PARAMS_FILE]) for sweep in sweeps]


def varied_stages(root: Path, stages: Sequence[Any], keys: Sequence[str]) -> set[str]:
    """The stages a swept key reaches: those that read one of ``keys`` (``dvc.yaml``'s
    ``params:`` lists) and everything downstream of them."""
    defined = read_yaml(root / "dvc.yaml").get("stages", {})
    varied: set[str] = set()
    for stage in stages:  # dependencies first
        params = (defined.get(stage.name) or {}).get("params", None)
        reads = [p for p in params or [] if isinstance(p, str)]
        if (
            params is None
            or len(reads) < len(params)
            or any(_overlap(key, param) for key in keys for param in reads)
            or varied & set(stage.upstream)
        ):  # (a stage not in dvc.yaml as such, or params from another file: varied)
            varied.add(stage.name)
    return varied


def _overlap(key: str, param: str) -> bool:
    return key == param or key.startswith(f"{param}.") or param.startswith(f"{key}.")


@contextlib.contextmanager
def isolated_workspace(root: Path, folder: Path) -> Iterator[Path]:
    """A clone of the project to run in, on the project's DVC cache; removed afterwards.

    The clone is ``git clone`` of ``HEAD`` with the workspace's modified and untracked
    (not ignored) files copied over, as ``dvc exp run`` takes the workspace; its DVC
    config is the project's (``config.local`` included) with ``cache.dir`` set to the
    project's cache; its feature cache (:data:`SHARED_CACHE`) is a link to the project's.

    Args:
        root: the project.
        folder: where the clone goes (it must not exist).
    """
    from dvc.repo import Repo

    _git(["clone", "--quiet", "--local", str(root), str(folder)], root.parent)
    try:
        listed = _git(["ls-files", "-z", "--modified", "--others", "--exclude-standard"], root)
        for name in filter(None, listed.split("\0")):
            source, target = root / name, folder / name
            if source.exists() or source.is_symlink():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target, follow_symlinks=False)
            else:  # deleted in the workspace
                target.unlink(missing_ok=True)
        if (root / ".dvc" / "config.local").is_file():
            shutil.copy2(root / ".dvc" / "config.local", folder / ".dvc" / "config.local")
        with Repo(str(root)) as project:
            cache_dir = project.cache.local_cache_dir
        with Repo(str(folder)) as clone, clone.config.edit("local") as config:
            config["cache"]["dir"] = cache_dir
        shared = tlp_dir(root) / Path(SHARED_CACHE).name
        shared.mkdir(exist_ok=True)
        tlp_dir(folder)
        (folder / SHARED_CACHE).symlink_to(shared, target_is_directory=True)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _git(args: list[str], cwd: Path) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"git {args[0]} failed in {cwd}: {done.stderr.strip()}")
    return done.stdout


@task(name="shared stages", task_run_name="shared stages", cache_policy=NO_CACHE,
      persist_result=False)  # fmt: skip
def bring_shared_stages_up_to_date(root: str, folder: str, keys: list[str]) -> dict[str, str]:
    """Bring the stages no swept key reaches up to date once, in a clone of their own.

    Their outputs land in the project's DVC cache and its run cache, from which every run
    of the sweep then restores them. Returns each shared stage's outcome.

    Raises:
        flows.stages.StageFailedError: a shared stage failed (every run would fail too).
    """
    logger, outcomes = get_run_logger(), {}
    with (
        isolated_workspace(Path(root), Path(folder)) as clone,
        DvcWorker(clone, emit=logger.info) as dvc,
    ):
        plan = dvc.pipeline()
        varied = varied_stages(clone, plan.stages, keys)
        for stage in plan.stages:
            if stage.name not in varied:
                outcomes[stage.name] = dvc.reproduce(stage.name, emit=logger.info)
    logger.info("shared by every run: %s", outcomes or "no stage")
    return outcomes


@task(name="sweep run", task_run_name="run {index}", cache_policy=NO_CACHE, persist_result=False)
def run_in_clone(root: str, folder: str, index: int, overrides: dict[str, Any], name: str,
                 metric: str) -> SweepRun:  # fmt: skip
    """Run the pipeline flow with ``overrides`` in a clone; save and push its experiment.

    Returns:
        The run's row; a failed run is a row with its error, not an exception.
    """
    result = SweepRun(index, overrides)
    with isolated_workspace(Path(root), Path(folder)) as clone:
        state = pipeline.with_options(flow_run_name=name)(
            overrides, True, str(clone), return_state=True
        )
        result.state = state.name
        if not state.is_completed():
            result.error = str(state.result(raise_on_failure=False))
            return result
        result.outcomes = state.result()
        result.metric, result.experiment = collect(clone, Path(root), metric)
    return result


@task(name="sweep run", task_run_name="run {index}", cache_policy=NO_CACHE, persist_result=False)
def run_on_pool(root: str, deployment: str, index: int, overrides: dict[str, Any], name: str,
                metric: str) -> SweepRun:  # fmt: skip
    """Run the pipeline as a flow run of ``deployment``: whichever worker of its work pool
    is free runs it in its own clone and pushes the experiment (``push``); read it back.

    Returns:
        The run's row; a failed run is a row with its error, not an exception.
    """
    from prefect.deployments import run_deployment

    result = SweepRun(index, overrides)
    parameters = {"overrides": overrides, "push": True}
    child = run_deployment(
        deployment, parameters=parameters, flow_run_name=name, as_subflow=True, timeout=None
    )
    result.state = child.state.name
    if not child.state.is_completed():
        result.error = child.state.message or child.state.name
        return result
    result.metric, result.experiment = pushed(Path(root), name, metric)
    return result


def pushed(root: Path, name: str, metric: str) -> tuple[float | None, str]:
    """A worker's experiment in the project: pulled from ``origin`` if the project has one
    (``dvc exp pull``), then its value of ``metric`` (``dvc exp show``)."""
    import dvc.api

    with _PROJECT_LOCK:
        if "origin" in _git(["remote"], root).split():
            command = [sys.executable, "-m", "dvc", "exp", "pull", "origin", name]
            subprocess.run(command, cwd=root, capture_output=True, check=False)
        rows = dvc.api.exp_show(repo=str(root))
    row = next((row for row in rows if row.get("Experiment") == name), None)
    if row is None:
        return None, ""
    value = row.get(metric)
    return (float(value) if isinstance(value, int | float) else None), name


def collect(clone: Path, root: Path, metric: str) -> tuple[float | None, str]:
    """The clone's value of ``metric`` and its experiment, pushed into the project's git."""
    import dvc.api
    from dvc.repo import Repo

    metrics = dvc.api.metrics_show(repo=str(clone))
    value = metrics.get(metric, lookup(metrics, metric))
    value = float(value) if isinstance(value, int | float) else None
    with Repo(str(clone)) as repo:
        names = [n for exps in repo.experiments.ls(all_commits=True).values() for n, _ in exps]
        if not names:
            return value, ""
        with _PROJECT_LOCK:
            repo.experiments.push(str(root), names[:1], push_cache=False)
    return value, names[0]


def _row(value: Any, index: int, overrides: dict[str, Any]) -> SweepRun:
    """A run's row, also when its task itself failed (no clone, the worker crashed...)."""
    if isinstance(value, SweepRun):
        return value
    return SweepRun(index, overrides, "Failed", error=f"{type(value).__name__}: {value}")


def ranked(runs: Sequence[SweepRun]) -> list[SweepRun]:
    """Best first: finished runs by metric (highest first), then those without one."""
    return sorted(runs, key=lambda r: (r.metric is None, -(r.metric or 0.0), r.index))


def table_rows(runs: Sequence[SweepRun], metric: str) -> list[dict[str, Any]]:
    """One row per run, best first: rank, experiment, the metric, each swept key, the
    stages served from cache, and the state (with the error of a failed run)."""
    keys = list(dict.fromkeys(key for run in runs for key in run.overrides))
    rows = []
    for rank, run in enumerate(ranked(runs), start=1):
        served = sum(o in ("cached", "restored") for o in run.outcomes.values())
        rows.append({
            "rank": rank, "experiment": run.experiment or "-",
            metric: "-" if run.metric is None else round(run.metric, 4),
            **{key: run.overrides.get(key, "-") for key in keys},
            "cached": f"{served}/{len(run.outcomes)}" if run.outcomes else "-",
            "state": run.state + (f": {run.error}" if run.error else ""),
        })  # fmt: skip
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows as aligned text columns, for the terminal."""
    if not rows:
        return ""
    columns = list(rows[0])
    cells = [columns, *([str(row[c]) for c in columns] for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in cells)  # fmt: skip


@flow(name=SWEEP_FLOW, description="A grid of pipeline runs, each an isolated DVC experiment.")
def sweep(
    options: list[str],
    parallel: int = 1,
    metric: str = "macro_f1",
    apply_best: bool = False,
    project_dir: str | None = None,
    deployment: str | None = None,
) -> list[dict[str, Any]]:
    """Run every combination of ``options`` as its own pipeline flow run and rank them.

    Args:
        options: ``-S`` options, e.g. ``["train.learning_rate=0.001,0.003"]``
            (:func:`expand_grid`).
        parallel: how many runs at a time.
        metric: the metric to rank by, highest first (a key of the metrics files, dotted
            for a nested one: ``macro_f1``, ``quality.lift``).
        apply_best: apply the best run to the project's workspace (``dvc exp apply``).
        project_dir: the project; default: ``TLP_PROJECT_DIR``, else the current folder's.
        deployment: run each combination as a flow run of this deployment of the pipeline
            (e.g. ``tlp-pipeline/tlp-pipeline``) on its work pool's workers, instead of in
            local clones; each worker pushes its run (``dvc exp push origin``).

    Returns:
        The table's rows, best first.

    Raises:
        ParamsError: an option does not parse or a combination is invalid (before any run).
        flows.stages.StageFailedError: a stage shared by every run failed.
    """
    logger = get_run_logger()
    if parallel < 1:
        raise ParamsError(f"--parallel must be at least 1, got {parallel}")
    root = project_root(project_dir or os.environ.get("TLP_PROJECT_DIR"))
    grid = [preflight(root, overrides) for overrides in expand_grid(options)]
    name = flow_run.get_name() or "sweep"
    folder = tlp_dir(root) / "sweeps" / name
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("%d runs, %d at a time, in %s", len(grid), parallel, folder)
    keys = sorted({key for overrides in grid for key in overrides})
    if deployment is None:  # a pool's workers have caches of their own
        bring_shared_stages_up_to_date(str(root), str(folder / "shared"), keys)
    body, where = (run_on_pool, {"deployment": deployment}) if deployment else (run_in_clone, {})
    with ThreadPoolTaskRunner(max_workers=parallel) as runner:
        futures = []
        for index, overrides in enumerate(grid, start=1):
            place = where or {"folder": str(folder / f"run-{index}")}
            common = {"root": str(root), "index": index, "name": f"{name}-{index}"}
            parameters = {**common, **place, "overrides": overrides, "metric": metric}
            futures.append(runner.submit(body, parameters))
        values = [future.result(raise_on_failure=False) for future in futures]
    runs = [_row(value, index, grid[index - 1]) for index, value in enumerate(values, start=1)]
    shutil.rmtree(folder, ignore_errors=True)
    rows = table_rows(runs, metric)
    best = ranked(runs)[0]
    create_table_artifact(rows, key="sweep", description=f"{len(runs)} runs ranked by {metric}")
    logger.info("ranked by %s:\n%s", metric, format_table(rows), extra={CONSOLE: False})
    if apply_best and best.experiment:
        apply_experiment(root, best.experiment)
        logger.info("applied the best run, %s, to the workspace", best.experiment)
    return rows


def apply_experiment(root: Path, name: str) -> None:
    """``dvc exp apply NAME`` in the project: its params, ``dvc.lock`` and outputs."""
    from dvc.repo import Repo

    with workspace_lock(root, f"dvc exp apply {name}"), Repo(str(root)) as repo:
        repo.experiments.apply(name)
