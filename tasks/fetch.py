"""Stage ``fetch``: get the raw dataset into ``<out>`` (``data/raw``), verified and atomically.

``fetch.source`` is one of:

- a dataset descriptor: ``data/builtin/digits.yaml`` (the default), ``mnist.yaml``,
  ``fashion-mnist.yaml``, or one you write (:mod:`tasks.builtin`);
- an ``http(s)://`` URL of a tar(.gz/.bz2/.xz) or zip archive, optionally pinned by
  ``fetch.sha256``, downloaded into the cache (``--cache``) by :mod:`tasks.download` and
  extracted into ``images/`` by :func:`tasks.archive.safe_extract`;
- a local archive (same rules), absolute or relative to the project root;
- a local folder of class sub-folders, copied into ``images/`` (symlinks that point outside
  the folder, symlinked folders and hidden entries, whose names start with a dot and which
  prepare ignores, are skipped and reported). A folder holding what DVC, which hashes the
  source, cannot read (a symlink loop, a dangling link, a FIFO, socket or device) is refused,
  naming the entries: ``dvc status`` would fail on them, or hang reading a FIFO.

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

Permissions: nobody else can read what fetch writes unless they can read the source now.
A copy keeps, for the group and for other users, only the access the source grants them
(every folder above it searchable, the file or folder itself readable), and never more
than the umask allows; the temporary folder is private while it fills.
"""

from __future__ import annotations

import argparse
import errno
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
        tmp.chmod(0o700)  # private while it fills; opened up to what the source allows below
        keep = 0o777 if local is None else _access_mask(local, tmp.stat().st_gid)
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
            result = _copy_folder(source, local, tmp, keep)
        else:
            digest = sha256_file(local)
            if expected and digest != expected:
                raise StageError(
                    f"sha256 mismatch for {local}: expected {expected}, got {digest}. Correct "
                    "fetch.sha256 in params.yaml, or fetch.source if it names the wrong file."
                )
            result = _extract(source, str(local), local, digest, params, tmp)
        write_json(tmp / "source.json", result.to_json())
        _restrict(tmp, keep)
    _warn_if_the_project_is_open(out, keep)
    log.info(
        "fetch: %d files (%s bytes, kind %s) from %s into %s",
        result.files, f"{result.bytes:,}", result.kind, result.origin, out,
    )  # fmt: skip
    return result


def _local_source(value: str, out: Path) -> Path:
    path = Path(value)
    if path.is_symlink() and not path.exists():
        raise StageError(
            f"fetch.source {value!r} is a symlink loop or a link to nothing; point "
            "fetch.source at the folder or archive itself"
        )
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


def _copy_folder(source: str, folder: Path, tmp: Path, keep: int) -> FetchResult:
    """Copy the files of ``folder`` into ``tmp/images``; refuse a file that changes meanwhile.

    Each copy and folder keeps only the access its source grants the group and other users
    (``keep`` for ``folder`` itself, narrowed by each folder below it).
    """
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
    images, gid, umask = tmp / "images", tmp.stat().st_gid, _umask()
    masks = {PurePosixPath("."): keep}  # source folder -> the access its copies may keep
    images.mkdir()
    total = 0
    for rel, path in files:
        for parent in reversed(PurePosixPath(rel).parents[:-1]):
            if parent not in masks:
                masks[parent] = masks[parent.parent] & _access_mask(root / parent, gid)
                (images / parent).mkdir()
                (images / parent).chmod(0o700 | (masks[parent] & ~umask))
        dest = images / rel
        before = os.stat(path)
        shutil.copyfile(path, dest)
        after = os.stat(path)
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
            raise StageError(
                f"{path} changed while it was being copied; run fetch again once nothing "
                "writes to the source folder"
            )
        mask = masks[PurePosixPath(rel).parent] & _grants(after, 4, gid)
        dest.chmod(0o600 | (after.st_mode & mask & 0o666 & ~umask))
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


def check_source_folder(folder: Path) -> None:
    """Raise :class:`StageError`, naming them, if ``folder`` holds entries DVC cannot hash
    (``tlp status`` and ``tlp run`` check this before DVC reads the source)."""
    _list_folder(folder.resolve())


def _list_folder(root: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """The files to copy (relative POSIX path, file to read), sorted, and what is skipped.

    Symlinks to regular files inside the folder are read through; symlinked folders,
    symlinks pointing outside the folder, and hidden entries (``.DS_Store``, ``...``:
    prepare ignores them) are skipped, as ``"<path> (<why>)"``.

    Raises:
        StageError: the folder holds entries DVC cannot hash (symlink loops, links to
            nothing, FIFOs, sockets, devices), all named.
    """
    files: list[tuple[str, Path]] = []
    skipped: list[str] = []
    unreadable: list[str] = []

    def cannot_list(error: OSError) -> None:
        unreadable.append(f"{Path(error.filename).relative_to(root)} ({error.strerror})")

    # os.walk is bounded: it does not follow symlinked folders (followlinks=False).
    for dirpath, dirnames, filenames in os.walk(root, onerror=cannot_list, followlinks=False):
        here = Path(dirpath)
        rel = here.relative_to(root)
        dirnames.sort()
        for name in [d for d in dirnames if d.startswith(".") or (here / d).is_symlink()]:
            hidden = name.startswith(".")
            skipped.append(f"{rel / name} ({'hidden' if hidden else 'symlinked folder'})")
            dirnames.remove(name)
        for name in sorted(filenames):
            path = here / name
            why = _unhashable(path)
            if why:
                unreadable.append(f"{rel / name} ({why})")
            elif name.startswith("."):
                skipped.append(f"{rel / name} (hidden)")
            elif path.is_symlink():
                real = path.resolve()
                if not real.is_relative_to(root):
                    skipped.append(f"{rel / name} (symlink to outside the folder)")
                    continue
                files.append(((rel / name).as_posix(), real))
            else:
                files.append(((rel / name).as_posix(), path))
    if unreadable:
        raise StageError(
            f"fetch.source {root} holds {len(unreadable)} entries that DVC, which hashes the "
            f"source, cannot read: {'; '.join(unreadable[:10])}. Remove them (or fix the "
            "links) and run again"
        )
    return files, skipped


def _unhashable(path: Path) -> str | None:
    """Why DVC cannot hash this folder entry (it follows links), or ``None``."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop"
        return "link to nothing" if path.is_symlink() else exc.strerror
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return "FIFO" if stat.S_ISFIFO(mode) else "socket or device"


# -- permissions ----------------------------------------------------------------------------


def _umask() -> int:
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def _grants(info: os.stat_result, bit: int, gid: int) -> int:
    """The owner, and the classes of users (group, other) that permission ``bit`` (4: read,
    1: search) of ``info`` lets in, as a mode mask. Where the copy gets another group
    (``gid``), the group's bit counts only if other users have it too: the copy's group
    may hold anyone."""
    other = info.st_mode & bit
    group = info.st_mode & (bit << 3) and (info.st_gid == gid or other)
    return 0o700 | (0o070 if group else 0) | (0o007 if other else 0)


def _access_mask(path: Path, gid: int) -> int:
    """Who can read ``path`` now, as a mode mask: every folder above it must be searchable
    by them, and ``path`` readable (and searchable, if a folder)."""
    real = path.resolve()
    info = os.stat(real)
    mask = _grants(info, 4, gid) & (_grants(info, 1, gid) if stat.S_ISDIR(info.st_mode) else 0o777)
    for folder in real.parents:
        mask &= _grants(os.stat(folder), 1, gid)
    return mask


def _restrict(tmp: Path, keep: int) -> None:
    """Narrow the permissions of everything in ``tmp`` to ``keep`` and the umask (archives
    carry their own modes); the owner keeps read access."""
    keep &= ~_umask()
    for dirpath, dirnames, filenames in os.walk(tmp):
        for name, floor in [*((d, 0o700) for d in dirnames), *((f, 0o600) for f in filenames)]:
            path = os.path.join(dirpath, name)
            os.chmod(path, floor | (os.stat(path).st_mode & keep))  # no links: copies only
    tmp.chmod(0o700 | (0o777 & keep))


def _warn_if_the_project_is_open(out: Path, keep: int) -> None:
    """Say so when the source is closed to users who can read the project folder: DVC's
    cache (files 0444) and the later stages' outputs there would be readable by them."""
    project = Path(os.environ.get("DVC_ROOT") or out.absolute().parent)  # DVC sets DVC_ROOT
    exposed = _access_mask(project, os.stat(project).st_gid) & ~_umask() & ~keep & 0o077
    if exposed:
        log.warning(
            "fetch.source is not readable by %s, nor is %s now, but the project %s is open "
            "to them: DVC's cache and the later stages' outputs there will be readable by "
            "them. To keep them private: chmod 700 %s",
            "other users" if exposed & 0o007 else "your group", out, project, project,
        )  # fmt: skip


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
