"""Image decoding shared by ``prepare`` (training shards) and ``tlp predict``.

One function, :func:`decode`, turns an image file (or raw IDX pixels) into the RGB uint8
array a model sees: EXIF orientation applied, any mode converted to RGB, resized by
:func:`resize`. ``prepare`` and ``predict`` both call it, so an image gets the same pixels
in training, ``evaluate`` and ``tlp predict``.

Fast on photos. A JPEG at least 3x the target size on both sides is decoded at 1/2, 1/4
or 1/8 scale by libjpeg's DCT scaling (Pillow's ``Image.draft``), keeping at least 1.5x
the target size, then area-averaged like any other image: a 2000x1500 photo to 224x224 is
decoded at 500x375, about twice as fast as in full. Against the full decode and the same
resize, the mean absolute difference is under 3 grey levels (of 255), the 99th percentile
at most 20 and the largest at most 96, at hard edges and fine stripes where the scaled IDCT
rings (``tests/test_imaging.py`` checks these bounds on synthetic photos).

Bounded on hostile files, per image and not only per count of images:

* only regular files are read (a FIFO or a device is refused before it is opened, and
  opened non-blocking so a swap cannot hang us), and at most
  :func:`max_file_bytes` of them: the largest file an image of ``max_pixels`` can need;
* width x height over ``max_pixels`` or a side under ``min_side`` is refused from the
  header, before any pixel memory exists;
* every image is shrunk to the target size in its own mode (16-bit, alpha, CMYK...) and
  converted to 8-bit RGB only then, with integer arithmetic: no full-size float copy;
* the decoding threads together hold at most :data:`DECODE_BUDGET` bytes of full-size
  pixels (an image needing more is decoded alone), whatever the file compresses to.

This module imports only NumPy and Pillow: ``tlp predict`` starts in well under a second
because it never loads pandas, pydantic or TensorFlow.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import stat
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

# A JPEG is decoded at a reduced DCT scale only while this many times the target size
# remains: the area average that follows then hides most of the scaled IDCT's differences.
# 2 would halve the largest differences and cost a quarter more time on 2000x1500 photos
# (entropy decoding, which no scaling avoids, is most of what remains).
DRAFT_MARGIN = 1.5
_ORIENTATION = 0x0112  # EXIF tag
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # as ImageOps.exif_transpose, which cannot run on the already-resized image


class DecodeLimits(Protocol):
    """What :func:`decode` reads from its settings (``PrepareParams`` has these fields)."""

    image_size: tuple[int, int]
    min_side: int
    max_pixels: int


@dataclass
class Item:
    """One source image: where it is and which class folder it came from."""

    path: str
    label: str
    file: Path | None = None  # where to read it; None for IDX images
    data: bytes | None = None  # IDX images arrive as raw pixels, not files
    shape: tuple[int, int] | None = None
    reason: str = ""  # set when the file is unusable wherever it is (e.g. outside any class)
    follow_symlinks: bool = True  # False: refuse `file` if it is itself a symbolic link


@dataclass
class Decoded:
    """A decoded image, or why it was rejected."""

    item: Item
    pixels: np.ndarray | None = None
    sha256: str = ""
    width: int = 0
    height: int = 0
    reason: str = ""


# ---------------------------------------------------------------- memory


class MemoryBudget:
    """Bytes of full-size pixels that the decoding threads may hold at once.

    A reservation waits until it fits. One larger than the whole budget waits until nothing
    else is reserved and then runs alone, so the bound is ``max(limit, largest image)``.
    Reservations are served in arrival order: a large image is not starved by small ones.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._queue: collections.deque[object] = collections.deque()
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` (capped at the limit) for the duration of the ``with`` block."""
        nbytes = min(nbytes, self.limit)
        ticket = object()
        with self._changed:
            self._queue.append(ticket)
            self._changed.wait_for(
                lambda: self._queue[0] is ticket and self.used + nbytes <= self.limit
            )
            self._queue.popleft()
            self.used += nbytes
            self._changed.notify_all()  # the next in line may fit too
        try:
            yield
        finally:
            with self._changed:
                self.used -= nbytes
                self._changed.notify_all()


# 512 MiB: two 10,000 x 10,000 16-bit greyscale PNGs at once, or one 8-bit RGB one. An image
# needing more (at prepare.max_pixels' default, an RGBA one: 800 MB while its alpha is
# premultiplied) is decoded alone.
DECODE_BUDGET = MemoryBudget(512 * 2**20)


def max_file_bytes(max_pixels: int) -> int:
    """The largest file :func:`decode` reads: 8 bytes a pixel (uncompressed 16-bit RGBA)
    for ``max_pixels`` pixels, plus 16 MiB of metadata. A larger file cannot hold an image
    that ``max_pixels`` admits."""
    return 8 * max_pixels + 16 * 2**20


def _stored_bytes_per_pixel(mode: str) -> int:
    """Pillow's storage: 1 byte a pixel for 1/L/P, 2 for I;16*, 4 for everything else."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("LA", "La", "PA", "RGBA", "RGBa") or (
        image.mode == "P" and "transparency" in image.info
    )


def peak_bytes(image: Image.Image, size: tuple[int, int]) -> int:
    """Pixel memory that :func:`_shrink_to_rgb` needs for ``image`` (not loaded yet).

    The decoded image, the full-size copies made before resizing (1 -> L, P -> RGB(A), and
    the premultiplied copy ``Image.resize`` makes of an image with alpha), and the resize's
    intermediate (target width x source height).
    """
    width, height = image.size
    per_pixel = _stored_bytes_per_pixel(image.mode)
    if image.mode == "1":
        per_pixel += 1
    elif image.mode in ("P", "PA"):
        per_pixel += 4
    if _has_alpha(image):
        per_pixel += 4
    return width * height * per_pixel + size[0] * height * 4


# ---------------------------------------------------------------- pixels


def resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to ``size`` (width, height): area average when shrinking, else bilinear.

    Shrinking on both sides averages every source pixel into its output pixel (Pillow's
    BOX filter, like OpenCV's INTER_AREA): no aliasing, and about twice as fast as
    Pillow's antialiased bilinear filter. Enlarging (small images such as MNIST's 28x28
    to 32x32), or shrinking one side only, interpolates bilinearly.
    """
    if image.size == size:
        return image
    shrinking = image.width >= size[0] and image.height >= size[1]
    return image.resize(size, Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR)


def _shrink_to_rgb(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize ``image`` to ``size`` in its own mode, then convert to 8-bit RGB.

    Resizing first keeps every conversion small: 16-bit and 32-bit values are averaged as
    they are and scaled to 8 bits with integer arithmetic on the small image; alpha is
    averaged premultiplied (``Image.resize`` does that), then composited on white.
    """
    mode = image.mode
    if mode == "1":
        image = image.convert("L")  # Image.resize would only sample bilevel images
    elif mode in ("P", "PA"):
        image = image.convert("RGBA" if _has_alpha(image) else "RGB")  # idem for palettes
    top = 0.0
    if mode in ("I", "F"):  # no fixed range: scale by the image's own maximum
        top = max(float(image.getextrema()[1]), 1.0)
    image = resize(image, size)
    if mode.startswith("I;16"):
        # floor(v * 255 / 65535) == v // 257: exact, and no float copy
        image = Image.fromarray((np.asarray(image) // 257).astype(np.uint8), "L")
    elif mode in ("I", "F"):
        array = np.clip(np.asarray(image, dtype=np.float64) / top * 255.0, 0, 255)
        image = Image.fromarray(array.astype(np.uint8), "L")
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def _orientation(image: Image.Image) -> int:
    orientation = image.getexif().get(_ORIENTATION, 1)
    return orientation if orientation in _TRANSPOSE else 1


def _decode_open(image: Image.Image, width: int, height: int) -> Image.Image:
    """Load an opened image within the memory budget; return it as (height, width) RGB."""
    # The target in the file's stored orientation: swapped when EXIF says "rotate 90".
    # (A JPEG's EXIF sits in its header; others may keep it after the pixels.)
    rotated = image.format in ("JPEG", "MPO") and _orientation(image) in (5, 6, 7, 8)
    stored_size = (height, width) if rotated else (width, height)
    # A no-op for formats other than JPEG (and JPEG-based MPO, which phones write).
    image.draft(None, (int(stored_size[0] * DRAFT_MARGIN), int(stored_size[1] * DRAFT_MARGIN)))
    with DECODE_BUDGET.reserve(peak_bytes(image, stored_size)):
        image.load()
        orientation = _orientation(image)
        if orientation in (5, 6, 7, 8):
            stored_size = (height, width)
        shrunk = _shrink_to_rgb(image, stored_size)
        if shrunk is image:  # already RGB at the target size: keep it open (a copy)
            shrunk = image.copy()
        image.close()  # the full-size pixels go before the budget is released
    method = _TRANSPOSE.get(orientation)
    return shrunk.transpose(method) if method is not None else shrunk


def _open_regular(item: Item, max_bytes: int) -> tuple[BinaryIO | None, str]:
    """Open ``item.file`` if it is a regular file of at most ``max_bytes``; else say why.

    Checked before opening (a FIFO would block the open, a device may act on it) and
    again on the open descriptor, which is non-blocking, in case the path was swapped.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not item.follow_symlinks:
        flags |= os.O_NOFOLLOW
    fd = -1
    try:
        info = os.stat(item.file, follow_symlinks=item.follow_symlinks)
        if stat.S_ISREG(info.st_mode):
            fd = os.open(item.file, flags)
            info = os.fstat(fd)
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}"
    reason = ""
    if not stat.S_ISREG(info.st_mode):
        reason = f"not a regular file: {_file_kind(info.st_mode)}"
    elif info.st_size > max_bytes:
        reason = (
            f"file too large: {info.st_size:,} bytes, over the {max_bytes:,} that an image "
            "within prepare.max_pixels can take"
        )
    if reason:
        if fd >= 0:
            os.close(fd)
        return None, reason
    return os.fdopen(fd, "rb"), ""


def _file_kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a folder" if stat.S_ISDIR(mode) else "not a file"


def decode(item: Item, params: DecodeLimits) -> Decoded:
    """Decode, validate and resize one image to ``params.image_size`` RGB uint8.

    Never raises for bad data: the reason lands in ``Decoded.reason``.
    """
    if item.reason:
        return Decoded(item, reason=item.reason)
    height, width = params.image_size
    if item.data is not None:  # IDX: raw grayscale pixels
        digest = hashlib.sha256(item.data).hexdigest()
        array = np.frombuffer(item.data, np.uint8).reshape(item.shape)
        image = resize(Image.fromarray(array, "L").convert("RGB"), (width, height))
        return Decoded(item, np.asarray(image), digest, item.shape[1], item.shape[0])
    handle, reason = _open_regular(item, max_file_bytes(params.max_pixels))
    if handle is None:
        return Decoded(item, reason=reason)
    with handle:
        try:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
            empty = handle.tell() == 0
            handle.seek(0)
        except OSError as exc:
            return Decoded(item, reason=f"unreadable: {exc.strerror or exc}")
        if empty:
            return Decoded(item, sha256=digest, reason="empty file (0 bytes)")
        return _decode_file(item, handle, digest, params)


def _decode_file(item: Item, handle: BinaryIO, digest: str, params: DecodeLimits) -> Decoded:
    height, width = params.image_size
    try:
        # The header gives the size without decoding: refuse huge and tiny images before any
        # pixel memory is allocated (PIL's own bomb check, set in `prepare`, backs this up).
        image = Image.open(handle)
        w, h = image.size
        if w * h > params.max_pixels:
            return Decoded(item, sha256=digest, width=w, height=h,
                           reason=f"too large: {w}x{h} exceeds prepare.max_pixels={params.max_pixels}")  # fmt: skip
        if min(w, h) < params.min_side:
            return Decoded(item, sha256=digest, width=w, height=h,
                           reason=f"too small: {w}x{h} is under prepare.min_side={params.min_side}")  # fmt: skip
        rgb = _decode_open(image, width, height)
    except UnidentifiedImageError:
        return Decoded(item, sha256=digest, reason="not an image (unknown format)")
    except Image.DecompressionBombError as exc:
        return Decoded(
            item, sha256=digest,
            reason=f"too large: over prepare.max_pixels={params.max_pixels} ({exc})",
        )  # fmt: skip
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return Decoded(item, sha256=digest, reason=f"corrupt or truncated image: {exc}")
    except Exception as exc:
        # Decoders of malformed files raise whatever they hit (struct.error, IndexError,
        # ZeroDivisionError...). The file is rejected with the reason, never skipped silently.
        return Decoded(item, sha256=digest, reason=f"corrupt image ({type(exc).__name__}: {exc})")
    return Decoded(item, np.asarray(rgb, dtype=np.uint8), digest, w, h)


def decode_in_order(
    items: Iterable[Item], params: DecodeLimits, workers: int, window: int
) -> Iterator[Decoded]:
    """:func:`decode` over ``items`` in a thread pool, yielded in order.

    At most ``window`` items are submitted ahead of the one being yielded, so memory does
    not grow with the number of items (and the items may come from a generator).
    Decoding and resizing release the GIL, so the threads run in parallel.
    """
    with ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(decode, item, params))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
