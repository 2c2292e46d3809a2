"""Read the prepare stage's shards: batches for training, evaluation and export checks.

Shards are memory-mapped, so a batch touches only its own images: memory stays bounded
by the batch whatever the dataset size, and a global shuffle costs no extra memory.
"""

from __future__ import annotations

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

    def rows(self, split: str) -> pd.DataFrame:
        """Manifest rows of one split."""
        return self.manifest[self.manifest["split"] == split].reset_index(drop=True)

    def count(self, split: str) -> int:
        """Number of images in a split."""
        return int((self.manifest["split"] == split).sum())

    def labels(self, split: str) -> np.ndarray:
        """Label indices of a split, in manifest order."""
        return self.rows(split)["label_index"].to_numpy(np.int32)

    def _shard(self, name: str, cache: dict) -> np.ndarray:
        if name not in cache:
            cache[name] = np.load(self.root / "shards" / name, mmap_mode="r")
        return cache[name]

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
        rows = self.rows(split)
        if limit is not None:
            rows = rows.iloc[:limit]
        order = np.arange(len(rows))
        if shuffle:
            order = np.random.default_rng(seed).permutation(len(rows))
        shards = rows["shard"].to_numpy()
        offsets = rows["offset"].to_numpy()
        labels = rows["label_index"].to_numpy(np.int32)
        cache: dict[str, np.ndarray] = {}
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            images = np.empty((len(index), *self.image_size, 3), np.uint8)
            for position, row in enumerate(index):
                images[position] = self._shard(shards[row], cache)[offsets[row]]
            yield images, labels[index]

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
        """
        import tensorflow as tf

        clock = clock or EpochClock()

        def generate():
            yield from self.batches(
                split, batch_size, shuffle=shuffle, seed=seed * 100_003 + clock.epoch
            )

        height, width = self.image_size
        dataset = tf.data.Dataset.from_generator(
            generate,
            output_signature=(
                tf.TensorSpec((None, height, width, 3), tf.uint8),
                tf.TensorSpec((None,), tf.int32),
            ),
        )
        # A generator's length is unknown to tf.data; stating it lets Keras size its epochs
        # (no "input ran out of data" warning after the first one, a progress total).
        n_batches = -(-self.count(split) // batch_size)
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(n_batches))
        dataset = dataset.map(
            lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE
        )
        return dataset.prefetch(tf.data.AUTOTUNE)
