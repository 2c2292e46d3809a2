"""Stale sources: new bytes behind an unchanged ``fetch.source`` or ``backbone.weights``.

DVC sees these inputs by name only (a param), so these tests change the bytes and check
that :func:`flows.freshness.stale_sources` notices, that nothing is reported for a file
that was only touched, and that forcing the named stage brings the pipeline up to date.
"""

from __future__ import annotations

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
import pandas as pd
import pytest
from PIL import Image

import tasks.fetch
from flows.freshness import (
    SourceCheck,
    StagePaths,
    StaleSource,
    check_sources,
    stage_paths,
    stale_sources,
)
from flows.stages import read_pipeline, repro
from tasks.fetch import MANIFEST_NAME, HashIndex, fetch, parse_manifest
from tasks.params import Params, parse_params
from tests.conftest import SHRUNK, deep_update, make_project, run
from tests.httpserver import FileServer, free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TLP_NO_PROGRESS", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def png(seed: int, size: int = 16) -> bytes:
    """A small, valid, random RGB PNG."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def make_images(folder: Path, per_class: int = 10) -> None:
    for label_index, label in enumerate(("cat", "dog", "fox")):
        (folder / label).mkdir(parents=True)
        for index in range(per_class):
            (folder / label / f"{index}.png").write_bytes(png(100 * label_index + index))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def params_for(**sections: dict) -> Params:
    return parse_params(sections)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A folder laid out like a project (its dvc.yaml gives the paths), without DVC."""
    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copy(ROOT / "dvc.yaml", folder / "dvc.yaml")
    return folder


def fetch_into(root: Path, params: Params) -> None:
    """What the fetch stage does in ``root`` (same paths as dvc.yaml)."""
    fetch(params.fetch, root / "data" / "raw", root / ".tlp" / "downloads")


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every file that gets read to be hashed (by tasks.fetch.file_sha256)."""
    calls: list[str] = []
    real = tasks.fetch.file_sha256

    def counting(path: str | Path) -> str:
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(tasks.fetch, "file_sha256", counting)
    return calls


def test_paths_come_from_dvc_yaml() -> None:
    assert stage_paths(ROOT) == StagePaths(
        Path("data/raw"), Path(".tlp/downloads"), Path("models/backbone.json")
    )


# -- local folders --------------------------------------------------------------------------


def test_folder_fingerprint_depends_on_content_only(root: Path, tmp_path: Path) -> None:
    source = tmp_path / "images"
    make_images(source, per_class=3)
    params = params_for(fetch={"source": str(source)})
    fetch_into(root, params)
    raw = root / "data" / "raw"
    record = json.loads((raw / "source.json").read_text())
    manifest = (raw / MANIFEST_NAME).read_bytes()
    assert record["fingerprint"] == {
        "method": "sha256-tree",
        "path": str(source),
        "sha256": sha256(manifest),
        "files": 9,
        "manifest": MANIFEST_NAME,
    }
    assert parse_manifest(manifest) == {
        f"{p.parent.name}/{p.name}": sha256(p.read_bytes()) for p in source.rglob("*.png")
    }
    first = {p.name: p.read_bytes() for p in raw.iterdir() if p.is_file()}

    # Touching every file changes no byte: a re-fetch writes the same output, so DVC
    # would re-run nothing downstream.
    for path in source.rglob("*.png"):
        os.utime(path, ns=(time.time_ns(), time.time_ns()))
    fetch_into(root, params)
    assert {p.name: p.read_bytes() for p in raw.iterdir() if p.is_file()} == first


def test_folder_checks_hash_only_files_whose_stat_changed(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hashed: list[str]
) -> None:
    monkeypatch.setattr(tasks.fetch, "RACY_WINDOW_NS", 0)  # trust stats at once (see below)
    source = tmp_path / "images"
    make_images(source)
    params = params_for(fetch={"source": str(source)})
    fetch_into(root, params)
    hashed.clear()

    assert check_sources(root, params)[0] == SourceCheck(
        "fetch", "fresh", f"the 30 files under {source} are unchanged"
    )
    assert hashed == []  # every file was known from the fetch: stat only

    time.sleep(0.05)  # past the file system's timestamp tick
    os.utime(source / "cat" / "0.png")  # touched, same bytes
    assert stale_sources(root, params) == []
    assert hashed == ["0.png"]
    assert stale_sources(root, params) == [] and hashed == ["0.png"]  # now known again

    # Same size, same mtime, new bytes (what cp -p or rsync -t can do): ctime gives it away.
    target = source / "dog" / "1.png"
    before = target.stat()
    replacement = png(999)[: before.st_size].ljust(before.st_size, b"\0")
    time.sleep(0.05)
    target.write_bytes(replacement)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert target.stat().st_size == before.st_size
    assert target.stat().st_mtime_ns == before.st_mtime_ns
    (source / "fox" / "new.png").write_bytes(png(1000))
    (source / "fox" / "0.png").unlink()
    assert stale_sources(root, params) == [
        StaleSource(
            "fetch",
            f"fetch: 1 file changed, 1 added, 1 removed under {source} since the last fetch "
            "(dog/1.png, fox/new.png, fox/0.png)",
        )
    ]

    fetch_into(root, params)  # what `dvc repro -f --single-item fetch` runs
    assert stale_sources(root, params) == []
    assert (root / "data" / "raw" / "images" / "dog" / "1.png").read_bytes() == replacement


def test_files_hashed_right_after_a_change_are_not_trusted_on_their_stat(
    root: Path, tmp_path: Path, hashed: list[str]
) -> None:
    source = tmp_path / "images"
    make_images(source, per_class=2)
    params = params_for(fetch={"source": str(source)})
    fetch_into(root, params)  # within RACY_WINDOW_NS of writing them
    index = HashIndex.for_source(root / ".tlp" / "downloads", source)
    assert len(index.entries) == 6
    assert all(entry["stat"] is None for entry in index.entries.values())
    hashed.clear()
    assert stale_sources(root, params) == []
    assert len(hashed) == 6  # read again rather than trusted


def test_missing_source_folder_is_unknown_not_stale(root: Path, tmp_path: Path) -> None:
    source = tmp_path / "images"
    make_images(source, per_class=2)
    params = params_for(fetch={"source": str(source)})
    fetch_into(root, params)
    shutil.rmtree(source)
    check = check_sources(root, params)[0]
    assert check.state == "unknown" and "is missing" in check.reason
    assert stale_sources(root, params) == []


def test_pending_and_builtin_sources(root: Path, tmp_path: Path) -> None:
    source = tmp_path / "images"
    make_images(source, per_class=2)
    params = params_for(fetch={"source": str(source)})
    assert check_sources(root, params)[0].state == "pending"  # not fetched yet
    fetch_into(root, params)
    moved = params_for(fetch={"source": str(tmp_path / "elsewhere")})
    check = check_sources(root, moved)[0]
    assert check.state == "pending" and "dvc repro re-runs fetch by itself" in check.reason
    digits = params_for(fetch={"source": "builtin:digits"})
    record = {"source": "builtin:digits", "fingerprint": None}  # as fetch writes it
    (root / "data" / "raw" / "source.json").write_text(json.dumps(record))
    assert check_sources(root, digits)[0] == SourceCheck(
        "fetch", "fresh", "builtin:digits is pinned by its hashes"
    )


# -- local archives and URLs ----------------------------------------------------------------


def write_archive(path: Path, seed: int) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for index in range(6):
            data = png(seed + index)
            info = tarfile.TarInfo(f"{('cat', 'dog')[index % 2]}/{index}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_local_archive(root: Path, tmp_path: Path) -> None:
    archive = tmp_path / "data.tar.gz"
    write_archive(archive, seed=1)
    old = sha256(archive.read_bytes())
    params = params_for(fetch={"source": str(archive)})
    fetch_into(root, params)
    assert stale_sources(root, params) == []
    write_archive(archive, seed=2)
    new = sha256(archive.read_bytes())
    assert stale_sources(root, params) == [
        StaleSource(
            "fetch",
            f"fetch: {archive} changed since the last fetch (sha256 {old[:12]}... -> "
            f"{new[:12]}...)",
        )
    ]
    fetch_into(root, params)
    assert stale_sources(root, params) == []

    # Pinned: the fetched data is still the pinned content; forcing fetch would only fail.
    pinned = params_for(fetch={"source": str(archive), "sha256": new})
    fetch_into(root, pinned)
    write_archive(archive, seed=3)
    check = check_sources(root, pinned)[0]
    assert check.state == "unknown" and "no longer matches fetch.sha256" in check.reason


def test_url_source_changed_upstream(root: Path, tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    archive = www / "data.tar.gz"
    write_archive(archive, seed=1)
    raw = root / "data" / "raw"
    with FileServer(www) as server:
        url = server.url("data.tar.gz")
        params = params_for(fetch={"source": url})
        fetch_into(root, params)
        fingerprint = json.loads((raw / "source.json").read_text())["fingerprint"]
        assert fingerprint["method"] == "http" and fingerprint["etag"]
        assert fingerprint["sha256"] == sha256(archive.read_bytes()) and not fingerprint["pinned"]
        assert stale_sources(root, params) == [] and server.count(method="HEAD") == 1

        # Unchanged: the forced re-fetch revalidates its cached copy (304) and reuses it.
        fetch_into(root, params)
        assert [r.status for r in server.requests if r.method == "GET"] == [200, 304]

        time.sleep(0.01)
        write_archive(archive, seed=2)  # new bytes, same URL
        [stale] = stale_sources(root, params)
        assert (
            stale.stage == "fetch" and f"{url} changed since the last fetch (ETag" in stale.reason
        )

        fetch_into(root, params)  # the forced re-fetch: 200, the new file
        assert [r.status for r in server.requests if r.method == "GET"][-1] == 200
        assert json.loads((raw / "source.json").read_text())["sha256"] == sha256(
            archive.read_bytes()
        )
        assert stale_sources(root, params) == []

        pinned = params_for(fetch={"source": url, "sha256": sha256(archive.read_bytes())})
        fetch_into(root, pinned)
        heads = server.count(method="HEAD")
        assert check_sources(root, pinned)[0].state == "fresh"
        assert server.count(method="HEAD") == heads  # a pinned URL needs no request

    # The server is gone: that is "unknown", never "stale".
    check = check_sources(root, params, timeout_s=2)[0]
    assert check.state == "unknown" and "could not reach" in check.reason


def test_url_revalidation_falls_back_to_the_cache_when_offline(root: Path, tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    write_archive(www / "data.tar.gz", seed=1)
    with FileServer(www) as server:
        url = server.url("data.tar.gz")
        params = params_for(fetch={"source": url, "retries": 0})
        fetch_into(root, params)
    before = (root / "data" / "raw" / "source.json").read_bytes()
    fetch_into(root, params)  # nothing listens on that port any more
    assert (root / "data" / "raw" / "source.json").read_bytes() == before


# -- backbone weights -----------------------------------------------------------------------


def write_backbone_info(root: Path, weights: str, weights_sha256: str | None) -> None:
    """models/backbone.json as tasks.backbone writes it (only the keys the check reads)."""
    info = root / "models" / "backbone.json"
    info.parent.mkdir(exist_ok=True)
    info.write_text(json.dumps({"weights": weights, "weights_sha256": weights_sha256}))


def test_weights_file_changed(root: Path, tmp_path: Path) -> None:
    from tasks.backbone import sha256_file

    weights = tmp_path / "mine.weights.h5"
    weights.write_bytes(b"\x89HDF\r\n\x1a\n" + b"1" * 1000)
    old = sha256_file(weights)
    params = params_for(backbone={"arch": "mobilenet_v2", "weights": str(weights)})
    assert check_sources(root, params)[1].state == "pending"  # not built yet
    write_backbone_info(root, str(weights), old)
    assert check_sources(root, params)[1] == SourceCheck(
        "backbone", "fresh", f"{weights} is unchanged (sha256 {old[:12]}...)"
    )
    weights.write_bytes(b"\x89HDF\r\n\x1a\n" + b"2" * 1000)
    new = sha256_file(weights)
    assert stale_sources(root, params) == [
        StaleSource(
            "backbone",
            f"backbone: the weights file {weights} changed since the backbone stage ran "
            f"(sha256 {old[:12]}... -> {new[:12]}...)",
        )
    ]
    weights.unlink()
    assert check_sources(root, params)[1].state == "unknown"
    other = params_for(backbone={"arch": "mobilenet_v2", "weights": "imagenet"})
    assert check_sources(root, other)[1].state == "fresh"


# -- the real pipeline ----------------------------------------------------------------------


@pytest.mark.slow
def test_new_bytes_behind_a_source_folder_are_refetched(tmp_path: Path) -> None:
    source = tmp_path / "images"
    make_images(source)
    project = make_project(
        tmp_path / "project", deep_update({"fetch": {"source": str(source)}}, SHRUNK)
    )
    run(["dvc", "repro", "prepare"], project)

    def stale() -> list[StaleSource]:
        return stale_sources(project)  # params read from the project's params.yaml

    def prepare_status() -> dict:
        return json.loads(
            run(["dvc", "status", "--json", "prepare", "--with-deps"], project).stdout
        )

    assert stale() == [] and prepare_status() == {}
    old_bytes = (source / "cat" / "3.png").read_bytes()
    new_bytes = png(4242)
    (source / "cat" / "3.png").write_bytes(new_bytes)

    assert prepare_status() == {}  # DVC alone cannot see it: fetch.source's text is unchanged
    [found] = stale()
    assert found.stage == "fetch"
    assert "1 file changed, 0 added, 0 removed" in found.reason and "cat/3.png" in found.reason

    # What `tlp run` / `tlp status` see: fetch forced, with the reason.
    plan = {stage.name: stage for stage in read_pipeline(project).stages}
    assert plan["fetch"].stale and plan["fetch"].force and "cat/3.png" in plan["fetch"].reason
    assert not plan["prepare"].force
    lines: list[str] = []
    result = repro(project, "fetch", emit=lambda _level, line: lines.append(line), force=True)
    assert result.ran, lines
    assert "prepare" in prepare_status()  # data/raw changed: DVC takes it from here
    run(["dvc", "repro", "prepare"], project)
    manifest = pd.read_parquet(project / "data" / "prepared" / "manifest.parquet")
    row = manifest[manifest["path"].str.endswith("cat/3.png")]
    assert row["sha256"].tolist() == [sha256(new_bytes)]
    assert sha256(old_bytes) not in set(manifest["sha256"])
    assert stale() == [] and prepare_status() == {}
    assert not any(stage.force for stage in read_pipeline(project).stages)


# Two different weights files for the same architecture, then the backbone stage's own core
# function and info file: one TensorFlow import in all.
BACKBONE_SCRIPT = """
import sys, keras
from tasks.backbone import build_backbone
from tasks.common import write_json
from tasks.params import load_params

for seed, path in enumerate(sys.argv[1:3]):
    keras.utils.set_random_seed(seed)
    model = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
    model.save_weights(path)
params = load_params("params.yaml")
_, info = build_backbone(params.backbone, params.prepare.image_size)
write_json(sys.argv[3], info.to_json())
"""


@pytest.mark.slow
def test_new_bytes_behind_a_weights_path_are_seen(root: Path, tmp_path: Path) -> None:
    weights, other = tmp_path / "mobilenet.weights.h5", tmp_path / "other.weights.h5"
    backbone = {"arch": "mobilenet_v2", "weights": str(weights)}
    config = {"backbone": backbone, "prepare": {"image_size": [32, 32]}}
    (root / "params.yaml").write_text(json.dumps(config))  # JSON is YAML
    (root / "models").mkdir()
    info = root / "models" / "backbone.json"
    script = [sys.executable, "-c", BACKBONE_SCRIPT, str(weights), str(other), str(info)]
    run(script, root, timeout=300, env={"PYTHONPATH": str(ROOT)})
    assert json.loads(info.read_text())["weights_sha256"] == sha256(weights.read_bytes())
    assert stale_sources(root) == []  # params read from root/params.yaml

    shutil.copyfile(other, weights)  # new bytes, same path
    [found] = stale_sources(root)
    assert found.stage == "backbone" and str(weights) in found.reason
    # `dvc repro -f --single-item backbone` re-runs the stage, as for fetch above.


def test_unreachable_url_needs_no_long_wait(root: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/data.tar.gz"
    (root / "data" / "raw").mkdir(parents=True)
    fingerprint = {"method": "http", "url": url, "etag": '"x"', "last_modified": None}
    record = {"source": url, "fingerprint": {**fingerprint, "sha256": "0" * 64, "pinned": False}}
    (root / "data" / "raw" / "source.json").write_text(json.dumps(record))
    began = time.monotonic()
    check = check_sources(root, params_for(fetch={"source": url}), timeout_s=2)[0]
    assert check.state == "unknown" and time.monotonic() - began < 5
