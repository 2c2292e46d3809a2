"""The prepare stage's shard files: ``shards/<split>-<n>.npy``, written as images arrive.

Each shard is a plain ``.npy`` file (uint8, ``(N, height, width, 3)``) that NumPy opens
memory-mapped (:mod:`tasks.dataset`). Its header has a fixed size, :data:`HEADER_BYTES`,
so it can be written last, when the number of images is known.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from tasks.common import StageError

HEADER_BYTES = 128  # fixed, so the header can be rewritten in place (multiple of 64)


class ShardWriter:
    """Streams images per split into ``shards/<split>-<n>.npy``, one open file per split.

    Pixels go to disk as they arrive; only the ``.npy`` header, rewritten when a shard is
    closed, waits for the final count. Memory does not grow with ``prepare.shard_size``.
    """

    def __init__(self, folder: Path, shard_size: int, splits: Sequence[str]):
        self.folder = folder
        self.shard_size = shard_size
        self.files: dict[str, BinaryIO | None] = dict.fromkeys(splits)
        self.rows: dict[str, int] = dict.fromkeys(splits, 0)
        self.shape: dict[str, tuple[int, ...]] = {}
        self.counts: dict[str, int] = dict.fromkeys(splits, 0)
        folder.mkdir(parents=True, exist_ok=True)

    def _name(self, split: str) -> str:
        return f"{split}-{self.counts[split]:05d}.npy"

    def add(self, split: str, pixels: np.ndarray) -> tuple[str, int]:
        """Append one uint8 image; return its shard file name and row."""
        handle = self.files[split]
        if handle is None:
            handle = self.files[split] = (self.folder / self._name(split)).open("wb")
            handle.write(b"\0" * HEADER_BYTES)
            self.shape[split] = pixels.shape
        elif pixels.shape != self.shape[split]:
            raise StageError(f"image shape {pixels.shape} differs from {self.shape[split]}")
        location = self._name(split), self.rows[split]
        handle.write(np.ascontiguousarray(pixels, np.uint8).data)
        self.rows[split] += 1
        if self.rows[split] >= self.shard_size:
            self._flush(split)
        return location

    def _flush(self, split: str) -> None:
        handle = self.files[split]
        if handle is None:
            return
        header = repr(
            {
                "descr": "|u1",
                "fortran_order": False,
                "shape": (self.rows[split], *self.shape[split]),
            }
        )
        body = header.ljust(HEADER_BYTES - 11) + "\n"  # magic 6 + version 2 + length 2
        handle.seek(0)
        handle.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1"))
        handle.close()
        self.files[split] = None
        self.rows[split] = 0
        self.counts[split] += 1

    def close(self) -> None:
        """Finish every open shard."""
        for split in self.files:
            self._flush(split)
