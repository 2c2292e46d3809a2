"""Stage ``fetch`` end to end: built-in datasets, a real local HTTP server, local sources, CLI."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tasks.builtin import IDX_FILES
from tasks.common import EXIT_TRANSIENT, StageError, TransientError
from tasks.download import cache_name, download
from tasks.fetch import FetchResult, fetch
from tasks.params import FetchParams, ParamsError, load_params, read_yaml, with_changes
from tests.conftest import PARAMS, make_project, requires, run, set_params, write_params
from tests.httpserver import FileServer, free_port

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ROOT / "data" / "builtin"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _quiet_offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TLP_NO_PROGRESS", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for name in (
        "TLP_MNIST_BASE_URL",
        "TLP_FASHION_MNIST_BASE_URL",
        "TLP_MNIST_DIR",
        "TLP_FASHION_MNIST_DIR",
    ):
        monkeypatch.delenv(name, raising=False)


def fetch_params(**overrides: object) -> FetchParams:
    """The real ``fetch`` section of params.yaml, with test overrides (validated)."""
    real = load_params(ROOT / "params.yaml").fetch
    return with_changes(PARAMS.fetch, **{**real.model_dump(), **overrides})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def cached(cache: Path) -> list[str]:
    """The download cache's files (temporary ones included), validator sidecars aside."""
    if not cache.exists():
        return []
    return sorted(p.name for p in cache.iterdir() if p.is_file() and p.suffix != ".json")


@pytest.fixture
def images() -> dict[str, bytes]:
    """A small class-folder dataset (random bytes: fetch does not decode images)."""
    rng = np.random.default_rng(0)
    return {
        f"{label}/{index}.png": rng.bytes(40_000) for label in ("cat", "dog") for index in range(4)
    }


@pytest.fixture
def www(tmp_path: Path, images: dict[str, bytes]) -> Path:
    """A served folder holding ``data.tar.gz`` of ``images`` (about 320 KB)."""
    folder = tmp_path / "www"
    folder.mkdir()
    with tarfile.open(folder / "data.tar.gz", "w:gz") as tar:
        for name, data in images.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return folder


# -- built-in datasets ----------------------------------------------------------------------


def test_builtin_digits(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    out = tmp_path / "raw"
    source = str(BUILTIN / "digits.yaml")
    result = fetch(fetch_params(source=source), out, tmp_path / "cache")

    digits = load_digits()
    pngs = sorted((out / "images").rglob("*.png"))
    assert len(pngs) == 1797 == result.files
    assert sorted(p.name for p in (out / "images").iterdir()) == [str(d) for d in range(10)]
    for label in range(10):
        assert len(list((out / "images" / str(label)).iterdir())) == np.sum(digits.target == label)
    index = 42
    sample = Image.open(out / "images" / str(digits.target[index]) / f"{index:04d}.png")
    assert sample.mode == "L" and sample.size == (8, 8)
    pixels = np.asarray(sample)
    expected = np.rint(digits.images[index] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(pixels, expected)
    assert pixels.max() == 255 and pixels.min() == 0  # 16 -> 255, 0 -> 0
    record = json.loads((out / "source.json").read_text())
    assert record["source"] == source and record["kind"] == "folder"
    assert record["files"] == 1797 and record["bytes"] == sum(p.stat().st_size for p in pngs)

    # The same source gives the same bytes: a re-run changes nothing DVC would see.
    before = tree(out)
    fetch(fetch_params(source=source), out, tmp_path / "cache")
    assert tree(out) == before


def test_old_builtin_names_and_home_folders_are_refused_by_the_params() -> None:
    with pytest.raises(ParamsError, match="use data/builtin/mnist.yaml"):
        fetch_params(source="builtin:mnist")
    with pytest.raises(ParamsError, match="write the full path"):
        fetch_params(source="~/images")


def test_an_invalid_descriptor_names_its_problems(tmp_path: Path) -> None:
    bad = tmp_path / "kmnist.yaml"
    data = read_yaml(BUILTIN / "mnist.yaml")
    data["files"]["train-images-idx3-ubyte.gz"]["sha256"] = "not-a-hash"
    data["classes"] = ["a", "a"]
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(StageError) as excinfo:
        fetch(fetch_params(source=str(bad)), tmp_path / "raw", tmp_path / "cache")
    message = str(excinfo.value)
    assert f"{bad} is not a valid dataset descriptor" in message
    assert "files.train-images-idx3-ubyte.gz.sha256: String should match pattern" in message
    assert "classes: Value error, must be distinct" in message
    data = read_yaml(BUILTIN / "mnist.yaml")
    del data["files"]["t10k-labels-idx1-ubyte.gz"]
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(StageError, match="files: Value error, must list exactly"):
        fetch(fetch_params(source=str(bad)), tmp_path / "raw", tmp_path / "cache")
    bad.write_text("kind: cifar\n")
    with pytest.raises(StageError, match="kind: Input tag 'cifar' found using 'kind' does not"):
        fetch(fetch_params(source=str(bad)), tmp_path / "raw", tmp_path / "cache")
    assert not (tmp_path / "raw").exists()


@requires(
    DEBIAN_FASHION.is_dir(),
    "Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
)
def test_builtin_fashion_mnist_from_the_debian_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing listens there: the test fails if fetch tries to download.
    monkeypatch.setenv("TLP_FASHION_MNIST_BASE_URL", f"http://127.0.0.1:{free_port()}/")
    out = tmp_path / "raw"
    params = fetch_params(source=str(BUILTIN / "fashion-mnist.yaml"), retries=0)
    result = fetch(params, out, tmp_path / "cache")

    assert sorted(p.name for p in (out / "idx").iterdir()) == sorted([*IDX_FILES, "classes.json"])
    for name in IDX_FILES:
        assert sha256(out / "idx" / name) == sha256(DEBIAN_FASHION / name) == result.sha256[name]
    classes = json.loads((out / "idx" / "classes.json").read_text())
    assert classes[0] == "T-shirt_top" and classes[9] == "Ankle_boot" and len(classes) == 10
    assert result.kind == "idx" and result.origin == str(DEBIAN_FASHION)
    assert result.details["counts"] == {"train": 60000, "t10k": 10000}
    assert json.loads((out / "source.json").read_text()) == json.loads(json.dumps(result.to_json()))
    assert cached(tmp_path / "cache") == []


def test_damaged_local_idx_copy_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / "fashion"
    write_idx_files(local, train=6, test=2)
    monkeypatch.setenv("TLP_FASHION_MNIST_DIR", str(local))
    source = str(BUILTIN / "fashion-mnist.yaml")
    with pytest.raises(StageError, match="does not match fashion-mnist.*decompressed sha256"):
        fetch(fetch_params(source=source), tmp_path / "raw", tmp_path / "cache")
    assert not (tmp_path / "raw").exists()


def write_idx_files(folder: Path, *, train: int, test: int) -> dict[str, str]:
    """Small, valid IDX .gz files; return their sha256 by name."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("t10k", test)):
        pixels = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        images = struct.pack(">IIII", 0x803, count, 28, 28) + pixels.tobytes()
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images, mtime=0))
        header = struct.pack(">II", 0x801, count)
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(header + labels.tobytes(), mtime=0)
        )
    return {name: sha256(folder / name) for name in IDX_FILES}


def write_descriptor(path: Path, base_url: str, hashes: dict[str, str]) -> Path:
    """A descriptor of one's own IDX dataset (as for KMNIST), made from the MNIST one."""
    data = read_yaml(BUILTIN / "mnist.yaml")
    data.update(base_url=base_url, base_url_env=None, local_dir_env=None)
    data["files"] = {name: {"sha256": digest} for name, digest in hashes.items()}
    path.write_text(yaml.safe_dump(data))
    return path


def test_idx_dataset_of_ones_own_downloads_from_its_base_url(tmp_path: Path) -> None:
    served = tmp_path / "mirror"
    hashes = write_idx_files(served, train=12, test=3)
    cache = tmp_path / "cache"
    with FileServer(served) as server:
        source = str(write_descriptor(tmp_path / "tiny-mnist.yaml", server.base_url, hashes))
        out = tmp_path / "raw"
        result = fetch(fetch_params(source=source), out, cache)
        for name in IDX_FILES:
            assert (out / "idx" / name).read_bytes() == (served / name).read_bytes()
            assert server.count(name) == 1
        assert json.loads((out / "idx" / "classes.json").read_text()) == [str(d) for d in range(10)]
        assert result.sha256 == hashes and result.origin == server.base_url
        assert result.details["counts"] == {"train": 12, "t10k": 3}

        # A re-run reuses the complete, verified downloads.
        fetch(fetch_params(source=source), out, cache)
        assert server.count() == 4
    assert len(cached(cache)) == 4


def test_builtin_mnist_refuses_files_that_differ_from_the_pinned_hashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = tmp_path / "mirror"
    write_idx_files(served, train=12, test=3)
    cache = tmp_path / "cache"
    with FileServer(served) as server:
        monkeypatch.setenv("TLP_MNIST_BASE_URL", server.base_url.rstrip("/"))
        with pytest.raises(StageError) as excinfo:
            fetch(fetch_params(source=str(BUILTIN / "mnist.yaml")), tmp_path / "raw", cache)
    message = str(excinfo.value)
    pinned = read_yaml(BUILTIN / "mnist.yaml")["files"]["train-images-idx3-ubyte.gz"]["sha256"]
    assert f"expected {pinned}, got {sha256(served / 'train-images-idx3-ubyte.gz')}" in message
    assert not (tmp_path / "raw").exists()
    assert cached(cache) == []


# -- HTTP archives --------------------------------------------------------------------------


def test_http_archive_with_sha256(tmp_path: Path, www: Path, images: dict[str, bytes]) -> None:
    digest = sha256(www / "data.tar.gz")
    cache = tmp_path / "cache"
    with FileServer(www) as server:
        url = server.url("data.tar.gz")
        result = fetch(fetch_params(source=url, sha256=digest.upper()), tmp_path / "raw", cache)
        assert tree(tmp_path / "raw" / "images") == images
        assert result.sha256 == digest and result.files == len(images)
        assert result.details["format"] == "tar.gz"
        assert cached(cache) == [cache_name(url, digest)]
        source = json.loads((tmp_path / "raw" / "source.json").read_text())
        assert source["sha256"] == digest and source["kind"] == "folder" and source["source"] == url

        fetch(fetch_params(source=url, sha256=digest), tmp_path / "raw", cache)
        assert server.count() == 1  # the verified download was reused


def test_http_archive_with_wrong_sha256(tmp_path: Path, www: Path) -> None:
    digest = sha256(www / "data.tar.gz")
    cache = tmp_path / "cache"
    with FileServer(www) as server:
        url = server.url("data.tar.gz")
        with pytest.raises(StageError) as excinfo:
            fetch(fetch_params(source=url, sha256="0" * 64), tmp_path / "raw", cache)
        message = str(excinfo.value)
        assert f"expected {'0' * 64}, got {digest}" in message
        assert "fetch.sha256" in message and url in message
        assert not (tmp_path / "raw").exists()
        assert cached(cache) == []  # the bad bytes were deleted, not kept for later

        fetch(fetch_params(source=url, sha256=digest), tmp_path / "raw", cache)
        assert server.count() == 2


def test_dropped_connection_is_retried_from_the_start(
    tmp_path: Path, www: Path, images: dict[str, bytes]
) -> None:
    archive = www / "data.tar.gz"
    cache = tmp_path / "cache"
    with FileServer(www, drop_after_bytes=100_000, drop_requests=2) as server:
        url = server.url("data.tar.gz")
        fetch(fetch_params(source=url, sha256=sha256(archive), retries=3), tmp_path / "raw", cache)
        assert [(r.range, r.status) for r in server.requests] == [(None, 200)] * 3
    assert (cache / cache_name(url, sha256(archive))).read_bytes() == archive.read_bytes()
    assert cached(cache) == [cache_name(url, sha256(archive))]  # no partial file left
    assert tree(tmp_path / "raw" / "images") == images


def test_connection_reset_is_retried(tmp_path: Path, www: Path, images: dict[str, bytes]) -> None:
    with FileServer(www, drop_after_bytes=100_000, drop_reset=True) as server:
        fetch(
            fetch_params(source=server.url("data.tar.gz"), retries=1),
            tmp_path / "raw",
            tmp_path / "c",
        )
        assert server.count() == 2
    assert tree(tmp_path / "raw" / "images") == images


def test_interrupted_download_leaves_nothing_and_the_next_run_starts_over(
    tmp_path: Path, www: Path
) -> None:
    archive = www / "data.tar.gz"
    cache = tmp_path / "cache"
    with FileServer(www, drop_after_bytes=150_000, drop_requests=1) as server:
        url = server.url("data.tar.gz")
        with pytest.raises(TransientError, match="could not download .* after 1 attempts"):
            fetch(fetch_params(source=url, retries=0), tmp_path / "raw", cache)
        assert cached(cache) == []  # the partial bytes were not kept

        result = fetch(fetch_params(source=url, retries=0), tmp_path / "raw", cache)
        assert [(r.range, r.status) for r in server.requests] == [(None, 200)] * 2
    assert result.sha256 == sha256(archive)
    assert cached(cache) == [cache_name(url)]


def test_leftover_of_a_killed_download_is_not_trusted(tmp_path: Path, www: Path) -> None:
    archive = www / "data.tar.gz"
    cache = tmp_path / "cache"
    cache.mkdir()
    with FileServer(www) as server:
        url = server.url("data.tar.gz")
        leftover = cache / f".{cache_name(url)}.killed.tmp"  # as tasks.common.atomic_path names it
        leftover.write_bytes(b"left over from another version of the file" * 100)
        result = fetch(fetch_params(source=url), tmp_path / "raw", cache)
        assert server.count() == 1
    assert result.sha256 == sha256(archive)
    assert cached(cache) == [cache_name(url)]


def test_unchanged_url_is_revalidated_and_a_changed_one_downloaded_again(
    tmp_path: Path, www: Path, images: dict[str, bytes]
) -> None:
    archive = www / "data.tar.gz"
    cache = tmp_path / "cache"
    with FileServer(www) as server:
        url = server.url("data.tar.gz")
        fetch(fetch_params(source=url), tmp_path / "raw", cache)
        fetch(fetch_params(source=url), tmp_path / "raw", cache)  # 304: the cached copy
        time.sleep(0.01)  # a new mtime, so a new ETag
        with tarfile.open(archive, "w:gz") as tar:
            info = tarfile.TarInfo("cat/new.png")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"new"))
        result = fetch(fetch_params(source=url), tmp_path / "raw", cache)
        assert [r.status for r in server.requests] == [200, 304, 200]
        assert server.requests[1].if_none_match and server.requests[2].if_none_match
    assert result.sha256 == sha256(archive)
    assert tree(tmp_path / "raw" / "images") == {"cat/new.png": b"new"}


def test_server_errors_are_retried(tmp_path: Path, www: Path, images: dict[str, bytes]) -> None:
    with FileServer(www, error_status=503, error_requests=2) as server:
        fetch(
            fetch_params(source=server.url("data.tar.gz"), retries=2),
            tmp_path / "raw",
            tmp_path / "c",
        )
        assert [r.status for r in server.requests] == [503, 503, 200]
    assert tree(tmp_path / "raw" / "images") == images


def test_html_page_is_an_error(tmp_path: Path, www: Path) -> None:
    cache = tmp_path / "cache"
    expected = r"the server returned an HTML page, not a \.tar\.gz archive"
    with FileServer(www, html=True) as server, pytest.raises(StageError, match=expected):
        fetch(fetch_params(source=server.url("data.tar.gz")), tmp_path / "raw", cache)
    assert not (tmp_path / "raw").exists()
    assert cached(cache) == []


def test_http_404_is_an_error(tmp_path: Path, www: Path) -> None:
    with FileServer(www) as server:
        with pytest.raises(StageError, match="HTTP 404 .*check fetch.source") as excinfo:
            fetch(
                fetch_params(source=server.url("missing.tar.gz")), tmp_path / "raw", tmp_path / "c"
            )
        assert server.count() == 1  # a 404 is not retried
    assert not isinstance(excinfo.value, TransientError)


def test_unresolvable_host_fails_fast_naming_it(tmp_path: Path) -> None:
    began = time.monotonic()
    with pytest.raises(StageError, match="could not resolve host nonexistent.invalid") as excinfo:
        fetch(
            fetch_params(source="http://nonexistent.invalid/x.tar.gz", retries=3),
            tmp_path / "raw",
            tmp_path / "c",
        )
    assert not isinstance(excinfo.value, TransientError)  # exit 1: retrying cannot help
    assert time.monotonic() - began < 20  # generous: retries with back-off would pass it


def test_refused_connection_to_an_ip_address_is_not_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{free_port()}/data.tar.gz"  # nothing listens there
    with (
        caplog.at_level("WARNING", logger="urllib3"),
        pytest.raises(StageError, match="connection to 127.0.0.1 refused") as excinfo,
    ):
        fetch(fetch_params(source=url, retries=3), tmp_path / "raw", tmp_path / "c")
    assert not isinstance(excinfo.value, TransientError)
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]  # urllib3's retries


def test_unsafe_archive_from_http_is_refused(tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    with tarfile.open(www / "evil.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("../../evil.png")
        tar.addfile(info, io.BytesIO(b""))
    refused = "refusing the archive .*path traversal"
    with FileServer(www) as server, pytest.raises(StageError, match=refused):
        fetch(fetch_params(source=server.url("evil.tar.gz")), tmp_path / "raw", tmp_path / "c")
    assert not (tmp_path / "raw").exists() and not (tmp_path / "evil.png").exists()


# -- local sources and atomicity ------------------------------------------------------------


def test_local_archive(tmp_path: Path, www: Path, images: dict[str, bytes]) -> None:
    archive = www / "data.tar.gz"
    result = fetch(fetch_params(source=str(archive)), tmp_path / "raw", tmp_path / "cache")
    assert tree(tmp_path / "raw" / "images") == images
    assert result.sha256 == sha256(archive) and result.origin == str(archive)
    with pytest.raises(StageError, match=f"expected {'1' * 64}, got {sha256(archive)}"):
        fetch(
            fetch_params(source=str(archive), sha256="1" * 64),
            tmp_path / "raw2",
            tmp_path / "cache",
        )
    assert archive.exists()  # a local archive is never deleted


def test_local_folder(tmp_path: Path, images: dict[str, bytes]) -> None:
    folder = tmp_path / "dataset"
    for name, data in images.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the dataset")
    (folder / "cat" / "escape.png").symlink_to(secret)
    (folder / "dog" / "alias.png").symlink_to(folder / "cat" / "0.png")
    (folder / "outside_dir").symlink_to(tmp_path, target_is_directory=True)
    (folder / "...").mkdir()  # hidden, as prepare sees it: not a class
    (folder / "..." / "1.png").write_bytes(images["cat/0.png"])
    (folder / "cat" / ".DS_Store").write_bytes(b"Bud1")

    result = fetch(fetch_params(source=str(folder)), tmp_path / "raw", tmp_path / "cache")
    copied = tree(tmp_path / "raw" / "images")
    assert copied == {**images, "dog/alias.png": images["cat/0.png"]}
    assert not (tmp_path / "raw" / "images" / "dog" / "alias.png").is_symlink()
    assert result.kind == "folder" and result.files == len(images) + 1
    assert sorted(result.details["skipped"]) == [
        "... (hidden)",
        "cat/.DS_Store (hidden)",
        "cat/escape.png (symlink to outside the folder)",
        "outside_dir (symlinked folder)",
    ]


def test_a_folder_dvc_cannot_hash_is_refused_naming_every_entry(
    tmp_path: Path, images: dict[str, bytes]
) -> None:
    folder = tmp_path / "dataset"
    for name, data in images.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "cat" / "loop.png").symlink_to("loop.png")
    (folder / "dog" / "gone.png").symlink_to(tmp_path / "deleted.png")
    os.mkfifo(folder / "dog" / "pipe.png")  # DVC would wait on it forever

    with pytest.raises(StageError) as error:
        fetch(fetch_params(source=str(folder)), tmp_path / "raw", tmp_path / "cache")
    assert "3 entries that DVC, which hashes the source, cannot read" in str(error.value)
    for entry in ("cat/loop.png (symlink loop)", "dog/gone.png (link to nothing)",
                  "dog/pipe.png (FIFO)"):  # fmt: skip
        assert entry in str(error.value)
    assert not (tmp_path / "raw").exists()

    # DVC hashes the source before any stage runs (it would fail on the loop with a
    # traceback and wait forever on the FIFO): `tlp status` names the entries instead.
    project = make_project(tmp_path / "project", {"fetch": {"source": str(folder)}})
    cli = [sys.executable, "-m", "flows.cli", "status"]
    status = run(cli, project, check=False, timeout=120)
    assert status.returncode == 1 and "Traceback" not in status.stderr
    assert status.stderr.count("ERROR:") == 1 and "dog/pipe.png (FIFO)" in status.stderr
    set_params(project, {"fetch": {"source": "http://[::1"}})  # DVC: "Invalid IPv6 URL" alone
    status = run(cli, project, check=False, timeout=120)
    assert status.returncode == 1 and "Traceback" not in status.stderr
    assert "ERROR: invalid params: fetch.source: Value error, is not a valid URL" in status.stderr

    (folder / "loop").symlink_to("loop")
    done = run_cli(tmp_path, str(folder / "loop"))  # the source itself: one clear line
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR: fetch:")]
    assert done.returncode == 1 and len(errors) == 1 and "symlink loop" in errors[0]
    assert "Traceback" not in done.stderr


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder other users can read (pytest's own temporary folders are 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="tlp-open-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def modes(root: Path) -> dict[str, int]:
    """The permission bits of everything under ``root``, itself included (as ".")."""
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]
    }


def write_folder(folder: Path, images: dict[str, bytes]) -> None:
    """``images`` as a class-folder tree: folders 0755, files 0644 (what a umask of 022 gives)."""
    for name, data in images.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        (folder / name).write_bytes(data)
        (folder / name).chmod(0o644)


def test_nothing_fetched_from_a_private_folder_is_readable_by_others(
    open_folder: Path, www: Path, images: dict[str, bytes]
) -> None:
    private = open_folder / "mine"
    write_folder(private, images)
    private.chmod(0o700)  # the one thing that keeps the files inside from other users
    archive = open_folder / "mine.tar.gz"
    shutil.copy(www / "data.tar.gz", archive)  # its members are 0644
    archive.chmod(0o600)
    umask = os.umask(0o022)
    try:
        for source in (private, archive):
            out = open_folder / f"raw-{source.name}"
            fetch(fetch_params(source=str(source)), out, open_folder / "cache")
            assert tree(out / "images") == images  # nothing lost
            readable = {path: mode for path, mode in modes(out).items() if mode & 0o077}
            assert readable == {}, f"{source.name}: readable by others: {readable}"
            assert modes(out)["images"] == 0o700 and modes(out)["source.json"] == 0o600

        public = open_folder / "shared"  # readable by all: copies keep that (umask 022)
        write_folder(public, images)
        fetch(fetch_params(source=str(public)), open_folder / "raw", open_folder / "cache")
        assert set(modes(open_folder / "raw").values()) == {0o755, 0o644}
        os.umask(0o077)  # a stricter umask wins over the source's permissions
        fetch(fetch_params(source=str(public)), open_folder / "raw", open_folder / "cache")
        assert set(modes(open_folder / "raw").values()) == {0o700, 0o600}
    finally:
        os.umask(umask)


def test_a_private_source_fetched_into_an_open_project_is_a_warning(
    open_folder: Path, images: dict[str, bytes]
) -> None:
    private = open_folder / "mine"
    write_folder(private, images)
    private.chmod(0o700)
    done = run_cli(open_folder, str(private))  # the output goes to open_folder/raw
    assert done.returncode == 0, done.stderr
    assert "fetch.source is not readable by other users" in done.stderr
    assert f"chmod 700 {open_folder}" in done.stderr
    assert all(mode & 0o077 == 0 for mode in modes(open_folder / "raw").values())


def test_failed_fetch_leaves_the_previous_output_intact(
    tmp_path: Path, www: Path, images: dict[str, bytes]
) -> None:
    out = tmp_path / "raw"
    fetch(fetch_params(source=str(www / "data.tar.gz")), out, tmp_path / "cache")
    before = tree(out)
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes((www / "data.tar.gz").read_bytes()[:100_000])  # truncated
    unknown = tmp_path / "nope.yaml"
    unknown.write_text("kind: cifar\n")
    for source in (str(broken), str(tmp_path / "missing"), str(unknown)):
        with pytest.raises(StageError):
            fetch(fetch_params(source=source), out, tmp_path / "cache")
        assert tree(out) == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders


def test_sha256_with_a_builtin_source_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="fetch.sha256 is set but"):
        fetch(
            fetch_params(source=str(BUILTIN / "digits.yaml"), sha256="2" * 64),
            tmp_path / "raw",
            tmp_path / "c",
        )


def test_result_is_what_source_json_holds(tmp_path: Path, www: Path) -> None:
    result = fetch(fetch_params(source=str(www / "data.tar.gz")), tmp_path / "raw", tmp_path / "c")
    saved = json.loads((tmp_path / "raw" / "source.json").read_text())
    assert FetchResult(**saved) == result


# -- command line ---------------------------------------------------------------------------


def run_cli(tmp_path: Path, source: str, **fetch: object) -> subprocess.CompletedProcess[str]:
    params = write_params(tmp_path / "params.yaml", {"fetch": {"source": source, **fetch}})
    env = {**os.environ, "TLP_NO_PROGRESS": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tasks.fetch",
            "--out",
            str(tmp_path / "raw"),
            "--cache",
            str(tmp_path / "cache"),
            "--params",
            str(params),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "source, message",
    [
        ("ftp://x", "unsupported URL scheme 'ftp'"),
        ("no/such/folder", "does not exist"),
        ("http://[::1", "fetch.source: Value error, is not a valid URL (Invalid IPv6 URL)"),
    ],
)
def test_cli_bad_source(tmp_path: Path, source: str, message: str) -> None:
    done = run_cli(tmp_path, source)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR: fetch:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "raw").exists()


def test_cli_builtin_digits(tmp_path: Path) -> None:
    done = run_cli(tmp_path, "data/builtin/digits.yaml")  # relative to the project root
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "raw" / "source.json").read_text())["files"] == 1797


def test_cli_download_that_keeps_failing_exits_75(tmp_path: Path, www: Path) -> None:
    with FileServer(www, error_status=503, error_requests=100) as server:
        done = run_cli(tmp_path, server.url("data.tar.gz"), retries=1)
        assert server.count() == 2  # the first attempt and one retry
    assert done.returncode == EXIT_TRANSIENT, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR: fetch:")]
    assert len(errors) == 1 and "could not download" in errors[0] and "HTTP 503" in errors[0]
    assert not (tmp_path / "raw").exists()


# -- credentials ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://me:s3cret@example.org/data.tar.gz",
        "https://example.org/data.tar.gz?token=s3cret",
        "https://example.org/data.tar.gz?X-Amz-Signature=s3cret&X-Amz-Date=20260101",
        "https://example.org/data.tar.gz?v=2&api_key=s3cret",
    ],
)
def test_credentials_in_a_url_are_refused_and_never_repeated(tmp_path: Path, url: str) -> None:
    with pytest.raises(ParamsError) as error:
        fetch_params(source=url)
    assert "source: Value error, must not hold credentials" in str(error.value)
    assert "~/.netrc" in str(error.value) and "s3cret" not in str(error.value)

    done = run_cli(tmp_path, url)  # the stage itself, as `dvc repro` runs it
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR: fetch:")]
    assert done.returncode == 1 and len(errors) == 1 and "must not hold credentials" in errors[0]
    assert "s3cret" not in done.stdout + done.stderr
    assert not (tmp_path / "raw").exists() and not (tmp_path / "cache").exists()

    with pytest.raises(StageError) as error:  # any other download (a descriptor's base URL)
        download(url, tmp_path / "cache", what="a .gz file")
    assert "must not hold credentials" in str(error.value) and "s3cret" not in str(error.value)


@pytest.mark.slow
def test_a_url_behind_a_login_is_fetched_with_netrc_and_the_secret_recorded_nowhere(
    tmp_path: Path, www: Path, images: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    netrc = tmp_path / "netrc"
    with FileServer(www, basic_auth="me:s3cret") as server:
        url = server.url("data.tar.gz")
        with pytest.raises(StageError, match="HTTP 401"):  # no login: fails at once
            fetch(fetch_params(source=url), tmp_path / "raw", tmp_path / "cache")

        netrc.write_text("machine 127.0.0.1\nlogin me\npassword s3cret\n")
        netrc.chmod(0o600)
        monkeypatch.setenv("NETRC", str(netrc))  # read by requests and by DVC
        project = make_project(tmp_path / "project", {"fetch": {"source": url}})
        status = json.loads(run(["dvc", "status", "--json"], project).stdout)
        assert status["fetch"][0]["changed deps"][url] == "modified"  # DVC got in: not "deleted"
        repro = run(["dvc", "repro", "fetch"], project)
    assert tree(project / "data" / "raw" / "images") == images
    lock = (project / "dvc.lock").read_text()
    assert f"path: {url}" in lock  # DVC tracks the URL as it is: without the secret
    assert json.loads((project / "data" / "raw" / "source.json").read_text())["source"] == url
    recorded = [repro.stdout, repro.stderr, lock, *map(Path.read_text, project.rglob("*.json"))]
    assert not [text for text in recorded if "s3cret" in text]
