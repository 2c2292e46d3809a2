"""``tlp predict``'s cascade: the main model, then the other class's specialist.

When the pipeline trained a specialist (``train.other_specialist``), the export_other stage
wrote ``other/model.onnx`` next to the main model, with ``specialist_of`` in its metadata: the
main model's class whose images it tells apart (``other``). An image the main model puts
in that class goes to the specialist, and its answer is the specialist's class, with both
probabilities: ``other › beagle (0.81 × 0.92)``. No such file (the folder holds only
a README.md while the specialist is off) means no cascade. ONNX Runtime only, like predict;
:func:`text_line` is how predict prints an answer, through one model or both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.classifier import Classifier, PredictError, load_classifier, probabilities

SPECIALIST_FILE = "other/model.onnx"  # the export_other stage's output, by the main model


@dataclass(frozen=True)
class Specialist:
    """The other class's specialist, and the main model's class it refines."""

    classifier: Classifier
    refines: str

    def summary(self) -> dict[str, Any]:
        """What ``tlp predict --json`` says about the specialist."""
        return {"model": str(self.classifier.path), "refines": self.refines,
                "classes": self.classifier.classes}  # fmt: skip


def find_specialist(
    model: Path, main: Classifier, path: Path | None = None, threads: int = 0
) -> Specialist | None:
    """The specialist at ``path`` (default: ``other/model.onnx`` by ``model``), if there is one.

    Raises:
        PredictError: ``path`` was given but is missing or empty, or the specialist does not
            fit the main model (no ``specialist_of`` class of it, another image size).
    """
    given = path is not None
    path = path if given else model.parent / SPECIALIST_FILE
    if not given and not path.is_file():
        return None  # no specialist trained: the main model alone
    specialist = load_classifier(path, threads)
    refines = specialist.specialist_of
    if refines is None or refines not in main.classes:
        raise PredictError(
            f"{path} is not a specialist of {model} (its specialist_of metadata is {refines!r}, "
            f"the model's classes are {main.classes}); re-run `dvc repro` or pass --specialist none"
        )
    if specialist.image_size != main.image_size:
        raise PredictError(
            f"{path} takes {specialist.image_size} images, {model} {main.image_size}; re-run "
            "`dvc repro` so both come from the same pipeline run"
        )
    return Specialist(specialist, refines)


def refine(specialist: Specialist, pixels: np.ndarray, answers: list[Any], top_k: int) -> None:
    """Send the images the main model put in the specialist's class to it; update the answers.

    An answer already below ``--min-confidence`` is left as it is. A refined answer's
    ``label`` becomes the specialist's class and its ``specialist`` holds that class, its
    probability and the specialist's ``top_k`` classes.
    """
    routed = [
        i for i, answer in enumerate(answers)
        if answer.top_label == specialist.refines and not answer.below_min_confidence
    ]  # fmt: skip
    if not routed:
        return
    classes = specialist.classifier.classes
    k = min(top_k, len(classes))
    for i, row in zip(routed, probabilities(specialist.classifier, pixels[routed]), strict=True):
        order = np.argsort(-row, kind="stable")[:k]
        ranked = [{"label": classes[j], "probability": float(row[j])} for j in order]
        answers[i].label = ranked[0]["label"]
        answers[i].specialist = {**ranked[0], "top_k": ranked}


def text_line(answer: Any, min_confidence: float) -> str:
    """``tlp predict``'s line for one answer; a refined one shows its path through both
    models: ``photo.jpg: other › beagle (0.81 × 0.92)  [other 0.810, ...]``."""
    ranked = ", ".join(f"{r['label']} {r['probability']:.3f}" for r in answer.top_k)
    if answer.below_min_confidence:
        best = f"{answer.top_label} {answer.top_probability:.3f}"
        why = f"best class {best}, under --min-confidence {min_confidence:g}"
        return f"{answer.path}: {answer.label} ({why})  [{ranked}]"
    if answer.specialist:
        fine = answer.specialist
        return (
            f"{answer.path}: {answer.top_label} › {fine['label']} "
            f"({answer.top_probability:.2f} × {fine['probability']:.2f})  [{ranked}]"
        )
    return f"{answer.path}: {answer.label} ({answer.top_probability:.3f})  [{ranked}]"
