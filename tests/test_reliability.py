"""Reliability issue: fault injection against the real stages.

Items (numbering of the issue):

2. training killed with SIGKILL three times (once inside a checkpoint write, once inside
   an epoch after its first batch, once inside a backup write) resumes each time from the
   last complete epoch and ends bit-identical to an uninterrupted run; a resume with other settings is
   refused; a worse epoch never replaces the best checkpoint;
4. a NaN loss fails the stage with its cause, writes no model, and in the DVC project the
   previous model stays recorded (dvc.lock unchanged) and restorable from the cache;
5. two seeded CPU runs of the shrunk pipeline give identical metrics and weights;
7. model files that would run code (Lambda layers, foreign modules) are refused before
   anything of theirs runs, through ``python -m tasks.backbone`` and ``load_model_safely``;
9. byte-identical images never straddle splits; a 99:1 imbalance is reported;
10. property-based fuzzing of the params schema and of the image decoder, and a corpus of
    malformed images through prepare, which leaves its source folder untouched.

Training subprocesses use the exact flags of ``dvc.yaml``'s train stage.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from flows import reports
from tasks.backup import DIVERGED_MARK, latest_backup
from tasks.dataset import Prepared
from tasks.params import Params, ParamsError, parse_params, read_yaml, with_changes
from tasks.prepare import Item, decode, prepare
from tasks.safety import UnsafeModelError, load_model_safely
from tests.conftest import BIN, PARAMS, ROOT, SHRUNK, make_project, run, set_params
from tests.faults import FIRST_BATCH_HOOK
from tests.test_prepare import (
    encode,
    exif_rotated_jpeg,
    noise_png,
    png_16bit_rgb,
    png_header_only,
    rejects_of,
    tree_digest,
    write_classes,
)

# ---------------------------------------------------------------- helpers


def train_flags() -> list[str]:
    """The flags ``dvc.yaml`` passes to ``python -m tasks.train``."""
    with (ROOT / "dvc.yaml").open() as handle:
        command = shlex.split(yaml.safe_load(handle)["stages"]["train"]["cmd"])
    assert command[:3] == ["python", "-m", "tasks.train"], command
    return command[3:]


def with_flags(flags: list[str], **values: str) -> list[str]:
    """``flags`` with the values of some ``--name`` options replaced."""
    flags = list(flags)
    for name, value in values.items():
        flags[flags.index("--" + name.replace("_", "-")) + 1] = value
    return flags


def flag(flags: list[str], name: str) -> str:
    return flags[flags.index("--" + name) + 1]


def env_for(project: Path) -> dict[str, str]:
    """The environment ``tests.conftest.run`` gives its commands."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(project),
        "TLP_NO_PROGRESS": "1",
    }


def weights_digest(model_file: Path) -> str:
    """sha256 of a saved model's weight arrays (not of the .keras zip, which has timestamps)."""
    digest = hashlib.sha256()
    for array in load_model_safely(model_file, compile=False).get_weights():
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def epochs_started(output: str) -> list[int]:
    """The epoch numbers Keras announced ("Epoch 3/6"), in order."""
    return [int(n) for n in re.findall(r"^Epoch (\d+)/\d+$", output, re.MULTILINE)]


def copy_project(source: Path, dest: Path) -> Path:
    """A private copy of a built project (git, DVC cache and outputs included)."""
    shutil.copytree(source, dest, symlinks=True)
    return dest


# Runs tasks.train.main with a fault injected: the process SIGKILLs itself at the n-th
# occurrence of an event, whatever the machine's speed:
# - "checkpoint" / "backup": inside the write of a best checkpoint (".best-*" zip) or of an
#   epoch backup (".epoch-*" HDF5), after the file's data went out but before it was
#   closed, so a half-written file is left;
# - "epoch": inside an epoch, after its first batch (between two writes of the backup).
KILL_AT = (
    FIRST_BATCH_HOOK
    + r"""
import os, signal, sys, zipfile
import h5py

event, nth = sys.argv[1], int(sys.argv[2])
seen = []

def on_event(what):
    seen.append(what)
    if len(seen) == nth:
        print(f"FAULT INJECTION: SIGKILL {what}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

if event == "checkpoint":
    original_zip_close = zipfile.ZipFile.close

    def close(self):
        # Keras's own write of a checkpoint (``.best-...tmp.keras``), before save_model
        # rewrites it under its final name: a kill here leaves a half-written zip.
        name = str(self.filename)
        if self.fp is not None and self.mode == "w" and "/.best-" in name and name.endswith(".tmp.keras"):
            on_event(f"while writing {self.filename}")
        return original_zip_close(self)

    zipfile.ZipFile.close = close
elif event == "backup":
    original_h5_close = h5py.File.close

    def close(self):
        name = self.filename if self.id.valid else ""
        if "/.epoch-" in name and self.mode == "r+":
            self.flush()
            on_event(f"while writing {name}")
        return original_h5_close(self)

    h5py.File.close = close
elif event == "epoch":
    _on_first_batches(lambda epoch: on_event(f"in epoch {epoch}, after its first batch"))
else:
    raise SystemExit(f"unknown event {event!r}")

from tasks.train import main
sys.exit(main(sys.argv[3:]))
"""
)


def train_killed_at(project: Path, event: str, nth: int, flags: list[str]):
    """Run the stage with ``flags``; it SIGKILLs itself at the ``nth`` ``event`` (``KILL_AT``)."""
    result = subprocess.run(
        [sys.executable, "-c", KILL_AT, event, str(nth), *flags],
        cwd=project, env=env_for(project), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr[-3000:])
    assert "FAULT INJECTION: SIGKILL" in result.stdout
    return result


def assert_consistent_backup(backup: Path) -> int:
    """The best checkpoint named by best-head.json loads; returns the last complete epoch."""
    state = json.loads((backup / "best-head.json").read_text())
    checkpoint = load_model_safely(backup / state["file"], compile=False)
    assert checkpoint.output_shape[-1] == 10
    done, weights = latest_backup(backup / "head")
    assert weights is not None and (weights.parent / f"epoch-{done:04d}.json").exists()
    return done


# ---------------------------------------------------------------- 2. kill during training


@pytest.mark.slow
def test_training_killed_three_times_resumes_and_ends_like_an_uninterrupted_run(
    built_project, tmp_path
):
    project = copy_project(built_project, tmp_path / "project")
    epochs = 6
    set_params(project, {"train": {"epochs": epochs}})
    flags = train_flags()
    backup = project / flag(flags, "backup")
    assert not backup.exists()

    # The reference: the same stage, same inputs and params, never interrupted (it runs
    # beside the interrupted ones; it shares no output with them).
    reference = with_flags(
        flags, model="ref/model.keras", info="ref/model.json", backup="ref/backup",
        live="ref/live", metrics="ref/train.json",
    )  # fmt: skip
    reference_log = (tmp_path / "reference.log").open("w")
    reference_run = subprocess.Popen(
        [sys.executable, "-m", "tasks.train", *reference], cwd=project, env=env_for(project),
        stdout=reference_log, stderr=subprocess.STDOUT,
    )  # fmt: skip

    # Kill 1: inside the write of the second best checkpoint (end of epoch 2).
    first = train_killed_at(project, "checkpoint", 2, flags)
    assert epochs_started(first.stdout) == [1, 2]
    half_written = list(backup.glob(".best-head-e0002.tmp.keras"))
    assert half_written and not zipfile.is_zipfile(half_written[0])
    assert assert_consistent_backup(backup) == 1  # epoch 2 is not marked done: redone

    # Kill 2: mid-epoch, between writes: in the second epoch the resumed run trains (3),
    # after its first batch. Epoch 2 was completed again; nothing of epoch 3 was kept.
    second = train_killed_at(project, "epoch", 2, flags)
    assert epochs_started(second.stdout) == [2, 3], second.stdout[-2000:]
    done = assert_consistent_backup(backup)
    assert done == 2 and not list(backup.glob("head/*epoch-0003*"))

    # A resume with another learning rate is refused and the backup is left as it was.
    other = read_yaml(project / "params.yaml")
    other["train"]["learning_rate"] = 0.01
    (tmp_path / "other-lr.yaml").write_text(yaml.safe_dump(other))
    before = tree_digest(backup)
    refused = run(
        ["python", "-m", "tasks.train", *flags, "--params", str(tmp_path / "other-lr.yaml")],
        project, check=False,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "holds a backup of an interrupted run made with other settings" in refused.stderr
    assert tree_digest(backup) == before

    # Kill 3: inside the write of the next epoch backup.
    third = train_killed_at(project, "backup", 1, flags)
    assert epochs_started(third.stdout) == [done + 1]
    assert list(backup.glob(f"head/.epoch-{done + 1:04d}.tmp.weights.h5"))
    assert assert_consistent_backup(backup) == done  # that epoch will be trained again

    # The last run finishes: every epoch done once in effect, the model loads.
    final = run(["python", "-m", "tasks.train", *flags], project)
    assert epochs_started(final.stdout) == list(range(done + 1, epochs + 1))
    info = json.loads((project / "models/model.json").read_text())
    assert info["epochs_run"] == epochs
    assert not backup.exists()  # finished: nothing left to resume
    returncode = reference_run.wait(timeout=600)
    reference_log.close()
    assert returncode == 0, (tmp_path / "reference.log").read_text()[-3000:]
    model_file = project / "models/model.keras"
    assert weights_digest(model_file) == weights_digest(project / "ref/model.keras")
    assert info["best"] == json.loads((project / "ref/model.json").read_text())["best"]

    # The saved model is the best checkpoint: its val_loss is the recorded best.
    model = load_model_safely(model_file)
    images, labels = Prepared.open(project / "data/prepared").load("val")
    val_loss = model.evaluate(images.astype("float32"), labels, batch_size=32, verbose=0)[0]
    assert val_loss == pytest.approx(info["best"]["val_loss"], rel=1e-4)


# ---------------------------------------------------------------- 4. NaN loss


@pytest.mark.slow
def test_nan_loss_fails_with_its_cause_and_the_previous_model_survives(built_project, tmp_path):
    project = copy_project(built_project, tmp_path / "project")
    # The usual DVC workflow: dvc.lock and the uncached outputs (metrics and dvclive plots)
    # are committed to git; the cached ones are in .dvc/cache.
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "a good model"], project)
    lock_before = (project / "dvc.lock").read_bytes()
    recorded = {
        out["path"]: out["md5"]
        for out in yaml.safe_load(lock_before)["stages"]["train"]["outs"]
        if "md5" in out
    }
    good_model = (project / "models/model.keras").read_bytes()
    set_params(project, {"train": {"learning_rate": 1e6, "dropout": 0.0}})

    result = run(["dvc", "repro", "train"], project, check=False)

    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "ERROR: train: training diverged: the loss became nan" in output
    assert "Lower train.learning_rate (now 1000000.0)" in output
    # DVC removes a stage's outputs before running it; the failed run wrote no new ones...
    assert not (project / "models/model.keras").exists()
    assert not (project / "models/model.json").exists()
    # ...and recorded nothing:
    assert (project / "dvc.lock").read_bytes() == lock_before
    # The previous good model is still in the DVC cache, restored byte for byte; the
    # uncached training metrics and plots come back from git.
    run(["dvc", "checkout", "train"], project)
    run(["git", "checkout", "--", "params.yaml", "dvclive", "metrics/train.json"], project)
    assert (project / "models/model.keras").read_bytes() == good_model
    assert hashlib.md5(good_model).hexdigest() == recorded["models/model.keras"]
    assert json.loads(run(["dvc", "status", "--json"], project).stdout) == {}
    tracked = ["params.yaml", "dvc.lock", "dvclive", "metrics"]
    assert run(["git", "status", "--porcelain", "--", *tracked], project).stdout == ""

    # The diverged run's backup holds no NaN, and is marked so a fixed run discards it.
    backup = project / ".tlp/backup/train"
    assert (backup / DIVERGED_MARK).exists()
    for weights in backup.rglob("*.weights.h5"):
        with h5py.File(weights) as handle:
            handle.visititems(
                lambda _, node: (
                    None
                    if not isinstance(node, h5py.Dataset) or node.dtype.kind != "f"
                    else np.testing.assert_array_equal(np.isfinite(node[()]), True)
                )
            )


# ---------------------------------------------------------------- 5. determinism


@pytest.mark.slow
def test_two_seeded_pipeline_runs_give_identical_metrics_and_weights(built_project, tmp_path):
    second = make_project(tmp_path / "second", SHRUNK)
    run(["dvc", "repro", "evaluate"], second)

    def lock_md5(project: Path, stage: str, path: str) -> str:
        lock = yaml.safe_load((project / "dvc.lock").read_text())
        return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == path)

    assert lock_md5(second, "prepare", "data/prepared") == lock_md5(
        built_project, "prepare", "data/prepared"
    )
    for model in ("models/backbone.keras", "models/model.keras"):
        assert weights_digest(second / model) == weights_digest(built_project / model), model
    for metrics in ("metrics/eval.json", "metrics/train.json"):
        assert json.loads((second / metrics).read_text()) == json.loads(
            (built_project / metrics).read_text()
        ), metrics
    info = [json.loads((p / "models/model.json").read_text()) for p in (second, built_project)]
    assert info[0]["best"] == info[1]["best"] and info[0]["best_epoch"] == info[1]["best_epoch"]
    # 9: evaluate reports per-class metrics, so a neglected minority class is visible.
    per_class = reports.per_class_scores(second / "plots/per_class.csv")
    assert set(per_class) == {str(d) for d in range(10)}


# ---------------------------------------------------------------- 7. malicious model files


SENTINEL_MODULE = "tlp_evil_sentinel"


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """Model files whose loading would run code, each leaving a sentinel file if it ran."""
    sentinel = tmp_path / "PWNED"
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / f"{SENTINEL_MODULE}.py").write_text(
        f"from pathlib import Path\nPath({str(sentinel)!r}).touch()\n"
    )
    monkeypatch.syspath_prepend(str(code_dir))
    files = tmp_path / "files"
    files.mkdir()

    # A Lambda whose function leaves the sentinel when called (building the model calls it).
    payload = eval(  # the point of the test: a model file that carries code
        f"lambda x: (__import__('pathlib').Path({str(sentinel)!r}).touch(), x)[1]"
    )
    model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(payload)])
    model.save(files / "lambda.keras")
    model.save(files / "lambda.h5")
    sentinel.unlink()

    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="dense")])
    plain.save(files / "plain.keras")

    def with_layer(name: str, module: str, class_name: str) -> Path:
        """plain.keras with its Dense layer renamed to a class from another module."""
        with zipfile.ZipFile(files / "plain.keras") as source:
            entries = {n: source.read(n) for n in source.namelist()}
        config = json.loads(entries["config.json"])
        for layer in config["config"]["layers"]:
            if layer["class_name"] == "Dense":
                layer.update(module=module, class_name=class_name, registered_name=class_name)
        entries["config.json"] = json.dumps(config).encode()
        with zipfile.ZipFile(files / name, "w") as target:
            for entry, data in entries.items():
                target.writestr(entry, data)
        return files / name

    paths = {
        "lambda.keras": files / "lambda.keras",
        "lambda.h5": files / "lambda.h5",
        "module.keras": with_layer("module.keras", SENTINEL_MODULE, "Evil"),
        "os.keras": with_layer("os.keras", "os", "system"),
        "subprocess.keras": with_layer("subprocess.keras", "subprocess", "Popen"),
    }
    return sentinel, code_dir, paths


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("lambda.keras", "contains a Lambda layer"),
        ("lambda.h5", "contains a Lambda layer"),
        ("module.keras", f"names module '{SENTINEL_MODULE}'"),
        ("os.keras", "names module 'os'"),
        ("subprocess.keras", "names module 'subprocess'"),
    ],
)
def test_model_files_that_run_code_are_refused_by_the_loader(evil, name, expected):
    sentinel, _, paths = evil
    with pytest.raises(UnsafeModelError, match="refusing to load") as caught:
        load_model_safely(paths[name])
    assert expected in str(caught.value)
    assert not sentinel.exists()
    assert SENTINEL_MODULE not in sys.modules


def test_model_files_that_run_code_are_refused_as_backbone_weights(evil, tmp_path):
    sentinel, code_dir, paths = evil
    data = read_yaml(ROOT / "params.yaml")
    data["prepare"]["image_size"] = [32, 32]
    weights = tmp_path / "data" / "weights"
    weights.mkdir(parents=True)
    for name, path in paths.items():
        shutil.copyfile(path, weights / name)  # where backbone.weights names files
        data["backbone"].update(arch="vgg16", weights=name)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
        result = run(
            ["python", "-m", "tasks.backbone", "--params", "params.yaml", "--weights-dir",
             "data/weights", "--out", "models/backbone.keras", "--info", "models/backbone.json"],
            tmp_path, check=False, env={"PYTHONPATH": f"{ROOT}{os.pathsep}{code_dir}"},
        )  # fmt: skip
        assert result.returncode == 1, name
        assert "ERROR: backbone: " in result.stderr and "refusing to load" in result.stderr, name
        assert not sentinel.exists(), name
        assert not (tmp_path / "models").exists(), name

    # Control: the payloads are live. Keras itself, with safe_mode off, runs the Lambda.
    keras.saving.load_model(paths["lambda.keras"], safe_mode=False)
    assert sentinel.exists()


# ---------------------------------------------------------------- 9. leakage and imbalance


def test_identical_images_never_straddle_splits(tmp_path):
    raw = tmp_path / "raw"
    write_classes(raw, {"a": 60, "b": 60})
    rng = random.Random(9)
    for index in range(12):  # 12 images, each planted 5 more times under other names
        label = "ab"[index % 2]
        data = noise_png(50_000 + index)
        for copy_index in range(6):
            folder = raw / label / f"sub{rng.randrange(3)}"
            folder.mkdir(exist_ok=True)
            (folder / f"planted-{index}-{copy_index}.jpg").write_bytes(data)
    conflict = noise_png(90_000)  # the same bytes under two classes: neither can be right
    (raw / "a" / "conflict.png").write_bytes(conflict)
    (raw / "b" / "conflict.png").write_bytes(conflict)

    result = prepare(
        with_changes(PARAMS.prepare, image_size=(16, 16), workers=2), raw, tmp_path / "out"
    )

    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert (manifest.groupby("sha256")["split"].nunique() == 1).all()
    planted = manifest[manifest["path"].str.contains("planted")]
    assert len(planted) == 72 and planted["sha256"].nunique() == 12
    assert not set(manifest.loc[manifest["split"] == "train", "sha256"]) & set(
        manifest.loc[manifest["split"] != "train", "sha256"]
    )
    assert rejects_of(tmp_path / "out") == {
        "raw/a/conflict.png": "identical bytes appear under several classes (here 'a')",
        "raw/b/conflict.png": "identical bytes appear under several classes (here 'b')",
    }
    assert any("60 byte-identical duplicate images" in w for w in result.warnings)


def test_a_99_to_1_imbalance_is_reported(tmp_path):
    raw = tmp_path / "raw"
    write_classes(raw, {"common": 495, "rare": 5})
    result = prepare(
        with_changes(PARAMS.prepare, image_size=(16, 16), workers=2), raw, tmp_path / "out"
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["warnings"] == result.warnings
    assert any(
        w.startswith("class imbalance 99:1 (largest 'common' 495, smallest 'rare' 5)")
        for w in report["warnings"]
    )


# ---------------------------------------------------------------- 10. fuzzing


SHIPPED = read_yaml(ROOT / "params.yaml")


def key_paths(node: dict, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a nested mapping: sections and values."""
    paths = []
    for key, value in node.items():
        paths.append((*prefix, key))
        if isinstance(value, dict):
            paths += key_paths(value, (*prefix, key))
    return paths


def value_at(node: dict, path: tuple):
    for key in path:
        node = node[key]
    return node


def set_at(node: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


PATHS = key_paths(SHIPPED)
SECTIONS = [()] + [p for p in PATHS if isinstance(value_at(SHIPPED, p), dict)]

any_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["1e-3", "32", "none", "imagenet", "val_loss", "same", ""]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(path=st.sampled_from(PATHS), value=any_value)
def test_any_value_at_any_key_is_valid_or_a_params_error_naming_that_key(path, value):
    raw = copy.deepcopy(SHIPPED)
    set_at(raw, path, value)
    try:
        params = parse_params(raw)
    except ParamsError as error:
        assert ".".join(path) in str(error), (path, value, str(error))
    else:
        assert isinstance(params, Params)


@settings(max_examples=150, deadline=None)
@given(section=st.sampled_from(SECTIONS), key=st.text(min_size=1, max_size=12), value=any_value)
def test_an_unknown_key_anywhere_is_named_with_the_allowed_ones(section, key, value):
    raw = copy.deepcopy(SHIPPED)
    node = value_at(raw, section)
    if key in node:
        return
    node[key] = value
    with pytest.raises(ParamsError) as caught:
        parse_params(raw)
    where = ".".join((*section, key))
    assert f"unknown key {where} (allowed: " in str(caught.value)


@settings(max_examples=200, deadline=None)
@given(
    raw=st.dictionaries(
        st.sampled_from([*SHIPPED, "other"]) | st.text(max_size=6),
        any_value | st.dictionaries(st.text(max_size=16), any_value, max_size=6),
        max_size=6,
    )
)
def test_arbitrary_params_never_raise_anything_but_params_error(raw):
    try:
        parse_params(raw)
    except ParamsError as error:
        assert str(error).startswith("invalid params: ")


VALID_FILES = [
    noise_png(1),
    encode(Image.new("RGB", (20, 14), (200, 10, 10)), "JPEG"),
    encode(Image.new("P", (12, 12), 3), "GIF"),
    encode(Image.new("RGB", (12, 12), (1, 2, 3)), "BMP"),
    encode(Image.new("RGBA", (12, 12), (1, 2, 3, 4)), "TIFF"),
    encode(Image.new("RGB", (12, 12), (9, 9, 9)), "WEBP"),
    exif_rotated_jpeg(),
]


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's notes on the damaged TIFF tags
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(VALID_FILES),
    cut=st.floats(min_value=0.0, max_value=1.0),
    flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=8),
)
def test_the_decoder_never_raises_on_damaged_files(tmp_path_factory, base, cut, flips):
    data = bytearray(base[: max(1, int(len(base) * cut))] if cut < 0.98 else base)
    for position, byte in flips:
        data[min(int(position * len(data)), len(data) - 1)] = byte
    path = tmp_path_factory.mktemp("fuzz") / "image"
    path.write_bytes(bytes(data))

    result = decode(Item("fuzz", "c", path), with_changes(PARAMS.prepare, image_size=(16, 16)))

    if result.reason:
        assert result.pixels is None
    else:
        assert result.pixels.shape == (16, 16, 3) and result.pixels.dtype == np.uint8


def test_a_corpus_of_malformed_images_is_converted_or_rejected_and_the_source_untouched(
    tmp_path,
):
    raw = tmp_path / "raw"
    write_classes(raw, {"a": 30, "b": 30})
    good = {
        "a/cmyk.jpg": encode(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG"),
        "a/gray16.png": encode(Image.fromarray(np.full((12, 12), 40000, np.uint16)), "PNG"),
        "a/rgb16.png": png_16bit_rgb(np.full((12, 12, 3), 50000)),
        "a/palette.gif": encode(Image.new("P", (12, 12), 7), "GIF"),
        "b/rgba.png": encode(Image.new("RGBA", (12, 12), (0, 0, 0, 0)), "PNG"),
        "b/png-named.jpg": noise_png(77),  # wrong extension: decoded by content
        "b/rotated.jpg": exif_rotated_jpeg(),
        "b/huge-but-allowed.png": encode(Image.new("RGB", (1200, 900)), "PNG"),
    }
    bad = {
        "a/zero.png": (b"", "empty file (0 bytes)"),
        "a/text.png": (b"just some text", "not an image"),
        "a/truncated.png": (noise_png(5)[:70], "corrupt or truncated image"),
        "b/truncated.jpg": (encode(Image.new("RGB", (64, 64)), "JPEG")[:200], "corrupt"),
        "b/one-pixel.png": (encode(Image.new("RGB", (1, 1)), "PNG"), "too small: 1x1"),
        "b/30k.png": (png_header_only(30000, 30000), "too large"),
        "b/random.bmp": (bytes(random.Random(3).randrange(256) for _ in range(500)), "image"),
    }
    for name, data in good.items():
        (raw / name).write_bytes(data)
    for name, (data, _) in bad.items():
        (raw / name).write_bytes(data)
    (raw / "notes.txt").write_text("beside the class folders")
    before = tree_digest(raw)

    started = time.monotonic()
    prepare(
        with_changes(PARAMS.prepare, image_size=(16, 16), max_bad_fraction=0.2),
        raw,
        tmp_path / "out",
    )
    assert time.monotonic() - started < 60  # the 30000x30000 header is not decoded

    assert tree_digest(raw) == before  # nothing renamed, moved, rewritten or deleted
    kept = set(pd.read_parquet(tmp_path / "out" / "manifest.parquet")["path"])
    rejected = rejects_of(tmp_path / "out")
    every_file = {str(p.relative_to(tmp_path)) for p in raw.rglob("*") if p.is_file()}
    assert kept | set(rejected) == every_file and not kept & set(rejected)
    assert {f"raw/{name}" for name in good} <= kept
    for name, (_, reason) in bad.items():
        assert reason in rejected[f"raw/{name}"], (name, rejected[f"raw/{name}"])
    assert rejected["raw/notes.txt"] == "not inside a class folder"
    assert all(rejected.values())
