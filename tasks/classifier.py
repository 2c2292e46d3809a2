"""The exported ONNX classifier, checked and opened in ONNX Runtime (no TensorFlow).

Everything the model needs travels inside ``models/model.onnx`` (see :mod:`tasks.export`):
the class names, the image size and the preprocessing (inside the graph, which takes RGB
float32 pixels in 0..255, NHWC). Before anything runs, the model file is checked:
external-data paths must stay inside the model's folder, and ``onnx.checker`` runs with
``full_check``. ``tlp predict`` (:mod:`tasks.predict`) is its user.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INPUT_NAME = "pixels"  # tasks.onnx_io.INPUT_NAME (not imported: tlp predict stays light)
OUTPUT_NAME = "probabilities"  # tasks.onnx_io.OUTPUT_NAME


class PredictError(ValueError):
    """The model cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Classifier:
    """An ONNX model ready to run, with what its metadata says about its input."""

    path: Path
    session: object  # onnxruntime.InferenceSession
    classes: list[str]
    image_size: tuple[int, int]
    preprocessing: str
    specialist_of: str | None = None  # set on the other class's specialist (tasks.cascade)


def _tensors_of_graph(graph) -> Iterator:
    """Every tensor stored in a graph: initializers and attribute tensors, subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _tensors_of_attributes(node.attribute)


def _tensors_of_attributes(attributes) -> Iterator:
    for attribute in attributes:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        if attribute.HasField("sparse_tensor"):
            yield attribute.sparse_tensor.values
            yield attribute.sparse_tensor.indices
        if attribute.HasField("g"):
            yield from _tensors_of_graph(attribute.g)
        for subgraph in attribute.graphs:
            yield from _tensors_of_graph(subgraph)


def check_external_data(model, folder: Path, source: str) -> None:
    """Refuse a model whose external data would be read from outside ``folder``.

    An ONNX file may keep tensors in other files named by relative paths; a crafted file
    could name ``../../etc/passwd`` or an absolute path, or reach out through a symlink.
    Every location must resolve (symlinks followed) to a file inside the model's folder.

    Args:
        model: the ``ModelProto``, loaded without its external data.
        folder: the folder that holds the model file.
        source: the model's path, for the message.

    Raises:
        PredictError: naming the tensor and the offending location.
    """
    from onnx.external_data_helper import uses_external_data

    root = folder.resolve()
    tensors = [*_tensors_of_graph(model.graph)]
    for function in model.functions:
        for node in function.node:
            tensors.extend(_tensors_of_attributes(node.attribute))
    for tensor in tensors:
        if not uses_external_data(tensor):
            continue
        location = next(
            (entry.value for entry in tensor.external_data if entry.key == "location"), ""
        )
        target = (root / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(root):
            raise PredictError(
                f"refusing to load {source}: tensor {tensor.name!r} keeps its data in "
                f"{location!r}, outside the model's folder {root}. External data must sit next "
                "to the .onnx file; re-export the model (tasks.export) instead of using this file"
            )


def _metadata(props: dict[str, str], key: str, source: str):
    if key not in props:
        raise PredictError(
            f"{source} has no {key!r} metadata: it was not exported by this pipeline. Export it "
            "with the export stage (`dvc repro export`), which records classes and image size"
        )
    try:
        return json.loads(props[key])
    except json.JSONDecodeError:
        raise PredictError(
            f"{source}: metadata {key!r} is not valid JSON: {props[key]!r}"
        ) from None


def load_classifier(path: str | Path, threads: int = 0) -> Classifier:
    """Check an exported model and open it in ONNX Runtime.

    Args:
        path: the ``.onnx`` file written by the export stage.
        threads: ONNX Runtime intra-op threads; 0 lets it use every core.

    Returns:
        A :class:`Classifier`.

    Raises:
        PredictError: the file is missing, is not valid ONNX, points outside its folder for
            external data, fails ``onnx.checker``, or lacks this pipeline's metadata.
    """
    import onnx
    from google.protobuf.message import Error as ProtobufError

    path = Path(path)
    if not path.is_file():
        # A stage's folder for an optional model (int8, the specialist) holds only a note
        # while the setting that builds the model is off: the note says which setting.
        note = path.with_name("README.md")
        if note.is_file() and (text := folder_note(note)):
            raise PredictError(f"{path} does not exist. {text}")
        raise PredictError(
            f"model {path} not found. Build it with `tlp run` (or `dvc repro export`), or pass "
            "--model PATH to an exported .onnx file"
        )
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (OSError, ValueError, ProtobufError) as exc:
        raise PredictError(f"{path} is not a readable ONNX model: {exc}") from None
    check_external_data(proto, path.parent, str(path))
    try:
        # The path form checks external data files as well, and handles models over 2 GB.
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        raise PredictError(f"{path} failed onnx.checker (full check): {exc}") from None
    props = {prop.key: prop.value for prop in proto.metadata_props}
    classes = _metadata(props, "classes", str(path))
    image_size = _metadata(props, "image_size", str(path))
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise PredictError(
            f"{path}: metadata 'classes' must be a non-empty list of names, got {classes!r}"
        )
    if not (
        isinstance(image_size, list)
        and len(image_size) == 2
        and all(type(v) is int and v > 0 for v in image_size)
    ):
        raise PredictError(
            f"{path}: metadata 'image_size' must be [height, width], got {image_size!r}"
        )
    del proto  # the session holds its own copy

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise PredictError(
            f"{path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, found inputs "
            f"{sorted(inputs)} and outputs {sorted(outputs)}; re-export with the export stage"
        )
    shape = inputs[INPUT_NAME].shape
    height, width = image_size
    if len(shape) != 4 or list(shape[1:]) != [height, width, 3]:
        raise PredictError(
            f"{path}: input {INPUT_NAME!r} has shape {shape}, but the metadata says images are "
            f"{height}x{width} RGB (expected [batch, {height}, {width}, 3])"
        )
    return Classifier(
        path, session, classes, (height, width), props.get("preprocessing", ""),
        props.get("specialist_of"),
    )  # fmt: skip


def probabilities(classifier: Classifier, pixels: np.ndarray) -> np.ndarray:
    """The model's class probabilities for a batch of (batch, height, width, 3) uint8 images."""
    feed = {INPUT_NAME: pixels.astype(np.float32)}
    (result,) = classifier.session.run([OUTPUT_NAME], feed)
    return result


def folder_note(note: Path, limit: int = 2000) -> str:
    """The note a stage leaves in a model's folder instead of the model, on one line.

    Its heading and paragraphs are joined, the Markdown marks (``#``, backquotes) dropped;
    at most ``limit`` characters are read. An empty note gives "".
    """
    with note.open(encoding="utf-8", errors="replace") as handle:
        text = handle.read(limit)
    lines = [line.strip().lstrip("#").strip().replace("`", "") for line in text.splitlines()]
    heading, *body = [line for line in lines if line] or [""]
    return f"{heading}: {' '.join(body)}" if body else heading
