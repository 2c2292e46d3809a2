"""The ``tlp`` command line, params overrides and the workspace lock (no Prefect server)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import yaml

from flows.locking import WorkspaceBusyError, current_holder, workspace_lock
from flows.workspace import (
    dotted_keys,
    lookup,
    overrides_applied,
    parse_set_options,
    project_root,
    validate_overrides,
)
from tasks.params import ParamsError
from tests.conftest import ROOT, run, set_params
from tests.prefect_server import STAGES


def tlp(cwd, *args, check=True, **env):
    """Run ``python -m flows.cli`` (the ``tlp`` entry point) in ``cwd``."""
    return run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd,
        check=check,
        env={"PYTHONPATH": str(ROOT), **env},
    )


def test_cli_module_imports_neither_prefect_nor_dvc_nor_tensorflow(tmp_path):
    code = textwrap.dedent(
        """
        import sys, types
        stub = types.ModuleType("tasks.predict")
        stub.main = lambda argv: print("predict got", argv) or 7
        sys.modules["tasks.predict"] = stub
        import flows.cli
        code = flows.cli.main(["predict", "--model", "m.onnx", "a.png", "-h"])
        heavy = [m for m in ("prefect", "dvc", "tensorflow", "keras") if m in sys.modules]
        print("heavy", heavy)
        sys.exit(code)
        """
    )
    result = run([sys.executable, "-c", code], tmp_path, check=False, env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 7  # predict's own exit code
    assert "predict got ['--model', 'm.onnx', 'a.png', '-h']" in result.stdout  # argv as given
    assert "heavy []" in result.stdout


def test_help_lists_the_subcommands(tmp_path):
    result = tlp(tmp_path, "--help")
    for command in ("run", "status", "server", "serve", "predict"):
        assert command in result.stdout


def test_commands_outside_a_project_say_where_to_run_them(tmp_path):
    result = tlp(tmp_path, "status", check=False)
    assert result.returncode == 1
    assert "is not inside a DVC project" in result.stderr


def test_serve_without_a_server_says_to_start_one(project):
    result = tlp(project, "serve", "--interval", "60", check=False, PREFECT_API_URL="")
    assert result.returncode == 1
    assert "start `tlp server` in another terminal" in result.stderr


def test_status_shows_stages_in_graph_order_and_why_they_would_rerun(project):
    fresh = json.loads(tlp(project, "status", "--json").stdout)
    assert [row["stage"] for row in fresh["stages"]] == STAGES
    assert {row["why"] for row in fresh["stages"]} == {"never ran here (no entry in dvc.lock)"}
    assert fresh["running"] is None

    run(["dvc", "repro", "fetch"], project)  # the cheapest stage: no TensorFlow
    set_params(project, {"fetch": {"timeout_s": 30}})
    rows = {
        row["stage"]: row for row in json.loads(tlp(project, "status", "--json").stdout)["stages"]
    }
    assert rows["fetch"] == {
        "stage": "fetch",
        "status": "will run",
        "why": "params fetch.timeout_s 60 -> 30",
    }
    assert rows["prepare"]["why"] == "never ran here (no entry in dvc.lock)"

    set_params(project, {"fetch": {"timeout_s": 60}})
    rows = {
        row["stage"]: row for row in json.loads(tlp(project, "status", "--json").stdout)["stages"]
    }
    assert rows["fetch"]["status"] == "up to date"
    text = tlp(project, "status").stdout
    assert text.splitlines()[0].split() == ["stage", "status", "why"]
    assert [line.split()[0] for line in text.splitlines()[1:9]] == STAGES


def test_status_names_the_run_in_progress(project):
    with workspace_lock(project, "flow run 'busy-bee'"):
        status = json.loads(tlp(project, "status", "--json").stdout)
    assert status["running"]["pid"] == os.getpid()
    assert status["running"]["what"] == "flow run 'busy-bee'"


def test_set_options_are_read_as_yaml():
    assert parse_set_options(
        ["train.epochs=5", "prepare.image_size=[64, 64]", "fetch.sha256=", "backbone.arch=vgg16"]
    ) == {
        "train.epochs": 5,
        "prepare.image_size": [64, 64],
        "fetch.sha256": None,
        "backbone.arch": "vgg16",
    }
    with pytest.raises(ParamsError, match="expected key=value"):
        parse_set_options(["train.epochs"])


def test_overrides_are_validated_and_normalised(project):
    assert validate_overrides(project, {"train.epochs": "5", "prepare.image_size": [20, 24]}) == {
        "train.epochs": 5,
        "prepare.image_size": [20, 24],
    }
    assert validate_overrides(project, None) == {}
    with pytest.raises(ParamsError, match="train.epochs"):
        validate_overrides(project, {"train.epochs": 0})
    with pytest.raises(ParamsError, match="unknown key train.epoch "):
        validate_overrides(project, {"train.epoch": 5})
    with pytest.raises(ParamsError, match="first part must be a stage"):
        validate_overrides(project, {"training.epochs": 5})


def test_overrides_keep_params_comments_and_are_undone_when_the_run_fails(tmp_path):
    root = tmp_path / "p"
    (root / ".dvc").mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml"):
        (root / name).write_text((ROOT / name).read_text())
    original = (root / "params.yaml").read_text()
    epochs = yaml.safe_load(original)["train"]["epochs"]
    changes = validate_overrides(root, {"train.epochs": epochs + 1, "prepare.image_size": [9, 9]})

    with overrides_applied(root, changes):
        text = (root / "params.yaml").read_text()
    assert yaml.safe_load(text)["train"]["epochs"] == epochs + 1
    changed = [
        (a, b) for a, b in zip(original.splitlines(), text.splitlines(), strict=True) if a != b
    ]
    assert [b.split() for _, b in changed] == [
        ["image_size:", "[9,", "9]", "#", "height,", "width"],  # the comment survives
        ["epochs:", str(epochs + 1)],
    ]

    (root / "params.yaml").write_text(original)
    with pytest.raises(RuntimeError), overrides_applied(root, changes):
        raise RuntimeError("a stage failed")
    assert (root / "params.yaml").read_text() == original
    assert project_root(root / ".dvc") == root.resolve()


def test_workspace_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    code = textwrap.dedent(
        """
        import sys
        from flows.locking import WorkspaceBusyError, workspace_lock
        try:
            with workspace_lock(sys.argv[1], "second"):
                print("acquired")
        except WorkspaceBusyError as exc:
            print(exc)
        """
    )
    assert current_holder(tmp_path) is None
    with workspace_lock(tmp_path, "first run"):
        holder = current_holder(tmp_path)
        second = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=60,
        )
        with (
            pytest.raises(WorkspaceBusyError, match=f"PID {os.getpid()}"),
            workspace_lock(tmp_path, "same process, other handle"),
        ):
            pass
    assert holder["pid"] == os.getpid() and holder["what"] == "first run"
    assert "this workspace is busy: first run" in second.stdout
    assert f"kill {os.getpid()}" in second.stdout
    assert current_holder(tmp_path) is None  # released with the block
    assert (tmp_path / ".tlp/.gitignore").read_text().splitlines()[-1] == "*"


def test_preset_lists_writes_and_refuses_unknown_names(project):
    listed = dict(
        line.split(maxsplit=1) for line in tlp(project, "preset", "--list").stdout.splitlines()
    )
    assert set(listed) == {p.stem for p in (ROOT / "presets").glob("*.yaml")}
    assert listed["mnist"].startswith("MNIST: 70,000 28x28 handwritten digits")
    assert "shipped params.yaml, byte for byte" in listed["default"]
    assert tlp(project, "preset").stdout == tlp(project, "preset", "--list").stdout
    unknown = tlp(project, "preset", "nope", check=False)
    assert unknown.returncode == 1 and "unknown preset 'nope'; available: " in unknown.stderr

    tlp(project, "preset", "mnist")
    preset = yaml.safe_load((project / "presets/mnist.yaml").read_text())
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["fetch"]["source"] == preset["fetch"]["source"]
    assert run(["git", "diff", "--stat"], project).stdout.strip().startswith("params.yaml")


def test_preset_changes_only_its_keys_in_place_and_default_restores_the_shipped_file(project):
    shipped = (ROOT / "params.yaml").read_bytes()
    (project / "params.yaml").write_bytes(shipped)  # with its comments (make_project drops them)
    preset = yaml.safe_load((ROOT / "presets/fashion-mnist.yaml").read_text())

    dry = tlp(project, "preset", "fashion-mnist", "--dry-run").stdout
    assert (project / "params.yaml").read_bytes() == shipped  # nothing written
    assert {"-  epochs: 12", "+  epochs: 8"} <= set(dry.splitlines())  # the diff it would write

    tlp(project, "preset", "fashion-mnist")
    text = (project / "params.yaml").read_text()
    written = yaml.safe_load(text)
    for key, value in dotted_keys(preset).items():
        assert lookup(written, key) == value, key
    shipped_lines = shipped.decode().splitlines()
    changed = {key for key in dotted_keys(yaml.safe_load(shipped))
               if lookup(written, key) != lookup(yaml.safe_load(shipped), key)}  # fmt: skip
    assert changed <= set(dotted_keys(preset))  # only the preset's keys changed
    comments = [line.split("#", 1)[1] for line in shipped_lines if "#" in line]
    assert all(comment in text for comment in comments)  # every comment kept
    assert len(text.splitlines()) == len(shipped_lines)  # in place: same lines, same order
    keys = [line.split(":")[0] for line in text.splitlines() if ":" in line and "#" not in line[:2]]
    assert keys == [
        line.split(":")[0] for line in shipped_lines if ":" in line and "#" not in line[:2]
    ]

    after_mnist = tlp(project, "preset", "mnist").stdout  # leaves fashion-mnist's dropout
    assert "train.dropout: 0.3 (default 0.2)" in after_mnist
    tlp(project, "preset", "default")
    assert (project / "params.yaml").read_bytes() == shipped  # byte for byte


RUN_IN_PROCESS = textwrap.dedent(
    """
    import sys, time
    import flows.cli
    started = time.monotonic()
    code = flows.cli.main(["run", *sys.argv[1:]])
    heavy = [m for m in ("prefect", "dvc", "tensorflow") if m in sys.modules]
    print(f"exit {code} heavy {heavy} seconds {time.monotonic() - started:.2f}")
    """
)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("backbone.arch=resnet5", "backbone.arch 'resnet5' is not a known architecture; allowed: "),
        ("train.epoch=5", "unknown key train.epoch (allowed: "),
        ("backbone.weights=mine.h5", "is not 'imagenet', 'none' or a weights file in"),
        ("fetch.source=photos/", "fetch.source 'photos/' does not exist"),
        ("fetch.source=htps://example.org/x.tgz", "unsupported URL scheme 'htps'"),
    ],
)
def test_run_refuses_bad_params_before_any_server_or_stage_starts(project, override, expected):
    if override.startswith("backbone.weights"):  # a weights file needs a pretrained arch
        set_params(project, {"backbone": {"arch": "vgg16"}, "prepare": {"image_size": [32, 32]}})
    params = (project / "params.yaml").read_bytes()
    result = run([sys.executable, "-c", RUN_IN_PROCESS, "-S", override], project, check=False,
                 env={"PYTHONPATH": str(ROOT), "PREFECT_API_URL": ""})  # fmt: skip

    assert expected in result.stderr, result.stderr
    assert result.stderr.startswith("ERROR: invalid params: ")
    if "allowed: " in expected:
        assert "mobilenet_v2" in result.stderr or "epochs" in result.stderr  # the allowed ones
    code, heavy, seconds = re.search(r"exit (\d+) heavy (.*) seconds (.*)", result.stdout).groups()
    assert code == "1"
    assert heavy == "[]"  # no Prefect (so no server, no flow run), no DVC, no TensorFlow
    assert float(seconds) < 30  # a guard only: starting a Prefect server takes longer
    assert not (project / ".tlp" / "prefect").exists()
    assert (project / "params.yaml").read_bytes() == params
    assert not (project / "dvc.lock").exists()  # no stage ran
