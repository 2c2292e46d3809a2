"""Extraction of untrusted archives: the standard library's checks, plus what they lack.

The standard library does most of the work. Tar members go through tarfile's ``data``
extraction filter (Python >= 3.11.4), which refuses links to absolute paths or out of the
destination, paths that resolve outside it and device files and FIFOs, and drops owners and
set-uid bits. zipfile checks each member's CRC and stops at its declared size.

:func:`safe_extract` adds only what they lack, and refuses the *whole* archive, with an
:class:`ArchiveError` naming the member, rather than extracting part of it:

- caps against decompression bombs: ``max_members``, ``max_member_bytes``,
  ``max_total_bytes`` (declared sizes bound what is written: tarfile reads exactly the
  declared bytes, zipfile stops there and checks the CRC) and, for zip, ``max_ratio``;
- names are refused, not rewritten: absolute paths (``/x``, ``C:/x``), ``..`` and backslash
  separators (zipfile silently rewrites these, tarfile strips a leading ``/``), duplicate
  members and a member that is a file in one place and a folder in another (both libraries
  would silently overwrite);
- links are never created on disk: a tar link to a file in the archive is written as a copy
  of that file once everything else is extracted, a link to anything else is refused, and
  zip links and special files are refused (zipfile would write a link as a text file);
- a tar that ends at an unreadable header (tarfile stops there quietly, losing members);
- all or nothing: extraction goes into a fresh staging folder next to ``dest``, renamed
  onto ``dest`` only when every member was written.

The format is recognised by its magic bytes, not by the file name.
"""

from __future__ import annotations

import errno
import lzma
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ArchiveError",
    "ArchiveLimitError",
    "ExtractReport",
    "looks_like_html",
    "safe_extract",
    "sniff_format",
]

# Ratios only matter for members big enough to hurt; small members may compress well.
RATIO_MIN_BYTES = 1024 * 1024
MAX_LINK_HOPS = 16
_DRIVE = re.compile(r"^[A-Za-z]:")
_TAR_MODES = {"tar": "r:", "tar.gz": "r:gz", "tar.bz2": "r:bz2", "tar.xz": "r:xz"}


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


def _parts(name: str) -> tuple[str, ...]:
    """A member name as path components, or an :class:`ArchiveError` naming the problem."""
    posix = name.replace("\\", "/")  # separators in zips made on Windows
    if posix.startswith("/") or _DRIVE.match(posix):
        raise ArchiveError("absolute path", name)
    parts = tuple(part for part in posix.split("/") if part not in ("", "."))
    if ".." in parts:
        raise ArchiveError("'..' path component (path traversal)", name)
    return parts


@dataclass
class _Guard:
    """Admits members one by one: the caps, the names, and the links to copy afterwards."""

    max_members: int
    max_total_bytes: int
    max_member_bytes: int
    members: int = 0
    total: int = 0
    files: dict[tuple[str, ...], int] = field(default_factory=dict)  # path -> size
    dirs: set[tuple[str, ...]] = field(default_factory=set)
    links: dict[tuple[str, ...], tuple[str, tuple[str, ...]]] = field(default_factory=dict)

    def count(self, name: str) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise ArchiveLimitError(
                f"the archive has more than max_members={self.max_members} members", name
            )

    def add_dir(self, name: str, parts: tuple[str, ...]) -> None:
        for depth in range(1, len(parts) + 1):
            if parts[:depth] in self.files:
                raise ArchiveError("is a folder here but a file elsewhere in the archive", name)
            self.dirs.add(parts[:depth])

    def add_file(self, name: str, parts: tuple[str, ...], size: int) -> None:
        if not parts:
            raise ArchiveError("file with an empty name", name)
        if size > self.max_member_bytes:
            raise ArchiveLimitError(
                f"declares {size} bytes, over max_member_bytes={self.max_member_bytes}"
                " (possible decompression bomb)",
                name,
            )
        self.total += size
        if self.total > self.max_total_bytes:
            raise ArchiveLimitError(
                f"brings the declared total to {self.total} bytes, over "
                f"max_total_bytes={self.max_total_bytes} (possible decompression bomb)",
                name,
            )
        if parts in self.files:
            raise ArchiveError("duplicate member (the archive holds this path twice)", name)
        if parts in self.dirs:
            raise ArchiveError("is a file here but a folder elsewhere in the archive", name)
        for depth in range(1, len(parts)):
            if parts[:depth] in self.files:
                raise ArchiveError(
                    f"needs {'/'.join(parts[:depth])!r} to be a folder, but it is a file", name
                )
        self.dirs.update(parts[:depth] for depth in range(1, len(parts)))
        self.files[parts] = size

    def tar_filter(self, member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
        """tarfile's ``data`` filter, then the caps; links are noted, extracted later."""
        self.count(member.name)
        parts = _parts(member.name)
        member = tarfile.data_filter(member, dest)
        if member.isdir():
            self.add_dir(member.name, parts)
            return member
        if member.issym() or member.islnk():
            base = "" if member.islnk() else posixpath.dirname(posixpath.join(*parts or ("",)))
            target = _parts(posixpath.normpath(posixpath.join(base, member.linkname)))
            self.add_file(member.name, parts, 0)  # its size counts once it is resolved
            self.links[parts] = (member.name, target)
            return None
        self.add_file(member.name, parts, member.size)
        return member

    def copy_links(self, staging: Path) -> None:
        """Write each link as a copy of the file it points to, or refuse the archive."""
        for parts, (name, target) in self.links.items():
            for _ in range(MAX_LINK_HOPS):
                if target not in self.links:
                    break
                target = self.links[target][1]
            if target in self.links or target not in self.files:
                what = "a folder" if target in self.dirs else "not a file in the archive"
                raise ArchiveError(
                    f"links to {'/'.join(target)!r}, which is {what}; only links to files "
                    "inside the archive are supported (re-create it with tar --dereference)",
                    name,
                )
            self.files[parts] = size = self.files[target]
            self.total += size
            if self.total > self.max_total_bytes:
                raise ArchiveLimitError(
                    f"brings the total to {self.total} bytes, over "
                    f"max_total_bytes={self.max_total_bytes} (possible decompression bomb)",
                    name,
                )
            staging.joinpath(*parts[:-1]).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(staging.joinpath(*target), staging.joinpath(*parts))


def _admit_zip(guard: _Guard, archive: zipfile.ZipFile, max_ratio: float) -> None:
    infos = archive.infolist()
    if len(infos) > guard.max_members:
        raise ArchiveLimitError(
            f"the archive has {len(infos)} members, over max_members={guard.max_members}"
        )
    for info in infos:
        guard.count(info.filename)
        parts = _parts(info.filename)
        if info.flag_bits & 0x1:
            raise ArchiveError("encrypted members are not supported", info.filename)
        if stat.S_IFMT(info.external_attr >> 16) not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise ArchiveError(
                "is a link, device file, FIFO or socket; zips are extracted as plain files and "
                "folders only (a link could point outside the archive)",
                info.filename,
            )
        if info.is_dir():
            guard.add_dir(info.filename, parts)
            continue
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > RATIO_MIN_BYTES and ratio > max_ratio:
            raise ArchiveLimitError(
                f"compression ratio {ratio:.0f}:1 is over max_ratio={max_ratio:g}"
                " (possible decompression bomb)",
                info.filename,
            )
        guard.add_file(info.filename, parts, info.file_size)


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
    archive, dest = Path(archive), Path(dest)
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
    guard = _Guard(max_members, max_total_bytes, max_member_bytes)
    try:
        if fmt == "zip":
            with zipfile.ZipFile(archive) as zf:
                _admit_zip(guard, zf, max_ratio)
                zf.extractall(staging)
        else:
            with tarfile.open(archive, mode=_TAR_MODES[fmt]) as tar:
                tar.errorlevel = 2  # raise every extraction error; never skip a member
                tar.extractall(staging, filter=guard.tar_filter)
                # tarfile stops quietly at an unreadable header after the first member; a
                # good archive ends with zero blocks (or just ends), so anything else there
                # means lost members.
                tar.fileobj.seek(tar.offset)
                if tar.fileobj.read(tarfile.BLOCKSIZE).strip(b"\0"):
                    raise ArchiveError(
                        f"unreadable tar header at byte {tar.offset}: the archive is corrupt "
                        "(or several archives were concatenated)"
                    )
            guard.copy_links(staging)
        staging.rename(dest)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        error = _as_archive_error(exc, archive, fmt)
        if error is None or error is exc:
            raise
        raise error from None
    return ExtractReport(
        format=fmt,
        files=len(guard.files),
        directories=len(guard.dirs),
        bytes=guard.total,
        links_copied=len(guard.links),
    )


def _as_archive_error(exc: BaseException, archive: Path, fmt: str) -> BaseException | None:
    """Turn a reader error into an ArchiveError; ``None`` for errors that are not the archive's."""
    if isinstance(exc, ArchiveError):
        return exc
    if isinstance(exc, tarfile.FilterError):  # tarfile's data filter, in its own words
        return ArchiveError(f"refused by tarfile's data filter: {exc}", exc.tarinfo.name)
    corrupt = (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError)
    if isinstance(exc, corrupt) or (isinstance(exc, OSError) and exc.errno is None):
        # gzip.BadGzipFile and bz2's "Invalid data stream" are OSErrors without an errno.
        return ArchiveError(f"{archive.name} is corrupt or truncated ({fmt}): {exc}")
    if isinstance(exc, NotImplementedError):  # e.g. a zip compression method Python lacks
        return ArchiveError(f"{archive.name} uses an unsupported feature: {exc}")
    if isinstance(exc, OSError) and exc.errno in (errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
        return ArchiveError(
            f"{archive.name} holds two members that name the same file on this file system "
            f"(e.g. names that differ only in case): {exc}"
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        return ArchiveError(f"{archive.name} holds a path too long for this file system: {exc}")
    return None
