"""Stale sources: bytes that changed behind a name DVC sees as unchanged.

DVC re-runs a stage when its code, params or dependencies change. Two inputs are named by a
param and read from outside the project, so DVC only ever sees their *name*:

- ``fetch.source``: a local folder or archive, or a URL;
- ``backbone.weights``: a local weights file.

If the bytes behind such a name change, ``dvc status`` still says "up to date" and the next
run would train on the old data under a lock that looks current. :func:`stale_sources`
compares each source with what the last run recorded (the ``fingerprint`` in the fetch
output's ``source.json``, written by :mod:`tasks.fetch`; ``weights_sha256`` in the backbone
info file, written by :mod:`tasks.backbone`) and names the stages to force::

    for stale in stale_sources(root, params):
        dvc repro -f --single-item <stale.stage>   # fetch before backbone
    dvc repro

Checks are cheap. Local files are compared by stat against a hash index (only files whose
size, mtime, ctime or inode changed are read again, see :class:`tasks.fetch.HashIndex`), so
a touched but unchanged file is not stale; a URL costs one HEAD request with a short
timeout. A check that cannot be made (network down, source missing, nothing recorded) is
"unknown", never "stale": forcing a stage that cannot run would only break the run.

Paths are read from ``dvc.yaml`` (the fetch stage's ``--out`` and ``--cache``, the backbone
stage's ``--info``), never re-spelled here. ``python -m flows.freshness`` prints the checks.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import requests
import yaml

from tasks.common import StageError, read_json
from tasks.fetch import (
    ARCHIVE_KEY,
    MANIFEST_NAME,
    USER_AGENT,
    HashIndex,
    folder_manifest,
    hash_file,
    hash_folder,
    list_folder,
    parse_manifest,
)
from tasks.params import BackboneParams, FetchParams, Params, load_params

HEAD_TIMEOUT_S = 5.0
_EXAMPLES = 3

State = Literal["fresh", "stale", "unknown", "pending"]


@dataclass(frozen=True)
class SourceCheck:
    """The outcome of checking one stage's outside source.

    Attributes:
        stage: ``fetch`` or ``backbone``.
        state: ``fresh`` (same bytes as recorded, or nothing that can change), ``stale``
            (changed: force the stage), ``unknown`` (cannot tell; do not force) or
            ``pending`` (the stage has not run with these params yet: DVC runs it anyway).
        reason: one line for people, naming the source and what was found.
    """

    stage: str
    state: State
    reason: str


@dataclass(frozen=True)
class StaleSource:
    """A stage whose outside source changed since it last ran; force it.

    Attributes:
        stage: the DVC stage to force (``dvc repro -f --single-item <stage>``).
        reason: e.g. ``"fetch: 1 file changed, 0 added, 0 removed under /data/x since the
            last fetch (cat/3.png)"``.
    """

    stage: str
    reason: str


@dataclass(frozen=True)
class StagePaths:
    """The paths the checks read, as ``dvc.yaml`` gives them (relative to the root)."""

    raw: Path  # fetch --out
    downloads: Path  # fetch --cache; hash indexes live in its sources/ folder
    backbone_info: Path  # backbone --info


def stale_sources(
    root: str | Path, params: Params | None = None, *, timeout_s: float = HEAD_TIMEOUT_S
) -> list[StaleSource]:
    """The stages whose outside sources changed since they last ran, in pipeline order.

    Args:
        root: the project root (the folder holding ``dvc.yaml``).
        params: the project's parameters; read from ``<root>/params.yaml`` when omitted.
        timeout_s: the timeout of the HEAD request made for an unpinned URL source.

    Returns:
        One :class:`StaleSource` per stage to force; empty when nothing is stale.
    """
    return [
        StaleSource(check.stage, f"{check.stage}: {check.reason}")
        for check in check_sources(root, params, timeout_s=timeout_s)
        if check.state == "stale"
    ]


def check_sources(
    root: str | Path, params: Params | None = None, *, timeout_s: float = HEAD_TIMEOUT_S
) -> list[SourceCheck]:
    """Check ``fetch.source`` and ``backbone.weights`` against what the last run recorded.

    Args:
        root: the project root (the folder holding ``dvc.yaml``).
        params: the project's parameters; read from ``<root>/params.yaml`` when omitted.
        timeout_s: the timeout of the HEAD request made for an unpinned URL source.

    Returns:
        One :class:`SourceCheck` for ``fetch`` and one for ``backbone``, in that order.

    Raises:
        ValueError: ``dvc.yaml`` lacks the fetch or backbone stage or their path options.
    """
    root = Path(root)
    if params is None:
        params = load_params(root / "params.yaml")
    paths = stage_paths(root)
    return [
        check_fetch(root, params.fetch, paths, timeout_s=timeout_s),
        check_backbone(root, params.backbone, paths),
    ]


def stage_paths(root: Path) -> StagePaths:
    """Read the fetch and backbone stages' path options from ``<root>/dvc.yaml``.

    Raises:
        ValueError: a stage or an option is missing.
    """
    dvc_yaml = Path(root) / "dvc.yaml"
    with dvc_yaml.open(encoding="utf-8") as handle:
        stages = (yaml.safe_load(handle) or {}).get("stages") or {}

    def option(stage: str, name: str) -> Path:
        cmd = (stages.get(stage) or {}).get("cmd")
        words = shlex.split(" ".join(cmd) if isinstance(cmd, list) else str(cmd or ""))
        for index, word in enumerate(words[:-1]):
            if word == name:
                return Path(words[index + 1])
            if word.startswith(name + "="):
                return Path(word.split("=", 1)[1])
        raise ValueError(
            f"{dvc_yaml}: the {stage!r} stage's cmd has no {name} option; flows.freshness "
            f"reads the {stage} stage's paths from it (see the shipped dvc.yaml)"
        )

    return StagePaths(
        raw=option("fetch", "--out"),
        downloads=option("fetch", "--cache"),
        backbone_info=option("backbone", "--info"),
    )


# -- fetch ----------------------------------------------------------------------------------


def check_fetch(
    root: Path, params: FetchParams, paths: StagePaths, *, timeout_s: float = HEAD_TIMEOUT_S
) -> SourceCheck:
    """Compare ``fetch.source`` with the ``fingerprint`` in ``<raw>/source.json``."""
    record_file = root / paths.raw / "source.json"
    if not record_file.is_file():
        return SourceCheck("fetch", "pending", f"not fetched yet ({record_file} is missing)")
    record = _read_record(record_file)
    if record is None:
        return SourceCheck("fetch", "unknown", f"{record_file} is not readable JSON")
    if record.get("source") != params.source:
        return SourceCheck(
            "fetch",
            "pending",
            f"fetch.source changed since the last fetch ({record.get('source')!r} -> "
            f"{params.source!r}); dvc repro re-runs fetch by itself",
        )
    fingerprint = record.get("fingerprint")
    if params.source.startswith("builtin:"):
        return SourceCheck("fetch", "fresh", f"{params.source} is pinned by its hashes")
    if not isinstance(fingerprint, dict):
        return SourceCheck(
            "fetch",
            "unknown",
            f"{record_file} records no fingerprint (fetched by an older version); run "
            "`dvc repro -f --single-item fetch` once to record one",
        )
    method = fingerprint.get("method")
    if method == "http":
        return _check_url(params, fingerprint, timeout_s)
    source = _resolve(root, params.source)
    index = HashIndex.for_source(root / paths.downloads, source)
    try:
        if method == "sha256-tree":
            return _check_folder(source, fingerprint, root / paths.raw, index)
        if method == "sha256":
            return _check_archive(source, params, fingerprint, index)
    except (OSError, StageError) as exc:
        return SourceCheck("fetch", "unknown", f"could not read {source}: {exc}")
    finally:
        index.save()
    return SourceCheck("fetch", "unknown", f"unknown fingerprint method {method!r}")


def _check_folder(
    folder: Path, fingerprint: dict[str, Any], raw: Path, index: HashIndex
) -> SourceCheck:
    if folder.exists() and not folder.is_dir():
        return SourceCheck("fetch", "stale", f"{folder} was a folder at the last fetch, not now")
    if not folder.is_dir():
        return SourceCheck(
            "fetch", "unknown", f"the source folder {folder} is missing; the next fetch would fail"
        )
    hashes = hash_folder(list_folder(folder), index)
    if hashlib.sha256(folder_manifest(hashes)).hexdigest() == fingerprint.get("sha256"):
        return SourceCheck(
            "fetch", "fresh", f"the {len(hashes)} files under {folder} are unchanged"
        )
    manifest = raw / str(fingerprint.get("manifest") or MANIFEST_NAME)
    try:
        recorded = parse_manifest(manifest.read_bytes())
    except OSError:
        return SourceCheck(
            "fetch",
            "stale",
            f"the files under {folder} changed since the last fetch ({len(hashes)} now, "
            f"{fingerprint.get('files')} then)",
        )
    changed = sorted(rel for rel in hashes if rel in recorded and recorded[rel] != hashes[rel])
    added = sorted(set(hashes) - set(recorded))
    removed = sorted(set(recorded) - set(hashes))
    examples = ", ".join([*changed, *added, *removed][:_EXAMPLES])
    return SourceCheck(
        "fetch",
        "stale",
        f"{_count(changed, 'file')} changed, {len(added)} added, {len(removed)} removed "
        f"under {folder} since the last fetch ({examples})",
    )


def _check_archive(
    archive: Path, params: FetchParams, fingerprint: dict[str, Any], index: HashIndex
) -> SourceCheck:
    if archive.is_dir():
        return SourceCheck("fetch", "stale", f"{archive} was a file at the last fetch, not now")
    if not archive.is_file():
        return SourceCheck(
            "fetch",
            "unknown",
            f"the source archive {archive} is missing; the next fetch would fail",
        )
    digest = hash_file(archive, index, ARCHIVE_KEY)
    recorded = fingerprint.get("sha256")
    if digest == recorded:
        return SourceCheck("fetch", "fresh", f"{archive} is unchanged (sha256 {digest[:12]}...)")
    if params.sha256:
        # The fetched data is the pinned content; forcing fetch would only fail on the pin.
        return SourceCheck(
            "fetch",
            "unknown",
            f"{archive} no longer matches fetch.sha256 (now {digest[:12]}...); the fetched "
            "data is still the pinned content, but the next fetch will refuse the file",
        )
    return SourceCheck(
        "fetch",
        "stale",
        f"{archive} changed since the last fetch (sha256 {str(recorded)[:12]}... -> "
        f"{digest[:12]}...)",
    )


def _check_url(params: FetchParams, fingerprint: dict[str, Any], timeout_s: float) -> SourceCheck:
    url = params.source
    if params.sha256:
        if fingerprint.get("sha256") == params.sha256.lower():
            return SourceCheck("fetch", "fresh", f"{url} is pinned by fetch.sha256")
        return SourceCheck(
            "fetch", "pending", "fetch.sha256 changed since the last fetch; dvc repro re-runs fetch"
        )
    etag, last_modified = fingerprint.get("etag"), fingerprint.get("last_modified")
    if not etag and not last_modified:
        return SourceCheck(
            "fetch",
            "unknown",
            f"the server sent no ETag or Last-Modified for {url}, so a change cannot be "
            "seen; pin fetch.sha256, or force fetch to download it again",
        )
    try:
        response = requests.head(
            url, timeout=timeout_s, allow_redirects=True, headers={"User-Agent": USER_AGENT}
        )
    except requests.RequestException as exc:
        return SourceCheck("fetch", "unknown", f"could not reach {url} to check it: {exc}")
    with response:
        if not response.ok:
            return SourceCheck(
                "fetch", "unknown", f"HEAD {url} answered HTTP {response.status_code}"
            )
        etag_now = response.headers.get("ETag")
        last_modified_now = response.headers.get("Last-Modified")
    if etag and etag_now:
        if _weak(etag) == _weak(etag_now):
            return SourceCheck("fetch", "fresh", f"{url} is unchanged (ETag {etag})")
        return SourceCheck(
            "fetch",
            "stale",
            f"{url} changed since the last fetch (ETag {etag} -> {etag_now})",
        )
    if last_modified and last_modified_now:
        if last_modified == last_modified_now:
            return SourceCheck(
                "fetch", "fresh", f"{url} is unchanged (Last-Modified {last_modified})"
            )
        return SourceCheck(
            "fetch",
            "stale",
            f"{url} changed since the last fetch (Last-Modified {last_modified} -> "
            f"{last_modified_now})",
        )
    return SourceCheck(
        "fetch", "unknown", f"{url} no longer sends the validator recorded at the last fetch"
    )


# -- backbone -------------------------------------------------------------------------------


def check_backbone(root: Path, params: BackboneParams, paths: StagePaths) -> SourceCheck:
    """Compare a ``backbone.weights`` file with ``weights_sha256`` in the backbone info."""
    weights = params.weights.strip()
    if weights.lower() in ("none", ""):
        return SourceCheck("backbone", "fresh", "backbone.weights is none: no file to check")
    if weights.lower() == "imagenet":
        return SourceCheck("backbone", "fresh", "imagenet weights are pinned by Keras")
    info_file = root / paths.backbone_info
    if not info_file.is_file():
        return SourceCheck("backbone", "pending", f"not built yet ({info_file} is missing)")
    info = _read_record(info_file)
    if info is None:
        return SourceCheck("backbone", "unknown", f"{info_file} is not readable JSON")
    if info.get("weights") != weights:
        return SourceCheck(
            "backbone",
            "pending",
            f"backbone.weights changed since the backbone stage ran ({info.get('weights')!r} "
            f"-> {weights!r}); dvc repro re-runs it by itself",
        )
    recorded = info.get("weights_sha256")
    path = _resolve(root, weights)
    if not recorded:
        return SourceCheck("backbone", "unknown", f"{info_file} records no weights_sha256")
    if not path.is_file():
        return SourceCheck(
            "backbone",
            "unknown",
            f"the weights file {path} is missing; the backbone stage would fail",
        )
    index = HashIndex.for_source(root / paths.downloads, path)
    try:
        digest = hash_file(path, index, ARCHIVE_KEY)
    except (OSError, StageError) as exc:
        return SourceCheck("backbone", "unknown", f"could not read {path}: {exc}")
    finally:
        index.save()
    if digest == recorded:
        return SourceCheck("backbone", "fresh", f"{path} is unchanged (sha256 {digest[:12]}...)")
    return SourceCheck(
        "backbone",
        "stale",
        f"the weights file {path} changed since the backbone stage ran (sha256 "
        f"{recorded[:12]}... -> {digest[:12]}...)",
    )


# -- helpers --------------------------------------------------------------------------------


def _read_record(path: Path) -> dict[str, Any] | None:
    """A JSON object written by a stage, or ``None`` if it cannot be read as one."""
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _resolve(root: Path, value: str) -> Path:
    """A param path as the stages see it: relative paths are relative to the project root."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path


def _weak(etag: str) -> str:
    """Weak comparison (RFC 9110 8.8.3.2): ``W/"x"`` and ``"x"`` are the same tag."""
    return etag.strip().removeprefix("W/")


def _count(items: list[str], noun: str) -> str:
    return f"{len(items)} {noun}" + ("" if len(items) == 1 else "s")


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.freshness [--root .]``: print each check; exit 1 if any is stale."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.freshness",
        description="Check whether fetch.source or backbone.weights changed behind their names.",
    )
    parser.add_argument("--root", type=Path, default=Path("."), help="the project root")
    args = parser.parse_args(argv)
    checks = check_sources(args.root)
    for check in checks:
        print(f"{check.stage:9} {check.state:8} {check.reason}")
    return 1 if any(check.state == "stale" for check in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
