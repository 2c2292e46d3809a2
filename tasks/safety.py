"""Refuse model files that could run code when loaded.

A ``.keras`` archive or a full-model ``.h5`` carries a config that names classes and
modules; a ``Lambda`` layer carries marshalled Python bytecode. Keras' ``safe_mode`` stops
the bytecode, but we check before Keras sees the file at all: only layers from ``keras``
itself and this project's registered ``tlp>`` layers are accepted.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_OUR_MODULES = {"tasks.layers"}
# "__lambda__" is how Keras serializes a Python lambda (marshalled bytecode) anywhere in a
# config, e.g. as an activation; the others wrap foreign code (SavedModel, pickled torch).
_FORBIDDEN_CLASSES = {
    "Lambda",
    "__lambda__",
    "TFSMLayer",
    "TorchModuleWrapper",
    "JaxLayer",
    "FlaxLayer",
}
_MAX_CONFIG_BYTES = 64 * 1024 * 1024  # a real model config is kilobytes to a few megabytes


class UnsafeModelError(ValueError):
    """A model file names code outside Keras and this project."""


def _walk(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def check_config(config: Any, source: str) -> None:
    """Raise :class:`UnsafeModelError` if a Keras config names a Lambda or foreign module.

    Args:
        config: the parsed model config (``config.json`` of a ``.keras`` archive).
        source: the file it came from, for the message.
    """
    for node in _walk(config):
        class_name = node.get("class_name")
        if not isinstance(class_name, str):
            continue
        if class_name in _FORBIDDEN_CLASSES or class_name.endswith(">Lambda"):
            raise UnsafeModelError(
                f"{source}: refusing to load: it contains a {class_name} layer, which runs "
                "arbitrary Python code. Rebuild the model without it, or pass plain weights."
            )
        module = node.get("module")
        registered = node.get("registered_name") or ""
        ours = module in _OUR_MODULES and registered.startswith("tlp>")
        if (
            isinstance(module, str)
            and module
            and not ours
            and not (module == "keras" or module.startswith("keras.") or module == "builtins")
        ):
            raise UnsafeModelError(
                f"{source}: refusing to load: it names module {module!r} (class {class_name!r}); "
                "only Keras layers and this project's layers are allowed."
            )
        if (
            module is None
            and registered
            and not registered.startswith("tlp>")
            and "fn" not in node.get("config", {})
        ):
            raise UnsafeModelError(
                f"{source}: refusing to load: it needs the custom object {registered!r}."
            )


def check_model_file(path: str | Path) -> None:
    """Check a ``.keras``/``.h5``/``.weights.h5`` file before any Keras loader opens it.

    Raises:
        UnsafeModelError: the file holds a model config with unsafe layers or modules.
        ValueError: the file is not a Keras model or weights file.
    """
    path = Path(path)
    with path.open("rb") as handle:
        magic = handle.read(8)
    if magic.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = set(archive.namelist())
                if "config.json" in names:
                    if archive.getinfo("config.json").file_size > _MAX_CONFIG_BYTES:
                        raise UnsafeModelError(
                            f"{path}: refusing to load: config.json is too large"
                        )
                    _check_json(archive.read("config.json"), str(path))
        except (zipfile.BadZipFile, OSError) as exc:
            raise ValueError(f"{path}: not a valid .keras archive ({exc})") from None
        return
    if magic == b"\x89HDF\r\n\x1a\n":
        import h5py

        try:
            with h5py.File(path, "r") as handle:
                # A legacy full-model .h5 keeps its architecture in `model_config` and its
                # compile settings (losses, metrics: possibly lambdas) in `training_config`.
                raws = [handle.attrs.get(key) for key in ("model_config", "training_config")]
        except OSError as exc:
            raise ValueError(f"{path}: not a readable HDF5 weights file ({exc})") from None
        for raw in raws:
            if raw is not None:
                _check_json(raw.decode() if isinstance(raw, bytes) else str(raw), str(path))
        return
    raise ValueError(
        f"{path}: not a Keras weights file (expected a .h5 / .weights.h5 HDF5 file or a .keras "
        "archive)"
    )


def _check_json(text: str | bytes, source: str) -> None:
    try:
        config = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{source}: the model config is not valid JSON ({exc})") from None
    except RecursionError:
        raise UnsafeModelError(
            f"{source}: refusing to load: the config is nested too deeply"
        ) from None
    try:
        check_config(config, source)
    except RecursionError:
        raise UnsafeModelError(
            f"{source}: refusing to load: the config is nested too deeply"
        ) from None


def load_model_safely(path: str | Path, **kwargs: Any):
    """``keras.saving.load_model`` after :func:`check_model_file`, always in ``safe_mode``."""
    import keras

    import tasks.layers  # noqa: F401  (registers the tlp> layers)

    check_model_file(path)
    return keras.saving.load_model(path, safe_mode=True, **kwargs)
