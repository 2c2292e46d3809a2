"""Read the prepare stage's shards: batches for training, evaluation and export checks.

Shards are memory-mapped, so a batch touches only its own images: memory stays bounded
by the batch whatever the dataset size, and a global shuffle costs no extra memory.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.common import StageError, read_json


@dataclass
class EpochClock:
    """The current epoch, shared between a Keras callback and a dataset generator."""

    epoch: int = 0


@dataclass
class Prepared:
    """The prepare stage's output folder."""

    root: Path
    classes: list[str]
    manifest: pd.DataFrame
    image_size: tuple[int, int]

    @classmethod
    def open(cls, root: str | Path) -> Prepared:
        """Open a prepared folder, with a clear error when it is missing or incomplete."""
        root = Path(root)
        try:
            classes = read_json(root / "classes.json")
            manifest = pd.read_parquet(root / "manifest.parquet")
            report = read_json(root / "report.json")
        except FileNotFoundError as exc:
            raise StageError(
                f"{root} is not a prepared dataset ({exc.filename} missing); run the prepare stage"
            ) from None
        return cls(root, list(classes), manifest, tuple(report["image_size"]))

    def specialist(self, other_class: str) -> Prepared:
        """The images merged into ``other_class``, labelled with the classes they came from.

        The specialist's dataset: the same shards, a subset of the rows (in manifest order),
        ``classes`` the merged classes' own names.

        Raises:
            StageError: fewer than 2 classes were merged, or one has no training image.
        """
        if "source_label" not in self.manifest.columns:
            raise StageError(f"{self.root} predates train.other_specialist; run the prepare stage")
        merged = set(read_json(self.root / "report.json").get("merged_into_other", []))
        rows = self.manifest[self.manifest["label"] == other_class].reset_index(drop=True)
        classes = sorted(merged | set(rows["source_label"]))
        counts = {
            name: {s: int(((rows["source_label"] == name) & (rows["split"] == s)).sum())
                   for s in ("train", "val", "test")}
            for name in classes
        }  # fmt: skip
        if len(classes) < 2 or any(count["train"] == 0 for count in counts.values()):
            raise StageError(
                f"train.other_specialist needs at least 2 classes merged into {other_class!r}, "
                f"each with a training image; got {counts or 'none'} (images per split). Add "
                "images to those classes, raise prepare.min_images_per_class so more merge, "
                "or set train.other_specialist: false"
            )
        index_of = {name: i for i, name in enumerate(classes)}
        rows["label"] = rows["source_label"]
        rows["label_index"] = rows["source_label"].map(index_of).astype("int64")
        return Prepared(self.root, classes, rows, self.image_size)

    def digest(self) -> bytes:
        """A digest of the data: every image's content hash, label and split."""
        columns = self.manifest[["sha256", "label_index", "split"]].astype(str)
        return hashlib.sha256("\n".join(columns.agg("|".join, axis=1)).encode()).digest()

    def rows(self, split: str) -> pd.DataFrame:
        """Manifest rows of one split."""
        return self.manifest[self.manifest["split"] == split].reset_index(drop=True)

    def count(self, split: str) -> int:
        """Number of images in a split."""
        return int((self.manifest["split"] == split).sum())

    def labels(self, split: str) -> np.ndarray:
        """Label indices of a split, in manifest order."""
        return self.rows(split)["label_index"].to_numpy(np.int32)

    def _reader(self, split: str, limit: int | None = None) -> _SplitReader:
        rows = self.rows(split)
        if limit is not None:
            rows = rows.iloc[:limit]
        return _SplitReader(
            self.root / "shards",
            self.image_size,
            rows["shard"].to_numpy(),
            rows["offset"].to_numpy(),
            rows["label_index"].to_numpy(np.int32),
        )

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        limit: int | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(images uint8 (B,H,W,3), labels int32 (B,))`` batches of a split.

        Args:
            split: ``train``, ``val`` or ``test``.
            batch_size: images per batch.
            shuffle: a fresh permutation of the whole split, from ``seed``.
            seed: the permutation's seed (pass the epoch number to vary it per epoch).
            limit: stop after this many images.
        """
        reader = self._reader(split, limit)
        order = reader.order(shuffle, seed)
        for start in range(0, len(order), batch_size):
            yield reader.gather(order[start : start + batch_size])

    def take(self, split: str, indices: np.ndarray) -> np.ndarray:
        """The images at ``indices`` (positions in the split, manifest order), uint8."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) == 0:
            return np.empty((0, *self.image_size, 3), np.uint8)
        return self._reader(split).gather(indices)[0]

    def load(self, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A whole (small) split in memory: for parity checks and tests."""
        parts = list(self.batches(split, 1024, limit=limit))
        if not parts:
            return np.empty((0, *self.image_size, 3), np.uint8), np.empty((0,), np.int32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def tf_dataset(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        clock: EpochClock | None = None,
    ):
        """A streaming ``tf.data.Dataset`` of ``(float32 pixels, int32 labels)``, prefetched.

        With ``shuffle`` every epoch gets its own permutation, derived from ``seed`` and
        ``clock.epoch`` (which a Keras callback keeps current), so a resumed run sees the
        same order as an uninterrupted one.

        The dataset is a range of batch numbers mapped to their pixels, read from the
        memory-mapped shards, not a ``from_generator`` dataset: with a generator, Keras
        waited 11-18 s at the start of some epochs (224x224 MobileNetV2, 2,000 images)
        while the previous epoch's generator was torn down; here every epoch starts at once.
        """
        import tensorflow as tf

        clock = clock or EpochClock()
        reader = self._reader(split)
        orders: dict[int, np.ndarray] = {}
        lock = threading.Lock()

        def load(number):
            epoch = clock.epoch
            with lock:  # one permutation per epoch, computed once
                if epoch not in orders:
                    orders.clear()
                    orders[epoch] = reader.order(shuffle, seed * 100_003 + epoch)
                order = orders[epoch]
            start = int(number) * batch_size
            return reader.gather(order[start : start + batch_size])

        height, width = self.image_size
        n_batches = -(-len(reader.labels) // batch_size)

        def read(number):
            images, labels = tf.numpy_function(load, [number], (tf.uint8, tf.int32))
            images = tf.ensure_shape(tf.cast(images, tf.float32), (None, height, width, 3))
            return images, tf.ensure_shape(labels, (None,))

        dataset = tf.data.Dataset.range(n_batches)
        dataset = dataset.map(read, num_parallel_calls=2, deterministic=True)
        return dataset.prefetch(tf.data.AUTOTUNE)


class _SplitReader:
    """Gathers rows of one split from the memory-mapped shards (thread-safe)."""

    def __init__(self, folder: Path, image_size, shards, offsets, labels):
        self.folder, self.image_size = folder, tuple(image_size)
        self.shards, self.offsets, self.labels = shards, offsets, labels
        self._maps: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def order(self, shuffle: bool, seed: int) -> np.ndarray:
        """Row order for one pass: a permutation from ``seed``, or the manifest order."""
        if shuffle:
            return np.random.default_rng(seed).permutation(len(self.labels))
        return np.arange(len(self.labels))

    def _shard(self, name: str) -> np.ndarray:
        with self._lock:
            if name not in self._maps:
                self._maps[name] = np.load(self.folder / name, mmap_mode="r")
            return self._maps[name]

    def gather(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(images uint8 (B,H,W,3), labels int32 (B,))`` of the rows in ``index``."""
        images = np.empty((len(index), *self.image_size, 3), np.uint8)
        for position, row in enumerate(index):
            images[position] = self._shard(self.shards[row])[self.offsets[row]]
        return images, self.labels[index]
