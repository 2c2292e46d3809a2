"""Stage ``prepare``: validate every image, split by content hash, write compact shards.

Output layout (``--out``)::

    classes.json        class names; a label is an index into this list
    manifest.parquet    one row per kept image: path, label, label_index, split, sha256,
                        width, height, shard, offset
    rejects.csv         path, reason for every file that could not be used
    report.json         counts per class and split, rejects by reason, warnings
    shards/<split>-<n>.npy   uint8 arrays (N, height, width, 3)

Images are decoded in a thread pool and written shard by shard, so peak memory is
bounded by ``prepare.shard_size`` images, not by the dataset. Splits come from each
image's sha256: byte-identical files always share a split, and adding an image never
moves another one.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import os
import struct
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from tasks.common import StageError, atomic_path, log, progress, read_json, run_stage, write_json
from tasks.imaging import Item, decode
from tasks.params import PrepareParams, load_params

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


def find_class_root(root: Path) -> list[tuple[str, Path]]:
    """Find the class folders under ``root``.

    Descends through folders that hold a single sub-folder and no images (archives often
    wrap everything in one folder), and merges ``train/``, ``val/``, ``test/`` split
    folders by class name (we make our own split).

    Returns:
        ``(class_name, folder)`` pairs; a class may appear more than once.
    """
    return _class_folders(root)[0]


def _class_folders(root: Path) -> tuple[list[tuple[str, Path]], list[Path]]:
    """``find_class_root``'s pairs, and the visible files that sit outside every class folder."""
    current = root
    while True:
        subdirs = sorted(p for p in current.iterdir() if p.is_dir() and _visible(p))
        files = [p for p in current.iterdir() if p.is_file() and _visible(p)]
        if len(subdirs) == 1 and not files:
            current = subdirs[0]
            continue
        break
    if not subdirs:
        raise StageError(
            f"no class folders found under {root}: put the images in one sub-folder per class "
            "(e.g. images/cat/*.jpg, images/dog/*.jpg)"
        )
    if {d.name.lower() for d in subdirs} <= SPLIT_DIR_NAMES:
        pairs = []
        for split_dir in subdirs:
            pairs += [
                (d.name, d) for d in sorted(split_dir.iterdir()) if d.is_dir() and _visible(d)
            ]
            files += [p for p in split_dir.iterdir() if p.is_file() and _visible(p)]
        return pairs, sorted(files)
    return [(d.name, d) for d in subdirs], sorted(files)


def iter_folder(root: Path) -> tuple[list[str], list[Item]]:
    """List every file under each class folder (sorted, so runs are deterministic).

    Files beside the class folders belong to no class: they are listed too, as rejects,
    so that nothing is dropped without a trace.
    """
    pairs, strays = _class_folders(root)
    items: list[Item] = [
        Item(str(file.relative_to(root.parent)), "", file, reason="not inside a class folder")
        for file in strays
    ]
    names = sorted({name for name, _ in pairs})
    for name, folder in pairs:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                if filename.startswith("."):
                    continue
                file = Path(dirpath, filename)
                items.append(Item(str(file.relative_to(root.parent)), name, file))
    return names, items


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise StageError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise StageError(f"{path} is truncated: expected {int(np.prod(shape))} values")
    return array.reshape(shape)


def iter_idx(folder: Path) -> tuple[list[str], list[Item]]:
    """Read MNIST-style IDX files (train and t10k) as items holding raw pixels."""
    classes = read_json(folder / "classes.json")
    items: list[Item] = []
    for part in ("train", "t10k"):
        images_path = folder / f"{part}-images-idx3-ubyte.gz"
        if not images_path.exists():
            continue
        images = _read_idx(images_path)
        labels = _read_idx(folder / f"{part}-labels-idx1-ubyte.gz")
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


class _ShardWriter:
    """Buffers images per split and writes ``shards/<split>-<n>.npy`` when a buffer is full."""

    def __init__(self, folder: Path, shard_size: int):
        self.folder = folder
        self.shard_size = shard_size
        self.buffers: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        self.counts: dict[str, int] = dict.fromkeys(SPLITS, 0)
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, split: str, pixels: np.ndarray) -> tuple[str, int]:
        buffer = self.buffers[split]
        shard = f"{split}-{self.counts[split]:05d}.npy"
        buffer.append(pixels)
        offset = len(buffer) - 1
        if len(buffer) >= self.shard_size:
            self._flush(split)
        return shard, offset

    def _flush(self, split: str) -> None:
        buffer = self.buffers[split]
        if buffer:
            np.save(self.folder / f"{split}-{self.counts[split]:05d}.npy", np.stack(buffer))
            self.counts[split] += 1
            self.buffers[split] = []

    def close(self) -> None:
        for split in SPLITS:
            self._flush(split)


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
        StageError: no classes, too many bad files, or classes that are too small.
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

    previous_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = params.max_pixels  # PIL's decompression-bomb guard, as configured
    try:
        with warnings.catch_warnings():  # entered once, here, not in the decoding threads
            # Between 1x and 2x the limit PIL only warns; `decode` rejects those images itself.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return _prepare_items(params, classes, items, out)
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit


def _prepare_items(
    params: PrepareParams, classes: list[str], items: list[Item], out: Path
) -> PrepareResult:
    writer = _ShardWriter(out / "shards", params.shard_size)
    rows: list[dict] = []
    rejects: list[tuple[str, str]] = []
    workers = params.workers or os.cpu_count() or 1
    chunk = max(params.shard_size, 256)
    bar = progress(total=len(items), desc="prepare", unit="img")
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(items), chunk):
            for result in pool.map(lambda it: decode(it, params), items[start : start + chunk]):
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
            bar.update(min(chunk, len(items) - start))
    bar.close()
    writer.close()

    manifest = pd.DataFrame(
        rows, columns=["path", "label", "split", "sha256", "width", "height", "shard", "offset"]
    )
    # The same bytes under two class names cannot both be right: reject every copy.
    labels_per_hash = manifest.groupby("sha256")["label"].nunique()
    conflicting = set(labels_per_hash[labels_per_hash > 1].index)
    if conflicting:
        bad = manifest["sha256"].isin(conflicting)
        for path, label in manifest.loc[bad, ["path", "label"]].itertuples(index=False):
            rejects.append((path, f"identical bytes appear under several classes (here {label!r})"))
        manifest = manifest[~bad].reset_index(drop=True)

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
    mapping, final = _resolve_classes(Counter(manifest["label"]), classes, params)
    manifest["label"] = manifest["label"].map(mapping)
    manifest.insert(2, "label_index", manifest["label"].map({c: i for i, c in enumerate(final)}))

    counts = {
        c: {s: int(((manifest["label"] == c) & (manifest["split"] == s)).sum()) for s in SPLITS}
        for c in final
    }
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
    duplicates = int(manifest["sha256"].duplicated().sum())
    if duplicates:
        notes.append(f"{duplicates} byte-identical duplicate images (kept, always in one split)")
    for note in notes:
        log.warning("prepare: %s", note)

    manifest.to_parquet(out / "manifest.parquet", index=False)
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
            "images": len(manifest),
            "files": n_total,
            "rejected": len(rejects),
            "rejected_by_reason": dict(reasons),
            "duplicates": duplicates,
            "image_size": list(params.image_size),
            "warnings": notes,
        },
    )
    log.info(
        "prepare: %d images in %d classes (train %d, val %d, test %d), %d rejected",
        len(manifest), len(final), *(int((manifest["split"] == s).sum()) for s in SPLITS),
        len(rejects),
    )  # fmt: skip
    return PrepareResult(final, counts, len(manifest), len(rejects), notes)


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
