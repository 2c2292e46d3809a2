"""Typed pipeline parameters: ``params.yaml`` parsed once, at the edge.

Every stage reads its own section (stage name = module name = section name). Unknown keys,
wrong types and sections that contradict each other (:mod:`tasks.checks`) fail with
:class:`ParamsError`, whose message names the key, what was given and what is allowed.

The shipped ``params.yaml`` is the one place defaults live: every key is required here, so
what DVC tracks (the keys in ``params.yaml``) is all a stage reads, and no default hides in
code. :func:`with_changes` derives a section from another one (tests start from the
shipped file and change what they need).

``params.yaml`` is read by :mod:`tasks.paramsfile`, with the YAML rules DVC uses.
"""

from __future__ import annotations

import copy
import reprlib
import typing
from pathlib import Path, PurePosixPath
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from tasks.paramsfile import ParamsError, parse_yaml, read_yaml  # noqa: F401 (the params API)
from tasks.urls import SecretInURLError, check_url

STAGES = ("fetch", "prepare", "backbone", "train", "evaluate", "export")
# numpy and keras.utils.set_random_seed accept seeds in [0, 2**32 - 1].
MAX_SEED = 2**32 - 1
_SHORT = reprlib.Repr()  # keyword arguments need Python 3.12
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlist = _SHORT.maxdict = 6
_SHORT.maxlevel = 3


def _is_numeric(annotation: Any) -> bool:
    """``int``, ``float`` or a tuple of them: fields where YAML ``true`` is a typo, not a 1."""
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) is tuple:
        return all(arg in (int, float, Ellipsis) for arg in typing.get_args(annotation))
    return False


class _Section(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` in YAML would pass every `gt=0` check and then
    # break training (an infinite learning rate) far from the typo.
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode turns `epochs: true` into 1; a boolean in a numeric field is
        # almost always a mistake, so refuse it (strings like "1e-3" are still accepted:
        # PyYAML reads `1e-3` without a dot as a string).
        annotation = cls.model_fields[info.field_name].annotation
        items = value if isinstance(value, list | tuple) else [value]
        if _is_numeric(annotation) and any(isinstance(item, bool) for item in items):
            raise ValueError("must be a number, not true/false")
        return value


class FetchParams(_Section):
    """Where the raw images come from (``fetch`` section)."""

    source: str = Field(
        ...,
        description="a dataset descriptor (data/builtin/digits.yaml, mnist.yaml, "
        "fashion-mnist.yaml) | http(s) URL of an archive | local archive | local folder of "
        "class sub-folders",
    )
    sha256: str | None = Field(..., pattern=r"^[0-9a-fA-F]{64}$")
    timeout_s: float = Field(..., gt=0)
    retries: int = Field(..., ge=0, le=20)
    max_members: int = Field(..., gt=0)
    max_total_bytes: int = Field(..., gt=0)
    max_member_bytes: int = Field(..., gt=0)

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        # Returned as written: dvc.yaml uses the same text as a dependency path or URL.
        if not value.strip():
            raise ValueError("must not be empty; use data/builtin/digits.yaml, a URL, or a path")
        if value.startswith("~"):
            raise ValueError("write the full path: DVC, which tracks the source, does not expand ~")
        if "://" in value:
            check_url(value)  # it parses, and holds no credentials (they would be logged)
        if value.startswith("builtin:"):
            name = value.removeprefix("builtin:")
            raise ValueError(
                f"{value!r} is no longer accepted: built-in datasets are descriptor files "
                f"now; use data/builtin/{name}.yaml"
            )
        return value


class PrepareParams(_Section):
    """Decoding, validation, splitting and sharding (``prepare`` section)."""

    image_size: tuple[int, int]
    val_fraction: float = Field(..., ge=0.0, lt=1.0)
    test_fraction: float = Field(..., gt=0.0, lt=1.0)
    min_images_per_class: int = Field(..., ge=1)
    other_class: str | None
    max_bad_fraction: float = Field(..., ge=0.0, le=1.0)
    imbalance_warn_ratio: float = Field(..., ge=1.0)
    shard_size: int = Field(..., ge=1)
    min_side: int = Field(..., ge=1)
    max_pixels: int = Field(..., ge=1)
    workers: int = Field(..., ge=0, description="decode threads; 0 = number of CPUs + 1")

    @field_validator("image_size")
    @classmethod
    def _positive_size(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 8 or max(value) > 2048:
            raise ValueError(
                f"must be two ints between 8 and 2048 (height, width), got {list(value)}"
            )
        return value

    def model_post_init(self, _context: Any) -> None:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ParamsError(
                "prepare.val_fraction + prepare.test_fraction must be below 0.9, got "
                f"{self.val_fraction} + {self.test_fraction}"
            )


class SimpleCnnParams(_Section):
    """The course's MNIST CNN: conv blocks with configurable filters, stride, padding, pooling."""

    filters: tuple[int, ...]
    kernel_size: int = Field(..., ge=1, le=15)
    strides: int = Field(..., ge=1, le=4)
    padding: Literal["same", "valid"]
    pool_size: int = Field(..., ge=1, le=4)

    @field_validator("filters")
    @classmethod
    def _filters(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(f < 1 for f in value):
            raise ValueError(f"must be a non-empty list of positive ints, got {list(value)}")
        return value


class BackboneParams(_Section):
    """Which pretrained feature extractor to use (``backbone`` section)."""

    arch: str
    weights: str = Field(
        ..., description="imagenet | none | the name of a weights file in data/weights/"
    )
    seed: int = Field(
        ..., ge=0, le=MAX_SEED, description="seeds the initial weights of untrained layers"
    )
    simple_cnn: SimpleCnnParams

    @field_validator("arch")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower()

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        # A weights file lives in data/weights/, so that DVC tracks it as a dependency of
        # the backbone stage (dvc.yaml: data/weights/${backbone.weights}).
        if value in ("imagenet", "none"):
            return value
        if value.strip().lower() in ("imagenet", "none", ""):
            raise ValueError("must be imagenet or none, in lower case")
        path = PurePosixPath(value.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts or value.startswith("~"):
            raise ValueError(
                "must be imagenet, none, or the name of a file in data/weights/; copy or link "
                "the file into data/weights/ and set backbone.weights to its name"
            )
        return value


class FineTuneParams(_Section):
    """Optional second phase: unfreeze the top layers of the backbone."""

    enabled: bool
    layers: int = Field(..., ge=1)
    epochs: int = Field(..., ge=1)
    learning_rate: float = Field(..., gt=0)


class TrainParams(_Section):
    """The classification head and its training (``train`` section)."""

    epochs: int = Field(..., ge=1)
    batch_size: int = Field(..., ge=1)
    learning_rate: float = Field(..., gt=0)
    dropout: float = Field(..., ge=0.0, lt=1.0)
    pooling: Literal["avg", "max", "flatten"]
    dense_units: int = Field(
        ..., ge=0, description="hidden Dense layer before the classifier; 0 = none"
    )
    monitor: str
    early_stopping_patience: int = Field(..., ge=0, description="0 disables early stopping")
    augment: bool
    feature_cache: bool
    feature_engine: Literal["onnxruntime", "keras"] = Field(
        ...,
        description="runs the frozen backbone to fill the feature cache; onnxruntime is "
        "1.3-2x faster on CPU and falls back to keras if the conversion fails",
    )
    seed: int = Field(..., ge=0, le=MAX_SEED)
    fine_tune: FineTuneParams
    other_specialist: bool = Field(
        ...,
        description="also train a model on the classes merged into prepare.other_class "
        "(stages train_other, export_other); needs prepare.other_class",
    )
    distribute: Literal["none", "mirrored"] = Field(
        ..., description="mirrored: tf.distribute.MirroredStrategy over train.devices"
    )
    devices: list[str] | None = Field(
        ..., min_length=1, max_length=64, description="with mirrored, e.g. [GPU:0, GPU:1]; "
        "null: every local GPU (the CPU if there is none)",
    )  # fmt: skip

    @field_validator("monitor")
    @classmethod
    def _monitor(cls, value: str) -> str:
        allowed = {"val_loss", "val_accuracy", "loss", "accuracy"}
        if value not in allowed:
            raise ValueError(f"must be one of {sorted(allowed)}, got {value!r}")
        return value


class EvaluateParams(_Section):
    """Metrics on the test split (``evaluate`` section)."""

    top_k: int = Field(..., ge=1, description="top-k accuracy, reported when k < classes")
    batch_size: int = Field(..., ge=1)
    allow_weak: bool = Field(
        ..., description="write a model no better than guessing, with warnings, instead of failing"
    )
    min_accuracy: float | None = Field(..., ge=0.0, le=1.0)
    min_macro_f1: float | None = Field(..., ge=0.0, le=1.0)
    explain: int = Field(..., ge=0, le=64, description="test images in plots/explain.png")
    explain_layer: str | None = Field(..., description="layer for Grad-CAM; null: the last conv")
    errors: int = Field(..., ge=0, le=64, description="images in plots/errors.png")


class ExportParams(_Section):
    """ONNX export, its parity gate and the gated int8 model (``export`` section)."""

    opset: int = Field(..., ge=13, le=21)
    atol: float = Field(..., gt=0)
    min_top1_agreement: float = Field(..., ge=0.0, le=1.0)
    max_parity_images: int = Field(..., ge=1)
    quantize: Literal["none", "int8"]
    calibration_images: int = Field(..., ge=1, le=10_000)
    int8_min_agreement: float = Field(..., ge=0.0, le=1.0)
    int8_max_accuracy_drop: float = Field(..., ge=0.0, le=1.0)


class Params(_Section):
    """All of ``params.yaml``."""

    fetch: FetchParams
    prepare: PrepareParams
    backbone: BackboneParams
    train: TrainParams
    evaluate: EvaluateParams
    export: ExportParams


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        section = ".".join(str(p) for p in error["loc"][:-1])
        allowed = _allowed_keys(error["loc"][:-1])
        where = f"{section}." if section else ""
        return f"unknown key {where}{error['loc'][-1]} (allowed: {', '.join(allowed)})"
    if isinstance(error.get("ctx", {}).get("error"), SecretInURLError):
        return f"{key}: {message}"  # the value holds a secret: never echo it
    # reprlib: a huge value (say, one a YAML alias expanded) is never printed whole.
    return f"{key}: {message} (got {_SHORT.repr(error.get('input'))})"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Params
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def parse_params(raw: dict[str, Any] | None) -> Params:
    """Validate a params mapping.

    Args:
        raw: the mapping read from ``params.yaml`` (with overrides applied).

    Returns:
        The typed, frozen parameters.

    Raises:
        ParamsError: naming every bad key, what was given and what is allowed.
    """
    try:
        params = Params.model_validate(raw or {})
    except ValidationError as exc:
        raise ParamsError(
            f"invalid params: {_problems(exc)}. Fix params.yaml or the override."
        ) from None
    from tasks.checks import check_params  # it imports this module

    check_params(params)  # the sections against each other: arch, image size, URL
    return params


def _problems(exc: ValidationError) -> str:
    """Every problem, the missing keys named together (the shipped params.yaml has them)."""
    errors = exc.errors()
    missing = [".".join(map(str, e["loc"])) for e in errors if e["type"] == "missing"]
    problems = [_describe(e) for e in errors if e["type"] != "missing"]
    if missing:
        problems.append(
            f"missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}: every key of "
            "the shipped params.yaml is required; copy the missing ones from it"
        )
    return "; ".join(problems)


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted-key overrides (``{"train.epochs": 5}``) applied.

    Raises:
        ParamsError: if a dotted key does not name a known parameter.
    """
    result = copy.deepcopy(raw)
    for dotted, value in (overrides or {}).items():
        parts = dotted.split(".")
        if parts[0] not in STAGES:
            raise ParamsError(
                f"unknown override {dotted!r}: the first part must be a stage ({', '.join(STAGES)})"
            )
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ParamsError(f"override {dotted!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return result


def load_params(
    path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None
) -> Params:
    """Read ``path``, apply ``overrides`` (dotted keys: ``{"train.epochs": 5}``), validate;
    return the typed parameters (:func:`parse_params`)."""
    return parse_params(apply_overrides(read_yaml(path), overrides))


Section = TypeVar("Section", bound=_Section)


def with_changes(section: Section, **changes: Any) -> Section:
    """A validated copy of a params section with some keys changed.

    Example: ``with_changes(params.train, epochs=3, fine_tune={"enabled": True})``: nested
    sections are merged, not replaced. Unlike ``model_copy(update=...)`` the result is
    validated, so a bad value fails here with :class:`ParamsError`.
    """
    merged = section.model_dump()
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    try:
        return type(section).model_validate(merged)
    except ValidationError as exc:
        raise ParamsError(f"invalid params: {_problems(exc)}") from None
