"""``tlp predict``: classify images with the exported ONNX model, without TensorFlow.

The model (``models/model.onnx``) is checked and opened by :mod:`tasks.classifier`; only
ONNX Runtime runs it, and TensorFlow, pandas, pyarrow and pydantic are never imported, so
the command starts in well under a second. Images are decoded by
:func:`tasks.imaging.decode`, the function that built the training shards, so an image gets
the same pixels here as in ``evaluate``.

Inputs stream: files are listed lazily, decoded in a thread pool at most two batches ahead
(``--batch-size``), classified a batch at a time, and each answer is written as soon as its
batch is done. Memory depends on the batch size, not on the number of images (``--json``
alone keeps every answer, to print one document at the end; ``--jsonl`` streams one JSON
object per image).

A folder is searched recursively for image suffixes. Only regular files are read: a FIFO,
a device, or a symbolic link leading out of the folder is skipped with its reason, never
opened; files are opened without following links (the folder's own links to its own files
are resolved first), and a file larger than an image can be is refused. A file named on
the command line is always tried, whatever its suffix, but never a FIFO or a device.

With ``--min-confidence P``, an image whose best class has a probability under ``P`` is
labelled ``other``. ``other`` is not one of the model's classes and has no probability: the
probability shown is always the best class's, named beside it (``top_label``,
``top_probability`` and ``below_min_confidence`` in JSON).

With the other class's specialist next to the model, its class refines the model's ``other``
(``other › beagle (0.81 × 0.92)``; in JSON ``label`` and ``specialist``): :mod:`tasks.cascade`.

Exit status: 0 when at least one image was classified (the others are listed with their
reason: on stderr, under ``errors`` in ``--json``, as ``{"path", "error"}`` lines in
``--jsonl``); 1 when the model cannot be used or no image could be classified, or with
``--strict`` when any image failed; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# tasks.imaging, not tasks.prepare: that one imports pandas and pydantic (~0.5 s of start-up).
from tasks.cascade import SPECIALIST_FILE, Specialist, find_specialist, refine, text_line
from tasks.classifier import Classifier, PredictError, load_classifier, probabilities
from tasks.imaging import IMAGE_SUFFIXES, Decoded, Item, decode, decode_in_order

DEFAULT_MODEL = Path("models/model.onnx")
OTHER_LABEL = "other"


@dataclass(frozen=True)
class DecodeLimits:
    """The three ``PrepareParams`` fields that :func:`tasks.imaging.decode` reads.

    The limits are the prepare stage's defaults, and a test checks that they still are
    (building a ``PrepareParams`` would import pydantic and slow every start).
    """

    image_size: tuple[int, int]
    min_side: int = 8
    max_pixels: int = 100_000_000


@dataclass
class Prediction:
    """The answer for one image.

    ``top_label`` is the model's best class and ``top_probability`` its probability.
    ``label`` is ``top_label``, or ``other`` when ``top_probability`` is under the requested
    minimum confidence (then ``below_min_confidence`` is true). ``top_k`` lists the model's
    best classes, best first.
    """

    path: str
    label: str
    top_label: str
    top_probability: float
    below_min_confidence: bool
    top_k: list[dict[str, float | str]] = field(default_factory=list)
    specialist: dict | None = None  # the specialist's label, probability, top_k (tasks.cascade)


@dataclass
class Failure:
    """An input that could not be classified, and why."""

    path: str
    reason: str


# ---------------------------------------------------------------- inputs


def iter_inputs(inputs: Iterable[str | Path]) -> Iterator[Item]:
    """Turn the command line's files and folders into image items, lazily and in order.

    A folder contributes every file with an image suffix below it (hidden names skipped,
    sorted: output order is stable), see :func:`_walk_folder`; a file named explicitly is
    always tried, whatever its suffix. An input that names nothing usable becomes an item
    whose ``reason`` says why.
    """
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = False
            for item in _walk_folder(path):
                found = True
                yield item
            if not found:
                suffixes = " ".join(sorted(IMAGE_SUFFIXES))
                yield Item(str(path), "", reason=f"no image files in this folder (looked for {suffixes})")  # fmt: skip
        elif path.is_file():
            yield Item(str(path), "", file=path)
        elif path.exists():
            yield Item(str(path), "", reason="not a regular file or folder")
        else:
            yield Item(str(path), "", reason="no such file or folder")


def _walk_folder(root: Path) -> Iterator[Item]:
    """Image files below ``root``: each folder's files, then its sub-folders, sorted.

    Sub-folders reached through symbolic links are not entered. A file that is a symbolic
    link is read from its target if that resolves inside ``root``, else skipped; nothing is
    opened here (:func:`tasks.imaging.decode` refuses what is not a regular file).
    """
    real_root = root.resolve()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as scan:
                entries = sorted((e for e in scan if not e.name.startswith(".")), key=lambda e: e.name)  # fmt: skip
        except OSError as exc:
            yield Item(str(folder), "", reason=f"unreadable folder: {exc.strerror or exc}")
            continue
        subfolders = []
        for entry in entries:
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                subfolders.append(path)
            elif path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            elif not entry.is_symlink():
                yield Item(str(path), "", file=path, follow_symlinks=False)
            else:
                target = Path(os.path.realpath(path))
                if target.is_relative_to(real_root):
                    yield Item(str(path), "", file=target, follow_symlinks=False)
                else:
                    reason = f"a symbolic link to {target}, outside the folder {real_root}"
                    yield Item(str(path), "", reason=reason)
        stack.extend(reversed(subfolders))


def load_pixels(path: Path, image_size: tuple[int, int]) -> tuple[np.ndarray | None, str]:
    """Decode one image exactly as the prepare stage does.

    Returns:
        ``(pixels, "")`` with uint8 RGB of shape (height, width, 3), or ``(None, reason)``.
    """
    result = decode(Item(str(path), "", file=path), DecodeLimits(tuple(image_size)))
    return result.pixels, result.reason


# ---------------------------------------------------------------- predicting


def classify(
    classifier: Classifier,
    pixels: np.ndarray,
    paths: Sequence[str],
    top_k: int,
    min_confidence: float,
    specialist: Specialist | None = None,
) -> list[Prediction]:
    """Run a batch of uint8 images and rank the classes.

    Args:
        classifier: from :func:`tasks.classifier.load_classifier`.
        pixels: (batch, height, width, 3) uint8 RGB.
        paths: the images' paths, for the answers.
        top_k: how many classes to list per image (capped at the number of classes).
        min_confidence: below this top-1 probability the answer is ``other``.
        specialist: the other class's specialist, which refines that class's answers.

    Returns:
        One :class:`Prediction` per image.
    """
    k = min(top_k, len(classifier.classes))
    answers = []
    for path, row in zip(paths, probabilities(classifier, pixels), strict=True):
        order = np.argsort(-row, kind="stable")[:k]
        ranked = [{"label": classifier.classes[i], "probability": float(row[i])} for i in order]
        best = float(row[order[0]])
        below = best < min_confidence
        label = OTHER_LABEL if below else ranked[0]["label"]
        answers.append(Prediction(path, label, ranked[0]["label"], best, below, ranked))
    if specialist is not None:
        refine(specialist, pixels, answers, top_k)
    return answers


def predict(
    classifier: Classifier,
    items: Iterable[Item | Path],
    *,
    top_k: int = 3,
    min_confidence: float = 0.0,
    batch_size: int = 32,
    workers: int = 0,
    specialist: Specialist | None = None,
) -> Iterator[Prediction | Failure]:
    """Classify images batch by batch, yielding one result per input, in order.

    Decoding runs in a thread pool (Pillow releases the GIL) at most two batches ahead of
    the model, so memory does not grow with the number of images.

    Args:
        classifier: from :func:`tasks.classifier.load_classifier`.
        items: from :func:`iter_inputs` (or plain paths); may be a generator.
        top_k: classes listed per image.
        min_confidence: below this top-1 probability the label is ``other``.
        batch_size: images per ONNX Runtime call.
        workers: decoding threads; 0 = number of CPUs.
        specialist: the other class's specialist (:func:`tasks.cascade.find_specialist`).

    Yields:
        A :class:`Prediction`, or a :class:`Failure` for an input that could not be decoded.
    """
    items = (i if isinstance(i, Item) else Item(str(i), "", file=Path(i)) for i in items)
    limits = DecodeLimits(classifier.image_size)
    threads = workers or os.cpu_count() or 1
    chunk: list[Decoded] = []
    for result in decode_in_order(items, limits, threads, window=2 * batch_size):
        chunk.append(result)
        if len(chunk) == batch_size:
            yield from _classify_chunk(classifier, chunk, top_k, min_confidence, specialist)
            chunk = []
    yield from _classify_chunk(classifier, chunk, top_k, min_confidence, specialist)


def _classify_chunk(
    classifier: Classifier, chunk: list[Decoded], top_k: int, min_confidence: float,
    specialist: Specialist | None,
) -> Iterator[Prediction | Failure]:  # fmt: skip
    good = [result for result in chunk if result.pixels is not None]
    answers = iter(
        classify(classifier, np.stack([r.pixels for r in good]), [r.item.path for r in good],
                 top_k, min_confidence, specialist) if good else []
    )  # fmt: skip
    for result in chunk:
        yield Failure(result.item.path, result.reason) if result.pixels is None else next(answers)


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
        help="image files or folders (searched recursively; only regular files are read)",
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
        "--min-confidence",
        type=_probability,
        default=0.0,
        metavar="P",
        help=f"answer {OTHER_LABEL!r} when the best class's probability is below P (default: 0,"
        " never); the probability shown stays the best class's",
    )
    parser.add_argument(
        "--specialist", metavar="PATH", help="the other class's specialist (default: "
        f"{SPECIALIST_FILE} next to --model, if there; 'none': the model alone)",
    )  # fmt: skip
    output = parser.add_mutually_exclusive_group()
    output.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document at the end (keeps every answer)",
    )
    output.add_argument(
        "--jsonl", action="store_true", help="print one JSON object per image as it is classified"
    )
    parser.add_argument(
        "--batch-size",
        type=_positive,
        default=32,
        help="images per model call; memory grows with it (default: 32)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="ONNX Runtime and decoding threads (default: all cores)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: on a terminal, once a run passes 2 seconds)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 if any input could not be classified"
    )
    return parser


def _progress_bar(args: argparse.Namespace):
    """A tqdm bar on stderr, or None: forced by --progress, else on terminals, late."""
    automatic = args.progress is None
    if args.progress is False or (
        automatic and (not sys.stderr.isatty() or os.environ.get("TLP_NO_PROGRESS") == "1")
    ):
        return None
    from tqdm import tqdm

    total = sum(1 for _ in iter_inputs(args.inputs))  # names only: nothing is opened
    return tqdm(total=total, desc="predict", unit="img", file=sys.stderr, delay=2.0 if automatic else 0.0)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """``tlp predict IMAGE_OR_FOLDER... [--model M] [--json | --jsonl] [...]``.

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

    # As the prepare stage does: decode() refuses images over max_pixels from their header,
    # so Pillow's warning between 1x and 2x its limit would only be noise.
    Image.MAX_IMAGE_PIXELS = DecodeLimits((1, 1)).max_pixels
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    try:
        classifier = load_classifier(args.model, threads=max(args.threads, 0))
        specialist = None if args.specialist == "none" else find_specialist(
            args.model, classifier, args.specialist and Path(args.specialist), max(args.threads, 0)
        )  # fmt: skip
    except PredictError as exc:
        print(f"ERROR: predict: {exc}", file=sys.stderr)
        return 1
    bar = _progress_bar(args)

    def say(line: str, file=sys.stdout) -> None:
        if bar is not None and file.isatty():  # a line on the bar's terminal: move the bar
            bar.write(line, file=file)
        else:
            print(line, file=file, flush=args.jsonl)

    predictions: list[Prediction] = []  # --json only: the others stream
    failures: list[Failure] = []
    classified = failed = 0
    for result in predict(
        classifier, iter_inputs(args.inputs), top_k=args.top_k,
        min_confidence=args.min_confidence, batch_size=args.batch_size,
        workers=max(args.threads, 0), specialist=specialist,
    ):  # fmt: skip
        if bar is not None:
            bar.update(1)
        if isinstance(result, Failure):
            failed += 1
            if args.json:
                failures.append(result)
            elif args.jsonl:
                say(json.dumps({"path": result.path, "error": result.reason}))
            else:
                say(f"skipped: {result.path}: {result.reason}", file=sys.stderr)
            continue
        classified += 1
        if args.json:
            predictions.append(result)
        elif args.jsonl:
            say(json.dumps(asdict(result)))
        else:
            say(text_line(result, args.min_confidence))
    if bar is not None:
        bar.close()
    if args.json:
        document = {
            "model": str(args.model),
            "classes": classifier.classes,
            "specialist": specialist and specialist.summary(),
            "image_size": list(classifier.image_size),
            "top_k": min(args.top_k, len(classifier.classes)),
            "min_confidence": args.min_confidence,
            "predictions": [asdict(p) for p in predictions],
            "errors": [asdict(f) for f in failures],
        }
        print(json.dumps(document, indent=2))
    if failed:
        print(f"predict: {classified} classified, {failed} skipped", file=sys.stderr)
    if not classified:
        print("ERROR: predict: no image could be classified", file=sys.stderr)
        return 1
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
