"""The Prefect dashboard in a real headless browser (Debian's chromium, driven by Playwright).

Screenshots are kept in tests/artifacts/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import require
from tests.prefect_server import ARTIFACTS, STAGES, shared_pipeline

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
# Flags that work in this sandbox-less, offline container; a fresh profile per test.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def pipeline(request, tmp_path_factory):
    """The session's shared project, server and first run."""
    return shared_pipeline(request.config, tmp_path_factory)


@pytest.fixture
def page(tmp_path):
    """A page in headless chromium with a fresh profile."""
    require(
        importlib.util.find_spec("playwright") is not None, "playwright (pip install -e '.[dev]')"
    )
    require(CHROMIUM.exists(), f"{CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 2200},  # all eight task runs in one shot,
        )
        try:
            page = context.new_page()
            page.set_default_timeout(90_000)  # a busy 2-core machine renders slowly
            yield page
        finally:
            context.close()


def screenshot(page, name: str) -> Path:
    """Save a full-page screenshot in tests/artifacts/."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def log_in(page, url: str, secret: str) -> None:
    """Open the dashboard at the address ``tlp server`` prints and log in as a person does:
    a wrong secret is refused, the project's one lets the browser in (and it keeps it)."""
    page.goto(url)
    field = page.get_by_placeholder("admin:pass")  # Prefect's login page
    field.wait_for()
    assert "/login" in page.url  # no data before: every API call the page makes gets 401
    screenshot(page, "dashboard-login.png")
    field.fill("tlp:not-the-secret")
    field.press("Enter")
    page.get_by_text("Invalid credentials").wait_for()
    assert "/login" in page.url
    field.fill(secret)
    field.press("Enter")
    page.wait_for_url(lambda address: "/login" not in address)


def test_flow_run_page_shows_the_stage_task_runs_and_the_metrics_artifacts(pipeline, page):
    server, run_id = pipeline.server, pipeline.first_run_id
    flow_run = server.flow_run(run_id)

    log_in(page, server.url, server.auth)  # the API answers only to the project's secret
    page.goto(f"{server.url}/runs/flow-run/{run_id}")
    page.get_by_text(flow_run["name"], exact=True).first.wait_for()
    page.get_by_text("Task Runs", exact=True).click()
    page.get_by_text(f"({len(STAGES)} Completed)").wait_for()
    for stage in STAGES:
        page.get_by_text(stage, exact=True).first.wait_for()
    task_runs_text = page.inner_text("body")
    shot = screenshot(page, "dashboard-flow-run-task-runs.png")
    assert shot.stat().st_size > 10_000
    for stage in STAGES:
        assert f"\n{stage}\nCompleted\n" in task_runs_text  # the task run row: name, state

    page.get_by_text("Artifacts", exact=True).click()
    keys = ("eval-metrics", "pipeline-stages", "confusion-matrix", "export-parity", "quality")
    for key in (*keys, "pictures"):
        page.get_by_text(key, exact=True).wait_for()
    screenshot(page, "dashboard-flow-run-artifacts.png")

    page.get_by_text("confusion-matrix", exact=True).click()  # the Markdown, rendered
    page.wait_for_url("**/artifacts/artifact/**")
    page.locator("table").nth(1).wait_for()  # the matrix and the per-class scores
    matrix_text = page.inner_text("body")
    assert "actual \\ predicted" in matrix_text and "precision" in matrix_text
    screenshot(page, "dashboard-confusion-matrix.png")

    artifact = server.artifacts(run_id)["eval-metrics"]  # the metrics table itself
    metrics = {row["metric"]: row["value"] for row in json.loads(artifact["data"])}
    page.goto(f"{server.url}/artifacts/artifact/{artifact['id']}")
    page.get_by_text(str(metrics["accuracy"]), exact=True).wait_for()
    rows = [row.split() for row in page.locator("tbody tr").all_inner_texts()]
    screenshot(page, "dashboard-eval-metrics.png")
    for metric in ("accuracy", "macro_f1", "quality.lift", "macro_recall", "test_images"):
        assert [metric, str(metrics[metric])] in rows  # a table row: name, value

    # The pictures artifact carries its images (data: URLs): the browser decodes all three.
    page.goto(f"{server.url}/artifacts/artifact/{server.artifacts(run_id)['pictures']['id']}")
    images = page.locator("img[src^='data:image/jpeg']")
    images.nth(2).wait_for()
    page.wait_for_function(
        "Array.from(document.querySelectorAll(\"img[src^='data:image/jpeg']\"))"
        ".every(img => img.complete && img.naturalWidth > 0)"
    )
    widths = images.evaluate_all("images => images.map(img => [img.alt, img.naturalWidth])")
    assert [alt for alt, _ in widths] == [
        "plots/explain.png", "plots/errors.png", "plots/confusion_matrix.png",
    ]  # fmt: skip
    assert all(300 < width <= 1200 for _, width in widths), widths
    screenshot(page, "dashboard-pictures.png")
