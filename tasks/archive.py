"""Safe extraction of untrusted archives (tar, tar.gz, tar.bz2, tar.xz, zip).

:func:`safe_extract` plans the whole archive before it writes a byte and refuses the
*whole* archive, with an :class:`ArchiveError` that names the member and the reason, on:

- absolute paths (``/etc/x``, ``C:/x``), ``..`` components, NUL bytes, over-long names;
- symlinks or hardlinks whose target lies outside the archive, links to folders or to
  members that do not exist (links are never created on disk: a link to a file inside
  the archive is written as a copy of that file, so no later member can be written
  *through* a link);
- device files, FIFOs and other special members; encrypted zip members;
- duplicate members, and a member that is both a file and a folder;
- more than ``max_members`` members, a member over ``max_member_bytes``, or more than
  ``max_total_bytes`` in all (decompression bombs). Declared sizes are checked first and
  the bytes actually written are counted too, since headers can lie; zip members must
  also stay under ``max_ratio`` (uncompressed / compressed).

Extraction goes into a fresh staging folder next to ``dest`` that is renamed onto ``dest``
only when every member was written: on any error nothing is left behind. The archive
format is recognised by its magic bytes, not by its file name. Tar members also pass
Python's own ``tarfile.data_filter`` as a second line of defence.

Members are never extracted with ``tarfile.extract``/``zipfile.extract``: this module
opens each regular member as a stream and writes plain files and folders itself, with
default permissions (no set-uid bits, owners or timestamps from the archive).
"""

from __future__ import annotations

import errno
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = [
    "ArchiveError",
    "ArchiveLimitError",
    "ExtractReport",
    "looks_like_html",
    "safe_extract",
    "sniff_format",
]

CHUNK_BYTES = 1024 * 1024
# Ratios only matter for members big enough to hurt; small members may compress well.
RATIO_MIN_BYTES = 1024 * 1024
MAX_LINK_HOPS = 16
MAX_NAME_BYTES = 255  # one path component, as on ext4, xfs, btrfs, apfs

_DRIVE = re.compile(r"^[A-Za-z]:")


class ArchiveError(ValueError):
    """The archive is unsafe, corrupt or unsupported; nothing was extracted."""

    def __init__(self, reason: str, member: str | None = None) -> None:
        self.reason = reason
        self.member = member
        super().__init__(f"member {member!r}: {reason}" if member is not None else reason)


class ArchiveLimitError(ArchiveError):
    """A member count or size cap was exceeded (possible decompression bomb)."""


@dataclass(frozen=True)
class ExtractReport:
    """What :func:`safe_extract` wrote.

    Attributes:
        format: ``tar``, ``tar.gz``, ``tar.bz2``, ``tar.xz`` or ``zip``.
        files: regular files written (links written as copies included).
        directories: folders created (explicit and implied).
        bytes: bytes written in all.
        links_copied: links inside the archive written as copies of their target.
    """

    format: str
    files: int
    directories: int
    bytes: int
    links_copied: int


def sniff_format(path: str | Path) -> str | None:
    """Recognise an archive by its magic bytes.

    Args:
        path: the file to look at.

    Returns:
        ``tar.gz``, ``tar.bz2``, ``tar.xz``, ``zip`` or ``tar``; ``None`` if it is none of
        these. A compressed stream is reported as a tar even if its content turns out not
        to be one (extraction then fails with a clear error).
    """
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if head.startswith(b"BZh"):
        return "tar.bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "tar.xz"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[257:262] == b"ustar":
        return "tar"
    # Old (v7) tars have no magic; let tarfile's header checksum decide.
    if len(head) == 512 and not looks_like_html(head):
        try:
            with tarfile.open(path, mode="r:") as tar:
                if tar.next() is not None:
                    return "tar"
        except (tarfile.TarError, OSError, EOFError):
            return None
    return None


def looks_like_html(head: bytes) -> bool:
    """Whether the first bytes of a file look like an HTML (or XML error) page.

    Servers often answer a bad download link with a login or error page and status 200.
    """
    text = head[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return text.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml", b"<!--"))


@dataclass
class _Member:
    name: str  # as written in the archive, for messages
    parts: tuple[str, ...]  # safe relative path
    kind: str  # "file" | "dir" | "link"
    size: int = 0
    target: tuple[str, ...] | None = None  # links: the target, relative to the root
    handle: Any = None  # TarInfo or ZipInfo


@dataclass
class _Plan:
    max_members: int
    max_total_bytes: int
    max_member_bytes: int
    members: int = 0
    declared_bytes: int = 0
    files: dict[tuple[str, ...], _Member] = field(default_factory=dict)
    dirs: set[tuple[str, ...]] = field(default_factory=set)
    links: list[_Member] = field(default_factory=list)

    def count(self, name: str) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise ArchiveLimitError(
                f"the archive has more than max_members={self.max_members} members", name
            )

    def _claim_file_path(self, member: _Member) -> None:
        if member.parts in self.files:
            raise ArchiveError("duplicate member (the archive holds this path twice)", member.name)
        if member.parts in self.dirs:
            raise ArchiveError("is a file here but a folder elsewhere in the archive", member.name)
        for depth in range(1, len(member.parts)):
            if member.parts[:depth] in self.files:
                raise ArchiveError(
                    f"needs {'/'.join(member.parts[:depth])!r} to be a folder, but it is a file",
                    member.name,
                )
        for depth in range(1, len(member.parts)):
            self.dirs.add(member.parts[:depth])

    def add_file(self, member: _Member) -> None:
        if member.size > self.max_member_bytes:
            raise ArchiveLimitError(
                f"declares {member.size} bytes, over max_member_bytes={self.max_member_bytes}"
                " (possible decompression bomb)",
                member.name,
            )
        self.declared_bytes += member.size
        if self.declared_bytes > self.max_total_bytes:
            raise ArchiveLimitError(
                f"brings the declared total to {self.declared_bytes} bytes, over "
                f"max_total_bytes={self.max_total_bytes} (possible decompression bomb)",
                member.name,
            )
        self._claim_file_path(member)
        self.files[member.parts] = member

    def add_dir(self, member: _Member) -> None:
        for depth in range(1, len(member.parts) + 1):
            if member.parts[:depth] in self.files:
                raise ArchiveError(
                    "is a folder here but a file elsewhere in the archive", member.name
                )
            self.dirs.add(member.parts[:depth])

    def add_link(self, member: _Member) -> None:
        self._claim_file_path(member)
        # Reserve the path so a later file of the same name is a duplicate.
        self.files[member.parts] = member
        self.links.append(member)

    def resolve_links(self) -> None:
        """Point every link at a regular file in the archive, or refuse the archive."""
        for link in self.links:
            target = link.target
            for _ in range(MAX_LINK_HOPS):
                found = self.files.get(target) if target is not None else None
                if found is None or found.kind != "link":
                    break
                target = found.target
            found = self.files.get(target) if target is not None else None
            if found is None or found.kind != "file":
                what = "a folder" if target in self.dirs else "not a file in the archive"
                raise ArchiveError(
                    f"links to {'/'.join(target or ())!r}, which is {what}; only links to files "
                    "inside the archive are supported (re-create it with tar --dereference)",
                    link.name,
                )
            link.target = target
            link.size = found.size
            self.declared_bytes += found.size
            if self.declared_bytes > self.max_total_bytes:
                raise ArchiveLimitError(
                    f"brings the declared total to {self.declared_bytes} bytes, over "
                    f"max_total_bytes={self.max_total_bytes} (possible decompression bomb)",
                    link.name,
                )


def _safe_parts(name: str) -> tuple[str, ...]:
    """Split a member name into safe path components, or raise naming the problem."""
    if "\x00" in name:
        raise ArchiveError("NUL byte in the name", name)
    # Backslashes are separators in zips made on Windows; treat them so everywhere.
    posix = name.replace("\\", "/")
    if posix.startswith("/") or _DRIVE.match(posix):
        raise ArchiveError("absolute path", name)
    parts = tuple(part for part in posix.split("/") if part not in ("", "."))
    if ".." in parts:
        raise ArchiveError("'..' path component (path traversal)", name)
    for part in parts:
        if len(os.fsencode(part)) > MAX_NAME_BYTES:
            raise ArchiveError(f"a path component is longer than {MAX_NAME_BYTES} bytes", name)
    return parts


def _link_target(
    member_name: str, parts: tuple[str, ...], target: str, *, hard: bool
) -> tuple[str, ...]:
    """Resolve a link target lexically against the archive root, refusing escapes."""
    if "\x00" in target:
        raise ArchiveError("NUL byte in the link target", member_name)
    posix = target.replace("\\", "/")
    if posix.startswith("/") or _DRIVE.match(posix):
        raise ArchiveError(
            f"link to an absolute path ({target!r}) points outside the archive", member_name
        )
    # Hardlink targets are archive paths; symlink targets are relative to the link's folder.
    resolved = [] if hard else list(parts[:-1])
    for part in posix.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not resolved:
                raise ArchiveError(f"link to {target!r} points outside the archive", member_name)
            resolved.pop()
        else:
            resolved.append(part)
    return tuple(resolved)


def _iter_tar(tar: tarfile.TarFile, plan: _Plan) -> Iterator[tarfile.TarInfo]:
    # Read headers one by one so a bomb of members is refused before it is all read.
    while True:
        member = tar.next()
        if member is None:
            return
        plan.count(member.name)
        yield member


def _plan_tar(tar: tarfile.TarFile, plan: _Plan, staging: Path) -> None:
    data_filter = getattr(tarfile, "data_filter", None)
    for info in _iter_tar(tar, plan):
        parts = _safe_parts(info.name)
        if info.ischr() or info.isblk() or info.isfifo():
            raise ArchiveError("device file or FIFO", info.name)
        if info.issym() or info.islnk():
            if not parts:
                raise ArchiveError("link with an empty name", info.name)
            target = _link_target(info.name, parts, info.linkname, hard=info.islnk())
            member = _Member(info.name, parts, "link", target=target, handle=info)
        elif info.isdir():
            member = _Member(info.name, parts, "dir", handle=info)
        elif info.isreg():
            if not parts:
                raise ArchiveError("file with an empty name", info.name)
            member = _Member(info.name, parts, "file", size=info.size, handle=info)
        else:
            raise ArchiveError(f"unsupported tar member type {info.type!r}", info.name)
        if data_filter is not None:  # second line of defence (Python >= 3.11.4)
            try:
                data_filter(info, str(staging))
            except tarfile.FilterError as exc:
                raise ArchiveError(f"refused by tarfile's data filter: {exc}", info.name) from None
        if member.kind == "file":
            plan.add_file(member)
        elif member.kind == "dir":
            plan.add_dir(member)
        else:
            plan.add_link(member)
    # tarfile stops quietly at an unreadable header after the first member; a good archive
    # ends with zero blocks (or just ends), so anything else there means lost members.
    tar.fileobj.seek(tar.offset)
    if tar.fileobj.read(tarfile.BLOCKSIZE).strip(b"\0"):
        raise ArchiveError(
            f"unreadable tar header at byte {tar.offset}: the archive is corrupt (or several "
            "archives were concatenated)"
        )


def _plan_zip(archive: zipfile.ZipFile, plan: _Plan, max_ratio: float) -> None:
    infos = archive.infolist()
    if len(infos) > plan.max_members:
        raise ArchiveLimitError(
            f"the archive has {len(infos)} members, over max_members={plan.max_members}"
        )
    for info in infos:
        plan.count(info.filename)
        parts = _safe_parts(info.filename)
        if info.flag_bits & 0x1:
            raise ArchiveError("encrypted members are not supported", info.filename)
        mode = info.external_attr >> 16
        file_type = stat.S_IFMT(mode)
        if stat.S_ISLNK(mode):
            if info.file_size > 4096:
                raise ArchiveError("symlink target longer than 4096 bytes", info.filename)
            if not parts:
                raise ArchiveError("link with an empty name", info.filename)
            raw = archive.read(info)
            target = _link_target(info.filename, parts, os.fsdecode(raw), hard=False)
            plan.add_link(_Member(info.filename, parts, "link", target=target, handle=info))
        elif info.is_dir() or stat.S_ISDIR(mode):
            plan.add_dir(_Member(info.filename, parts, "dir", handle=info))
        elif file_type not in (0, stat.S_IFREG):
            raise ArchiveError("device file, FIFO or socket", info.filename)
        else:
            if not parts:
                raise ArchiveError("file with an empty name", info.filename)
            if info.file_size > RATIO_MIN_BYTES and info.file_size > max_ratio * max(
                info.compress_size, 1
            ):
                ratio = info.file_size / max(info.compress_size, 1)
                raise ArchiveLimitError(
                    f"compression ratio {ratio:.0f}:1 is over max_ratio={max_ratio:g}"
                    " (possible decompression bomb)",
                    info.filename,
                )
            plan.add_file(_Member(info.filename, parts, "file", size=info.file_size, handle=info))


class _Writer:
    """Writes planned members into the staging folder, counting real bytes."""

    def __init__(self, staging: Path, plan: _Plan) -> None:
        self.staging = staging
        self.plan = plan
        self.bytes = 0
        self.files = 0

    def path(self, parts: tuple[str, ...]) -> Path:
        path = self.staging.joinpath(*parts)
        # Defence in depth: _safe_parts already guarantees this.
        if os.path.commonpath([self.staging, path]) != str(self.staging) or path == self.staging:
            raise ArchiveError("resolves outside the destination", "/".join(parts))
        return path

    def write(self, member: _Member, source: IO[bytes]) -> None:
        path = self.path(member.parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        # "xb": never overwrite, never follow a link at the final component.
        with open(path, "xb") as out:
            while True:  # bounded: every chunk counts against the caps below
                chunk = source.read(CHUNK_BYTES)
                if not chunk:
                    break
                written += len(chunk)
                if written > self.plan.max_member_bytes:
                    raise ArchiveLimitError(
                        f"holds more than max_member_bytes={self.plan.max_member_bytes} bytes "
                        f"(declared {member.size}; possible decompression bomb)",
                        member.name,
                    )
                if self.bytes + written > self.plan.max_total_bytes:
                    raise ArchiveLimitError(
                        f"brings the total past max_total_bytes={self.plan.max_total_bytes} bytes"
                        " (possible decompression bomb)",
                        member.name,
                    )
                out.write(chunk)
        self.bytes += written
        self.files += 1

    def copy_link(self, link: _Member) -> None:
        assert link.target is not None  # set by _Plan.resolve_links
        with open(self.path(link.target), "rb") as source:
            self.write(link, source)


def safe_extract(
    archive: str | Path,
    dest: str | Path,
    *,
    max_members: int,
    max_total_bytes: int,
    max_member_bytes: int,
    max_ratio: float = 200.0,
) -> ExtractReport:
    """Extract an untrusted archive into ``dest``, all or nothing.

    Args:
        archive: a tar (plain, gzip, bzip2 or xz) or zip file; the format is read from its
            magic bytes.
        dest: the folder to create; it must not exist yet.
        max_members: most members (files, folders, links) the archive may hold.
        max_total_bytes: most bytes the extracted files may hold in all.
        max_member_bytes: most bytes one extracted file may hold.
        max_ratio: most uncompressed/compressed ratio of a zip member over 1 MiB.

    Returns:
        What was written.

    Raises:
        ArchiveError: the archive is unsafe, corrupt or unsupported (``ArchiveLimitError``
            when a cap was exceeded). ``dest`` is then not created.
        FileExistsError: ``dest`` already exists.
    """
    archive = Path(archive)
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        raise FileExistsError(f"{dest} already exists; safe_extract only creates a fresh folder")
    fmt = sniff_format(archive)
    if fmt is None:
        with open(archive, "rb") as handle:
            head = handle.read(16)
        if looks_like_html(head):
            raise ArchiveError(f"{archive.name} is an HTML page, not an archive")
        raise ArchiveError(
            f"{archive.name} is not a tar, tar.gz, tar.bz2, tar.xz or zip archive "
            f"(it starts with {head!r})"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".extract", dir=dest.parent))
    plan = _Plan(max_members, max_total_bytes, max_member_bytes)
    try:
        writer = _Writer(staging, plan)
        if fmt == "zip":
            with zipfile.ZipFile(archive) as zf:
                _plan_zip(zf, plan, max_ratio)
                plan.resolve_links()
                _create_dirs(staging, plan)
                for member in plan.files.values():
                    if member.kind == "file":
                        with zf.open(member.handle) as source:
                            writer.write(member, source)
        else:
            mode = {"tar": "r:", "tar.gz": "r:gz", "tar.bz2": "r:bz2", "tar.xz": "r:xz"}[fmt]
            with tarfile.open(archive, mode=mode) as tar:
                _plan_tar(tar, plan, staging)
                plan.resolve_links()
                _create_dirs(staging, plan)
                for member in plan.files.values():
                    if member.kind == "file":
                        source = tar.extractfile(member.handle)
                        if source is None:  # isreg() members always have data
                            raise ArchiveError("has no data", member.name)
                        with source:
                            writer.write(member, source)
        for link in plan.links:
            writer.copy_link(link)
        staging.rename(dest)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        error = _as_archive_error(exc, archive, fmt)
        if error is None or error is exc:
            raise
        raise error from None
    return ExtractReport(
        format=fmt,
        files=writer.files,
        directories=len(plan.dirs),
        bytes=writer.bytes,
        links_copied=len(plan.links),
    )


def _create_dirs(staging: Path, plan: _Plan) -> None:
    for parts in sorted(plan.dirs, key=len):
        if parts:
            (staging.joinpath(*parts)).mkdir(exist_ok=True)


def _as_archive_error(exc: BaseException, archive: Path, fmt: str) -> BaseException | None:
    """Turn a reader error into an ArchiveError; ``None`` for errors that are not the archive's."""
    if isinstance(exc, ArchiveError):
        return exc
    corrupt = (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError)
    if isinstance(exc, corrupt) or (isinstance(exc, OSError) and exc.errno is None):
        # gzip.BadGzipFile and bz2's "Invalid data stream" are OSErrors without an errno.
        return ArchiveError(f"{archive.name} is corrupt or truncated ({fmt}): {exc}")
    if isinstance(exc, NotImplementedError):  # e.g. a zip compression method Python lacks
        return ArchiveError(f"{archive.name} uses an unsupported feature: {exc}")
    if isinstance(exc, OSError) and exc.errno == errno.EEXIST:
        return ArchiveError(
            f"{archive.name} holds two members that name the same file on this file system "
            f"(e.g. names that differ only in case): {exc}"
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        return ArchiveError(f"{archive.name} holds a path too long for this file system: {exc}")
    return None
