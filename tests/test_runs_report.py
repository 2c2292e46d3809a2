"""Runs side by side (``tlp runs``) and one run's report (``tlp report``).

The slow tests: two ``tlp run`` with different params on a copy of the session's built
project (each run starts its temporary Prefect server), then the table, its CSV, and the
HTML report opened in headless Chromium with the network cut off; the screenshot is kept in
tests/artifacts/. The fast ones: the table's width and the page's parts, from made-up runs.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
import shutil
import sys
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from PIL import Image

from flows.html_report import RunFiles, render
from flows.runs import RecordedRun, table, to_csv
from tests.conftest import require, run
from tests.prefect_server import ARTIFACTS
from tests.test_dashboard import CHROMIUM, CHROMIUM_FLAGS


def tlp(project: Path, *args: str) -> str:
    """``tlp ARGS`` in the project, without a Prefect server (stdout)."""
    env = {"PREFECT_API_URL": "", "PREFECT_HOME": str(project / ".tlp" / "prefect")}
    command = [sys.executable, "-m", "flows.cli", *args]
    return run(command, project, env=env, timeout=900).stdout


@pytest.fixture(scope="module")
def two_runs(built_project: Path, tmp_path_factory) -> Path:
    """A project with two saved runs: train.epochs 3 -> 2, then also train.dropout 0.2 -> 0.3."""
    project = tmp_path_factory.mktemp("runs") / "project"
    shutil.copytree(built_project, project, symlinks=True)
    shutil.rmtree(project / ".tlp" / "prefect", ignore_errors=True)
    tlp(project, "run", "-S", "train.epochs=2")
    tlp(project, "run", "-S", "train.dropout=0.3")
    return project


def saved(project: Path) -> list[dict[str, str]]:
    """``tlp runs --csv``, parsed."""
    return list(csv.DictReader(io.StringIO(tlp(project, "runs", "--csv"))))


@pytest.mark.slow
def test_runs_shows_each_run_compactly_with_accuracy_and_what_changed(two_runs: Path):
    table = tlp(two_runs, "runs")
    lines = table.splitlines()
    assert max(map(len, lines)) <= 120, table
    assert lines[0].split()[:5] == ["run", "when", "accuracy", "macro", "F1"]
    rows = saved(two_runs)
    assert len(rows) == len(lines) - 1 == 2
    newest, oldest = rows  # newest first
    assert oldest["changed"] == "train.epochs: 3 -> 2"
    assert newest["changed"] == "train.epochs: 3 -> 2; train.dropout: 0.2 -> 0.3"
    for row, line in zip(rows, lines[1:], strict=True):
        assert line.startswith(row["name"][:23])
        assert f"{float(row['accuracy']):.4f}" in line and f"{float(row['macro_f1']):.4f}" in line
        assert "train.epochs: 3 -> 2" in line
        assert float(row["seconds"]) > 0
    # The numbers are those DVC recorded for each experiment.
    shown = json.loads(run(["dvc", "exp", "show", "--json"], two_runs).stdout)
    text = json.dumps(shown)
    for row in rows:
        assert row["rev"] in text and row["accuracy"][:8] in text


@pytest.mark.slow
def test_report_is_one_file_that_opens_offline_in_chromium(two_runs: Path, tmp_path: Path):
    require(
        importlib.util.find_spec("playwright") is not None, "playwright (pip install -e '.[dev]')"
    )
    require(CHROMIUM.exists(), f"{CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    oldest = saved(two_runs)[-1]
    written = tlp(two_runs, "report", oldest["name"])
    report = two_runs / "reports" / f"{oldest['name']}.html"
    assert str(report) in written
    lock = yaml.safe_load(run(["git", "show", f"{oldest['rev']}:dvc.lock"], two_runs).stdout)
    onnx = next(o for o in lock["stages"]["export"]["outs"] if o["path"] == "models/model.onnx")

    requested: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        try:
            context = browser.new_context(offline=True, viewport={"width": 1300, "height": 900})
            page = context.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.goto(report.as_uri())
            page.get_by_text("Lineage", exact=True).wait_for()
            text = page.inner_text("body")
            charts = page.locator("figure svg").count()
            matrix_rows = page.locator("table.confusion tr").count()
            images = page.evaluate("[...document.images].map(i => i.naturalWidth)")
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "tlp-report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()

    assert requested == [report.as_uri()]  # nothing else: no CDN, no font, no image URL
    assert f"test accuracy {float(oldest['accuracy']):.4f}" in text
    assert charts >= 2  # accuracy and loss, train and eval
    assert matrix_rows == 1 + 10  # a header and the ten digits
    assert images and all(width > 0 for width in images)  # the stages' pictures, decoded
    assert "epochs: 2" in text  # the run's params
    assert oldest["rev"] in text and onnx["md5"] in text  # lineage: commit and model hash
    assert shot.stat().st_size > 50_000


def test_the_table_fits_120_columns_however_many_params_changed():
    changed = {f"train.key_{i}": (i, i + 1) for i in range(30)}
    runs = [
        RecordedRun("a-very-long-flow-run-name-indeed", "f" * 40, datetime(2026, 1, 2, 3, 4),
                    changed, 0.91234, 0.9, 3725.0),
        RecordedRun("short", "e" * 40, None, {}, None, None, None),
    ]  # fmt: skip
    lines = table(runs).splitlines()
    assert max(map(len, lines)) <= 120
    assert "0.9123" in lines[1] and "62m05s" in lines[1] and "2026-01-02 03:04" in lines[1]
    assert lines[1].rstrip().endswith("more)")  # cut, saying how many are left out
    assert lines[2].split()[1:] == ["?", "-", "-", "-", "-"]
    rows = list(csv.DictReader(io.StringIO(to_csv(runs))))
    assert rows[0]["changed"].count(";") == 29  # the CSV has them all


def test_the_report_page_is_self_contained():
    out = SimpleNamespace(def_path="metrics/eval.json", metric=True, plot=False)
    confusion = SimpleNamespace(
        def_path="plots/confusion.csv", metric=False, plot={"template": "confusion"}
    )
    picture = SimpleNamespace(def_path="plots/p.png", metric=False, plot=True)
    png = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 0, 0)).save(png, "PNG")
    files = {
        "metrics/eval.json": json.dumps({"accuracy": 0.75, "macro_f1": 0.5}).encode(),
        "plots/confusion.csv": b"actual,predicted\ncat,cat\ncat,dog\ndog,dog\n",
        "plots/p.png": png.getvalue(),
        "curves/train/loss.tsv": b"step\tloss\n0\t1.5\n1\t0.5\n",
        "params.yaml": b"train:\n  epochs: 2\n",
        "dvc.lock": yaml.safe_dump({"stages": {"export": {"outs": [
            {"path": "models/model.onnx", "md5": "abc123", "size": 10}]}}}).encode(),
    }  # fmt: skip
    run_files = RunFiles("exp-1", "d" * 40, datetime(2026, 1, 2), False, files.get,
                         lambda folder: [p for p in files if p.startswith(folder + "/")])  # fmt: skip

    page = render(run_files, {"evaluate": [out, confusion, picture]}, ["curves"])

    assert "test accuracy <b>0.7500</b>" in page and "macro F1 <b>0.5000</b>" in page
    assert "2 of 3 test images on the diagonal" in page
    assert page.count("<svg") == 1 and "data:image/png;base64," in page
    assert "epochs: 2" in page and "abc123" in page and "d" * 40 in page
    assert "<script" not in page and not re.search(r"(src|href)=['\"]?(https?:)?//", page)
