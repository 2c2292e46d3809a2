"""The pipeline as one Prefect flow, with one Prefect task per DVC stage.

The stages and their order come from ``dvc.yaml`` (DVC's graph), never from a list here.
One DVC worker process (:mod:`flows.dvc_worker`) holds DVC's repo lock for the whole run
and does the DVC work: the status is asked once, up-to-date stages finish at once as
*Cached*, and the others are reproduced one at a time (``dvc repro --single-item``), their
output streamed line by line into the task's log. Prefect adds the rest: schedules,
retries (only for a transient failure, exit 75, in ``fetch``), the dashboard, per-stage
states, logs and artifacts.

Run it with ``tlp run`` (flows/cli.py), serve it with ``tlp serve``, or deploy it to a work
pool with ``prefect deploy`` (prefect.yaml; entrypoint ``flows/pipeline.py:pipeline``).
"""

from __future__ import annotations

import os
import time
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
from flows.reports import StageOutcome
from flows.stages import DvcBusyError, Pipeline, StageFailedError, TransientStageError, run_reason
from flows.workspace import overrides_applied, project_root, validate_overrides
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


def bring_stage_up_to_date(dvc: DvcWorker, stage: str, step: str, reason: str) -> State:
    """The body of a stage's task: bring one stage up to date through DVC.

    Args:
        dvc: the flow run's DVC worker (a live connection, so the task runs in the flow's
            process, as Prefect runs tasks called from a flow).
        stage: the stage name.
        step: its place in the run, e.g. ``"4/6"``, for progress lines.
        reason: why it must run (:func:`flows.stages.run_reason`); "" if it need not.

    Returns:
        A *Completed* state if the stage ran, or a *Cached* one (also Completed) if it was
        up to date; its data is the :class:`~flows.reports.StageOutcome`.

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
    done = dvc.reproduce(stage, emit=logger.info)
    seconds = time.perf_counter() - started
    if done == "ran":
        logger.info("[%s] %s: done in %.1fs", step, stage, seconds)
        return Completed(message=f"ran: {reason}", data=StageOutcome(stage, "ran", seconds, reason))
    if done == "restored":
        outcome = StageOutcome(stage, "restored", seconds, f"{reason}; DVC run cache hit")
        return Completed(name="Cached", message="restored from DVC's run cache", data=outcome)
    outcome = StageOutcome(stage, "cached", seconds, "DVC found it up to date")
    return Completed(name="Cached", message="DVC found it up to date", data=outcome)


def stage_task(stage: str) -> Task:
    """The Prefect task for one stage: named after it, never cached by Prefect (DVC does)."""
    return task(
        bring_stage_up_to_date,
        name=stage,
        task_run_name=stage,
        cache_policy=NO_CACHE,
        persist_result=False,
        **STAGE_TASK_OPTIONS.get(stage, {}),
    )


@flow(name=FLOW_NAME, description="Fetch, prepare, train, evaluate and export, through DVC.")
def pipeline(
    overrides: dict[str, Any] | None = None, save_experiment: bool = True
) -> dict[str, str]:
    """Bring the whole pipeline up to date through DVC, one task per stage.

    Args:
        overrides: params to change for this run, as dotted keys, e.g.
            ``{"train.epochs": 5, "backbone.arch": "mobilenet_v2"}``. They are validated
            before any stage runs and written to ``params.yaml``, so ``dvc repro``
            reproduces the run later; a failed run puts ``params.yaml`` back.
        save_experiment: record the run as a DVC experiment (``dvc exp save``) when a
            stage ran, so ``dvc exp show`` compares runs side by side.

    Returns:
        Each stage's outcome (``ran``, ``cached``, ``restored``), in pipeline order.
    """
    logger = get_run_logger()
    root = project_root(os.environ.get("TLP_PROJECT_DIR"))
    run_name = flow_run.get_name()
    outcomes: list[StageOutcome] = []
    experiment = ""
    with workspace_lock(root, f"flow run {run_name!r}"):
        changes = validate_overrides(root, overrides)
        if changes:
            logger.info("params overrides for this run: %s", changes)
        with DvcWorker(root, emit=logger.info) as dvc:  # holds DVC's lock from here on
            try:
                with overrides_applied(root, changes):
                    plan = dvc.pipeline()
                    logger.info("pipeline from dvc.yaml: %s", " -> ".join(plan.names))
                    bring_up_to_date(dvc, plan, outcomes)
                experiment = record_run(dvc, plan, outcomes, run_name, save_experiment)
            except StageFailedError as exc:
                restore_outputs(dvc, exc.stage)
                raise
            finally:
                publish_stage_table(outcomes, experiment)
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
    total = len(plan.stages)
    for index, stage in enumerate(plan.stages, start=1):
        started = time.perf_counter()
        state = states[stage.name] = stage_task(stage.name)(
            quote(dvc),  # a live connection: Prefect must not inspect or copy it
            stage.name,
            f"{index}/{total}",
            run_reason(stage, changed),
            wait_for=[states[name] for name in stage.needs],  # dvc.yaml's edges in the UI graph
            return_state=True,
        )
        if not state.is_completed():
            error = state.result(raise_on_failure=False)
            elapsed = time.perf_counter() - started
            outcomes.append(StageOutcome(stage.name, "failed", elapsed, str(error)))
            outcomes += [
                StageOutcome(later.name, "not run", 0.0, f"{stage.name} failed")
                for later in plan.stages[index:]
            ]
            raise _flow_error(stage.name, error)
        outcome: StageOutcome = state.result()
        outcomes.append(outcome)
        if outcome.outcome in ("ran", "restored"):
            changed.add(stage.name)
        update_progress_artifact(progress, 100.0 * index / total)


def _flow_error(stage: str, error: Any) -> Exception:
    """The flow's own copy of a task's error (short traceback, same type and message)."""
    if isinstance(error, DvcBusyError):
        return DvcBusyError(str(error))
    if isinstance(error, StageFailedError):
        return type(error)(error.stage, error.error)
    return StageFailedError(stage, str(error))


def restore_outputs(dvc: DvcWorker, stage: str) -> None:
    """Put a failed stage's previous outputs back from the DVC cache (``dvc checkout``).

    DVC deletes a stage's outputs before running it. Best effort: a stage that never
    succeeded has nothing to restore.
    """
    logger = get_run_logger()
    try:
        dvc.checkout(stage)
    except RuntimeError as exc:
        logger.warning("could not restore the outputs of %s: %s", stage, exc)
    else:
        logger.info("restored the previous outputs of %s from the DVC cache", stage)


def record_run(
    dvc: DvcWorker, plan: Pipeline, outcomes: list[StageOutcome], run_name: str, save: bool
) -> str:
    """Save the run as a DVC experiment if a stage ran; return its name or why not."""
    logger = get_run_logger()
    if not save:
        return "not saved (save_experiment=False)"
    if not any(o.outcome in ("ran", "restored") for o in outcomes):
        return "not saved: nothing ran, the results are those of the previous run"
    if not plan.scm:
        logger.warning("not saving a DVC experiment: the project is not a git repo with a commit")
        return "not saved: no git commit to attach it to"
    try:
        name = dvc.save_experiment(run_name, list(plan.uncached_outputs))
    except RuntimeError as exc:
        logger.warning(
            "dvc exp save failed: %s; the run itself succeeded. Fix the cause and run "
            "`dvc exp save`.",
            exc,
        )
        return f"not saved: {exc}"
    logger.info("saved as DVC experiment %s (compare runs with `dvc exp show`)", name)
    return name


def publish_stage_table(outcomes: list[StageOutcome], experiment: str) -> None:
    """Publish the per-stage table: ran or cached, how long, and why."""
    if not outcomes:
        return
    ran = sum(o.outcome == "ran" for o in outcomes)
    create_table_artifact(
        reports.stages_table(outcomes),
        key="pipeline-stages",
        description=f"Per stage: ran or cached, and why (from dvc status before the run). "
        f"{ran} of {len(outcomes)} ran. DVC experiment: {experiment or 'none'}.",
    )


def publish_results(plan: Pipeline) -> None:
    """Publish the evaluation metrics, the confusion matrix and the export parity result."""
    logger = get_run_logger()
    root = plan.root
    for path in plan.metrics.get("evaluate", ()):
        if path.endswith(".json") and (root / path).is_file():
            metrics = read_json(root / path)
            create_table_artifact(
                reports.metrics_table(metrics),
                key="eval-metrics",
                description=f"Test-split metrics ({path}, stage evaluate)",
            )
            per_class = metrics.get("per_class") or {}
            break
    else:
        logger.warning("stage evaluate lists no JSON metrics file; no metrics artifact")
        per_class = {}
    for plot in plan.plots.get("evaluate", ()):
        if plot.props.get("template") == "confusion" and (root / plot.path).is_file():
            counts = reports.confusion_counts(
                root / plot.path, plot.props.get("x", "actual"), plot.props.get("y", "predicted")
            )
            create_markdown_artifact(
                reports.confusion_markdown(counts, list(per_class), per_class),
                key="confusion-matrix",
                description=f"Confusion matrix of the test split ({plot.path})",
            )
    for path in plan.metrics.get("export", ()):
        if path.endswith(".json") and (root / path).is_file():
            export = load_params(root / "params.yaml").export
            create_table_artifact(
                reports.parity_table(
                    read_json(root / path), export.atol, export.min_top1_agreement
                ),
                key="export-parity",
                description=f"ONNX export parity with the Keras model ({path}, stage export)",
            )
