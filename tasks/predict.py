"""``tlp predict``: classify images with the exported ONNX model, without TensorFlow.

Everything the model needs travels inside ``models/model.onnx`` (see :mod:`tasks.export`):
the class names, the image size and the preprocessing (inside the graph, which takes RGB
float32 pixels in 0..255, NHWC). Images are decoded by :func:`tasks.imaging.decode`, the
function that built the training shards (EXIF orientation applied, any mode converted to
RGB, resized to the model's image size by :func:`tasks.imaging.resize`), so an image gets
the same pixels here as in ``evaluate``. Only ONNX Runtime runs the model: TensorFlow, whose import alone takes
seconds, is never imported.

Before anything runs, the model file is checked: external-data paths must stay inside the
model's folder, and ``onnx.checker`` runs with ``full_check``.

Exit status: 0 when at least one image was classified (unreadable images are listed with
their reason on stderr and under ``errors`` in ``--json``); 1 when the model cannot be used
or no image could be classified, or with ``--strict`` when any image failed; 2 for bad
arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# tasks.imaging, not tasks.prepare: that one imports pandas and pydantic (~0.5 s of start-up).
from tasks.imaging import IMAGE_SUFFIXES, Item, decode

DEFAULT_MODEL = Path("models/model.onnx")
OTHER_LABEL = "other"
INPUT_NAME = "pixels"  # tasks.export.INPUT_NAME (not imported: that module needs TensorFlow)
OUTPUT_NAME = "probabilities"  # tasks.export.OUTPUT_NAME


class PredictError(ValueError):
    """The model cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class DecodeLimits:
    """The three ``PrepareParams`` fields that :func:`tasks.imaging.decode` reads.

    The limits are the prepare stage's defaults, and a test checks that they still are
    (building a ``PrepareParams`` would import pydantic and slow every start).
    """

    image_size: tuple[int, int]
    min_side: int = 8
    max_pixels: int = 100_000_000


@dataclass(frozen=True)
class Classifier:
    """An ONNX model ready to run, with what its metadata says about its input."""

    path: Path
    session: object  # onnxruntime.InferenceSession
    classes: list[str]
    image_size: tuple[int, int]
    preprocessing: str


@dataclass
class Prediction:
    """The answer for one image.

    ``label`` is the top class, or ``other`` when its probability is under the requested
    minimum confidence; ``top_k`` always lists the model's best classes, best first.
    """

    path: str
    label: str
    probability: float
    top_k: list[dict[str, float | str]] = field(default_factory=list)


@dataclass
class Failure:
    """An input that could not be classified, and why."""

    path: str
    reason: str


# ---------------------------------------------------------------- loading the model


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
        raise PredictError(
            f"model {path} not found. Build it with `tlp run` (or `dvc repro export`), or pass "
            "--model PATH to an exported .onnx file"
        )
    if path.stat().st_size == 0:  # the export stage's int8 placeholder (tasks/export.py)
        raise PredictError(
            f"{path} is empty: no int8 model was built (export.quantize: none). Set "
            "export.quantize: int8 and run `dvc repro export`, or use models/model.onnx"
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
    return Classifier(path, session, classes, (height, width), props.get("preprocessing", ""))


# ---------------------------------------------------------------- inputs


def expand_inputs(inputs: Iterable[str | Path]) -> tuple[list[Path], list[Failure]]:
    """Turn the command line's files and folders into a list of image files.

    A folder contributes every file with an image suffix below it (hidden files skipped,
    sorted, so output order is stable); a file named explicitly is always tried, whatever
    its suffix.

    Returns:
        ``(files, failures)``: the files to classify, and inputs that name nothing usable.
    """
    files: list[Path] = []
    failures: list[Failure] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found += [
                    Path(dirpath, name)
                    for name in sorted(filenames)
                    if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES
                ]
            if not found:
                suffixes = " ".join(sorted(IMAGE_SUFFIXES))
                failures.append(
                    Failure(str(path), f"no image files in this folder (looked for {suffixes})")
                )
            files += found
        elif path.is_file():
            files.append(path)
        elif path.exists():
            failures.append(Failure(str(path), "not a regular file or folder"))
        else:
            failures.append(Failure(str(path), "no such file or folder"))
    return files, failures


def load_pixels(path: Path, image_size: tuple[int, int]) -> tuple[np.ndarray | None, str]:
    """Decode one image exactly as the prepare stage does.

    Returns:
        ``(pixels, "")`` with uint8 RGB of shape (height, width, 3), or ``(None, reason)``.
    """
    result = decode(Item(str(path), "", file=path), DecodeLimits(tuple(image_size)))
    return result.pixels, result.reason


# ---------------------------------------------------------------- predicting


def classify(
    classifier: Classifier, pixels: np.ndarray, top_k: int, min_confidence: float
) -> list[tuple[str, float, list[dict[str, float | str]]]]:
    """Run a batch of uint8 images and rank the classes.

    Args:
        classifier: from :func:`load_classifier`.
        pixels: (batch, height, width, 3) uint8 RGB.
        top_k: how many classes to list per image (capped at the number of classes).
        min_confidence: below this top-1 probability the answer is ``other``.

    Returns:
        One ``(label, probability, top_k)`` per image.
    """
    feed = {INPUT_NAME: pixels.astype(np.float32)}
    (probabilities,) = classifier.session.run([OUTPUT_NAME], feed)
    k = min(top_k, len(classifier.classes))
    answers = []
    for row in probabilities:
        order = np.argsort(-row, kind="stable")[:k]
        ranked = [{"label": classifier.classes[i], "probability": float(row[i])} for i in order]
        best = float(row[order[0]])
        label = ranked[0]["label"] if best >= min_confidence else OTHER_LABEL
        answers.append((label, best, ranked))
    return answers


def predict(
    classifier: Classifier,
    files: Sequence[Path],
    *,
    top_k: int = 3,
    min_confidence: float = 0.0,
    batch_size: int = 32,
    workers: int = 0,
) -> Iterator[Prediction | Failure]:
    """Classify image files, batch by batch, yielding one result per file in order.

    Decoding runs in a thread pool (Pillow releases the GIL) and only one batch of pixels
    is held at a time, so memory does not grow with the number of files.

    Args:
        classifier: from :func:`load_classifier`.
        files: image files (see :func:`expand_inputs`).
        top_k: classes listed per image.
        min_confidence: below this top-1 probability the label is ``other``.
        batch_size: images per ONNX Runtime call.
        workers: decoding threads; 0 = number of CPUs.

    Yields:
        A :class:`Prediction`, or a :class:`Failure` for a file that could not be decoded.
    """
    threads = min(workers or os.cpu_count() or 1, max(len(files), 1))
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            decoded = list(pool.map(lambda f: load_pixels(f, classifier.image_size), chunk))
            batch = [pixels for pixels, _ in decoded if pixels is not None]
            answers = iter(
                classify(classifier, np.stack(batch), top_k, min_confidence) if batch else []
            )
            for file, (pixels, reason) in zip(chunk, decoded, strict=True):
                if pixels is None:
                    yield Failure(str(file), reason)
                else:
                    label, probability, ranked = next(answers)
                    yield Prediction(str(file), label, probability, ranked)


# ---------------------------------------------------------------- command line


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser(prog: str = "tlp predict") -> argparse.ArgumentParser:
    """The ``tlp predict`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Classify images with the exported ONNX model (ONNX Runtime only).",
        epilog="Exit status: 0 if at least one image was classified, 1 if none could be (or "
        "with --strict, if any failed) or the model is unusable, 2 for bad arguments.",
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="IMAGE_OR_FOLDER",
        help="image files or folders (searched recursively)",
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        help=f"exported model (default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--top-k", type=_positive, default=3, help="classes listed per image (default: 3)"
    )
    parser.add_argument(
        "--min-confidence", type=_probability, default=0.0, metavar="P",
        help=f"answer {OTHER_LABEL!r} when the top probability is below P (default: 0, never)",
    )  # fmt: skip
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document instead of text"
    )
    parser.add_argument(
        "--batch-size", type=_positive, default=32, help="images per model call (default: 32)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="ONNX Runtime and decoding threads (default: all cores)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 if any input could not be classified"
    )
    return parser


def _text_line(prediction: Prediction) -> str:
    ranked = ", ".join(f"{r['label']} {r['probability']:.3f}" for r in prediction.top_k)
    return f"{prediction.path}: {prediction.label} ({prediction.probability:.3f})  [{ranked}]"


def main(argv: list[str] | None = None) -> int:
    """``tlp predict IMAGE_OR_FOLDER... [--model M] [--top-k K] [--min-confidence P] [--json]``.

    Args:
        argv: the arguments after the command name (``sys.argv[1:]`` when ``None``).

    Returns:
        The exit status (see the module docstring).
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed by argparse
        return int(exc.code or 0)
    from PIL import Image

    # As the prepare stage's main() does: its decode() treats Pillow's bomb warning as an error.
    Image.MAX_IMAGE_PIXELS = DecodeLimits((1, 1)).max_pixels
    files, failures = expand_inputs(args.inputs)
    try:
        classifier = load_classifier(args.model, threads=max(args.threads, 0))
    except PredictError as exc:
        print(f"ERROR: predict: {exc}", file=sys.stderr)
        return 1
    if not args.json:
        for failure in failures:
            print(f"error: {failure.path}: {failure.reason}", file=sys.stderr)
    predictions: list[Prediction] = []
    for result in predict(
        classifier, files, top_k=args.top_k, min_confidence=args.min_confidence,
        batch_size=args.batch_size, workers=max(args.threads, 0),
    ):  # fmt: skip
        if isinstance(result, Failure):
            failures.append(result)
            if not args.json:
                print(f"error: {result.path}: {result.reason}", file=sys.stderr)
        else:
            predictions.append(result)
            if not args.json:
                print(_text_line(result))
    if args.json:
        document = {
            "model": str(args.model),
            "classes": classifier.classes,
            "image_size": list(classifier.image_size),
            "top_k": min(args.top_k, len(classifier.classes)),
            "min_confidence": args.min_confidence,
            "predictions": [asdict(p) for p in predictions],
            "errors": [asdict(f) for f in failures],
        }
        print(json.dumps(document, indent=2))
    if failures:
        print(
            f"predict: {len(predictions)} classified, {len(failures)} could not be read",
            file=sys.stderr,
        )
    if not predictions:
        print("ERROR: predict: no image could be classified", file=sys.stderr)
        return 1
    return 1 if args.strict and failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
