"""Quiet, useful logs: no TensorFlow native lines, each error once, everything with --verbose.

The end-to-end checks (``dvc repro`` of the default pipeline, a failing ``tlp run``) are
the slow tests at the end and in tests/test_rollback.py.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import textwrap
from pathlib import Path

import pytest

from flows.logs import CONSOLE, QuietConsole
from tests.conftest import ROOT, make_project, run

# TensorFlow's own format ("2026-01-01 12:00:00.000000: I tensorflow/...cc:210] ...") and
# absl's ("I0000 00:00:1700000000.000000 1234 devices.cc:76] ..."), plus absl's notice.
TF_NATIVE_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] \S+\.cc:\d+\]|[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ "
    r"+\d+ \S+\.cc:\d+\]|WARNING: All log messages before absl::InitializeLog)",
    re.MULTILINE,
)
TF_WITH_NATIVE_LOGS = textwrap.dedent(
    """
    import numpy as np, tensorflow as tf
    tf.data.Dataset.from_tensor_slices(np.zeros((4, 2))).batch(2).reduce(0.0, lambda a, b: a)
    """
)


def python(code: str, cwd: Path, **env: str):
    """Run ``python -c code`` with TF_CPP_MIN_LOG_LEVEL unset unless given (conftest sets it)."""
    return run(
        ["env", "-u", "TF_CPP_MIN_LOG_LEVEL", sys.executable, "-c", code],
        cwd,
        env={"PYTHONPATH": str(ROOT), **env},
    )


def test_the_tasks_package_turns_tensorflows_native_logging_down_before_its_import(tmp_path):
    plain = python(TF_WITH_NATIVE_LOGS, tmp_path)
    assert TF_NATIVE_LINE.search(plain.stderr), plain.stderr  # TensorFlow does print them
    staged = python("import tasks\n" + TF_WITH_NATIVE_LOGS, tmp_path)
    assert not TF_NATIVE_LINE.search(staged.stderr), staged.stderr
    verbose = python("import tasks\n" + TF_WITH_NATIVE_LOGS, tmp_path, TLP_VERBOSE="1")
    assert TF_NATIVE_LINE.search(verbose.stderr), verbose.stderr


def test_the_onnx_conversion_hides_the_graph_optimisers_absl_lines(tmp_path):
    code = textwrap.dedent(
        """
        import tasks, keras
        from tasks.onnx_io import keras_to_onnx
        model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3)])
        keras_to_onnx(model, (8, 8, 3), 17, "pixels", "out")
        print("converted")
        """
    )
    quiet = python(code, tmp_path)
    assert "converted" in quiet.stdout and not TF_NATIVE_LINE.search(quiet.stderr), quiet.stderr
    verbose = python(code, tmp_path, TLP_VERBOSE="1")
    assert TF_NATIVE_LINE.search(verbose.stderr), verbose.stderr  # they exist: shown on demand


STAGE = textwrap.dedent(
    """
    import sys
    from tasks.common import StageError, run_stage

    def body():
        raise StageError("the input is bad; fix it like so")

    sys.exit(run_stage("toy", body))
    """
)


def test_a_stage_error_is_printed_once_or_left_to_the_runner_that_asked_for_it(tmp_path):
    alone = run([sys.executable, "-c", STAGE], tmp_path, check=False, env={"PYTHONPATH": str(ROOT)})
    assert alone.returncode == 1
    assert alone.stderr.count("the input is bad") == 1
    assert "ERROR: toy: the input is bad; fix it like so" in alone.stderr

    result = tmp_path / "result.json"
    env = {"PYTHONPATH": str(ROOT), "TLP_STAGE_RESULT": str(result)}
    runner = run([sys.executable, "-c", STAGE], tmp_path, check=False, env=env)
    assert runner.returncode == 1 and "the input is bad" not in runner.stderr
    assert json.loads(result.read_text())["error"] == "the input is bad; fix it like so"


def record(pathname: str, level: int = logging.INFO, **extra) -> logging.LogRecord:
    """A log record as if logged from ``pathname``."""
    made = logging.LogRecord("prefect.flow_runs", level, pathname, 1, "message", None, None)
    made.__dict__.update(extra)
    return made


def test_the_console_keeps_the_flows_lines_and_drops_prefects_narration():
    prefect = "/venv/site-packages/prefect"
    quiet = QuietConsole(prefect)
    assert quiet.filter(record("/project/flows/pipeline.py"))  # the flow's own lines
    assert not quiet.filter(record("/project/flows/pipeline.py", logging.ERROR, **{CONSOLE: False}))
    assert not quiet.filter(record(f"{prefect}/flow_engine.py", logging.ERROR))  # "Finished in..."
    assert not quiet.filter(record(f"{prefect}/task_engine.py", logging.INFO))
    assert not quiet.filter(record(f"{prefect}/client/orchestration.py", logging.INFO))
    assert quiet.filter(record(f"{prefect}/client/orchestration.py", logging.WARNING))


@pytest.mark.slow
def test_dvc_repro_of_the_default_pipeline_prints_no_tensorflow_native_line(tmp_path):
    project = make_project(tmp_path / "project")  # the shipped params, not shrunk
    result = run(["env", "-u", "TF_CPP_MIN_LOG_LEVEL", "dvc", "repro"], project, timeout=1800)
    output = result.stdout + result.stderr
    assert "Running stage 'export'" in output  # every stage ran
    assert not TF_NATIVE_LINE.search(output), TF_NATIVE_LINE.findall(output)
    assert "is empty" not in output  # the feature cache folder is never an empty output
