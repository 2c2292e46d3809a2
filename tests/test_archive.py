"""Safe extraction (tasks/archive.py) against archives the tests build: good ones and attacks."""

from __future__ import annotations

import gzip
import io
import os
import stat
import struct
import tarfile
import tempfile
import warnings
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from tasks.archive import (
    ArchiveError,
    ArchiveLimitError,
    ExtractReport,
    looks_like_html,
    safe_extract,
    sniff_format,
)

CAPS = {"max_members": 100, "max_total_bytes": 10 * 2**20, "max_member_bytes": 2**20}
TREE = {
    "cats/1.png": b"\x89PNG one",
    "cats/2.png": b"\x89PNG two",
    "dogs/sub/3.jpg": b"\xff\xd8 three",
}


# -- builders -------------------------------------------------------------------------------


def regular(name: str, data: bytes = b"data") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def make_tar(path: Path, entries: list, mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def make_zip(path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        warnings.simplefilter("ignore")  # duplicate names are what some tests want
        for name, data in entries:
            zf.writestr(name, data)
    return path


def zip_info(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix: the high 16 bits of external_attr are st_mode
    info.external_attr = mode << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def listing(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """``sandbox/dest`` is where archives go; ``outside/`` must stay empty."""
    (tmp_path / "sandbox").mkdir()
    (tmp_path / "outside").mkdir()
    return tmp_path


def assert_refused(archive: Path, root: Path, match: str, **caps: int) -> ArchiveError:
    """Extraction fails with ``match``, leaves no dest or staging, and writes nothing outside."""
    dest = root / "sandbox" / "dest"
    before = listing(root)
    with pytest.raises(ArchiveError, match=match) as excinfo:
        safe_extract(archive, dest, **{**CAPS, **caps})
    assert not dest.exists()
    assert listing(root) == before, "something was written (or left) outside the destination"
    assert not any((root / "outside").iterdir())
    return excinfo.value


# -- good archives --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, fmt", [("w:gz", "tar.gz"), ("w", "tar"), ("w:bz2", "tar.bz2"), ("w:xz", "tar.xz")]
)
def test_tar_formats_extract(sandbox: Path, mode: str, fmt: str) -> None:
    archive = make_tar(sandbox / "data.bin", [regular(n, d) for n, d in TREE.items()], mode=mode)
    assert sniff_format(archive) == fmt  # by magic bytes: the name says nothing
    report = safe_extract(archive, sandbox / "sandbox" / "dest", **CAPS)
    dest = sandbox / "sandbox" / "dest"
    assert {k: (dest / k).read_bytes() for k in TREE} == TREE
    assert report == ExtractReport(
        format=fmt, files=3, directories=3, bytes=sum(map(len, TREE.values())), links_copied=0
    )
    assert [p.name for p in (sandbox / "sandbox").iterdir()] == ["dest"]  # no staging left


def test_zip_extracts(sandbox: Path) -> None:
    archive = make_zip(sandbox / "data.zip", [("cats/", b""), *TREE.items()])
    dest = sandbox / "sandbox" / "dest"
    report = safe_extract(archive, dest, **CAPS)
    assert {k: (dest / k).read_bytes() for k in TREE} == TREE
    assert report.format == "zip" and report.files == 3


def test_dot_slash_names_and_folders_from_tar_c(sandbox: Path, tmp_path: Path) -> None:
    # What `tar czf x.tgz -C folder .` produces: ".", "./cats", "./cats/1.png".
    folder = tmp_path / "folder"
    for name, data in TREE.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    archive = sandbox / "x.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=".")
    dest = sandbox / "sandbox" / "dest"
    safe_extract(archive, dest, **CAPS)
    assert listing(dest) == listing(folder)


def test_links_inside_become_copies(sandbox: Path) -> None:
    archive = make_tar(
        sandbox / "links.tar.gz",
        [
            special("cats/early.png", tarfile.SYMTYPE, "1.png"),  # before its target
            regular("cats/1.png", b"one"),
            special("cats/alias.png", tarfile.SYMTYPE, "1.png"),
            special("dogs/hard.png", tarfile.LNKTYPE, "cats/1.png"),
            special("dogs/chain.png", tarfile.SYMTYPE, "../cats/alias.png"),
        ],
    )
    dest = sandbox / "sandbox" / "dest"
    report = safe_extract(archive, dest, **CAPS)
    for name in ("cats/early.png", "cats/alias.png", "dogs/hard.png", "dogs/chain.png"):
        assert not (dest / name).is_symlink()
        assert (dest / name).read_bytes() == b"one"
    assert report.links_copied == 4 and report.files == 5 and report.bytes == 5 * 3


def test_dest_must_not_exist(sandbox: Path) -> None:
    archive = make_tar(sandbox / "a.tar.gz", [regular("a.png")])
    (sandbox / "sandbox" / "dest").mkdir()
    with pytest.raises(FileExistsError):
        safe_extract(archive, sandbox / "sandbox" / "dest", **CAPS)


# -- attacks and bad input: the whole archive is refused ------------------------------------


@pytest.mark.parametrize("builder", ["tar", "zip"])
@pytest.mark.parametrize(
    "name, match",
    [
        ("../evil", "path traversal"),
        ("cats/../../evil", "path traversal"),
        ("..\\evil", "path traversal"),
        ("C:/evil", "absolute path"),
    ],
)
def test_traversal_is_refused(sandbox: Path, builder: str, name: str, match: str) -> None:
    good = [("cats/1.png", b"one")]  # a good member first: it must not be written either
    if builder == "tar":
        archive = make_tar(
            sandbox / "a.tar.gz", [regular(n, d) for n, d in [*good, (name, b"evil")]]
        )
    else:
        archive = make_zip(sandbox / "a.zip", [*good, (name, b"evil")])
    error = assert_refused(archive, sandbox, match)
    assert error.member == name
    assert repr(name) in str(error)


@pytest.mark.parametrize("builder", ["tar", "zip"])
def test_absolute_path_is_refused(sandbox: Path, builder: str) -> None:
    target = sandbox / "outside" / "evil"
    if builder == "tar":
        archive = make_tar(sandbox / "a.tar.gz", [regular("ok.png"), regular(str(target))])
    else:
        archive = make_zip(sandbox / "a.zip", [("ok.png", b"x"), (str(target), b"evil")])
    assert_refused(archive, sandbox, "absolute path")
    assert not target.exists()


@pytest.mark.parametrize(
    "link, match",
    [
        ("/etc", "absolute path"),
        # tarfile's data filter words these; zip links are refused by this module.
        ("../../outside", "outside the destination"),
        ("cats/../../../outside", "outside the destination"),
    ],
)
def test_symlink_escape_is_refused(sandbox: Path, link: str, match: str) -> None:
    # The classic: a symlink out, then a file written "through" it.
    archive = make_tar(
        sandbox / "a.tar.gz",
        [special("escape", tarfile.SYMTYPE, link), regular("escape/evil", b"evil")],
    )
    error = assert_refused(archive, sandbox, match)
    assert error.member == "escape"


def test_symlink_to_a_folder_inside_is_refused(sandbox: Path) -> None:
    # "d -> ." then "d/x -> ../../outside" resolves inside lexically but outside on disk;
    # links to folders are refused, so the chain cannot be built.
    archive = make_tar(
        sandbox / "a.tar.gz",
        [special("d", tarfile.SYMTYPE, "."), special("d/x", tarfile.SYMTYPE, "../outside")],
    )
    assert_refused(archive, sandbox, "folder|not a file")


def test_zip_symlink_escape_is_refused(sandbox: Path) -> None:
    archive = make_zip(
        sandbox / "a.zip",
        [(zip_info("escape", stat.S_IFLNK | 0o777), b"../../outside"), ("escape/evil", b"evil")],
    )
    assert_refused(archive, sandbox, "outside the archive")


@pytest.mark.parametrize("target", ["../outside/secret", "/etc/passwd"])
def test_hardlink_escape_is_refused(sandbox: Path, target: str) -> None:
    archive = make_tar(sandbox / "a.tar.gz", [special("cats/hard", tarfile.LNKTYPE, target)])
    assert_refused(archive, sandbox, "outside the destination|absolute path")


def test_hardlink_to_missing_member_is_refused(sandbox: Path) -> None:
    archive = make_tar(sandbox / "a.tar.gz", [special("cats/hard", tarfile.LNKTYPE, "cats/none")])
    assert_refused(archive, sandbox, "not a file in the archive")


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_device_and_fifo_members_are_refused(sandbox: Path, kind: bytes) -> None:
    archive = make_tar(sandbox / "a.tar.gz", [regular("ok.png"), special("dev/null", kind)])
    assert_refused(archive, sandbox, "is a special file")  # tarfile's data filter


def test_zip_fifo_member_is_refused(sandbox: Path) -> None:
    archive = make_zip(sandbox / "a.zip", [(zip_info("pipe", stat.S_IFIFO | 0o644), b"")])
    assert_refused(archive, sandbox, "device file, FIFO")


def test_member_count_over_cap_is_refused(sandbox: Path) -> None:
    entries = [regular(f"cats/{i}.png", b"") for i in range(11)]
    archive = make_tar(sandbox / "a.tar.gz", entries)
    error = assert_refused(archive, sandbox, "max_members=10", max_members=10)
    assert isinstance(error, ArchiveLimitError)
    zipped = make_zip(sandbox / "a.zip", [(f"cats/{i}.png", b"") for i in range(11)])
    assert_refused(zipped, sandbox, "max_members=10", max_members=10)


def test_member_bomb_is_refused(sandbox: Path) -> None:
    zeros = bytes(50 * 2**20)  # 50 MB of zeros: a few tens of KB compressed
    archive = make_tar(sandbox / "bomb.tar.gz", [regular("ok.png"), regular("bomb.bin", zeros)])
    assert archive.stat().st_size < 2**20
    error = assert_refused(archive, sandbox, "max_member_bytes")
    assert isinstance(error, ArchiveLimitError) and error.member == "bomb.bin"
    zipped = make_zip(sandbox / "bomb.zip", [("bomb.bin", zeros)])
    assert_refused(zipped, sandbox, "max_member_bytes|compression ratio")


def test_total_bomb_is_refused(sandbox: Path) -> None:
    member = bytes(2**20 - 1)  # each under max_member_bytes, 11 MB in all
    archive = make_tar(
        sandbox / "bomb.tar.gz", [regular(f"part{i}.bin", member) for i in range(11)]
    )
    assert_refused(archive, sandbox, "max_total_bytes")


def test_zip_compression_ratio_is_refused(sandbox: Path) -> None:
    archive = make_zip(sandbox / "bomb.zip", [("zeros.bin", bytes(8 * 2**20))])
    assert_refused(
        archive, sandbox, "compression ratio", max_member_bytes=2**30, max_total_bytes=2**30
    )


def test_zip_lying_sizes_are_caught(sandbox: Path) -> None:
    """A zip whose headers declare 1000 bytes for a member that inflates to 3 MB."""
    archive = make_zip(sandbox / "liar.zip", [("liar.bin", bytes(3 * 2**20))])
    raw = bytearray(archive.read_bytes())
    true_size = struct.pack("<I", 3 * 2**20)
    for offset in (raw.find(b"PK\x03\x04") + 22, raw.find(b"PK\x01\x02") + 24):
        assert raw[offset : offset + 4] == true_size
        raw[offset : offset + 4] = struct.pack("<I", 1000)
    archive.write_bytes(bytes(raw))
    # The caps alone would let it through: only the counted bytes / CRC catch it.
    assert_refused(archive, sandbox, "corrupt|max_member_bytes", max_member_bytes=2000)


@pytest.mark.parametrize("builder", ["tar", "zip"])
def test_duplicate_and_conflicting_members_are_refused(sandbox: Path, builder: str) -> None:
    for names, match in [(["a.png", "a.png"], "duplicate"), (["a", "a/b.png"], "folder")]:
        if builder == "tar":
            archive = make_tar(sandbox / "a.tar.gz", [regular(n) for n in names])
        else:
            archive = make_zip(sandbox / "a.zip", [(n, b"x") for n in names])
        assert_refused(archive, sandbox, match)


def test_not_an_archive(sandbox: Path) -> None:
    page = sandbox / "page.tar.gz"
    page.write_bytes(b"<!DOCTYPE html><html><body>Sign in</body></html>")
    assert looks_like_html(page.read_bytes())
    assert_refused(page, sandbox, "HTML page")
    junk = sandbox / "junk.zip"
    junk.write_bytes(b"hello, world" * 100)
    assert_refused(junk, sandbox, "not a tar, tar.gz, tar.bz2, tar.xz or zip")
    lone = sandbox / "lone.gz"  # gzip, but not of a tar
    lone.write_bytes(gzip.compress(b"not a tar" * 100))
    assert_refused(lone, sandbox, "corrupt or truncated")


def test_truncated_archive_is_refused(sandbox: Path) -> None:
    archive = make_tar(
        sandbox / "a.tar.gz", [regular(f"{i}.bin", os.urandom(50_000)) for i in range(4)]
    )
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    assert_refused(archive, sandbox, "corrupt or truncated")


def test_corrupt_header_after_the_first_member_is_refused(sandbox: Path) -> None:
    # tarfile alone would stop quietly after "a.png" and report a one-member archive.
    archive = make_tar(sandbox / "a.tar", [regular("a.png", b"x" * 10), regular("b.png")], mode="w")
    raw = bytearray(archive.read_bytes())
    raw[1024 + 148 : 1024 + 156] = b"9999999\0"  # the second header's checksum
    archive.write_bytes(bytes(raw))
    assert_refused(archive, sandbox, "unreadable tar header at byte 1024")


# -- property: random names land inside dest or are refused, never outside -------------------

SEGMENT = st.one_of(
    st.sampled_from(["..", ".", "", "a", "b", "é", "名字", "..\\x", "C:", " ", "~", "a..b"]),
    st.text(
        st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1, max_size=6
    ),
)
NAME = st.builds(
    lambda lead, segments: lead + "/".join(segments),
    st.sampled_from(["", "./", "../", "\\", "//"]),
    st.lists(SEGMENT, min_size=1, max_size=4),
)


def _all_paths(root: Path) -> set[str]:
    return {
        os.path.relpath(os.path.join(d, n), root) for d, ds, fs in os.walk(root) for n in ds + fs
    }


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names=st.lists(NAME, min_size=1, max_size=5), fmt=st.sampled_from(["tar.gz", "zip"]))
def test_random_names_never_escape(names: list[str], fmt: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # Deeper than any run of ".." the strategy makes, so an escape would land in root.
        dest = root.joinpath("s1", "s2", "s3", "s4", "s5", "s6", "s7", "dest")
        dest.parent.mkdir(parents=True)
        archive = root / f"archive.{fmt}"
        try:
            if fmt == "zip":
                make_zip(archive, [(name, b"payload") for name in names])
            else:
                make_tar(archive, [regular(name, b"payload") for name in names])
        except (ValueError, UnicodeError):
            assume(False)  # the library cannot even write such a name
        before = _all_paths(root)
        try:
            safe_extract(archive, dest, **CAPS)
        except ArchiveError:
            event("refused")
            assert not dest.exists()
            written: set[str] = set()
        else:
            event("extracted")
            written = {p for p in _all_paths(root) if Path(root, p).is_relative_to(dest)}
            for path in written - {os.path.relpath(dest, root)}:
                full = Path(root, path)
                assert not full.is_symlink()
                assert os.path.realpath(full).startswith(os.path.realpath(dest) + os.sep)
        assert _all_paths(root) - written == before, "something appeared outside dest"
