"""Frozen-backbone features for the train stage, computed once and cached.

When the backbone is pretrained and frozen and nothing changes its input between epochs
(no augmentation, no fine-tuning), its pooled output for an image is the same every epoch.
:func:`cached_features` computes it once per split and keeps it under a key made of the
backbone's content, the data, the pooling, the image size and the engine
(:func:`cache_key`); the head then trains on those vectors in seconds.

The extraction runs on ONNX Runtime by default (``train.feature_engine``): the extractor is
converted with tf2onnx and checked against Keras on a sample first; Keras takes over if the
conversion fails or disagrees.

The folder may be shared by several workspaces at once (``tlp sweep`` links every isolated
run's cache to the project's): it is read and written under one file lock beside it, so
two runs that need the same features compute them once (the second waits, then hits), and
no entry is evicted while another run reads it.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from filelock import FileLock

from tasks.common import atomic_path, log, model_digest, progress
from tasks.dataset import Prepared
from tasks.onnx_io import cpu_session, keras_to_onnx

EXTRACT_BATCH = 16  # the fastest VGG16/MobileNetV2 batch on CPU here; features don't depend on it
FEATURE_OPSET = 17  # the extractor never leaves this process; any opset tf2onnx handles
SPLITS = ("train", "val")
# What the folder is, for whoever finds it (it is a cache, not a DVC output: see dvc.yaml).
NOTE = "README.txt"
NOTE_TEXT = (
    "Backbone features cached by the train stage (tasks/features.py), one folder per\n"
    "backbone, data, pooling and engine; only the latest is kept. Safe to delete.\n"
)


def open_cache(folder: Path) -> None:
    """Create the cache folder (``--features``) with its note, if they are not there."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / NOTE).exists():
        (folder / NOTE).write_text(NOTE_TEXT, encoding="utf-8")


def cache_key(backbone_file: Path, prepared: Prepared, pooling: str, engine: str) -> str:
    """The cache entry's name: backbone content, data, pooling, image size and engine."""
    digest = hashlib.sha256(model_digest(backbone_file))
    digest.update(prepared.digest())
    digest.update(f"{pooling}|{prepared.image_size}|{engine}".encode())
    return digest.hexdigest()[:20]


def cached_features(
    folder: Path, key: str, backbone, prepared: Prepared, pooling: str,
    engine: str = "keras", batch_size: int = EXTRACT_BATCH,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Load the features for ``key`` from ``folder``, computing and storing them if absent.

    Only one key is kept: features of older backbones or data are deleted.

    Args:
        folder: the cache folder (``--features``).
        key: the entry's name (:func:`cache_key`).
        backbone: the frozen backbone (raw pixels -> feature map).
        prepared: the prepared dataset.
        pooling: ``avg``, ``max`` or ``flatten``.
        engine: ``onnxruntime`` or ``keras``.
        batch_size: images per extraction batch.

    Returns:
        ``{"train": (n, width) float32, "val": (m, width) float32}``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    shared = folder.resolve()  # a sweep's clones link theirs to one folder: one lock for all
    with FileLock(str(shared.parent / f".{shared.name}.lock")):  # a parallel run: wait, then hit
        return _load_or_extract(folder, key, backbone, prepared, pooling, engine, batch_size)


def _load_or_extract(
    folder: Path, key: str, backbone, prepared: Prepared, pooling: str, engine: str,
    batch_size: int,
) -> dict[str, np.ndarray]:  # fmt: skip
    target = folder / key
    if all((target / f"{s}.npy").exists() for s in SPLITS):
        log.info("feature cache hit: %s", target)
        return {s: np.load(target / f"{s}.npy") for s in SPLITS}
    log.info("feature cache miss: extracting backbone features once into %s", target)
    started = time.perf_counter()
    sample = prepared.load("train", limit=2)[0].astype(np.float32)  # checks ONNX vs Keras
    extractor = feature_extractor(backbone, pooling, engine, sample if len(sample) else None)
    features = {
        s: extract_features(backbone, prepared, s, pooling, batch_size, extractor) for s in SPLITS
    }
    log.info(
        "extracted %d feature vectors with %s in %.1fs",
        sum(len(f) for f in features.values()),
        extractor.engine,
        time.perf_counter() - started,
    )
    for old in folder.iterdir():
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        elif old.name != NOTE:
            old.unlink()
    with atomic_path(target, directory=True) as tmp:
        for split, array in features.items():
            np.save(tmp / f"{split}.npy", array)
    return features


def training_features(
    folder: Path, backbone_file: Path, backbone, prepared: Prepared, pooling: str, engine: str,
    full: Prepared | None = None,
) -> dict[str, np.ndarray]:  # fmt: skip
    """The head's training features: :func:`cached_features` of ``prepared``, or, when it
    is a subset of ``full`` (the other-class specialist), :func:`subset_features`."""
    if full is None:
        key = cache_key(backbone_file, prepared, pooling, engine)
        return cached_features(folder, key, backbone, prepared, pooling, engine)
    key = cache_key(backbone_file, full, pooling, engine)
    return subset_features(folder, key, backbone, full, prepared, pooling, engine)


def subset_features(
    folder: Path, key: str, backbone, full: Prepared, subset: Prepared, pooling: str,
    engine: str = "keras",
) -> dict[str, np.ndarray]:  # fmt: skip
    """The features of ``subset`` (some rows of ``full``), from ``full``'s cache entry if any.

    The other-class specialist trains on a subset of the images the train stage cached:
    its vectors are sliced from entry ``key`` (read only: the folder is the train stage's
    output). Without that entry, only the subset's features are extracted, and not stored.

    Returns:
        ``{"train": ..., "val": ...}`` float32, in ``subset``'s manifest order.
    """
    import pandas as pd

    target = folder / key
    if all((target / f"{s}.npy").exists() for s in SPLITS):
        log.info("feature cache hit (the whole dataset's): %s", target)
        sliced = {}
        for split in SPLITS:
            wanted = pd.MultiIndex.from_frame(subset.rows(split)[["shard", "offset"]])
            rows = pd.MultiIndex.from_frame(full.rows(split)[["shard", "offset"]])
            sliced[split] = np.asarray(
                np.load(target / f"{split}.npy", mmap_mode="r")[rows.isin(wanted)]
            )
        return sliced
    log.info("no cached features of the whole dataset; extracting the subset's only")
    sample = subset.load("train", limit=2)[0].astype(np.float32)
    extractor = feature_extractor(backbone, pooling, engine, sample if len(sample) else None)
    return {
        s: extract_features(backbone, subset, s, pooling, EXTRACT_BATCH, extractor) for s in SPLITS
    }


@dataclass
class FeatureExtractor:
    """The frozen backbone plus pooling, as a function of a float32 pixel batch."""

    run: Callable[[np.ndarray], np.ndarray]
    engine: str  # "onnxruntime" or "keras"
    width: int  # features per image


def feature_extractor(
    backbone, pooling: str, engine: str = "keras", sample: np.ndarray | None = None
) -> FeatureExtractor:
    """Backbone → global pooling (or flatten) as a batch function on ``engine``.

    With ``onnxruntime`` the Keras graph is converted with tf2onnx and, given a ``sample``
    batch of float32 pixels, checked against Keras on it; if the conversion fails or
    disagrees, Keras is used and the reason is logged (the features are the same either
    way, within float32 rounding).
    """
    inputs = keras.Input(backbone.input_shape[1:])
    x = backbone(inputs, training=False)
    if pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D()(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D()(x)
    else:
        x = keras.layers.Flatten()(x)
    extractor = keras.Model(inputs, x)
    width = int(x.shape[-1])

    def on_keras(batch: np.ndarray) -> np.ndarray:
        return np.asarray(extractor.predict_on_batch(batch), np.float32)

    if engine == "onnxruntime":
        try:
            on_onnx = _onnx_runner(extractor)
        except Exception as exc:  # tf2onnx raises whatever it hits on layers it can't convert
            log.warning("feature extraction: ONNX Runtime unavailable (%s); using Keras", exc)
        else:
            if sample is None or _agrees(on_onnx(sample), on_keras(sample)):
                return FeatureExtractor(on_onnx, "onnxruntime", width)
    return FeatureExtractor(on_keras, "keras", width)


def _onnx_runner(extractor) -> Callable[[np.ndarray], np.ndarray]:
    """``extractor`` converted to ONNX, as a batch function on an ONNX Runtime session."""
    started = time.perf_counter()
    proto = keras_to_onnx(extractor, extractor.input_shape[1:], FEATURE_OPSET, "pixels", "features")
    session = cpu_session(proto)
    log.info(
        "feature extraction: backbone converted to ONNX in %.1fs", time.perf_counter() - started
    )
    return lambda batch: session.run(None, {"pixels": batch})[0]


def _agrees(features: np.ndarray, expected: np.ndarray) -> bool:
    """ONNX Runtime's features match Keras's within float32 rounding (else a warning)."""
    scale = max(1.0, float(np.abs(expected).max()))
    diff = float(np.abs(features - expected).max())
    if diff <= 1e-3 * scale:
        return True
    log.warning(
        "feature extraction: ONNX Runtime differs from Keras by %g (scale %g); using Keras",
        diff,
        scale,
    )
    return False


def extract_features(
    backbone, prepared: Prepared, split: str, pooling: str, batch_size: int,
    extractor: FeatureExtractor | None = None,
) -> np.ndarray:  # fmt: skip
    """Backbone outputs (globally pooled unless ``pooling`` is ``flatten``) for a split.

    ``extractor`` (from :func:`feature_extractor`) is built from ``backbone`` when absent.

    Returns:
        ``(images in the split, extractor.width)`` float32, in manifest order.
    """
    extractor = extractor or feature_extractor(backbone, pooling)
    total = prepared.count(split)
    out = np.empty((total, extractor.width), np.float32)
    done = 0
    with progress(total=total, desc=f"features {split} ({extractor.engine})", unit="img") as bar:
        for images, _ in prepared.batches(split, batch_size):
            out[done : done + len(images)] = extractor.run(images.astype(np.float32))
            done += len(images)
            bar.update(len(images))
    return out
