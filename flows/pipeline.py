"""The pipeline as one Prefect flow, with one Prefect task per DVC stage.

The stages and their order come from ``dvc.yaml`` (DVC's graph), never from a list here.
One DVC worker process (:mod:`flows.dvc_worker`) holds DVC's repo lock for the whole run
and does the DVC work: the status is read once, up-to-date stages finish at once as
*Cached*, and the others are reproduced one at a time, their output logged line by line.
Prefect adds schedules, retries (only for a transient failure, exit 75, in ``fetch``), the
dashboard, per-stage states, logs and artifacts. Run it with ``tlp run``, serve it with
``tlp serve``, or deploy it with ``prefect deploy`` (entrypoint in prefect.yaml).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed, State
from prefect.utilities.annotations import quote

from flows import reports
from flows.dvc_worker import DvcWorker
from flows.locking import workspace_lock
from flows.logs import CONSOLE
from flows.reports import StageOutcome
from flows.runs import run_message
from flows.stages import DvcBusyError, Pipeline, StageFailedError, TransientStageError, run_reason
from flows.workspace import overrides_applied, preflight, project_root
from tasks.common import read_json
from tasks.params import load_params

FLOW_NAME = "tlp-pipeline"


def _transient(task: Any, task_run: Any, state: State) -> bool:
    """Retry condition: only a transient failure (exit 75) is worth another attempt."""
    return isinstance(state.result(raise_on_failure=False), TransientStageError)


# Task options beyond the defaults, by stage name. fetch already retries each download
# itself (fetch.retries); a task retry waits longer, for an outage rather than a blip.
STAGE_TASK_OPTIONS: dict[str, dict[str, Any]] = {
    "fetch": {"retries": 2, "retry_delay_seconds": [30, 120], "retry_condition_fn": _transient},
}
# What DVC did with a stage it was asked to reproduce -> (state name, message, why).
AFTER_REPRO = {
    "ran": ("Completed", "ran: {reason}", "{reason}"),
    "restored": ("Cached", "restored from DVC's run cache", "{reason}; DVC run cache hit"),
    "cached": ("Cached", "DVC found it up to date", "DVC found it up to date"),
}


def bring_stage_up_to_date(dvc: DvcWorker, stage: str, step: str, reason: str) -> State:
    """The body of a stage's task: bring one stage up to date through DVC.

    Args:
        dvc: the flow run's DVC worker (a live connection: tasks called from a flow run in
            the flow's process).
        stage: the stage name.
        step: its place in the run, e.g. ``"4/6"``, for progress lines.
        reason: why it must run (:func:`flows.stages.run_reason`); "" if it need not.

    Returns:
        *Completed* if the stage ran, *Cached* (also a Completed state) if it was up to
        date; the state's data is the :class:`~flows.reports.StageOutcome`.

    Raises:
        StageFailedError: the stage failed; the message is the stage's own error.
    """
    logger = get_run_logger()
    if not reason:
        logger.info("[%s] %s: up to date (dvc status), cached", step, stage)
        outcome = StageOutcome(stage, "cached", 0.0, "up to date")
        return Completed(name="Cached", message="up to date, not run", data=outcome)
    logger.info("[%s] %s: running, because %s", step, stage, reason)
    started = time.perf_counter()
    try:
        done = dvc.reproduce(stage, emit=logger.info)
    except StageFailedError as exc:  # for the dashboard; tlp run prints it at the end
        logger.error("[%s] %s failed: %s", step, stage, exc.error, extra={CONSOLE: False})
        raise
    seconds = round(time.perf_counter() - started, 1)
    logger.info("[%s] %s: %s in %.1fs", step, stage, "done" if done == "ran" else done, seconds)
    name, message, why = (text.format(reason=reason) for text in AFTER_REPRO[done])
    return Completed(name=name, message=message, data=StageOutcome(stage, done, seconds, why))


def stage_task(stage: str) -> Task:
    """The Prefect task for one stage: named after it, never cached by Prefect (DVC does)."""
    options = STAGE_TASK_OPTIONS.get(stage, {})
    return task(bring_stage_up_to_date, name=stage, task_run_name=stage, cache_policy=NO_CACHE,
                persist_result=False, **options)  # fmt: skip


@flow(name=FLOW_NAME, description="Fetch, prepare, train, evaluate and export, through DVC.")
def pipeline(
    overrides: dict[str, Any] | None = None,
    save_experiment: bool = True,
    project_dir: str | None = None,
    push: bool = False,
) -> dict[str, str]:
    """Bring the whole pipeline up to date through DVC, one task per stage.

    Args:
        overrides: params to change for this run, as dotted keys, e.g.
            ``{"train.epochs": 5, "backbone.arch": "mobilenet_v2"}``. They are validated
            before any stage runs and written to ``params.yaml``, so ``dvc repro``
            reproduces the run later; a failed or interrupted run puts ``params.yaml``,
            ``dvc.lock`` and the outputs back as they were.
        save_experiment: record the run as a DVC experiment (``dvc exp save``) when a
            stage ran, so ``dvc exp show`` compares runs side by side.
        project_dir: the project to run in (a sweep's isolated clone); default: the one
            ``TLP_PROJECT_DIR`` names, else the one around the current folder.
        push: after saving the experiment, push it (``dvc exp push origin``): its git refs
            to the git remote ``origin``, its outputs to the default DVC remote, so any
            clone gets the run with ``dvc exp pull`` (a work pool's workers set this).

    Returns:
        Each stage's outcome (``ran``, ``cached``, ``restored``), in pipeline order.
    """
    logger, started = get_run_logger(), time.perf_counter()
    root = project_root(project_dir or os.environ.get("TLP_PROJECT_DIR"))
    run_name = flow_run.get_name()
    outcomes: list[StageOutcome] = []
    experiment = "none"
    with workspace_lock(root, f"flow run {run_name!r}"):
        changes = preflight(root, overrides)  # the params and the files they name
        if changes:
            logger.info("params overrides for this run: %s", changes)
        with DvcWorker(root, emit=logger.info) as dvc:  # holds DVC's lock from here on
            dvc.snapshot()
            try:
                # A failed stage, Ctrl-C or SIGTERM: everything is put back as before the run.
                with rolled_back_on_failure(dvc), overrides_applied(root, changes):
                    plan = dvc.pipeline()
                    logger.info("pipeline from dvc.yaml: %s", " -> ".join(plan.names))
                    bring_up_to_date(dvc, plan, outcomes)
                if save_experiment:
                    seconds = time.perf_counter() - started
                    experiment = record_run(dvc, outcomes, run_name, seconds)
                if push and save_experiment:
                    push_experiment(root, experiment)
            finally:
                ran = sum(o.outcome == "ran" for o in outcomes)
                create_table_artifact(
                    [vars(outcome) for outcome in outcomes],
                    key="pipeline-stages",
                    description=f"Per stage: ran or cached, and why (from dvc status before "
                    f"the run). {ran} of {len(outcomes)} ran. DVC experiment: {experiment}.",
                )
        publish_results(plan)
    return {outcome.stage: outcome.outcome for outcome in outcomes}


def bring_up_to_date(dvc: DvcWorker, plan: Pipeline, outcomes: list[StageOutcome]) -> None:
    """Run one task per stage, dependencies first; append each outcome as it is known.

    Raises:
        StageFailedError: a stage failed (the flow fails with it; later stages do not run).
    """
    progress = create_progress_artifact(
        0.0, key="pipeline-progress", description="Stages brought up to date, in percent"
    )
    changed: set[str] = set()
    states: dict[str, State] = {}
    for index, stage in enumerate(plan.stages, start=1):
        started = time.perf_counter()
        state = states[stage.name] = stage_task(stage.name)(
            quote(dvc),  # a live connection: Prefect must not inspect or copy it
            stage.name,
            f"{index}/{len(plan.stages)}",
            run_reason(stage, changed),
            wait_for=[states[name] for name in stage.needs],  # dvc.yaml's edges in the UI graph
            return_state=True,
        )
        if not state.is_completed():
            error = state.result(raise_on_failure=False)
            seconds = round(time.perf_counter() - started, 1)
            outcomes.append(StageOutcome(stage.name, "failed", seconds, str(error)))
            outcomes += [StageOutcome(s.name, "not run", 0.0, f"{stage.name} failed")
                         for s in plan.stages[index:]]  # fmt: skip
            raise _flow_error(stage.name, error)
        outcomes.append(state.result())
        if outcomes[-1].outcome in ("ran", "restored"):
            changed.add(stage.name)
        update_progress_artifact(progress, 100.0 * index / len(plan.stages))


def _flow_error(stage: str, error: Any) -> Exception:
    """The flow's own copy of a task's error (short traceback, same type and message)."""
    if isinstance(error, DvcBusyError):
        return DvcBusyError(str(error))
    if isinstance(error, StageFailedError):
        return type(error)(error.stage, error.error)
    return StageFailedError(stage, str(error))


@contextlib.contextmanager
def rolled_back_on_failure(dvc: DvcWorker) -> Iterator[None]:
    """If the block raises (a failed stage, Ctrl-C, SIGTERM), stop the stage that runs and
    put ``dvc.lock`` and the outputs of every stage the run reproduced back as they were
    (:mod:`flows.rollback`). What the run computed stays in DVC's cache, so a retry with
    the same params restores it instead of running it again."""
    try:
        yield
    except BaseException:
        logger = get_run_logger()
        try:
            lost = dvc.roll_back()
        except (RuntimeError, OSError) as exc:  # the worker did not answer, or is gone
            logger.warning("could not put the workspace back: %s; see `dvc status`", exc)
        else:
            if lost:
                logger.warning("not in the DVC cache, so not put back: %s", ", ".join(lost))
            logger.info("put params.yaml, dvc.lock and the outputs back as before the run")
        raise


def record_run(dvc: DvcWorker, outcomes: list[StageOutcome], name: str, seconds: float) -> str:
    """Save the run as a DVC experiment if a stage ran (its duration in the commit message,
    for ``tlp runs``); return its name or why not."""
    logger = get_run_logger()
    ran = [o.stage for o in outcomes if o.outcome in ("ran", "restored")]
    if not ran:
        return "not saved: nothing ran, the results are those of the previous run"
    try:
        name = dvc.save_experiment(name, run_message(name, seconds, ran))
    except RuntimeError as exc:
        logger.warning("not saved as a DVC experiment: %s; the run itself succeeded", exc)
        return f"not saved: {exc}"
    logger.info("saved as DVC experiment %s (compare runs with `dvc exp show`)", name)
    return name


def push_experiment(root: Any, name: str) -> None:
    """``dvc exp push origin NAME``: the run's git refs and its cached outputs.

    Raises:
        RuntimeError: the run was not saved as an experiment, or DVC could not push it.
    """
    if name.startswith("not saved"):
        raise RuntimeError(f"nothing to push: {name}")
    command = [sys.executable, "-m", "dvc", "exp", "push", "origin", name]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"dvc exp push origin {name} failed: {done.stderr.strip()[-2000:]}")
    get_run_logger().info("pushed experiment %s: git refs to origin, outputs to the DVC remote",
                          name)  # fmt: skip


def publish_results(plan: Pipeline) -> None:
    """Publish the evaluation: metrics, quality (guards, warnings), pictures, the confusion
    matrix; and the export parity result. A weak model let through gets a warning artifact."""
    root, per_class = plan.root, {}
    json_files = {stage: [root / p for p in paths if p.endswith(".json") and (root / p).is_file()]
                  for stage, paths in plan.metrics.items()}  # fmt: skip
    for plot in plan.plots.get("evaluate", ()):
        if plot.get("y") == "class" and (root / plot["path"]).is_file():  # per-class scores
            per_class = reports.per_class_scores(root / plot["path"])
    training = next((read_json(path) for path in json_files.get("train", [])), None)
    for path in json_files.get("evaluate", [])[:1]:
        metrics = read_json(path)
        description = f"Test-split metrics ({path.relative_to(root)}, stage evaluate)"
        create_table_artifact(reports.metrics_table(metrics), "eval-metrics", description)
        create_markdown_artifact(
            reports.quality_markdown(metrics, training), key="quality",
            description="Can this model be trusted? Test scores against guessing, the "
            "trainable parameters per training image, warnings",
        )  # fmt: skip
        if metrics.get("warnings"):  # only there when evaluate.allow_weak let it through
            get_run_logger().warning(
                "weak model kept (evaluate.allow_weak): %s", metrics["warnings"]
            )
            create_markdown_artifact(
                reports.weak_model_markdown(metrics["warnings"]), key="weak-model",
                description="WARNING: the evaluate stage's guards refuse this model",
            )  # fmt: skip
    pictures = [(plot["path"], root / plot["path"]) for plot in plan.plots.get("evaluate", ())
                if plot["path"].endswith(".png") and (root / plot["path"]).is_file()]  # fmt: skip
    if pictures:
        create_markdown_artifact(
            reports.pictures_markdown(pictures), key="pictures",
            description="Where the model looked (Grad-CAM), its most confident errors, the "
            "confusion matrix: reduced copies of the evaluate stage's PNG plots",
        )  # fmt: skip
    for plot in plan.plots.get("evaluate", ()):
        if plot.get("template") == "confusion" and (root / plot["path"]).is_file():
            axes = plot.get("x", "actual"), plot.get("y", "predicted")
            counts = reports.confusion_counts(root / plot["path"], *axes)
            create_markdown_artifact(
                reports.confusion_markdown(counts, list(per_class), per_class),
                key="confusion-matrix",
                description=f"Confusion matrix of the test split ({plot['path']})",
            )
    for path in json_files.get("export", [])[:1]:
        gates = load_params(root / "params.yaml").export
        create_table_artifact(
            reports.parity_table(read_json(path), gates.atol, gates.min_top1_agreement),
            key="export-parity",
            description=f"ONNX export parity with Keras ({path.relative_to(root)}, stage export)",
        )
