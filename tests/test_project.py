"""The project agrees with itself: dvc.yaml's code deps, the presets, the CI rule for tests."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from flows.presets import DEFAULT, apply_preset, presets
from tests.conftest import ROOT
from tests.prefect_server import STAGES


def imported_task_modules(module: str) -> set[str]:
    """The ``tasks`` modules ``module`` imports, directly or not, itself included.

    Every import counts, also those inside functions: a stage that imports a module only
    when it needs it still runs its code.
    """
    found: set[str] = set()
    queue = [module]
    while queue:
        name = queue.pop()
        path = ROOT / Path(*name.split(".")).with_suffix(".py")
        if name in found or not path.is_file():
            continue
        found.add(name)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                queue += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                queue += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return {name for name in found if name.startswith("tasks.")}


def test_every_stage_lists_exactly_the_tasks_modules_it_imports_as_deps():
    """A change to any module a stage runs must re-run the stage, and nothing else should."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    package = ast.parse((ROOT / "tasks/__init__.py").read_text())
    # tasks/__init__.py runs in every stage; while it holds only a docstring it need not be a dep.
    docstring_only = all(isinstance(node, ast.Expr) for node in package.body)
    assert list(stages) == STAGES
    for name, stage in stages.items():
        module = re.search(r"python -m (tasks\.\w+)", stage["cmd"]).group(1)
        imported = {f"{m.replace('.', '/')}.py" for m in imported_task_modules(module)}
        if not docstring_only:
            imported.add("tasks/__init__.py")
        listed = {dep for dep in stage.get("deps", []) if dep.startswith("tasks/")}
        assert listed == imported, (
            f"stage {name}: add {sorted(imported - listed)} to its deps in dvc.yaml, "
            f"remove {sorted(listed - imported)}"
        )


def test_no_stage_module_imports_another_stage_module():
    """What two stages share lives in a helper module (``tasks.training``, ``tasks.onnx_io``).

    A stage that imported another would list the other's whole module as a dep, and re-run
    whenever the other's command line or outputs changed.
    """
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    modules = {re.search(r"python -m (tasks\.\w+)", s["cmd"]).group(1) for s in stages.values()}
    assert len(modules) == len(stages)
    for module in sorted(modules):
        others = (imported_task_modules(module) - {module}) & modules
        assert not others, f"{module} imports the stage module(s) {sorted(others)}"


@pytest.mark.parametrize("name", presets(ROOT))
def test_every_preset_applies_to_the_shipped_params_and_keeps_their_comments(name, tmp_path):
    for file in ("params.yaml", "presets"):
        copy = shutil.copytree if (ROOT / file).is_dir() else shutil.copy
        copy(ROOT / file, tmp_path / file)
    original = (tmp_path / "params.yaml").read_text()

    change = apply_preset(tmp_path, name)

    written = yaml.safe_load((tmp_path / "params.yaml").read_text())
    preset = yaml.safe_load((ROOT / "presets" / f"{name}.yaml").read_text())
    for section, values in preset.items():
        for key, value in values.items():
            if not isinstance(value, dict):
                assert written[section][key] == value, f"{section}.{key}"
    assert change.values  # validated values, as dotted keys
    comments = [line for line in original.splitlines() if line.lstrip().startswith("#")]
    assert all(line in (tmp_path / "params.yaml").read_text() for line in comments)


def test_the_default_preset_is_the_shipped_params_byte_for_byte():
    default = ROOT / "presets" / f"{DEFAULT}.yaml"
    assert default.read_bytes() == (ROOT / "params.yaml").read_bytes(), (
        "presets/default.yaml must be params.yaml byte for byte (`tlp preset default` restores "
        "it): cp params.yaml presets/default.yaml"
    )


def test_a_missing_test_dependency_skips_locally_and_fails_under_ci(tmp_path):
    (tmp_path / "test_needs.py").write_text(
        textwrap.dedent(
            """
            from tests.conftest import requires

            @requires(False, "the frobnicator (apt-get install frobnicator)")
            def test_needs_it():
                pass
            """
        )
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    results = {}
    for ci in ("", "true"):
        results[ci] = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
            cwd=tmp_path,
            env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(ROOT), "CI": ci},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert results[""].returncode == 0 and "1 skipped" in results[""].stdout
    assert results["true"].returncode == 1 and "1 failed" in results["true"].stdout
    assert "frobnicator (apt-get install frobnicator) is missing" in results["true"].stdout
