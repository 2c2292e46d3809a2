"""Built-in datasets, named by small descriptor files, and the one IDX reader.

A built-in dataset is a YAML descriptor that git tracks (``data/builtin/digits.yaml``,
``mnist.yaml``, ``fashion-mnist.yaml``): ``fetch.source`` names the file, so DVC tracks it
as the fetch stage's dependency like any other source. Two kinds:

``kind: digits``
    scikit-learn's bundled 8x8 handwritten digits (offline), written as 8-bit grayscale PNGs
    scaled from 0..16 to 0..255: ``images/<digit>/<index:04d>.png``.

``kind: idx``
    the four MNIST-style IDX ``.gz`` files, pinned by sha256, copied into ``idx/`` with
    ``idx/classes.json``. Write one for another IDX dataset (KMNIST, EMNIST...)::

        kind: idx
        base_url: https://example.org/kmnist/      # where the four files are downloaded from
        base_url_env: TLP_KMNIST_BASE_URL          # optional: a mirror; the hashes still apply
        local_dir: null                            # optional: a folder that may hold the files
        local_dir_env: TLP_KMNIST_DIR              # optional: overrides local_dir
        classes: [o, ki, su, tsu, na, ha, ma, ya, re, wo]   # by label
        files:                                     # exactly the four IDX files
          train-images-idx3-ubyte.gz: {sha256: <hex>}
          ...

    A local copy is used when all four files are there; it is accepted when either its
    ``.gz`` or its decompressed content (``content_sha256``, for re-gzipped copies such as
    Debian's ``dataset-fashion-mnist``) has the pinned hash. Otherwise the files are
    downloaded, and must match ``sha256``.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from tasks.common import StageError, log, sha256_file, write_json
from tasks.params import ParamsError, read_yaml

IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
DESCRIPTOR_SUFFIXES = (".yaml", ".yml")
_HEX64 = r"^[0-9a-fA-F]{64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DigitsDescriptor(_Strict):
    """scikit-learn's bundled digits."""

    kind: Literal["digits"]


class IdxFile(_Strict):
    """The pinned hashes of one IDX ``.gz`` file."""

    sha256: str = Field(..., pattern=_HEX64)
    content_sha256: str | None = Field(None, pattern=_HEX64)


class IdxDescriptor(_Strict):
    """Four MNIST-style IDX files (see the module docstring)."""

    kind: Literal["idx"]
    base_url: str = Field(..., pattern=r"^https?://")
    base_url_env: str | None = None
    local_dir: str | None = None
    local_dir_env: str | None = None
    classes: tuple[str, ...] = Field(..., min_length=2)
    files: dict[str, IdxFile]

    @field_validator("classes")
    @classmethod
    def _class_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value) or any(not n or "/" in n for n in value):
            raise ValueError("must be distinct, non-empty names without '/'")
        return value

    @field_validator("files")
    @classmethod
    def _all_four(cls, value: dict[str, IdxFile]) -> dict[str, IdxFile]:
        if set(value) != set(IDX_FILES):
            raise ValueError(f"must list exactly {', '.join(IDX_FILES)}")
        return value

    def resolved_base_url(self) -> str:
        """``base_url``, or the override from ``base_url_env``, ending with ``/``."""
        url = (os.environ.get(self.base_url_env) if self.base_url_env else None) or self.base_url
        return url if url.endswith("/") else url + "/"

    def resolved_local_dir(self) -> Path | None:
        """``local_dir``, or the override from ``local_dir_env``."""
        override = os.environ.get(self.local_dir_env) if self.local_dir_env else None
        local = override or self.local_dir
        return Path(local) if local else None


Descriptor = DigitsDescriptor | IdxDescriptor
_DESCRIPTOR = TypeAdapter(Annotated[Descriptor, Field(discriminator="kind")])


def is_descriptor(source: str) -> bool:
    """Whether ``fetch.source`` names a dataset descriptor (a ``.yaml`` file)."""
    return source.lower().endswith(DESCRIPTOR_SUFFIXES)


def load_descriptor(path: Path) -> Descriptor:
    """Read and validate a descriptor file.

    Raises:
        StageError: the file is missing, not YAML, or not a valid descriptor; the message
            names the file and every problem.
    """
    try:
        raw = read_yaml(path)
        return _DESCRIPTOR.validate_python(raw)
    except ParamsError as exc:
        raise StageError(f"dataset descriptor {path}: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'][1:])) or 'kind'}: {e['msg']}" for e in exc.errors()
        )
        raise StageError(
            f"{path} is not a valid dataset descriptor ({problems}); see the format in "
            "tasks/builtin.py or data/builtin/mnist.yaml"
        ) from None


@dataclass(frozen=True)
class Written:
    """What a built-in dataset wrote into the fetch stage's output.

    Attributes:
        kind: ``folder`` (``images/<class>/...``) or ``idx`` (``idx/*.gz``).
        files: files written.
        bytes: their size in bytes.
        sha256: the IDX files' sha256 by name; ``None`` for digits.
        origin: where the data came from (a URL, a local folder, or the library).
        details: counts and classes.
    """

    kind: str
    files: int
    bytes: int
    sha256: dict[str, str] | None
    origin: str
    details: dict[str, Any] = field(default_factory=dict)


def write_digits(images: Path) -> Written:
    """Write scikit-learn's digits as PNGs into ``images/<digit>/<index:04d>.png``."""
    import sklearn
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 -> 0..255, rounded (8 -> 128: numpy rounds half to even).
    pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    total = 0
    for index, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
        folder = images / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index:04d}.png"
        Image.fromarray(image).save(path, format="PNG")
        total += path.stat().st_size
    return Written(
        kind="folder",
        files=len(pixels),
        bytes=total,
        sha256=None,
        origin=f"scikit-learn {sklearn.__version__} load_digits",
        details={"classes": [str(label) for label in digits.target_names]},
    )


def write_idx(
    name: str, dataset: IdxDescriptor, idx_dir: Path, download: Callable[..., Any]
) -> Written:
    """Copy the four IDX files (local copy or download) into ``idx_dir``, verified.

    Args:
        name: the dataset's name, for messages (the descriptor's file name).
        dataset: its descriptor.
        idx_dir: the folder to create.
        download: :func:`tasks.download.download` with the cache and retry settings bound.

    Raises:
        StageError: a file does not match its pinned hash, or the headers disagree.
    """
    idx_dir.mkdir(parents=True)
    local = dataset.resolved_local_dir()
    if local is not None and all((local / file).is_file() for file in IDX_FILES):
        for file in IDX_FILES:
            _check_local_copy(name, dataset, local / file)
            shutil.copyfile(local / file, idx_dir / file)
        origin = str(local)
    else:
        if local is not None:
            log.info("no complete local copy of %s in %s; downloading it", name, local)
        base_url = dataset.resolved_base_url()
        where = f"{dataset.base_url_env} ({base_url})" if dataset.base_url_env else base_url
        for file in IDX_FILES:
            fetched = download(
                base_url + file,
                sha256=dataset.files[file].sha256,
                what="a .gz file",
                hint=where,
                mismatch_hint=f"The file is not the {name} release the descriptor pins; if "
                f"{dataset.base_url_env or 'the base URL'} points at a mirror, use a faithful one.",
            )
            shutil.copyfile(fetched.path, idx_dir / file)
        origin = base_url
    counts = idx_counts(idx_dir)
    write_json(idx_dir / "classes.json", list(dataset.classes))
    return Written(
        kind="idx",
        files=len(IDX_FILES),
        bytes=sum((idx_dir / file).stat().st_size for file in IDX_FILES),
        sha256={file: sha256_file(idx_dir / file) for file in IDX_FILES},
        origin=origin,
        details={"counts": counts, "classes": list(dataset.classes)},
    )


def _check_local_copy(name: str, dataset: IdxDescriptor, path: Path) -> None:
    """Accept a local IDX file if its .gz or its decompressed content has the pinned hash."""
    pinned = dataset.files[path.name]
    gz_digest = sha256_file(path)
    if gz_digest == pinned.sha256:
        return
    content_digest = None
    if pinned.content_sha256 is not None:
        digest = hashlib.sha256()
        try:
            with gzip.open(path, "rb") as handle:
                while block := handle.read(1 << 20):
                    digest.update(block)
            content_digest = digest.hexdigest()
        except (OSError, EOFError) as exc:
            content_digest = f"unreadable ({exc})"
        if content_digest == pinned.content_sha256:
            return
    env = dataset.local_dir_env
    fix = f"set {env} to a missing folder to download instead" if env else "remove it"
    raise StageError(
        f"the local copy {path} does not match {name}: its sha256 is {gz_digest} "
        f"(expected {pinned.sha256})"
        + (
            f" and its decompressed sha256 is {content_digest} (expected {pinned.content_sha256})"
            if pinned.content_sha256
            else ""
        )
        + f". Reinstall it or {fix}."
    )


def idx_counts(idx_dir: Path) -> dict[str, int]:
    """Check the IDX headers (3-d images, 1-d labels, matching counts); count per split."""
    counts = {}
    for split in ("train", "t10k"):
        images = read_idx(idx_dir / f"{split}-images-idx3-ubyte.gz", shape_only=True)
        labels = read_idx(idx_dir / f"{split}-labels-idx1-ubyte.gz", shape_only=True)
        if len(images) != 3 or len(labels) != 1 or images[0] != labels[0]:
            raise StageError(
                f"{split}: images of shape {images} but labels of shape {labels} in the IDX "
                "files; the download is inconsistent"
            )
        counts[split] = images[0]
    return counts


def read_idx(path: Path, *, shape_only: bool = False) -> Any:
    """Read a gzipped IDX file of unsigned bytes (the MNIST format).

    Args:
        path: an ``*-ubyte.gz`` file.
        shape_only: read the header only.

    Returns:
        The array (``uint8``, in the file's shape), or only its shape.

    Raises:
        StageError: not a readable gzip, not an unsigned-byte IDX file, or truncated.
    """
    try:
        with gzip.open(path, "rb") as handle:
            zero, dtype_code, ndim = struct.unpack(">HBB", handle.read(4).ljust(4, b"\xff"))
            if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
                raise StageError(f"{path.name} is not an unsigned-byte IDX file")
            dims = handle.read(4 * ndim)
            if len(dims) != 4 * ndim:
                raise StageError(f"{path.name} is truncated: its header is incomplete")
            shape = struct.unpack(f">{ndim}I", dims)
            if shape_only:
                return shape
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise StageError(f"{path.name} is not a readable .gz file: {exc}") from None
    if len(data) != math.prod(shape):
        raise StageError(
            f"{path} holds {len(data)} values, not the {math.prod(shape)} its header says"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)
