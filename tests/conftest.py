"""Shared fixtures: a real DVC project in a temporary folder, with shrunken params."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from flows.workspace import dotted_keys
from tasks.params import apply_overrides, load_params

ROOT = Path(__file__).resolve().parents[1]
PARAMS = load_params(ROOT / "params.yaml")  # the shipped defaults, the only ones there are
BIN = Path(sys.executable).parent
PROJECT_FILES = (
    "tasks",
    "flows",
    "presets",
    "data/builtin",
    "data/weights",
    "dvc.yaml",
    "params.yaml",
    "pyproject.toml",
    "prefect.yaml",
    ".gitignore",
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TLP_NO_PROGRESS", "1")

# Small enough for a 2-core CI machine; large enough that accuracy means something.
SHRUNK = {
    # A 128-unit hidden layer (the shipped head has none): ~26 parameters per training
    # image, so the 10:1 warning is in play wherever these params run.
    "train": {
        "epochs": 3,
        "early_stopping_patience": 0,
        "dense_units": 128,
        "learning_rate": 0.001,
    },
    "prepare": {"image_size": [16, 16]},
    "backbone": {"simple_cnn": {"filters": [8, 16]}},
    "export": {"max_parity_images": 200},
}


def merged(base: dict, changes: dict) -> dict:
    """A copy of params ``base`` with the sections of ``changes`` merged in, key by key."""
    return apply_overrides(base, dotted_keys(changes))


def require(available: bool, what: str) -> None:
    """Skip the calling test when a test dependency is missing; under ``CI=true``, fail it.

    Locally a missing package skips, saying what to install; in CI the run must not go
    green by skipping what it was meant to test.

    Args:
        available: whether the dependency is there.
        what: what is missing and how to get it, e.g. ``"chromium (apt-get install chromium)"``.
    """
    if available:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is missing, and CI=true: install it", pytrace=False)
    pytest.skip(f"{what} is missing")


def requires(available: bool, what: str) -> Callable[[Callable], Callable]:
    """:func:`require` as a decorator for a test function."""

    def decorate(test: Callable) -> Callable:
        @functools.wraps(test)
        def checked(*args, **kwargs):
            require(available, what)
            return test(*args, **kwargs)

        return checked

    return decorate


def run(cmd: list[str], cwd: Path, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command with the venv's tools first on PATH, capturing text output."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(cwd)}
    env.update(kwargs.pop("env", {}))
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\nstdout:\n{result.stdout[-4000:]}\n"
            f"stderr:\n{result.stderr[-6000:]}"
        )
    return result


def make_project(dest: Path, params: dict | None = None) -> Path:
    """Copy the pipeline into ``dest`` as a fresh git + DVC repo with merged params.

    Also used by the benchmarks (bench/), which copy the project the same way.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy2(source, dest / name)
    with (ROOT / "params.yaml").open() as handle:
        data = merged(yaml.safe_load(handle), params or {})
    (dest / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["git", "config", "user.email", "test@example.com"], dest)
    run(["git", "config", "user.name", "test"], dest)
    run(["dvc", "init", "-q"], dest)
    run(["dvc", "config", "core.analytics", "false"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "init"], dest)
    return dest


def write_params(path: Path, changes: dict) -> Path:
    """Write the shipped params.yaml to ``path`` with ``changes`` merged in; return ``path``."""
    with (ROOT / "params.yaml").open() as handle:
        data = merged(yaml.safe_load(handle), changes)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def set_params(project: Path, changes: dict) -> None:
    """Merge ``changes`` into the project's params.yaml."""
    path = project / "params.yaml"
    data = merged(yaml.safe_load(path.read_text()), changes)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh pipeline project with shrunken params."""
    return make_project(tmp_path / "project", SHRUNK)


@pytest.fixture(scope="session")
def built_project(tmp_path_factory) -> Path:
    """One shrunken pipeline, run once with ``dvc repro`` and shared by read-only tests."""
    path = make_project(tmp_path_factory.mktemp("built") / "project", SHRUNK)
    run(["dvc", "repro"], path)
    return path
