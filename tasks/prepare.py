"""Stage ``prepare``: validate every image, split by content hash, write compact shards.

Output layout (``--out``)::

    classes.json        class names; a label is an index into this list
    manifest.parquet    one row per kept image: path, label, label_index, split, sha256,
                        width, height, shard, offset, source_label (its class before merging)
    rejects.csv         path, reason for every file that could not be used
    report.json         counts per class and split, rejects by reason, warnings
    shards/<split>-<n>.npy   uint8 arrays (N, height, width, 3)

Images are decoded in a thread pool (:func:`tasks.imaging.decode_in_order`) and streamed, in
order, into the open shard files, with at most a few images per thread in flight: peak memory
does not grow with the dataset or with ``prepare.shard_size``, and the full-size pixels of the
images being decoded stay within :data:`tasks.imaging.DECODE_BUDGET`, however large each
image is (up to ``prepare.max_pixels``). Splits come from each
image's sha256: byte-identical files always share a split, and adding an image never
moves another one.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from tasks.builtin import read_idx
from tasks.common import StageError, atomic_path, log, progress, read_json, run_stage, write_json
from tasks.imaging import Item, decode, decode_in_order  # noqa: F401 (decode: tests import it here)
from tasks.params import PrepareParams, load_params
from tasks.shards import HEADER_BYTES, ShardWriter

SPLITS = ("train", "val", "test")
_LOGGED_REJECTS = 100
SPLIT_DIR_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing"}


@dataclass
class PrepareResult:
    """What :func:`prepare` wrote."""

    classes: list[str]
    counts: dict[str, dict[str, int]]
    n_images: int
    n_rejected: int
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- sources


def _visible(path: Path) -> bool:
    return not path.name.startswith((".", "__MACOSX"))


def _entries(folder: Path, hidden: list[Path]) -> tuple[list[Path], list[Path]]:
    """The visible sub-folders and files of ``folder``, sorted; hidden entries (``.*``,
    ``__MACOSX``) are added to ``hidden``."""
    entries = sorted(folder.iterdir())
    hidden += [p for p in entries if not _visible(p)]
    visible = [p for p in entries if _visible(p)]
    return [p for p in visible if p.is_dir()], [p for p in visible if p.is_file()]


def _class_name(folder: Path) -> str:
    # One name, one class: macOS writes "café" decomposed (NFD), Linux composed (NFC).
    return unicodedata.normalize("NFC", folder.name)


def find_class_root(root: Path) -> list[tuple[str, Path]]:
    """Find the class folders under ``root``.

    Descends through folders that hold a single sub-folder and no images (archives often
    wrap everything in one folder), and merges ``train/``, ``val/``, ``test/`` split
    folders by class name (we make our own split). A class is named after its folder in
    Unicode NFC, so ``café`` written composed or decomposed is one class.

    Returns:
        ``(class_name, folder)`` pairs; a class may appear more than once.
    """
    return _class_folders(root, [])[0]


def _class_folders(root: Path, hidden: list[Path]) -> tuple[list[tuple[str, Path]], list[Path]]:
    """``find_class_root``'s pairs, and the visible files that sit outside every class folder."""
    subdirs, files = _entries(root, hidden)
    while len(subdirs) == 1 and not files:
        subdirs, files = _entries(subdirs[0], hidden)
    if not subdirs:
        raise StageError(
            f"no class folders found under {root}: put the images in one sub-folder per class "
            "(e.g. images/cat/*.jpg, images/dog/*.jpg)"
        )
    if {d.name.lower() for d in subdirs} <= SPLIT_DIR_NAMES:
        pairs = []
        for split_dir in subdirs:
            classes, strays = _entries(split_dir, hidden)
            pairs += [(_class_name(d), d) for d in classes]
            files += strays
        return pairs, sorted(files)
    return [(_class_name(d), d) for d in subdirs], sorted(files)


def iter_folder(root: Path) -> tuple[list[str], list[Item]]:
    """List every file under each class folder (sorted, so runs are deterministic).

    Files beside the class folders belong to no class: they are listed too, as rejects,
    so that nothing is dropped without a trace. Hidden entries are ignored and counted in
    a warning; class folders whose names differ only in Unicode form are merged, saying so.
    """
    hidden: list[Path] = []
    pairs, strays = _class_folders(root, hidden)
    items: list[Item] = [
        Item(str(file.relative_to(root.parent)), "", file, reason="not inside a class folder")
        for file in strays
    ]
    names = sorted({name for name, _ in pairs})
    for name in names:
        spelt = sorted({folder.name for label, folder in pairs if label == name})
        if len(spelt) > 1:
            log.warning(
                "prepare: class folders %s are one name in different Unicode forms; "
                "merged into class %r", spelt, name,
            )  # fmt: skip
    for name, folder in pairs:
        for dirpath, dirnames, filenames in os.walk(folder):
            here = Path(dirpath)
            hidden += [here / n for n in [*dirnames, *filenames] if n.startswith(".")]
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(f for f in filenames if not f.startswith(".")):
                file = here / filename
                items.append(Item(str(file.relative_to(root.parent)), name, file))
    if hidden:
        shown = ", ".join(str(p.relative_to(root.parent)) for p in hidden[:5])
        log.warning(
            "prepare: ignored %d hidden entries (names starting with '.', or __MACOSX): %s%s",
            len(hidden), shown, " ..." if len(hidden) > 5 else "",
        )  # fmt: skip
    return names, items


def iter_idx(folder: Path) -> tuple[list[str], list[Item]]:
    """Read MNIST-style IDX files (train and t10k) as items holding raw pixels."""
    classes = read_json(folder / "classes.json")
    items: list[Item] = []
    for part in ("train", "t10k"):
        images_path = folder / f"{part}-images-idx3-ubyte.gz"
        if not images_path.exists():
            continue
        images = read_idx(images_path)
        labels = read_idx(folder / f"{part}-labels-idx1-ubyte.gz")
        if len(images) != len(labels):
            raise StageError(f"{images_path}: {len(images)} images but {len(labels)} labels")
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            items.append(
                Item(
                    f"idx/{images_path.name}#{index}",
                    classes[int(label)],
                    data=image.tobytes(),
                    shape=image.shape,
                )
            )
    return list(classes), items


# ---------------------------------------------------------------- splitting


def split_of(digest: str, params: PrepareParams) -> str:
    """The split of an image, from its content hash alone (stable and duplicate-safe)."""
    position = int(digest[:16], 16) / 2**64
    if position < params.test_fraction:
        return "test"
    if position < params.test_fraction + params.val_fraction:
        return "val"
    return "train"


def _resolve_classes(
    counts: Counter, classes: list[str], params: PrepareParams
) -> tuple[dict[str, str], list[str]]:
    """Map each class to its final name (small classes → ``other_class``) or fail."""
    small = {c: counts.get(c, 0) for c in classes if counts.get(c, 0) < params.min_images_per_class}
    mapping = {c: c for c in classes}
    if small and params.other_class:
        for name in small:
            mapping[name] = params.other_class
        merged = sum(
            counts.get(c, 0) for c, target in mapping.items() if target == params.other_class
        )
        if merged < params.min_images_per_class:
            raise StageError(
                f"class {params.other_class!r} (merged from {sorted(small)}) has {merged} images, "
                f"under prepare.min_images_per_class={params.min_images_per_class}; add images or lower it"
            )
    elif small:
        listing = ", ".join(f"{c!r}: {n}" for c, n in sorted(small.items()))
        raise StageError(
            f"classes with fewer than prepare.min_images_per_class={params.min_images_per_class} "
            f"valid images: {listing}. Add images, lower prepare.min_images_per_class, or set "
            "prepare.other_class to merge them into one class"
        )
    final = sorted(set(mapping.values()))
    if len(final) < 2:
        raise StageError(f"need at least 2 classes to train a classifier, found {final}")
    return mapping, final


def prepare(params: PrepareParams, raw: Path, out: Path) -> PrepareResult:
    """Decode, validate, split and shard the raw images of ``raw`` into ``out``.

    Args:
        params: the ``prepare`` section.
        raw: the fetch stage's output (``images/`` class folders or ``idx/`` files).
        out: an empty folder to fill (the caller makes it appear atomically).

    Returns:
        A :class:`PrepareResult` summary.

    Raises:
        StageError: no classes, too many bad files, classes that are too small, or shards
            that would not fit on the disk.
    """
    if (raw / "idx").is_dir():
        classes, items = iter_idx(raw / "idx")
    elif (raw / "images").is_dir():
        classes, items = iter_folder(raw / "images")
    elif raw.is_dir():
        classes, items = iter_folder(raw)
    else:
        raise StageError(f"{raw} does not exist; run the fetch stage first")
    if not items:
        raise StageError(f"no files found under {raw}")
    _check_disk_space(params, len(items), out)

    previous_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = params.max_pixels  # PIL's decompression-bomb guard, as configured
    try:
        with warnings.catch_warnings():  # entered once, here, not in the decoding threads
            # Between 1x and 2x the limit PIL only warns; `decode` rejects those images itself.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return _prepare_items(params, classes, items, out)
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit


def _check_disk_space(params: PrepareParams, n_files: int, out: Path) -> None:
    """Refuse, before writing anything, shards that cannot fit in the free space at ``out``.

    Every file may become an image of ``prepare.image_size`` (height x width x 3 bytes:
    the shards are uncompressed), so the estimate is an upper bound; rejected files take
    no space.
    """
    height, width = params.image_size
    shards = n_files // params.shard_size + len(SPLITS)
    need = n_files * height * width * 3 + shards * HEADER_BYTES + 64 * n_files  # + manifest
    where = next(path for path in (out, *out.absolute().parents) if path.exists())
    free = shutil.disk_usage(where).free
    if need > free:
        raise StageError(
            f"prepare would write up to {need / 1e9:,.1f} GB of shards ({n_files:,} images of "
            f"{height}x{width}x3 bytes, prepare.image_size {list(params.image_size)}) into "
            f"{out}, but only {free / 1e9:,.1f} GB is free there (and DVC then copies them into "
            "its cache, unless it links files). Lower prepare.image_size, or free disk space"
        )


# source_label: the class the image came with, before prepare.other_class merged small ones.
MANIFEST_COLUMNS = ("path", "label", "label_index", "split", "sha256", "width", "height", "shard", "offset", "source_label")  # fmt: skip


def _prepare_items(
    params: PrepareParams, classes: list[str], items: list[Item], out: Path
) -> PrepareResult:
    writer = ShardWriter(out / "shards", params.shard_size, SPLITS)
    rows: list[dict] = []
    rejects: list[tuple[str, str]] = []
    # Decoding and resizing release the GIL; one thread more than the CPUs keeps them busy
    # while the others hold the GIL between images (measured: +10% on 2 cores).
    workers = params.workers or len(os.sched_getaffinity(0)) + 1  # the CPUs we may run on
    try:
        with progress(total=len(items), desc="prepare", unit="img") as bar:
            # At most 4 x workers decoded images wait to be written, whatever the dataset.
            for result in decode_in_order(items, params, workers, window=4 * workers):
                bar.update(1)
                if result.reason:
                    rejects.append((result.item.path, result.reason))
                    continue
                split = split_of(result.sha256, params)
                shard, offset = writer.add(split, result.pixels)
                rows.append(
                    {"path": result.item.path, "label": result.item.label, "split": split,
                     "sha256": result.sha256, "width": result.width, "height": result.height,
                     "shard": shard, "offset": offset}
                )  # fmt: skip
    finally:
        writer.close()  # also on error: no file handle outlives the stage

    # The same bytes under two class names cannot both be right: reject every copy.
    labels_of: dict[str, set[str]] = {}
    for row in rows:
        labels_of.setdefault(row["sha256"], set()).add(row["label"])
    if any(len(labels) > 1 for labels in labels_of.values()):
        kept = []
        for row in rows:
            if len(labels_of[row["sha256"]]) > 1:
                reason = f"identical bytes appear under several classes (here {row['label']!r})"
                rejects.append((row["path"], reason))
            else:
                kept.append(row)
        rows = kept

    n_total = len(items)
    bad_fraction = len(rejects) / n_total
    if bad_fraction > params.max_bad_fraction:
        for path, reason in rejects[:_LOGGED_REJECTS]:
            log.warning("prepare: rejected %s: %s", path, reason)
        if len(rejects) > _LOGGED_REJECTS:
            log.warning("prepare: ... and %d more rejected files", len(rejects) - _LOGGED_REJECTS)
        by_reason = Counter(r.split(":")[0] for _, r in rejects)
        sample = "; ".join(f"{p}: {r}" for p, r in rejects[:10])
        raise StageError(
            f"{len(rejects)} of {n_total} files ({bad_fraction:.1%}) are unusable, over "
            f"prepare.max_bad_fraction={params.max_bad_fraction} ({dict(by_reason)}). First ones: "
            f"{sample}. Remove or fix them, or raise prepare.max_bad_fraction"
        )
    mapping, final = _resolve_classes(Counter(row["label"] for row in rows), classes, params)
    index_of = {c: i for i, c in enumerate(final)}
    for row in rows:
        row["source_label"] = row["label"]
        row["label"] = mapping[row["label"]]
        row["label_index"] = index_of[row["label"]]

    per_class_split = Counter((row["label"], row["split"]) for row in rows)
    counts = {c: {s: per_class_split[c, s] for s in SPLITS} for c in final}
    notes: list[str] = []
    totals = {c: sum(v.values()) for c, v in counts.items()}
    ratio = max(totals.values()) / max(min(totals.values()), 1)
    if ratio > params.imbalance_warn_ratio:
        notes.append(
            f"class imbalance {ratio:.0f}:1 (largest {max(totals, key=totals.get)!r} "
            f"{max(totals.values())}, smallest {min(totals, key=totals.get)!r} "
            f"{min(totals.values())}); consider class weights or more data"
        )
    for c, per_split in counts.items():
        empty = [s for s in SPLITS if per_split[s] == 0 and (s != "val" or params.val_fraction > 0)]
        if empty:
            notes.append(f"class {c!r} has no images in split(s) {empty}")
    duplicates = len(rows) - len({row["sha256"] for row in rows})
    if duplicates:
        notes.append(f"{duplicates} byte-identical duplicate images (kept, always in one split)")
    for note in notes:
        log.warning("prepare: %s", note)

    _write_manifest(out / "manifest.parquet", rows)
    write_json(out / "classes.json", final)
    with (out / "rejects.csv").open("w", newline="", encoding="utf-8") as handle:
        writer_csv = csv.writer(handle)
        writer_csv.writerow(["path", "reason"])
        writer_csv.writerows(rejects)
    reasons = Counter(r.split(":")[0] for _, r in rejects)
    write_json(
        out / "report.json",
        {
            "classes": final,
            "merged_into_other": sorted(c for c, t in mapping.items() if t != c),
            "counts": counts,
            "images": len(rows),
            "files": n_total,
            "rejected": len(rejects),
            "rejected_by_reason": dict(reasons),
            "duplicates": duplicates,
            "image_size": list(params.image_size),
            "warnings": notes,
        },
    )
    per_split = Counter(row["split"] for row in rows)
    log.info(
        "prepare: %d images in %d classes (train %d, val %d, test %d), %d rejected",
        len(rows), len(final), *(per_split[s] for s in SPLITS), len(rejects),
    )  # fmt: skip
    return PrepareResult(final, counts, len(rows), len(rejects), notes)


def _write_manifest(path: Path, rows: list[dict]) -> None:
    """``manifest.parquet`` with pyarrow alone (pandas would add ~0.6 s of import)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    integer = {"label_index", "width", "height", "offset"}
    schema = pa.schema([(c, pa.int64() if c in integer else pa.string()) for c in MANIFEST_COLUMNS])
    columns = {c: [row[c] for row in rows] for c in MANIFEST_COLUMNS}
    pq.write_table(pa.table(columns, schema=schema), path)


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.prepare --raw data/raw --out data/prepared``."""
    parser = argparse.ArgumentParser(description="Validate, split and shard the raw images.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--raw", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    def body() -> None:
        params = load_params(args.params)
        with atomic_path(args.out, directory=True) as tmp:
            prepare(params.prepare, args.raw, tmp)

    return run_stage("prepare", body)


if __name__ == "__main__":
    raise SystemExit(main())
