"""The Prefect flow against a real Prefect server (``tlp server``, SQLite on 127.0.0.1).

The slow tests share one shrunken pipeline project, built once by ``tlp run`` (see
tests/prefect_server.py); each leaves it up to date for the next. The fast tests at the
end check the pieces the flow's reports are made of.
"""

from __future__ import annotations

import base64
import ctypes
import io
import json
import os
import re
import signal
import sys
import time

import httpx
import pytest
import yaml

from flows import reports
from flows.locking import workspace_lock
from flows.stages import StageFailedError, TransientStageError, describe_status
from tasks.params import read_yaml
from tests.conftest import run, set_params
from tests.faults import pause_train_after_first_batch
from tests.prefect_server import (
    STAGES,
    descendants,
    experiments,
    flow_run_id,
    shared_pipeline,
    spawn,
    stop_process,
    tlp,
    wait_for,
    wait_gone,
)


@pytest.fixture(scope="module")
def pipeline(request, tmp_path_factory):
    """The session's shared project, server and first run."""
    return shared_pipeline(request.config, tmp_path_factory)


def outcomes(pipeline, run_id: str) -> dict[str, str]:
    """Stage -> the Prefect state name of its task run (Completed, Cached, Failed)."""
    return {r["name"]: r["state"]["name"] for r in pipeline.server.task_runs(run_id)}


def output_times(project) -> dict[str, float]:
    """Modification times of every stage output, to prove no stage wrote anything."""
    paths = ["data/raw", "data/prepared", "models", "metrics", "plots", "dvclive", "dvc.lock"]
    return {
        str(path): path.stat().st_mtime_ns
        for name in paths
        for path in [project / name, *(project / name).rglob("*")]
        if path.exists()
    }


def assert_reproducible(project) -> None:
    """`dvc status` after a run: nothing to reproduce, so `dvc repro` gives the same state."""
    assert json.loads(run(["dvc", "status", "--json"], project).stdout) == {}


@pytest.mark.slow
def test_first_run_has_one_completed_task_per_stage_artifacts_and_an_experiment(pipeline):
    server, project, run_id = pipeline.server, pipeline.project, pipeline.first_run_id

    flow_run = server.flow_run(run_id)
    assert flow_run["state"]["type"] == "COMPLETED"
    task_runs = server.task_runs(run_id)
    assert [r["name"] for r in task_runs] == STAGES  # dvc.yaml's order, one task per stage
    assert [r["state"]["name"] for r in task_runs] == ["Completed"] * len(STAGES)
    assert server.flow_run(run_id)["parameters"] == {
        "overrides": None,
        "save_experiment": True,
        "project_dir": None,
        "push": False,
    }

    artifacts = server.artifacts(run_id)
    shown = {"pipeline-stages", "eval-metrics", "confusion-matrix", "export-parity", "quality"}
    assert shown | {"pictures"} <= set(artifacts) and "weak-model" not in artifacts

    stage_rows = json.loads(artifacts["pipeline-stages"]["data"])
    assert [row["stage"] for row in stage_rows] == STAGES
    assert {row["outcome"] for row in stage_rows} == {"ran"}
    assert all("no entry in dvc.lock" in row["why"] for row in stage_rows)

    metrics = json.loads((project / "metrics/eval.json").read_text())
    table = {row["metric"]: row["value"] for row in json.loads(artifacts["eval-metrics"]["data"])}
    assert table["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert table["test_images"] == metrics["test_images"] == 268
    assert metrics["accuracy"] > 0.5

    assert table["quality.lift"] == pytest.approx(metrics["quality"]["lift"], abs=1e-6)
    training = json.loads((project / "metrics/train.json").read_text())
    quality = artifacts["quality"]["data"]
    assert f"| test accuracy | {metrics['accuracy']:.4g} |" in quality
    assert f"| baseline accuracy | {metrics['quality']['baseline_accuracy']:.4g} |" in quality
    per_image = training["train"]["params_per_image"]  # 26.5 for the shrunk CNN: warned
    assert f"| trainable parameters per training image | {per_image:.4g} |" in quality
    assert per_image > 10 and "above the 10:1 rule of thumb" in quality.split("**Warnings**")[1]
    # The pictures are inside the Markdown (data: URLs), in dvc.yaml's order.
    pictures = re.findall(r"!\[([^\]]+)\]\(data:image/jpeg;base64,", artifacts["pictures"]["data"])
    assert pictures == ["plots/explain.png", "plots/errors.png", "plots/confusion_matrix.png"]

    matrix = artifacts["confusion-matrix"]["data"]
    assert f"of {metrics['test_images']} test images on the diagonal" in matrix
    assert "| **0** | **" in matrix  # the diagonal cell of class 0, in bold
    correct = round(metrics["accuracy"] * metrics["test_images"])
    assert (
        f"**Confusion matrix**: rows are the actual class, columns the predicted class; {correct} of"
        in matrix
    )

    export = json.loads((project / "metrics/export.json").read_text())
    parity = json.loads(artifacts["export-parity"]["data"])
    assert parity[0]["value"] == export["top1_agreement"] == 1.0 and parity[0]["passed"] is True
    assert parity[1]["value"] == export["max_abs_diff"] and parity[1]["passed"] is True

    logs = server.logs(run_id)
    assert "Epoch 3/3" in logs  # training progress, streamed from the stage into Prefect
    assert any(m.startswith(f"[4/{len(STAGES)}] train: running") for m in logs)
    assert any("INFO [tlp] evaluate: accuracy" in m for m in logs)

    saved = experiments(project)
    assert flow_run["name"] in saved, saved.keys()
    recorded = saved[flow_run["name"]]
    assert recorded["params"]["train"]["epochs"] == 3
    assert recorded["metrics"]["metrics/eval.json"]["accuracy"] == pytest.approx(
        metrics["accuracy"]
    )
    assert_reproducible(project)


@pytest.mark.slow
def test_rerun_with_nothing_changed_reports_every_stage_cached_and_does_no_work(pipeline):
    server, project = pipeline.server, pipeline.project
    before = output_times(project)
    saved_before = set(experiments(project))

    result = tlp(project, "run", api=server.api)
    run_id = flow_run_id(result.stdout)

    assert server.flow_run(run_id)["state"]["type"] == "COMPLETED"
    assert outcomes(pipeline, run_id) == dict.fromkeys(STAGES, "Cached")
    rows = json.loads(server.artifacts(run_id)["pipeline-stages"]["data"])
    assert [(row["stage"], row["outcome"]) for row in rows] == [(s, "cached") for s in STAGES]
    assert output_times(project) == before  # no stage wrote anything
    assert set(experiments(project)) == saved_before  # nothing new to record
    assert f"cached: {', '.join(STAGES)}" in result.stdout


@pytest.mark.slow
def test_epochs_override_reruns_train_evaluate_export_only(pipeline):
    server, project = pipeline.server, pipeline.project
    epochs = yaml.safe_load((project / "params.yaml").read_text())["train"]["epochs"]
    new = epochs - 1 if epochs > 1 else epochs + 1

    result = tlp(project, "run", "-S", f"train.epochs={new}", api=server.api)
    run_id = flow_run_id(result.stdout)
    flow_run = server.flow_run(run_id)

    assert flow_run["parameters"]["overrides"] == {"train.epochs": new}
    assert outcomes(pipeline, run_id) == {
        "fetch": "Cached",
        "prepare": "Cached",
        "backbone": "Cached",
        "train": "Completed",
        "train_other": "Completed",  # it reads the train section (it is off: in a second)
        "evaluate": "Completed",
        "export_other": "Cached",  # its inputs did not change: DVC found it up to date
        "export": "Completed",
    }
    rows = {
        row["stage"]: row for row in json.loads(server.artifacts(run_id)["pipeline-stages"]["data"])
    }
    assert rows["train"]["why"] == f"params train.epochs {epochs} -> {new}"
    assert rows["evaluate"]["why"] == "needs new outputs of train, train_other"
    assert rows["export"]["why"] == "needs new outputs of train, train_other, evaluate"  # the card

    # The override is in params.yaml, so `dvc repro` reproduces this run.
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["epochs"] == new
    assert json.loads((project / "models/model.json").read_text())["epochs_run"] == new
    assert_reproducible(project)

    saved = experiments(project)
    assert saved[flow_run["name"]]["params"]["train"]["epochs"] == new
    assert (
        saved[server.flow_run(pipeline.first_run_id)["name"]]["params"]["train"]["epochs"] == epochs
    )


@pytest.mark.slow
def test_failing_stage_fails_its_task_and_the_flow_and_leaves_outputs_whole(pipeline):
    server, project = pipeline.server, pipeline.project
    params_before = (project / "params.yaml").read_text()
    raw_before = sorted(str(p.relative_to(project)) for p in (project / "data/raw").rglob("*"))
    source_json = (project / "data/raw/source.json").read_text()

    # Valid for the params parser and an existing file (DVC checks that a dependency
    # exists), but no archive: fails inside the fetch stage.
    result = tlp(project, "run", "-S", "fetch.source=pyproject.toml", api=server.api, check=False)

    assert result.returncode == 1
    assert "ERROR: stage fetch failed: refusing the archive from pyproject.toml" in result.stderr
    run_id = flow_run_id(result.stderr)
    flow_run = server.flow_run(run_id)
    assert flow_run["state"]["type"] == "FAILED"
    assert "stage fetch failed" in flow_run["state"]["message"]
    task_runs = server.task_runs(run_id)
    assert [(r["name"], r["state"]["type"]) for r in task_runs] == [("fetch", "FAILED")]
    assert task_runs[0]["run_count"] == 1  # not a network error: no retry
    fetch_logs = server.logs(run_id, task_runs[0]["id"])  # the dashboard has the error...
    assert any("fetch failed: refusing the archive from pyproject.toml" in m for m in fetch_logs)
    output = result.stdout + result.stderr  # ...and the terminal shows it once, at the end
    assert output.count("refusing the archive from pyproject.toml") == 1, output
    assert "Traceback" not in output

    rows = json.loads(server.artifacts(run_id)["pipeline-stages"]["data"])
    assert [row["outcome"] for row in rows] == ["failed"] + ["not run"] * (len(STAGES) - 1)

    # Nothing half-written: the previous outputs are back, no temporary leftovers, and
    # params.yaml no longer holds the failing override.
    assert (
        sorted(str(p.relative_to(project)) for p in (project / "data/raw").rglob("*")) == raw_before
    )
    assert (project / "data/raw/source.json").read_text() == source_json
    assert not [p.name for p in (project / "data").iterdir() if p.name.startswith(".raw")]
    assert (project / "params.yaml").read_text() == params_before
    assert_reproducible(project)


@pytest.mark.slow
def test_a_weak_model_let_through_by_allow_weak_gets_a_warning_artifact(pipeline):
    server, project = pipeline.server, pipeline.project
    weak = ["-S", "evaluate.allow_weak=true", "-S", "evaluate.min_accuracy=1.0"]
    result = tlp(project, "run", "--no-save-experiment", *weak, api=server.api)
    run_id = flow_run_id(result.stdout)

    assert server.flow_run(run_id)["state"]["type"] == "COMPLETED"
    assert outcomes(pipeline, run_id)["evaluate"] == "Completed"
    artifacts = server.artifacts(run_id)
    accuracy = json.loads((project / "metrics/eval.json").read_text())["accuracy"]
    problem = f"test accuracy {accuracy:.3f} is under evaluate.min_accuracy 1.0"
    assert "`evaluate.allow_weak: true` let it through" in artifacts["weak-model"]["data"]
    assert problem in artifacts["weak-model"]["data"] and problem in artifacts["quality"]["data"]
    assert any("weak model kept" in message for message in server.logs(run_id))

    strict = ["-S", "evaluate.allow_weak=false", "-S", "evaluate.min_accuracy=null"]
    result = tlp(project, "run", "--no-save-experiment", *strict, api=server.api)
    run_id = flow_run_id(result.stdout)
    assert outcomes(pipeline, run_id)["evaluate"] == "Cached"  # DVC's run cache: no rerun
    assert "weak-model" not in server.artifacts(run_id)
    assert_reproducible(project)


@pytest.mark.slow
def test_invalid_override_fails_before_any_flow_run_or_stage(pipeline):
    server, project = pipeline.server, pipeline.project
    params_before = (project / "params.yaml").read_text()
    runs_before = server.post("/flow_runs/count", {})

    result = tlp(
        project, "run", "-S", "train.epochs=0", "-S", "train.nope=1", api=server.api, check=False
    )

    assert result.returncode == 1
    assert "train.epochs" in result.stderr and "unknown key train.nope" in result.stderr
    assert server.post("/flow_runs/count", {}) == runs_before  # no flow run at all
    assert (project / "params.yaml").read_text() == params_before


@pytest.mark.slow
def test_second_run_fails_at_once_while_another_holds_the_workspace(pipeline):
    server, project = pipeline.server, pipeline.project
    with workspace_lock(project, "a test holding the lock"):
        started = time.monotonic()
        result = tlp(project, "run", api=server.api, check=False)
        elapsed = time.monotonic() - started

    assert result.returncode == 1
    assert f"PID {os.getpid()}" in result.stderr and "a test holding the lock" in result.stderr
    run_id = flow_run_id(result.stderr)
    assert server.flow_run(run_id)["state"]["type"] == "FAILED"
    assert server.task_runs(run_id) == []
    assert elapsed < 60, elapsed  # it did not wait for the holder


@pytest.mark.slow
def test_run_fails_clearly_while_dvc_holds_its_repo_lock(pipeline):
    from dvc.repo import Repo

    server, project = pipeline.server, pipeline.project
    with Repo(str(project)) as repo, repo.lock:  # what a `dvc repro` in progress holds
        result = tlp(project, "run", api=server.api, check=False)

    assert result.returncode == 1
    assert "DVC's repo lock is held by another DVC process" in result.stderr
    run_id = flow_run_id(result.stderr)
    assert server.flow_run(run_id)["state"]["type"] == "FAILED"
    assert_reproducible(project)


@pytest.mark.slow
def test_served_deployment_runs_on_its_schedule_without_anyone_starting_it(pipeline, tmp_path):
    server, project = pipeline.server, pipeline.project
    serve = spawn(
        [sys.executable, "-m", "flows.cli", "serve", "--interval", "5", "--name", "every-5s"],
        project,
        tmp_path / "serve.log",
        env={"PREFECT_API_URL": server.api, "PREFECT_RUNNER_POLL_FREQUENCY": "1"},
    )
    try:
        deployment = wait_for(
            lambda: _deployment(server, "every-5s"), 90, "tlp serve to register the deployment"
        )
        assert deployment["schedules"][0]["schedule"]["interval"] == 5.0

        def completed_run():
            runs = server.post(
                "/flow_runs/filter",
                {"deployments": {"id": {"any_": [deployment["id"]]}}, "sort": "START_TIME_DESC"},
            )
            return next((r for r in runs if r["state"]["type"] == "COMPLETED"), None)

        flow_run = wait_for(completed_run, 180, "a scheduled flow run to complete", interval=2)
    finally:
        stop_process(serve)
    assert flow_run["auto_scheduled"] is True  # created by the scheduler, not by a person
    assert outcomes(pipeline, flow_run["id"]) == dict.fromkeys(STAGES, "Cached")


def _deployment(server, name: str):
    try:
        return server.get(f"/deployments/name/tlp-pipeline/{name}")
    except httpx.HTTPStatusError:  # 404 until it is registered
        return None


@pytest.mark.slow
def test_prefect_deploy_puts_the_flow_on_a_work_pool_and_a_worker_elsewhere_runs_it(
    pipeline, tmp_path
):
    server, project = pipeline.server, pipeline.project
    env = {"PREFECT_API_URL": server.api, "PREFECT_HOME": str(project / ".tlp/prefect")}
    env["PREFECT_API_AUTH_STRING"] = server.auth  # plain `prefect` needs the project's secret
    prefect = [sys.executable, "-m", "prefect"]
    run([*prefect, "work-pool", "create", "tlp", "--type", "process"], project, env=env)
    run([*prefect, "deploy", "--name", "tlp-pipeline"], project, env=env)  # reads prefect.yaml

    deployment = server.get("/deployments/name/tlp-pipeline/tlp-pipeline")
    assert deployment["work_pool_name"] == "tlp"
    assert deployment["entrypoint"] == "flows/pipeline.py:pipeline"
    assert deployment["pull_steps"] == [
        {
            "prefect.deployments.steps.set_working_directory": {
                "directory": "{{ $TLP_PROJECT_DIR }}"  # resolved on the worker
            }
        }
    ]
    run([*prefect, "deployment", "run", "tlp-pipeline/tlp-pipeline"], project, env=env)

    elsewhere = tmp_path / "worker-machine"  # the worker runs outside the project
    elsewhere.mkdir()
    worker = spawn(
        [*prefect, "worker", "start", "--pool", "tlp", "--run-once"],
        elsewhere,
        tmp_path / "worker.log",
        env={**env, "TLP_PROJECT_DIR": str(project)},
    )
    try:

        def finished_run():
            runs = server.post(
                "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment["id"]]}}}
            )
            return next(
                (r for r in runs if r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED")), None
            )

        flow_run = wait_for(finished_run, 240, "the worker to run the deployment", interval=2)
    finally:
        stop_process(worker)
    assert flow_run["state"]["type"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-3000:]
    assert outcomes(pipeline, flow_run["id"]) == dict.fromkeys(STAGES, "Cached")


# -- the pieces, without a server --------------------------------------------------------


def test_status_reasons_name_the_changed_param_values_files_and_outputs(tmp_path):
    # 1e-05 without a dot is a float in YAML 1.2 (DVC) but a string for PyYAML: no false diff.
    (tmp_path / "params.yaml").write_text(
        "train:\n  epochs: 5\n  fine_tune:\n    learning_rate: 1e-05\n"
    )
    locked = {
        "train": {
            "params": {
                "params.yaml": {"train": {"epochs": 3, "fine_tune": {"learning_rate": 1e-05}}}
            }
        }
    }
    entries = [
        {"changed deps": {"params.yaml": {"train": "modified"}, "tasks/train.py": "modified"}},
        {"changed outs": {"models/model.keras": "deleted"}},
        "changed checksum",
    ]
    assert describe_status("train", entries, locked, tmp_path) == (
        "params train.epochs 3 -> 5; tasks/train.py modified; output models/model.keras deleted; "
        "its dvc.yaml definition changed"
    )
    assert describe_status("evaluate", entries, locked, tmp_path) == (
        "never ran here (no entry in dvc.lock)"
    )


def test_only_a_network_failure_is_retried():
    from prefect.states import Failed

    from flows.pipeline import STAGE_TASK_OPTIONS

    retry = STAGE_TASK_OPTIONS["fetch"]["retry_condition_fn"]
    assert retry(None, None, Failed(data=TransientStageError("fetch", "could not download")))
    assert not retry(None, None, Failed(data=StageFailedError("fetch", "no such folder")))
    assert set(STAGE_TASK_OPTIONS) == {"fetch"}  # no other stage retries


def test_confusion_matrix_markdown_counts_actual_predicted_pairs(tmp_path):
    csv_path = tmp_path / "confusion.csv"
    csv_path.write_text("actual,predicted\ncat,cat\ncat,dog\ndog,dog\ndog,dog\nbird,dog\n")
    counts = reports.confusion_counts(csv_path)
    assert counts == {("cat", "cat"): 1, ("cat", "dog"): 1, ("dog", "dog"): 2, ("bird", "dog"): 1}
    per_class = {"cat": {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}}
    markdown = reports.confusion_markdown(counts, ["cat", "dog"], per_class)
    assert "3 of 5 test images on the diagonal" in markdown
    assert "| actual \\ predicted | cat | dog | bird |" in markdown
    assert "| **cat** | **1** | 1 | 0 |" in markdown
    assert "| **bird** | 0 | 1 | **0** |" in markdown
    assert "| cat | 1.0000 | 0.5000 | 0.6667 | 2 |" in markdown


def test_parity_table_checks_the_export_gates():
    rows = reports.parity_table(
        {"top1_agreement": 0.98, "max_abs_diff": 1e-5, "parity_images": 200}, 1e-4, 0.99
    )
    assert [(r["check"], r["passed"]) for r in rows[:2]] == [
        ("top-1 agreement, ONNX vs Keras", False),
        ("max |ONNX - Keras| probability", True),
    ]
    assert rows[2] == {"check": "parity_images", "value": 200, "limit": "", "passed": ""}
    assert reports.metrics_table({"accuracy": 0.5, "per_class": {"a": {}}, "top_k": 3}) == [
        {"metric": "accuracy", "value": 0.5},
        {"metric": "top_k", "value": 3},
    ]


def test_quality_markdown_has_the_guards_figures_the_saved_epoch_and_every_warning():
    evaluation = {
        "accuracy": 0.5, "macro_f1": 0.3333, "quality": {"baseline_accuracy": 0.5, "lift": 1.0,
        "prediction_majority_share": 1.0}, "test_images": 10, "warnings": ["collapsed"],
    }  # fmt: skip
    training = {
        "train": {"best_epoch": 2, "best_epoch_val_loss": 0.69, "best_epoch_val_accuracy": 0.5,
                  "epochs_run": 5, "params_per_image": 12100.2},
        "warnings": ["12,100 per image"],
    }  # fmt: skip
    markdown = reports.quality_markdown(evaluation, training)
    assert "| test accuracy | 0.5 | 10 test images |" in markdown
    assert "| lift | 1 | accuracy / baseline; 1.0 is no better than guessing |" in markdown
    assert "| trainable parameters per training image | 1.21e+04 |" in markdown
    assert (
        "| saved (best) epoch | 2 | of 5 run; at it: val_loss 0.69, val_accuracy 0.5 |" in markdown
    )
    assert markdown.endswith("**Warnings**\n\n- collapsed\n- 12,100 per image\n")
    assert reports.quality_markdown({"accuracy": 0.9}, None).endswith("No warnings.\n\n")


def test_pictures_are_embedded_as_reduced_jpeg_copies(tmp_path):
    from PIL import Image

    wide = tmp_path / "wide.png"
    Image.new("RGB", (2400, 600), (200, 30, 30)).save(wide)
    markdown = reports.pictures_markdown([("plots/wide.png", wide)])
    assert markdown.startswith("**plots/wide.png**\n\n![plots/wide.png](data:image/jpeg;base64,")
    data = re.search(r"base64,([^)]+)\)", markdown).group(1)
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        assert image.format == "JPEG" and image.size == (reports.PICTURE_WIDTH, 300)
        assert image.getpixel((10, 10)) == pytest.approx((200, 30, 30), abs=3)


@pytest.mark.slow
def test_two_tlp_runs_and_a_dvc_repro_started_together_leave_one_writer(pipeline, tmp_path):
    """Three writers at once: the locks let one write; the others wait or fail at once."""
    server, project = pipeline.server, pipeline.project
    # Give every runner real work to do: a seed no earlier test trained with, or DVC's run
    # cache would restore the model instead of training it.
    set_params(project, {"train": {"epochs": 1, "seed": 1001}})
    env = {"PREFECT_API_URL": server.api, "PREFECT_HOME": str(project / ".tlp" / "prefect")}
    commands = {
        "tlp-a": [sys.executable, "-m", "flows.cli", "run", "--no-save-experiment"],
        "tlp-b": [sys.executable, "-m", "flows.cli", "run", "--no-save-experiment"],
        "dvc": ["dvc", "repro"],
    }
    logs = {name: tmp_path / f"{name}.log" for name in commands}
    started = time.monotonic()
    processes = {name: spawn(cmd, project, logs[name], env=env) for name, cmd in commands.items()}
    finished: dict[str, float] = {}
    for name, process in processes.items():
        process.wait(timeout=900)
        finished[name] = time.monotonic() - started
    outputs = {name: logs[name].read_text() for name in commands}
    codes = {name: process.returncode for name, process in processes.items()}

    busy = ("is held by another DVC process", "Unable to acquire lock", "this workspace is busy")
    winners = [name for name, code in codes.items() if code == 0]
    assert winners, outputs
    for name, code in codes.items():
        if code != 0:  # a loser says why, naming the lock, and gave up without waiting it out
            assert any(word in outputs[name] for word in busy), outputs[name][-3000:]
    tlp_writers = [n for n in ("tlp-a", "tlp-b") if "train: running" in outputs[n]]
    assert len(tlp_writers) <= 1, outputs  # the workspace lock: never two tlp writers
    assert_reproducible(project)  # outputs and dvc.lock agree, whoever wrote them
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train.epochs"] == 1


@pytest.mark.slow
def test_dvc_repro_started_by_hand_mid_run_is_refused_and_dvc_lock_matches_params(
    pipeline, tmp_path
):
    """DVC's repo lock is held from the first stage to the last, even while a command runs."""
    server, project = pipeline.server, pipeline.project
    env = {"PREFECT_API_URL": server.api, "PREFECT_HOME": str(project / ".tlp" / "prefect")}
    epochs = yaml.safe_load((project / "params.yaml").read_text())["train"]["epochs"]
    new = 2 if epochs != 2 else 3
    log = tmp_path / "flow.log"
    # A seed no earlier test trained with: DVC's run cache must not restore the model.
    cmd = [sys.executable, "-m", "flows.cli", "run", "-S", f"train.epochs={new}",
           "-S", "train.seed=1002"]  # fmt: skip
    process = spawn([*cmd, "--no-save-experiment"], project, log, env=env)
    try:
        wait_for(lambda: "Epoch 1/" in log.read_text(), 600, "the train stage to start")
        # Freeze the flow, its DVC worker and the stage where they are: whatever lock the
        # run holds now, it holds while `dvc repro` tries, however fast or slow it is.
        frozen = [process.pid, *descendants(process.pid)]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            by_hand = run(["dvc", "repro"], project, check=False, timeout=120)
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
        assert process.wait(timeout=900) == 0, log.read_text()[-3000:]
    finally:
        stop_process(process)

    assert by_hand.returncode != 0
    assert "Unable to acquire lock" in by_hand.stderr  # DVC's own lock error
    assert "Running stage" not in by_hand.stdout + by_hand.stderr
    assert_reproducible(project)
    lock, params = read_yaml(project / "dvc.lock"), read_yaml(project / "params.yaml")  # as DVC
    # The train stage lists every train key but the specialist's switch, one by one.
    locked = lock["stages"]["train"]["params"]["params.yaml"]
    train = {key: value for key, value in params["train"].items() if key != "other_specialist"}
    assert locked == {f"train.{key}": value for key, value in train.items()}
    assert params["train"]["epochs"] == new


@pytest.mark.slow
def test_killed_flow_run_leaves_no_process_dvc_lock_untouched_and_the_next_run_completes(
    pipeline, tmp_path
):
    """SIGKILL `tlp run` alone while the train stage runs: its DVC worker and the stage go too,
    even a stage that does not stop on SIGTERM (a TensorFlow process can hang on its way out)."""
    server, project = pipeline.server, pipeline.project
    env = {"PREFECT_API_URL": server.api, "PREFECT_HOME": str(project / ".tlp" / "prefect")}
    assert_reproducible(project)
    lock_before = (project / "dvc.lock").read_bytes()
    log = tmp_path / "killed.log"
    cmd = [sys.executable, "-m", "flows.cli", "run", "-S", "train.epochs=4", "-S", "train.seed=1003",
           "--no-save-experiment"]  # fmt: skip
    # Orphans of the killed flow become our children, so we can reap them: an unreaped
    # zombie keeps its PID, and DVC would take its stale rwlock entry for a live writer.
    ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
    # The train stage stops after its first batch and says so: the kill lands mid-train
    # however fast or slow the machine is. From then on it ignores SIGTERM: only the
    # worker's SIGKILL, after its grace, can end it.
    hook, paused = pause_train_after_first_batch(tmp_path / "hook", project, ignore_sigterm=True)
    process = spawn(cmd, project, log, env={**env, **hook})
    try:
        wait_for(paused.exists, 600, "the train stage to pause after its first batch")
        below = descendants(process.pid)  # the DVC worker, the shell, the stage command
    finally:
        process.kill()  # as when the machine's OOM killer picks it: no chance to clean up
        process.wait(timeout=60)
    assert len(below) >= 2, below
    wait_gone(below, 120, "the worker and the stage to exit")

    assert (project / "dvc.lock").read_bytes() == lock_before  # nothing half-recorded
    status = json.loads(run(["dvc", "status", "--json"], project).stdout)
    assert "train" in status  # DVC knows train must run again (params.yaml kept the override)

    result = tlp(project, "run", "--no-save-experiment", api=server.api)  # the locks are free
    run_id = flow_run_id(result.stdout)
    states = outcomes(pipeline, run_id)
    assert states["train"] == "Completed" and states["fetch"] == "Cached", states
    assert_reproducible(project)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train.epochs"] == 4
