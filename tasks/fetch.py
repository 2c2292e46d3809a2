"""Stage ``fetch``: get the raw dataset into ``<out>`` (``data/raw``), verified and atomically.

``fetch.source`` accepts:

- ``builtin:digits``: scikit-learn's bundled 8x8 handwritten digits (offline), written as
  8-bit grayscale PNGs scaled from 0..16 to 0..255: ``images/<digit>/<index:04d>.png``.
- ``builtin:mnist`` / ``builtin:fashion-mnist``: the four official IDX ``.gz`` files,
  sha256-checked, in ``idx/`` with ``idx/classes.json``. Fashion-MNIST is first taken from
  the copy Debian's ``dataset-fashion-mnist`` package installs in
  ``/usr/share/datasets/fashion-mnist``; Debian re-gzipped those files, so a local copy is
  accepted when either its ``.gz`` or its decompressed content has the known sha256.
- an ``http(s)://`` URL of a tar(.gz/.bz2/.xz) or zip archive, optionally checked against
  ``fetch.sha256``, extracted into ``images/`` by :func:`tasks.archive.safe_extract`.
- a local archive (same rules), or a local folder of class sub-folders, copied into
  ``images/`` (symlinks that point outside the folder, and special files, are skipped and
  reported).

Output layout::

    <out>/source.json           {source, kind: "folder" | "idx", sha256, files, bytes,
                                 origin, details, fingerprint}
    <out>/source.sha256         local folder sources: ``<sha256>  <path>`` per file
    <out>/images/<class>/...    kind "folder"
    <out>/idx/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz, idx/classes.json   kind "idx"

``<out>`` is built in a temporary sibling folder and renamed into place only when complete,
so a failed run leaves the previous ``<out>`` untouched. Downloads stream into the cache
folder (``--cache``) as ``<name>.part``, resume with HTTP ``Range`` requests where the server
allows, are retried on transient errors, and are renamed to their final name (the URL's
hash, plus the expected sha256 when known) only once complete and verified; a later run
never trusts a ``.part`` (it resumes only with ``If-Range`` or a pinned sha256 to check).

Fingerprints (stale sources). ``fetch.source`` is a param, so DVC re-runs this stage when
its text changes, but not when the bytes behind an unchanged path or URL change. So
``source.json`` records a ``fingerprint`` of what was fetched, which
:mod:`flows.freshness` compares with the source as it is now:

- local folder: ``{method: "sha256-tree", path, sha256, files, manifest}``, where ``sha256``
  is the sha256 of ``<out>/source.sha256``, the per-file hashes (in ``sha256sum`` format,
  sorted by path) taken while copying. It depends on content only, so re-fetching an
  unchanged folder writes the same ``<out>`` and nothing downstream re-runs.
- local archive: ``{method: "sha256", path, sha256}``.
- URL: ``{method: "http", url, etag, last_modified, sha256, pinned}``: the validators the
  server sent and the archive's sha256. A cached download of an unpinned URL is
  revalidated with a conditional GET whenever the stage runs (304: reuse; 200: replace),
  so a forced re-fetch really fetches the new bytes. A pinned URL cannot change silently.
- builtin datasets: ``null`` (their hashes are pinned in this module).

Checking a big folder must not mean reading it all, so local sources keep a hash index in
``<cache>/sources/`` (:class:`HashIndex`): each file's sha256 with its size, mtime, ctime
and inode. A check re-hashes only files whose stat changed; a touched but unchanged file
is therefore not "stale", and a file rewritten with its old mtime restored still is
(ctime cannot be set). The index is a cache: deleting it costs one full re-hash.

Environment variables (for mirrors and tests):

- ``TLP_MNIST_BASE_URL`` / ``TLP_FASHION_MNIST_BASE_URL``: where the builtin IDX files are
  downloaded from (the hard-coded sha256s still apply, so a mirror cannot change the data);
- ``TLP_MNIST_DIR`` / ``TLP_FASHION_MNIST_DIR``: a local folder holding the four IDX files
  (a missing folder forces a download).

Test hook for the builtin hashes: the expected hashes live in :data:`IDX_DATASETS`, and
:func:`fetch` takes them as its ``idx_datasets`` argument. A test that serves its own small
IDX files passes ``dataclasses.replace(IDX_DATASETS["mnist"], gz_sha256=...)``; nothing in
the environment or ``params.yaml`` can loosen the hashes of a real run.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import re
import shutil
import stat
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from filelock import FileLock
from filelock import Timeout as LockTimeout

from tasks.archive import ArchiveError, ArchiveLimitError, looks_like_html, safe_extract
from tasks.common import (
    StageError,
    atomic_path,
    log,
    progress,
    read_json,
    remove,
    run_stage,
    write_json,
)
from tasks.params import FetchParams, load_params

CHUNK_BYTES = 1024 * 1024
# Small network reads: bytes read when a connection drops are kept for the resume.
NETWORK_CHUNK_BYTES = 64 * 1024
RETRY_BACKOFF_S = 0.5
RETRY_BACKOFF_MAX_S = 8.0
USER_AGENT = "tlp-fetch/0.1 (+https://dvc.org)"
MANIFEST_NAME = "source.sha256"  # per-file hashes of a local folder source, in <out>

IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801


@dataclass(frozen=True)
class IdxDataset:
    """A builtin dataset distributed as the four MNIST-style IDX ``.gz`` files.

    Attributes:
        name: the name after ``builtin:``.
        base_url: where the files are downloaded from (ends with ``/``).
        base_url_env: environment variable that overrides ``base_url``.
        classes: class names, by label index.
        gz_sha256: sha256 of each upstream ``.gz`` file, by file name.
        content_sha256: sha256 of each decompressed file, for re-gzipped local copies.
        local_dir: a folder that may already hold the files (e.g. a Debian package).
        local_dir_env: environment variable that overrides ``local_dir``.
    """

    name: str
    base_url: str
    base_url_env: str
    classes: tuple[str, ...]
    gz_sha256: Mapping[str, str]
    content_sha256: Mapping[str, str] = field(default_factory=dict)
    local_dir: Path | None = None
    local_dir_env: str | None = None

    def resolved_base_url(self) -> str:
        """``base_url``, or the override from ``base_url_env``, ending with ``/``."""
        url = os.environ.get(self.base_url_env) or self.base_url
        return url if url.endswith("/") else url + "/"

    def resolved_local_dir(self) -> Path | None:
        """``local_dir``, or the override from ``local_dir_env``."""
        override = os.environ.get(self.local_dir_env) if self.local_dir_env else None
        return Path(override) if override else self.local_dir


# Upstream .gz hashes as pinned by tensorflow/datasets (url_checksums/mnist.txt and
# fashion_mnist.txt). The decompressed Fashion-MNIST hashes were computed from Debian's
# dataset-fashion-mnist 0.0~git20200523.55506a9-1, which re-gzipped the upstream files.
IDX_DATASETS: Mapping[str, IdxDataset] = MappingProxyType(
    {
        "mnist": IdxDataset(
            name="mnist",
            base_url="https://storage.googleapis.com/cvdf-datasets/mnist/",
            base_url_env="TLP_MNIST_BASE_URL",
            classes=tuple(str(digit) for digit in range(10)),
            gz_sha256={
                "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            },
            local_dir_env="TLP_MNIST_DIR",
        ),
        "fashion-mnist": IdxDataset(
            name="fashion-mnist",
            base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            base_url_env="TLP_FASHION_MNIST_BASE_URL",
            classes=(
                "T-shirt_top",
                "Trouser",
                "Pullover",
                "Dress",
                "Coat",
                "Sandal",
                "Shirt",
                "Sneaker",
                "Bag",
                "Ankle_boot",
            ),
            gz_sha256={
                "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            },
            content_sha256={
                "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            },
            local_dir=Path("/usr/share/datasets/fashion-mnist"),
            local_dir_env="TLP_FASHION_MNIST_DIR",
        ),
    }
)

_ARCHIVE_SUFFIXES = (
    ".tar.gz",
    ".tgz",
    ".tar.bz2",
    ".tbz2",
    ".tar.xz",
    ".txz",
    ".tar",
    ".zip",
    ".gz",
)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True)
class FetchResult:
    """What :func:`fetch` wrote; also the content of ``<out>/source.json``.

    Attributes:
        source: ``fetch.source`` as given.
        kind: ``folder`` (``images/<class>/...``) or ``idx`` (``idx/*.gz``).
        files: image files (kind ``folder``) or IDX files (kind ``idx``) written.
        bytes: their size in bytes.
        sha256: the archive's sha256, the IDX files' sha256 by name, or ``None``
            (builtin digits and local folders).
        origin: where the data came from (a URL, a local path, or the library).
        details: extra facts (archive format, IDX counts, skipped entries, ...).
        fingerprint: what identifies the source's content, so that a later check can tell
            whether the bytes behind an unchanged ``fetch.source`` changed (see the module
            docstring); ``None`` for builtin datasets, which are pinned by their hashes.
    """

    source: str
    kind: str
    files: int
    bytes: int
    sha256: str | dict[str, str] | None
    origin: str
    details: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``source.json`` content."""
        return asdict(self)


@dataclass(frozen=True)
class Download:
    """A complete, verified file in the download cache, and the validators the server sent."""

    path: Path
    sha256: str
    reused: bool
    etag: str | None = None
    last_modified: str | None = None

    def fingerprint(self, url: str, *, pinned: bool) -> dict[str, Any]:
        """The ``fingerprint`` recorded in ``source.json`` for a URL source."""
        return {
            "method": "http",
            "url": url,
            "etag": self.etag,
            "last_modified": self.last_modified,
            "sha256": self.sha256,
            "pinned": pinned,
        }


class _DownloadFailed(StageError):
    """Every attempt of a download failed with a transient error."""


class _TransientError(Exception):
    """A download attempt failed in a way that a retry may fix."""


def fetch(
    params: FetchParams,
    out: Path,
    cache_dir: Path,
    *,
    idx_datasets: Mapping[str, IdxDataset] = IDX_DATASETS,
) -> FetchResult:
    """Fetch ``params.source`` into ``out``, replacing it atomically.

    Args:
        params: the ``fetch`` section of ``params.yaml``.
        out: the output folder (``data/raw``); replaced only if the fetch succeeds.
        cache_dir: where downloads are cached between runs (``.tlp/downloads``).
        idx_datasets: the builtin IDX datasets and their expected hashes (tests pass
            their own; see the module docstring).

    Returns:
        What was written (also saved as ``<out>/source.json``).

    Raises:
        StageError: the source is unknown, unreachable, fails verification or is unsafe;
            the message says what to change.
    """
    out = Path(out)
    cache_dir = Path(cache_dir)
    source = params.source
    kind, value = _classify(source, idx_datasets)
    expected = params.sha256.lower() if params.sha256 else None
    if expected and kind not in ("url", "path"):
        raise StageError(
            f"fetch.sha256 is set but fetch.source {source!r} is not an archive; builtin "
            "datasets carry their own hashes. Set fetch.sha256: null."
        )

    download: Download | None = None
    local: Path | None = None
    local_digest: str | None = None
    local_stat: list[int] | None = None
    index: HashIndex | None = None
    if kind == "url":
        download = fetch_url(
            value,
            cache_dir,
            sha256=expected,
            timeout_s=params.timeout_s,
            retries=params.retries,
            expect=f"a {_archive_label(value)} archive",
        )
    elif kind == "path":
        local = _local_source(value, out)
        if local.is_dir() and expected:
            raise StageError(
                f"fetch.sha256 is set but fetch.source {source!r} is a folder, not an archive. "
                "Set fetch.sha256: null."
            )
        index = HashIndex.for_source(cache_dir, local)
        if not local.is_dir():
            local_digest = hash_file(local, index, ARCHIVE_KEY)
            local_stat = stat_key(os.stat(local))
            if expected and local_digest != expected:
                raise StageError(
                    f"sha256 mismatch for {local}: expected {expected}, got {local_digest}. "
                    "Correct fetch.sha256 in params.yaml, or fetch.source if it names the wrong file."
                )

    with atomic_path(out, directory=True) as tmp:
        if kind == "digits":
            result = _write_digits(source, tmp / "images")
        elif kind == "idx":
            result = _write_idx(source, idx_datasets[value], params, tmp / "idx", cache_dir)
        elif download is not None:
            result = _write_archive(source, value, download.path, download.sha256, params, tmp)
            pinned = expected is not None
            result = replace(result, fingerprint=download.fingerprint(value, pinned=pinned))
        elif local is not None and local_digest is not None:
            result = _write_archive(source, str(local), local, local_digest, params, tmp)
            if stat_key(os.stat(local)) != local_stat:
                raise StageError(
                    f"{local} changed while it was being extracted; run fetch again once "
                    "nothing writes to it"
                )
            fingerprint = {"method": "sha256", "path": str(local.resolve()), "sha256": local_digest}
            result = replace(result, fingerprint=fingerprint)
        elif local is not None and index is not None:
            result = _copy_folder(source, local, tmp, index)
        else:  # unreachable: _classify returns one of the kinds above
            raise StageError(f"cannot fetch {source!r}")
        write_json(tmp / "source.json", result.to_json())
    if index is not None:
        index.save()
    log.info(
        "fetch: %d files (%s bytes, kind %s) from %s into %s",
        result.files,
        f"{result.bytes:,}",
        result.kind,
        result.origin,
        out,
    )
    return result


def _classify(source: str, idx_datasets: Mapping[str, IdxDataset]) -> tuple[str, str]:
    """Return ("digits" | "idx" | "url" | "path", the name, URL or path)."""
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name == "digits":
            return "digits", name
        if name in idx_datasets:
            return "idx", name
        allowed = ", ".join(f"builtin:{n}" for n in ("digits", *idx_datasets))
        raise StageError(f"unknown fetch.source {source!r}; the builtin datasets are {allowed}")
    scheme = _SCHEME.match(source)
    if scheme:
        if scheme.group(1).lower() in ("http", "https"):
            return "url", source
        raise StageError(
            f"fetch.source {source!r} uses the unsupported URL scheme {scheme.group(1)!r}; use "
            "an http(s):// URL of an archive, builtin:digits|mnist|fashion-mnist, or a local path"
        )
    return "path", source


def _local_source(value: str, out: Path) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise StageError(
            f"fetch.source {value!r} does not exist ({path.absolute()}); give an existing "
            "archive or folder (relative paths are relative to the project root), a URL, "
            "or builtin:digits"
        )
    if not path.is_dir() and not path.is_file():
        raise StageError(f"fetch.source {value!r} is neither a regular file nor a folder")
    resolved = path.resolve()
    out_resolved = out.absolute().resolve()
    if path.is_dir() and (
        out_resolved.is_relative_to(resolved) or resolved.is_relative_to(out_resolved)
    ):
        raise StageError(
            f"fetch.source {value!r} and the output folder {out} contain one another; "
            "keep the source folder outside the output"
        )
    return path


def _archive_label(url_or_path: str) -> str:
    name = PurePosixPath(urlsplit(url_or_path).path).name.lower()
    for suffix in _ARCHIVE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return "tar/zip"


# -- downloads ------------------------------------------------------------------------------


def cache_name(url: str, sha256: str | None = None) -> str:
    """The download cache's file name for ``url``: its hash, the expected hash, its name."""
    url_hash = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    base = PurePosixPath(urlsplit(url).path).name or "download"
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base)[-80:]
    return f"{url_hash}-{sha256.lower()[:16]}-{base}" if sha256 else f"{url_hash}-{base}"


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_url(
    url: str,
    cache_dir: Path,
    *,
    sha256: str | None = None,
    timeout_s: float = 60.0,
    retries: int = 3,
    expect: str = "a file",
    check_hint: str = "fetch.source",
    mismatch_hint: str = "If the file changed upstream on purpose, set fetch.sha256 to the new "
    "hash in params.yaml; otherwise correct fetch.source.",
    backoff_s: float = RETRY_BACKOFF_S,
) -> Download:
    """Download ``url`` into the cache (or reuse a complete cached copy), verified.

    The bytes stream into ``<cache>/<name>.part``, resumed with an HTTP ``Range`` request
    after a dropped connection when the server supports it, and the file is renamed to its
    final name only once it is complete, is not an HTML page and matches ``sha256``. The
    server's ``ETag`` and ``Last-Modified`` are kept beside it in ``<name>.json``.

    A cached copy is reused as is when ``sha256`` pins its content. Without a pin it is
    revalidated with a conditional request (``If-None-Match`` / ``If-Modified-Since``): a
    304 answer reuses it, a 200 answer replaces it, so a file that changed upstream under
    the same URL is downloaded again. If the server cannot be reached, the cached copy is
    used with a warning.

    Args:
        url: an http(s) URL.
        cache_dir: the download cache folder.
        sha256: the expected sha256 (hex), if known.
        timeout_s: connect and read timeout, in seconds.
        retries: how many times to retry after a transient error (connection dropped or
            refused, timeout, HTTP 5xx/429/408).
        expect: what the file should be, for error messages (``"a .tar.gz archive"``).
        check_hint: what to check when the URL is wrong, for error messages.
        mismatch_hint: what to do when the sha256 does not match, for error messages.
        backoff_s: the first pause between attempts; it doubles each time, up to 8 s.

    Returns:
        The cached file, its sha256 and the server's validators.

    Raises:
        StageError: HTTP error, too many failed attempts, an HTML page, or a wrong sha256
            (the bad file is deleted).
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    expected = sha256.lower() if sha256 else None
    final = cache_dir / cache_name(url, expected)
    lock = FileLock(str(final) + ".lock")
    try:
        lock.acquire(timeout=0)
    except LockTimeout:
        log.info("waiting for another process that is downloading %s", url)
        lock.acquire()
    try:
        sidecar = final.with_name(final.name + ".json")
        cached = _cached_download(final, sidecar, url, expected)
        if cached is not None and expected is not None:
            log.info("using the cached download %s", final)
            return cached
        with requests.Session() as session:
            session.headers["User-Agent"] = USER_AGENT
            transfer = _Transfer(
                session, url, final.with_name(final.name + ".part"), expected, timeout_s, check_hint
            )
            if cached is not None:
                transfer.conditional = _conditional_headers(cached)
                if not transfer.conditional:
                    log.info(
                        "the server sent no ETag or Last-Modified for %s, so the cached copy "
                        "cannot be revalidated; downloading it again",
                        url,
                    )
            try:
                resumed = transfer.run(retries, backoff_s)
            except _DownloadFailed as exc:
                if cached is None:
                    raise
                log.warning(
                    "could not check whether %s changed (%s); using the cached copy %s",
                    url,
                    exc,
                    final,
                )
                return cached
            if transfer.not_modified and cached is not None:
                log.info("%s has not changed (HTTP 304); using the cached download", url)
                return cached
            digest = _verify(transfer, expect)
            if digest is None and resumed:
                # The resumed bytes may come from a changed file: start once from scratch.
                log.warning("the resumed download of %s failed verification; starting over", url)
                transfer.discard()
                transfer.conditional = None
                transfer.run(retries, backoff_s)
                digest = _verify(transfer, expect)
        if digest is None:
            actual = file_sha256(transfer.part)
            transfer.discard()
            raise StageError(
                f"sha256 mismatch for {url}: expected {expected}, got {actual}; the download "
                f"was deleted. {mismatch_hint}"
            )
        try:
            meta = read_json(transfer.meta)
        except (OSError, ValueError):
            meta = {}
        os.replace(transfer.part, final)
        download = Download(
            final,
            digest,
            reused=False,
            etag=meta.get("etag") if isinstance(meta, dict) else None,
            last_modified=meta.get("last_modified") if isinstance(meta, dict) else None,
        )
        write_json(
            sidecar,
            {
                "url": url,
                "sha256": digest,
                "etag": download.etag,
                "last_modified": download.last_modified,
            },
        )
        remove(transfer.meta)
        return download
    finally:
        lock.release()


def _cached_download(final: Path, sidecar: Path, url: str, expected: str | None) -> Download | None:
    """The complete cached copy of ``url``, or ``None`` (a copy with the wrong hash is deleted)."""
    if not final.is_file():
        return None
    digest = file_sha256(final)
    if expected is not None and digest != expected:
        log.warning("cached %s has sha256 %s, not %s; downloading again", final, digest, expected)
        remove(final)
        remove(sidecar)
        return None
    try:
        meta = read_json(sidecar)
    except (OSError, ValueError):
        meta = {}
    if not isinstance(meta, dict) or meta.get("url") != url or meta.get("sha256") != digest:
        meta = {}  # validators of other bytes would make a 304 lie
    return Download(
        final, digest, reused=True, etag=meta.get("etag"), last_modified=meta.get("last_modified")
    )


def _conditional_headers(cached: Download) -> dict[str, str]:
    headers = {}
    if cached.etag:
        headers["If-None-Match"] = cached.etag
    if cached.last_modified:
        headers["If-Modified-Since"] = cached.last_modified
    return headers


def _verify(transfer: _Transfer, expect: str) -> str | None:
    """Return the sha256 of a complete download, ``None`` if it does not match."""
    with open(transfer.part, "rb") as handle:
        head = handle.read(1024)
    if looks_like_html(head):
        transfer.discard()
        raise StageError(
            f"the server returned an HTML page, not {expect}, for {transfer.url} (often a "
            "login, error or 'file moved' page served with status 200). Check "
            f"{transfer.check_hint}: it must be a direct download link."
        )
    digest = file_sha256(transfer.part)
    if transfer.expected is not None and digest != transfer.expected:
        return None
    return digest


@dataclass
class _Transfer:
    """One URL streaming into ``part``, with its resume metadata in ``part.json``."""

    session: requests.Session
    url: str
    part: Path
    expected: str | None
    timeout_s: float
    check_hint: str
    # Headers of a revalidation (If-None-Match / If-Modified-Since), sent with a fresh
    # start only; a 304 answer then sets ``not_modified``.
    conditional: dict[str, str] | None = None
    not_modified: bool = False

    @property
    def meta(self) -> Path:
        return self.part.with_name(self.part.name + ".json")

    def discard(self) -> None:
        remove(self.part)
        remove(self.meta)

    def run(self, retries: int, backoff_s: float) -> bool:
        """Attempt until one attempt completes; return whether any attempt resumed."""
        resumed = False
        last_error: BaseException | None = None
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(min(backoff_s * 2 ** (attempt - 1), RETRY_BACKOFF_MAX_S))
            try:
                resumed |= self.attempt()
                return resumed
            except (
                _TransientError,
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
                urllib3.exceptions.HTTPError,
            ) as exc:
                last_error = exc
                log.warning(
                    "download of %s failed (attempt %d of %d): %s",
                    self.url,
                    attempt + 1,
                    retries + 1,
                    exc,
                )
        raise _DownloadFailed(
            f"could not download {self.url} after {retries + 1} attempts: {last_error}. Check "
            f"the network and {self.check_hint}; raise fetch.retries or fetch.timeout_s for a "
            "slow or flaky link."
        )

    def attempt(self) -> bool:
        """One GET into ``part``, resuming it if possible; return whether it resumed."""
        offset, validator = self.resume_point()
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if validator:
                headers["If-Range"] = validator
        elif self.conditional:
            headers.update(self.conditional)
        timeout = (self.timeout_s, self.timeout_s)
        try:
            response = self.session.get(self.url, stream=True, timeout=timeout, headers=headers)
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema) as exc:
            raise StageError(
                f"{self.url!r} is not a valid URL ({exc}); check {self.check_hint}"
            ) from None
        with response:
            status = response.status_code
            if status in (408, 429) or status >= 500:
                raise _TransientError(f"HTTP {status} {response.reason}")
            if status == 416:
                self.discard()
                raise _TransientError("the server refused to resume; starting over")
            if status == 304 and not offset and self.conditional:
                self.not_modified = True
                return False
            if status not in (200, 206):
                raise StageError(
                    f"HTTP {status} {response.reason} for {self.url}; check {self.check_hint} "
                    "(the URL must be a direct, public download link)"
                )
            if status == 206:
                start = _content_range_start(response.headers.get("Content-Range"))
                if start != offset:
                    self.discard()
                    raise _TransientError(f"the server resumed at byte {start}, not {offset}")
                mode = "ab"
                log.info("resuming %s at byte %d", self.url, offset)
            else:
                offset, mode = 0, "wb"
                write_json(
                    self.meta,
                    {
                        "url": self.url,
                        "validator": _validator(response),
                        "etag": response.headers.get("ETag"),
                        "last_modified": response.headers.get("Last-Modified"),
                    },
                )
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length and length.isdigit() else None
            with (
                open(self.part, mode) as handle,
                progress(
                    total=total,
                    initial=offset,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=PurePosixPath(urlsplit(self.url).path).name or self.url,
                ) as bar,
            ):
                # raw.stream: the bytes exactly as sent (no Content-Encoding decoding).
                for chunk in response.raw.stream(NETWORK_CHUNK_BYTES, decode_content=False):
                    handle.write(chunk)
                    bar.update(len(chunk))
            size = self.part.stat().st_size
            if total is not None and size != total:
                raise _TransientError(f"the connection closed after {size} of {total} bytes")
        return mode == "ab"

    def resume_point(self) -> tuple[int, str | None]:
        """Where to resume from, and the ``If-Range`` validator; ``(0, None)`` to restart."""
        if not self.part.is_file():
            return 0, None
        try:
            meta = read_json(self.meta)
        except (OSError, ValueError):
            meta = {}
        same_url = isinstance(meta, dict) and meta.get("url") == self.url
        validator = meta.get("validator") if same_url else None
        # Without a validator the server cannot tell us the file changed; then only an
        # expected sha256 (checked at the end) makes resuming safe.
        if same_url and (validator or self.expected):
            return self.part.stat().st_size, validator
        return 0, None


def _validator(response: requests.Response) -> str | None:
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):  # weak ETags are not allowed in If-Range
        return etag
    return response.headers.get("Last-Modified")


def _content_range_start(header: str | None) -> int | None:
    match = re.match(r"^bytes (\d+)-\d+/(\d+|\*)$", header or "")
    return int(match.group(1)) if match else None


# -- the sources ----------------------------------------------------------------------------


def _write_digits(source: str, images: Path) -> FetchResult:
    import numpy as np
    import sklearn
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 -> 0..255, rounded (8 -> 128: numpy rounds half to even).
    pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    total = 0
    for index, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
        folder = images / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index:04d}.png"
        Image.fromarray(image).save(path, format="PNG")
        total += path.stat().st_size
    return FetchResult(
        source=source,
        kind="folder",
        files=len(pixels),
        bytes=total,
        sha256=None,
        origin=f"scikit-learn {sklearn.__version__} load_digits",
        details={"classes": [str(label) for label in digits.target_names]},
    )


def _write_idx(
    source: str, dataset: IdxDataset, params: FetchParams, idx_dir: Path, cache_dir: Path
) -> FetchResult:
    idx_dir.mkdir(parents=True)
    local = dataset.resolved_local_dir()
    if local is not None and all((local / name).is_file() for name in IDX_FILES):
        for name in IDX_FILES:
            _check_local_idx(dataset, local / name)
            shutil.copyfile(local / name, idx_dir / name)
        origin = str(local)
    else:
        if local is not None:
            log.info("no complete local copy of %s in %s; downloading it", dataset.name, local)
        base_url = dataset.resolved_base_url()
        for name in IDX_FILES:
            download = fetch_url(
                base_url + name,
                cache_dir,
                sha256=dataset.gz_sha256[name],
                timeout_s=params.timeout_s,
                retries=params.retries,
                expect="a .gz file",
                check_hint=f"{dataset.base_url_env} ({base_url})",
                mismatch_hint=f"The file is not the official {dataset.name} release; if "
                f"{dataset.base_url_env} is set, point it at a faithful mirror or unset it.",
            )
            shutil.copyfile(download.path, idx_dir / name)
        origin = base_url
    counts = _idx_counts(idx_dir)
    write_json(idx_dir / "classes.json", list(dataset.classes))
    hashes = {name: file_sha256(idx_dir / name) for name in IDX_FILES}
    return FetchResult(
        source=source,
        kind="idx",
        files=len(IDX_FILES),
        bytes=sum((idx_dir / name).stat().st_size for name in IDX_FILES),
        sha256=hashes,
        origin=origin,
        details={"counts": counts, "classes": list(dataset.classes)},
    )


def _check_local_idx(dataset: IdxDataset, path: Path) -> None:
    """Accept a local IDX file if its .gz or its decompressed content has the known hash."""
    name = path.name
    gz_digest = file_sha256(path)
    if gz_digest == dataset.gz_sha256[name]:
        return
    expected_content = dataset.content_sha256.get(name)
    content_digest = None
    if expected_content is not None:
        digest = hashlib.sha256()
        try:
            with gzip.open(path, "rb") as handle:
                while chunk := handle.read(CHUNK_BYTES):
                    digest.update(chunk)
            content_digest = digest.hexdigest()
        except (OSError, EOFError) as exc:
            content_digest = f"unreadable ({exc})"
        if content_digest == expected_content:
            return
    env = f"set {dataset.local_dir_env} to a missing folder to download instead"
    raise StageError(
        f"the local copy {path} does not match {dataset.name}: its sha256 is {gz_digest} "
        f"(expected {dataset.gz_sha256[name]})"
        + (
            f" and its decompressed sha256 is {content_digest} (expected {expected_content})"
            if expected_content
            else ""
        )
        + f". Reinstall it or {env}."
    )


def _idx_counts(idx_dir: Path) -> dict[str, int]:
    """Check the IDX headers (magic numbers, matching counts); return the count per split."""
    counts = {}
    for split in ("train", "t10k"):
        images = _idx_header(idx_dir / f"{split}-images-idx3-ubyte.gz", _IDX_IMAGES_MAGIC, 3)
        labels = _idx_header(idx_dir / f"{split}-labels-idx1-ubyte.gz", _IDX_LABELS_MAGIC, 1)
        if images[0] != labels[0]:
            raise StageError(
                f"{split}: {images[0]} images but {labels[0]} labels in the IDX files; the "
                "download is inconsistent"
            )
        counts[split] = images[0]
    return counts


def _idx_header(path: Path, magic: int, dims: int) -> tuple[int, ...]:
    try:
        with gzip.open(path, "rb") as handle:
            header = handle.read(4 + 4 * dims)
    except (OSError, EOFError) as exc:
        raise StageError(f"{path.name} is not a readable .gz file: {exc}") from None
    if len(header) < 4 + 4 * dims or struct.unpack(">I", header[:4])[0] != magic:
        raise StageError(f"{path.name} is not an IDX file (magic 0x{magic:08x} expected)")
    return struct.unpack(f">{dims}I", header[4:])


def _write_archive(
    source: str, where: str, archive: Path, digest: str, params: FetchParams, tmp: Path
) -> FetchResult:
    try:
        report = safe_extract(
            archive,
            tmp / "images",
            max_members=params.max_members,
            max_total_bytes=params.max_total_bytes,
            max_member_bytes=params.max_member_bytes,
        )
    except ArchiveLimitError as exc:
        raise StageError(
            f"refusing the archive from {where}: {exc}. Nothing was extracted. If the archive "
            "is trusted and really this big, raise fetch.max_members, fetch.max_member_bytes "
            "or fetch.max_total_bytes in params.yaml."
        ) from None
    except ArchiveError as exc:
        raise StageError(
            f"refusing the archive from {where}: {exc}. Nothing was extracted."
        ) from None
    if report.files == 0:
        raise StageError(f"the archive from {where} holds no files")
    return FetchResult(
        source=source,
        kind="folder",
        files=report.files,
        bytes=report.bytes,
        sha256=digest,
        origin=where,
        details={"format": report.format, "links_copied": report.links_copied},
    )


def _copy_folder(source: str, folder: Path, tmp: Path, index: HashIndex) -> FetchResult:
    """Copy the files of ``folder`` into ``tmp/images``, hashing each as it is copied."""
    listing = list_folder(folder)
    images = tmp / "images"
    images.mkdir(parents=True)
    for rel in listing.folders:
        (images / rel).mkdir()
    if listing.skipped:
        log.warning(
            "skipped %d entries of %s: %s%s",
            len(listing.skipped),
            folder,
            "; ".join(listing.skipped[:5]),
            " ..." if len(listing.skipped) > 5 else "",
        )
    if not listing.files:
        raise StageError(
            f"the folder {folder} holds no files; fetch.source must be a folder of class "
            "sub-folders (e.g. cats/1.jpg, dogs/2.jpg)"
        )
    hashes: dict[str, str] = {}
    total = 0
    for rel, path in listing.files:
        hashes[rel], size = _copy_and_hash(path, images / rel, index, rel)
        total += size
    index.forget_except(hashes)
    manifest = folder_manifest(hashes)
    (tmp / MANIFEST_NAME).write_bytes(manifest)
    return FetchResult(
        source=source,
        kind="folder",
        files=len(hashes),
        bytes=total,
        sha256=None,
        origin=str(listing.root),
        details={"skipped": listing.skipped},
        fingerprint={
            "method": "sha256-tree",
            "path": str(listing.root),
            "sha256": hashlib.sha256(manifest).hexdigest(),
            "files": len(hashes),
            "manifest": MANIFEST_NAME,
        },
    )


def _copy_and_hash(source: Path, dest: Path, index: HashIndex, key: str) -> tuple[str, int]:
    """Copy one file, returning its sha256 and size; refuse a file that changes meanwhile."""
    before = os.stat(source)
    began_ns = time.time_ns()
    digest = hashlib.sha256()
    size = 0
    # "xb": a fresh staging folder; never follow a link at the destination.
    with open(source, "rb") as reader, open(dest, "xb") as writer:
        while chunk := reader.read(CHUNK_BYTES):
            digest.update(chunk)
            writer.write(chunk)
            size += len(chunk)
    if stat_key(os.stat(source)) != stat_key(before):
        raise StageError(
            f"{source} changed while it was being copied; run fetch again once nothing "
            "writes to the source folder"
        )
    index.record(key, before, digest.hexdigest(), began_ns)
    return digest.hexdigest(), size


# -- local sources: listing, content fingerprints, and the hash index ----------------------


@dataclass(frozen=True)
class FolderListing:
    """What :func:`list_folder` found: the files fetch copies, and what it skips.

    Attributes:
        root: the resolved folder.
        files: ``(relative POSIX path, file to read)`` for every regular file, and for every
            symlink to a regular file inside the folder (read through the link), sorted.
        folders: relative paths of the sub-folders to create, parents first.
        skipped: ``"<relative path> (<why>)"`` for each entry that is not copied.
    """

    root: Path
    files: list[tuple[str, Path]]
    folders: list[str]
    skipped: list[str]


def list_folder(folder: Path) -> FolderListing:
    """List a local source folder exactly as :func:`fetch` copies it.

    Symlinked folders, symlinks that point outside the folder or at something other than a
    regular file, and special files (FIFOs, sockets, devices) are skipped.
    """
    root = Path(folder).resolve()
    files: list[tuple[str, Path]] = []
    folders: list[str] = []
    skipped: list[str] = []
    # os.walk is bounded: it does not follow symlinked folders (followlinks=False).
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        rel = here.relative_to(root)
        dirnames.sort()
        for name in list(dirnames):
            if (here / name).is_symlink():
                skipped.append(f"{rel / name} (symlinked folder)")
                dirnames.remove(name)
            else:
                folders.append((rel / name).as_posix())
        for name in sorted(filenames):
            path = here / name
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                real = path.resolve()
                if not real.is_relative_to(root):
                    skipped.append(f"{rel / name} (symlink to outside the folder)")
                    continue
                if not real.is_file():
                    skipped.append(f"{rel / name} (symlink to a non-file)")
                    continue
                path = real
            elif not stat.S_ISREG(mode):
                skipped.append(f"{rel / name} (not a regular file)")
                continue
            files.append(((rel / name).as_posix(), path))
    return FolderListing(root, files, folders, skipped)


def folder_manifest(hashes: Mapping[str, str]) -> bytes:
    """``sha256sum``-format lines (``<sha256>  <path>``) sorted by path.

    Names holding a backslash, newline or carriage return are escaped the way GNU
    ``sha256sum`` does it (the line then starts with ``\\``), so
    ``cd data/raw/images && sha256sum -c ../source.sha256`` checks a fetched folder.
    """
    lines = []
    for rel in sorted(hashes):
        if any(char in rel for char in "\\\n\r"):
            escaped = rel.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
            lines.append(f"\\{hashes[rel]}  {escaped}\n")
        else:
            lines.append(f"{hashes[rel]}  {rel}\n")
    # surrogateescape: file names that are not UTF-8 round-trip byte for byte.
    return "".join(lines).encode("utf-8", "surrogateescape")


def parse_manifest(data: bytes) -> dict[str, str]:
    """Read :func:`folder_manifest`'s output back into ``{relative path: sha256}``."""
    hashes = {}
    # split("\n"), not splitlines(): names may hold other line-breaking characters.
    for line in data.decode("utf-8", "surrogateescape").split("\n"):
        if not line:
            continue
        escaped = line.startswith("\\")
        digest, _, rel = line.removeprefix("\\").partition("  ")
        if escaped:
            rel = re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r"}.get(m[1], m[1]), rel)
        hashes[rel] = digest
    return hashes


# A file whose mtime or ctime is this close to the moment it was hashed may still change
# within the same timestamp tick without its stat changing (git calls this "racy"); its hash
# is recorded, but it is hashed again next time rather than trusted on its stat.
RACY_WINDOW_NS = 2_000_000_000
ARCHIVE_KEY = "."  # the index key of a single-file source (a local archive, a weights file)
_INDEX_VERSION = 1


def stat_key(st: os.stat_result) -> list[int]:
    """What the hash index compares: size, mtime, ctime, inode and device."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class HashIndex:
    """sha256s of a local source's files, reused while each file's stat stays the same.

    Like DVC's state database or git's index, it is a cache of facts ("the file with this
    size, mtime, ctime and inode had this hash"), so a stale or lost index costs hashing
    again, never a wrong answer. ctime is in the key because no tool can set it: a file
    rewritten with its old size and mtime restored (``cp -p``, ``rsync -t``, ``tar``) still
    shows as changed. One JSON file per source path, in ``<cache>/sources/``.

    Args:
        path: the index file; ``None`` for an index kept in memory only.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        self._dirty = False
        if path is None or not path.is_file():
            return
        try:
            data = read_json(path)
        except (OSError, ValueError):
            return  # a damaged cache is rebuilt
        if isinstance(data, dict) and data.get("version") == _INDEX_VERSION:
            entries = data.get("files")
            if isinstance(entries, dict):
                self.entries = entries

    @classmethod
    def for_source(cls, folder: Path, source: Path) -> HashIndex:
        """The index of ``source`` (a file or folder) kept under ``folder/sources/``."""
        name = hashlib.sha256(os.fsencode(Path(source).resolve())).hexdigest()[:24]
        return cls(Path(folder) / "sources" / f"{name}.json")

    def lookup(self, key: str, st: os.stat_result) -> str | None:
        """The recorded sha256 of ``key`` if its stat is unchanged and was trusted."""
        entry = self.entries.get(key)
        if isinstance(entry, dict) and entry.get("stat") == stat_key(st):
            digest = entry.get("sha256")
            return digest if isinstance(digest, str) else None
        return None

    def record(self, key: str, st: os.stat_result, digest: str, hashed_at_ns: int) -> None:
        """Record that ``key``, with stat ``st`` (taken before hashing), had ``digest``."""
        racy = max(st.st_mtime_ns, st.st_ctime_ns) + RACY_WINDOW_NS > hashed_at_ns
        entry = {"sha256": digest, "stat": None if racy else stat_key(st)}
        if self.entries.get(key) != entry:
            self.entries[key] = entry
            self._dirty = True

    def forget_except(self, keys: Iterable[str]) -> None:
        """Drop the entries of files that are gone."""
        keep = set(keys)
        for key in [key for key in self.entries if key not in keep]:
            del self.entries[key]
            self._dirty = True

    def save(self) -> None:
        """Write the index if it changed; a cache that cannot be written is only logged."""
        if self.path is None or not self._dirty:
            return
        try:
            write_json(self.path, {"version": _INDEX_VERSION, "files": self.entries})
            self._dirty = False
        except OSError as exc:
            log.warning("could not save the hash index %s: %s", self.path, exc)


def hash_file(path: Path, index: HashIndex | None = None, key: str = ARCHIVE_KEY) -> str:
    """The sha256 of a local file, taken from ``index`` while its stat is unchanged.

    Raises:
        StageError: the file kept changing while it was read.
    """
    before = os.stat(path)
    if index is not None and (known := index.lookup(key, before)) is not None:
        return known
    for _ in range(3):
        began_ns = time.time_ns()
        digest = file_sha256(path)
        after = os.stat(path)
        if stat_key(after) == stat_key(before):
            if index is not None:
                index.record(key, before, digest, began_ns)
            return digest
        before = after
    raise StageError(f"{path} kept changing while it was read; try again once nothing writes to it")


def hash_folder(listing: FolderListing, index: HashIndex | None = None) -> dict[str, str]:
    """The sha256 of every file in ``listing``, by relative path, reusing ``index``."""
    hashes = {rel: hash_file(path, index, rel) for rel, path in listing.files}
    if index is not None:
        index.forget_except(hashes)
    return hashes


# -- command line ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m tasks.fetch --out data/raw --cache .tlp/downloads``."""
    parser = argparse.ArgumentParser(
        prog="python -m tasks.fetch", description="Fetch the raw dataset (params: fetch)."
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (data/raw)")
    parser.add_argument("--cache", type=Path, required=True, help="download cache folder")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    args = parser.parse_args(argv)

    def body() -> None:
        params = load_params(args.params)
        fetch(params.fetch, args.out, args.cache)

    return run_stage("fetch", body)


if __name__ == "__main__":
    raise SystemExit(main())
