"""Stage ``fetch``: get the raw dataset into ``<out>`` (``data/raw``), verified and atomically.

``fetch.source`` is one of:

- a dataset descriptor: ``data/builtin/digits.yaml`` (the default), ``mnist.yaml``,
  ``fashion-mnist.yaml``, or one you write (:mod:`tasks.builtin`);
- an ``http(s)://`` URL of a tar(.gz/.bz2/.xz) or zip archive, optionally pinned by
  ``fetch.sha256``, downloaded into the cache (``--cache``) by :mod:`tasks.download` and
  extracted into ``images/`` by :func:`tasks.archive.safe_extract`;
- a local archive (same rules), absolute or relative to the project root;
- a local folder of class sub-folders, copied into ``images/`` (symlinks that point outside
  the folder, and special files, are skipped and reported).

``dvc.yaml`` lists ``${fetch.source}`` among the stage's dependencies, so DVC itself sees new
bytes behind an unchanged name: it hashes a local folder or file (keeping the hashes in its
state database, keyed by inode, size and mtime) and tracks a URL by its ETag. ``dvc status``
then reports the stage as changed and ``dvc repro`` runs it again.

Output layout::

    <out>/source.json                  {source, kind, files, bytes, sha256, origin, details}
    <out>/images/<class>/...           kind "folder"
    <out>/idx/*-ubyte.gz, classes.json kind "idx"

``<out>`` is built in a temporary sibling folder and renamed into place only when complete,
so a failed run leaves the previous ``<out>`` untouched. The same source bytes always give
the same output bytes (no timestamps), so re-fetching unchanged data re-runs nothing
downstream.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from tasks.archive import ArchiveError, ArchiveLimitError, safe_extract
from tasks.builtin import DigitsDescriptor, is_descriptor, load_descriptor, write_digits, write_idx
from tasks.common import StageError, atomic_path, log, run_stage, sha256_file, write_json
from tasks.download import download
from tasks.params import FetchParams, load_params

_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar", ".zip")
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
            (digits and local folders).
        origin: where the data came from (a URL, a local path, or the library).
        details: extra facts (archive format, IDX counts, skipped entries, ...).
    """

    source: str
    kind: str
    files: int
    bytes: int
    sha256: str | dict[str, str] | None
    origin: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``source.json`` content."""
        return asdict(self)


def fetch(params: FetchParams, out: Path, cache_dir: Path) -> FetchResult:
    """Fetch ``params.source`` into ``out``, replacing it atomically.

    Args:
        params: the ``fetch`` section of ``params.yaml``.
        out: the output folder (``data/raw``); replaced only if the fetch succeeds.
        cache_dir: where downloads are cached between runs (``.tlp/downloads``).

    Returns:
        What was written (also saved as ``<out>/source.json``).

    Raises:
        StageError: the source is unknown, unreachable, fails verification or is unsafe;
            the message says what to change (``TransientError`` for a download that kept
            failing).
    """
    out, cache_dir = Path(out), Path(cache_dir)
    source = params.source
    expected = params.sha256.lower() if params.sha256 else None
    scheme = _SCHEME.match(source)
    if scheme and scheme.group(1).lower() not in ("http", "https"):
        raise StageError(
            f"fetch.source {source!r} uses the unsupported URL scheme {scheme.group(1)!r}; use "
            "an http(s):// URL of an archive, a dataset descriptor such as "
            "data/builtin/digits.yaml, or a local archive or folder"
        )
    local = None if scheme else _local_source(source, out)
    if expected and local is not None and (local.is_dir() or is_descriptor(source)):
        what = "a folder" if local.is_dir() else "a dataset descriptor, which pins its own hashes"
        raise StageError(
            f"fetch.sha256 is set but fetch.source {source!r} is {what}, not an archive. "
            "Set fetch.sha256: null."
        )

    with atomic_path(out, directory=True) as tmp:
        if local is None:
            fetched = download(
                source,
                cache_dir,
                sha256=expected,
                timeout_s=params.timeout_s,
                retries=params.retries,
                what=f"a {_archive_label(source)} archive",
            )
            result = _extract(source, source, fetched.path, fetched.sha256, params, tmp)
        elif is_descriptor(source):
            result = _builtin(source, local, params, tmp, cache_dir)
        elif local.is_dir():
            result = _copy_folder(source, local, tmp)
        else:
            digest = sha256_file(local)
            if expected and digest != expected:
                raise StageError(
                    f"sha256 mismatch for {local}: expected {expected}, got {digest}. Correct "
                    "fetch.sha256 in params.yaml, or fetch.source if it names the wrong file."
                )
            result = _extract(source, str(local), local, digest, params, tmp)
        write_json(tmp / "source.json", result.to_json())
    log.info(
        "fetch: %d files (%s bytes, kind %s) from %s into %s",
        result.files, f"{result.bytes:,}", result.kind, result.origin, out,
    )  # fmt: skip
    return result


def _local_source(value: str, out: Path) -> Path:
    path = Path(value)
    if not path.exists():
        raise StageError(
            f"fetch.source {value!r} does not exist ({path.absolute()}); give an existing "
            "archive or folder (relative paths are relative to the project root), a URL, "
            "or a dataset descriptor such as data/builtin/digits.yaml"
        )
    if not path.is_dir() and not path.is_file():
        raise StageError(f"fetch.source {value!r} is neither a regular file nor a folder")
    resolved, out_resolved = path.resolve(), out.absolute().resolve()
    if path.is_dir() and (
        out_resolved.is_relative_to(resolved) or resolved.is_relative_to(out_resolved)
    ):
        raise StageError(
            f"fetch.source {value!r} and the output folder {out} contain one another; "
            "keep the source folder outside the output"
        )
    return path


def _archive_label(url: str) -> str:
    name = PurePosixPath(urlsplit(url).path).name.lower()
    return next((suffix for suffix in _ARCHIVE_SUFFIXES if name.endswith(suffix)), "tar/zip")


def _builtin(
    source: str, descriptor_path: Path, params: FetchParams, tmp: Path, cache_dir: Path
) -> FetchResult:
    descriptor = load_descriptor(descriptor_path)
    if isinstance(descriptor, DigitsDescriptor):
        written = write_digits(tmp / "images")
    else:
        fetch_file = functools.partial(
            download, cache_dir=cache_dir, timeout_s=params.timeout_s, retries=params.retries
        )
        written = write_idx(descriptor_path.stem, descriptor, tmp / "idx", fetch_file)
    return FetchResult(source=source, **asdict(written))


def _extract(
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


def _copy_folder(source: str, folder: Path, tmp: Path) -> FetchResult:
    """Copy the files of ``folder`` into ``tmp/images``; refuse a file that changes meanwhile."""
    root = folder.resolve()
    files, skipped = _list_folder(root)
    if skipped:
        log.warning(
            "skipped %d entries of %s: %s%s",
            len(skipped), folder, "; ".join(skipped[:5]), " ..." if len(skipped) > 5 else "",
        )  # fmt: skip
    if not files:
        raise StageError(
            f"the folder {folder} holds no files; fetch.source must be a folder of class "
            "sub-folders (e.g. cats/1.jpg, dogs/2.jpg)"
        )
    images = tmp / "images"
    total = 0
    for rel, path in files:
        dest = images / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        before = os.stat(path)
        shutil.copyfile(path, dest)
        after = os.stat(path)
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
            raise StageError(
                f"{path} changed while it was being copied; run fetch again once nothing "
                "writes to the source folder"
            )
        total += after.st_size
    return FetchResult(
        source=source,
        kind="folder",
        files=len(files),
        bytes=total,
        sha256=None,
        origin=str(root),
        details={"skipped": skipped},
    )


def _list_folder(root: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """The files to copy (relative POSIX path, file to read), sorted, and what is skipped.

    Symlinks to regular files inside the folder are read through; symlinked folders,
    symlinks pointing outside the folder or at something other than a regular file, and
    special files (FIFOs, sockets, devices) are skipped, as ``"<path> (<why>)"``.
    """
    files: list[tuple[str, Path]] = []
    skipped: list[str] = []
    # os.walk is bounded: it does not follow symlinked folders (followlinks=False).
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        rel = here.relative_to(root)
        dirnames.sort()
        for name in [d for d in dirnames if (here / d).is_symlink()]:
            skipped.append(f"{rel / name} (symlinked folder)")
            dirnames.remove(name)
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
    return files, skipped


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
