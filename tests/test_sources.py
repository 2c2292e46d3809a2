"""Outside sources are DVC dependencies: plain ``dvc status`` and ``dvc repro`` see new bytes.

``dvc.yaml`` lists ``${fetch.source}`` (a folder, an archive, a URL or a descriptor) and
``data/weights/${backbone.weights}`` among the stages' dependencies. These tests change the
bytes behind an unchanged name in a real DVC project and check, by DVC's own records
(``Repo.status()`` and the stages ``Repo.reproduce()`` ran, the same calls ``dvc status`` and
``dvc repro`` make), that exactly the stages that read them run again, and then nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import BIN, SHRUNK, make_project, merged, run
from tests.httpserver import FileServer

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _stage_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage commands (``python -m tasks.<stage>``) run with the venv's Python, quietly."""
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("TLP_NO_PROGRESS", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def status(project: Path, *targets: str) -> dict:
    """What ``dvc status`` reports (for ``targets`` and their upstream stages)."""
    from dvc.repo import Repo

    with contextlib.chdir(project), Repo(str(project)) as repo:  # targets are relative
        return repo.status(targets=list(targets), with_deps=True)


def repro(project: Path, *targets: str, force: bool = False) -> list[str]:
    """``dvc repro``; the names of the stages DVC ran (from DVC, not from its printed text)."""
    from dvc.repo import Repo

    with contextlib.chdir(project), Repo(str(project)) as repo:  # targets are relative
        return sorted(stage.name for stage in repo.reproduce(list(targets), force=force))


def png(seed: int) -> bytes:
    """A small, valid, random RGB PNG."""
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def images(seed: int, per_class: int = 8) -> dict[str, bytes]:
    return {
        f"{label}/{index}.png": png(seed + 100 * number + index)
        for number, label in enumerate(("cat", "dog", "fox"))
        for index in range(per_class)
    }


def write_folder(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def write_archive(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def prepared_hashes(project: Path) -> set[str]:
    import pandas as pd

    return set(pd.read_parquet(project / "data/prepared/manifest.parquet")["sha256"])


def project_with(tmp_path: Path, changes: dict) -> Path:
    return make_project(tmp_path / "project", merged(SHRUNK, changes))


def assert_only_fetch_and_prepare_rerun(project: Path, change) -> None:
    """After ``change()``: status shows fetch, repro runs fetch and prepare, then nothing."""
    assert status(project, "prepare") == {}
    change()
    assert list(status(project, "prepare")) == ["fetch"]  # prepare only waits for its input
    assert repro(project, "prepare") == ["fetch", "prepare"]
    assert repro(project, "prepare") == []
    assert status(project, "prepare") == {}


def test_new_image_in_a_source_folder(tmp_path: Path) -> None:
    source = tmp_path / "images"
    write_folder(source, images(seed=1))
    project = project_with(tmp_path, {"fetch": {"source": str(source)}})
    run(["dvc", "repro", "prepare"], project)
    assert repro(project, "prepare") == []  # nothing changed: nothing runs

    new = png(4242)
    assert_only_fetch_and_prepare_rerun(
        project, lambda: (source / "cat" / "new.png").write_bytes(new)
    )
    assert hashlib.sha256(new).hexdigest() in prepared_hashes(project)


def test_local_archive_replaced_in_place(tmp_path: Path) -> None:
    archive = tmp_path / "data.tar.gz"
    write_archive(archive, images(seed=1))
    project = project_with(tmp_path, {"fetch": {"source": str(archive)}})
    run(["dvc", "repro", "prepare"], project)
    before = prepared_hashes(project)

    assert_only_fetch_and_prepare_rerun(project, lambda: write_archive(archive, images(seed=1000)))
    assert prepared_hashes(project).isdisjoint(before)


def test_url_whose_content_changed(tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    archive = www / "data.tar.gz"
    write_archive(archive, images(seed=1))
    with FileServer(www) as server:
        project = project_with(tmp_path, {"fetch": {"source": server.url("data.tar.gz")}})
        run(["dvc", "repro", "prepare"], project)
        before = prepared_hashes(project)

        def replace() -> None:
            time.sleep(0.01)  # a new mtime, so a new ETag (the server's validator)
            write_archive(archive, images(seed=1000))

        assert_only_fetch_and_prepare_rerun(project, replace)
    assert prepared_hashes(project).isdisjoint(before)
    fetched = json.loads((project / "data/raw/source.json").read_text())
    assert fetched["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()


# Random-init VGG16 weights (no top), saved under a seed: ImageNet weights cannot be
# downloaded here. One TensorFlow import for both files.
WEIGHTS_SCRIPT = """
import sys, keras
for seed, path in enumerate(sys.argv[1:]):
    keras.utils.set_random_seed(seed)
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(path)
"""


def test_weights_file_replaced_at_the_same_path(tmp_path: Path) -> None:
    weights = {"arch": "vgg16", "weights": "vgg16/notop.weights.h5"}
    project = project_with(tmp_path, {"backbone": weights, "prepare": {"image_size": [32, 32]}})
    path, other = project / "data/weights/vgg16/notop.weights.h5", tmp_path / "other.weights.h5"
    path.parent.mkdir()
    run([sys.executable, "-c", WEIGHTS_SCRIPT, str(path), str(other)], tmp_path, timeout=300)
    assert run(["git", "status", "--porcelain"], project).stdout == ""  # git ignores weights
    run(["dvc", "repro", "backbone"], project)
    assert repro(project, "backbone") == [] and status(project, "backbone") == {}

    shutil.copyfile(other, path)  # new bytes, same name
    assert list(status(project, "backbone")) == ["backbone"]
    assert repro(project, "backbone") == ["backbone"]
    assert repro(project, "backbone") == [] and status(project, "backbone") == {}
    info = json.loads((project / "models/backbone.json").read_text())
    assert info["weights_sha256"] == hashlib.sha256(other.read_bytes()).hexdigest()


def test_nothing_changed_nothing_runs_and_a_rebuilt_backbone_changes_nothing_downstream(
    built_project: Path, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    shutil.copytree(built_project, project, symlinks=True)
    assert yaml.safe_load((project / "params.yaml").read_text())["fetch"]["source"] == (
        "data/builtin/digits.yaml"
    )
    assert status(project) == {}
    assert repro(project) == []

    # The backbone stage writes the same bytes for the same inputs, so running it again
    # (as a change to its code would) leaves train, evaluate and export up to date.
    lock = (project / "dvc.lock").read_text()
    assert repro(project, "backbone", force=True) == ["backbone"]
    assert (project / "dvc.lock").read_text() == lock
    assert status(project) == {}
