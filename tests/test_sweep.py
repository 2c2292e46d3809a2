"""``tlp sweep``: a grid of isolated runs on one DVC cache, ranked (flows/sweep.py).

The fast tests check the grid, which stages a grid shares, and the ranking. The slow one is
the whole thing against a real Prefect server: 4 runs, 2 at a time, each its own clone, a
child flow run of the sweep, and a DVC experiment in the project; the project's own
params.yaml and outputs untouched.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from flows.sweep import (
    SHARED_CACHE,
    SweepRun,
    _row,
    apply_experiment,
    expand_grid,
    format_table,
    ranked,
    table_rows,
    varied_stages,
)
from tasks.params import ParamsError, read_yaml
from tests.conftest import ROOT, make_project, run
from tests.prefect_server import (
    STAGES,
    experiments,
    flow_run_id,
    start_server,
    stop_process,
    tlp,
)


def test_grid_is_every_combination_in_dvc_exp_run_syntax():
    grid = expand_grid(["train.learning_rate=0.001,0.003", "train.dropout=0.1,0.3"])
    assert grid == [
        {"train.learning_rate": 0.001, "train.dropout": 0.1},
        {"train.learning_rate": 0.001, "train.dropout": 0.3},
        {"train.learning_rate": 0.003, "train.dropout": 0.1},
        {"train.learning_rate": 0.003, "train.dropout": 0.3},
    ]
    # Hydra's sweep syntax, as `dvc exp run --queue -S` reads it; one value is no sweep.
    assert expand_grid(["train.epochs=range(1,4)", "prepare.image_size=[16,16]"]) == [
        {"train.epochs": n, "prepare.image_size": [16, 16]} for n in (1, 2, 3)
    ]


@pytest.mark.parametrize(
    "options",
    [[], ["train.epochs"], ["train.epochs=range(1,100000)"], ["train.epochs=1,(2"]],
    ids=["none", "no-value", "too-many-runs", "unparsable"],
)
def test_a_bad_grid_is_refused_with_params_error(options):
    with pytest.raises(ParamsError, match="-S|grid|sweep"):
        expand_grid(options)


def test_stages_no_swept_key_reaches_are_shared(tmp_path):
    from dvc.repo import Repo

    from flows.stages import read_pipeline

    project = make_project(tmp_path / "project")
    with Repo(str(project)) as repo:
        stages = read_pipeline(repo).stages
    # train_other trains with the train section (the specialist), export_other exports it.
    assert varied_stages(project, stages, ["train.dropout"]) == {
        "train",
        "train_other",
        "evaluate",
        "export_other",
        "export",
    }
    # The backbone stage reads prepare.image_size: a new size re-runs everything after fetch.
    assert varied_stages(project, stages, ["prepare.image_size"]) == set(STAGES) - {"fetch"}
    assert varied_stages(project, stages, ["fetch"]) == set(STAGES) - {"backbone"}
    # The clones share the train stage's feature cache: the folder dvc.yaml gives it.
    assert f"--features {SHARED_CACHE}" in read_yaml(ROOT / "dvc.yaml")["stages"]["train"]["cmd"]


def test_table_ranks_by_metric_and_keeps_failed_runs_last_with_their_error():
    runs = [
        SweepRun(1, {"train.dropout": 0.1}, "Completed", "a", 0.5, {"train": "ran"}),
        SweepRun(2, {"train.dropout": 0.3}, "Failed", error="stage train failed: NaN loss"),
        SweepRun(3, {"train.dropout": 0.5}, "Completed", "c", 0.9, {"fetch": "restored"}),
    ]
    assert [r.index for r in ranked(runs)] == [3, 1, 2]
    # A run whose task itself failed (no clone could be made...) is a failed row too.
    crashed = _row(RuntimeError("git clone failed"), 4, {"train.dropout": 0.7})
    assert (crashed.state, crashed.error) == ("Failed", "RuntimeError: git clone failed")
    rows = table_rows(runs, "macro_f1")
    assert [(r["rank"], r["experiment"], r["macro_f1"]) for r in rows] == [
        (1, "c", 0.9), (2, "a", 0.5), (3, "-", "-"),
    ]  # fmt: skip
    assert rows[0]["cached"] == "1/1" and rows[1]["cached"] == "0/1"
    assert rows[2]["state"] == "Failed: stage train failed: NaN loss"
    lines = format_table(rows).splitlines()
    assert lines[0].split()[:3] == ["rank", "experiment", "macro_f1"] and len(lines) == 4


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_sweep_of_four_runs_two_at_a_time_leaves_the_workspace_alone(built_project, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(built_project, project, symlinks=True)
    watched = ["params.yaml", "dvc.lock", "models/model.onnx", "metrics/eval.json"]
    before = {name: digest(project / name) for name in watched}
    git_before = run(["git", "status", "--porcelain"], project).stdout
    server = start_server(project, tmp_path / "server.log")
    try:
        done = tlp(project, "sweep", "-S", "train.learning_rate=0.001,0.003",
                   "-S", "train.dropout=0.1,0.3", "--parallel", "2", api=None)  # fmt: skip
        sweep_id = flow_run_id(done.stdout)
        sweep_run = server.flow_run(sweep_id)
        task_runs = server.task_runs(sweep_id)
        children = server.post(
            "/flow_runs/filter",
            {"flow_runs": {"parent_task_run_id": {"any_": [t["id"] for t in task_runs]}}},
        )
        artifact = server.artifacts(sweep_id)["sweep"]
        child_stages = {c["name"]: len(server.task_runs(c["id"])) for c in children}
    finally:
        stop_process(server.process)

    # The workspace: params.yaml, dvc.lock and every output as they were; git sees no change.
    assert {name: digest(project / name) for name in watched} == before
    assert run(["git", "status", "--porcelain"], project).stdout == git_before
    assert not list((project / ".tlp" / "sweeps").glob("*/*"))  # the clones are gone

    # Four DVC experiments with metrics and the grid's params, in the project's git.
    branch = run(["git", "branch", "--show-current"], project).stdout.strip()
    saved = {name: e for name, e in experiments(project).items() if name != branch}
    assert len(saved) == 4, sorted(saved)
    grid = {(e["params"]["train"]["learning_rate"], e["params"]["train"]["dropout"])
            for e in saved.values()}  # fmt: skip
    assert grid == {(0.001, 0.1), (0.001, 0.3), (0.003, 0.1), (0.003, 0.3)}
    f1 = {name: e["metrics"]["metrics/eval.json"]["macro_f1"] for name, e in saved.items()}

    # The table, best first: each row's experiment with its own metric.
    lines = done.stdout[done.stdout.index("rank  experiment") :].splitlines()
    header, rows = lines[0].split(), [line.split() for line in lines[1:5]]
    assert header[:3] == ["rank", "experiment", "macro_f1"]
    assert [row[0] for row in rows] == ["1", "2", "3", "4"]
    assert {row[1] for row in rows} == set(saved)
    for row in rows:
        assert float(row[2]) == pytest.approx(f1[row[1]], abs=1e-4)
    assert [float(row[2]) for row in rows] == sorted((float(row[2]) for row in rows), reverse=True)
    # fetch, prepare and backbone came from the shared cache in every run; the rest ran.
    # fetch, prepare and backbone (no swept key reaches them) come from the shared run; so
    # may export_other, whose inputs do not change while the specialist is off.
    served = [row[header.index("cached")].split("/") for row in rows]
    assert all(int(n) >= 3 and int(d) == len(STAGES) for n, d in served), served
    assert {row[-1] for row in rows} == {"Completed"}

    # Prefect: one sweep flow run, whose four runs are child flow runs of one stage task each.
    assert sweep_run["state"]["type"] == "COMPLETED"
    assert sweep_run["parameters"]["parallel"] == 2
    assert sorted(child_stages) == sorted(saved)  # a run's experiment is named after it
    assert set(child_stages.values()) == {len(STAGES)}
    own = {
        t["name"] for t in task_runs if t["id"] not in {c["parent_task_run_id"] for c in children}
    }
    assert own == {"shared stages", *(f"run {i}" for i in range(1, 5))}
    assert artifact["type"] == "table"

    # What --apply-best does: the winner's params, dvc.lock and outputs in the workspace.
    best = rows[0][1]
    apply_experiment(project, best)
    applied = read_yaml(project / "params.yaml")["train"]
    wanted = saved[best]["params"]["train"]
    assert (applied["learning_rate"], applied["dropout"]) == (
        wanted["learning_rate"],
        wanted["dropout"],
    )
    assert json.loads(run(["dvc", "status", "--json"], project).stdout) == {}


def test_an_invalid_combination_fails_before_any_run(tmp_path):
    project = make_project(tmp_path / "project")
    result = tlp(project, "sweep", "-S", "train.dropout=0.1,1.5", api=None, check=False)
    assert result.returncode == 1
    assert "train.dropout" in result.stderr  # the key and its bounds, from the params check
    assert not (project / ".tlp" / "sweeps").exists()  # no sweep started, no clone made
