"""What can be checked in the params without the data, before anything runs.

:func:`check_params` is the one check. :func:`tasks.params.parse_params` runs it on every
params file a stage or ``tlp`` reads, so under plain ``dvc repro`` the first stage already
fails on a misspelt ``backbone.arch``, before any download. ``tlp run`` runs it once more
with the project's folders, before it starts Prefect or any stage, so that a weights file
or a local source that is not there fails in a second too. No TensorFlow, Prefect or DVC.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tasks.archs import ARCHS, SIMPLE_CNN, resolve_arch, simple_cnn_output
from tasks.params import ParamsError

if TYPE_CHECKING:
    from tasks.params import BackboneParams, Params

URL_SCHEMES = ("http", "https")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # what tasks.fetch takes for a URL


def check_params(params: Params, weights_dir: Path | None = None, root: Path | None = None) -> None:
    """Check what the params say against each other and, given the folders, against the disk.

    Args:
        params: the parsed params.
        weights_dir: the folder ``backbone.weights`` names a file in (``data/weights``);
            ``None`` skips that file's check.
        root: the folder a relative ``fetch.source`` is relative to (the project root);
            ``None`` skips the check that a local source exists.

    Raises:
        ParamsError: naming every problem and its fix.
    """
    problems = backbone_problems(params.backbone, params.prepare.image_size, weights_dir)
    problems += source_problems(params.fetch.source, root)
    if params.train.other_specialist and not params.prepare.other_class:
        problems.append(
            "train.other_specialist: true trains a model on the classes merged into "
            "prepare.other_class, but prepare.other_class is null; set it (e.g. other) or "
            "set train.other_specialist: false"
        )
    if problems:
        raise ParamsError(f"invalid params: {'; '.join(problems)}")


def check_backbone(
    backbone: BackboneParams, image_size: tuple[int, int], weights_dir: Path | None = None
) -> None:
    """:func:`backbone_problems` as an exception (what the backbone stage checks first).

    Raises:
        ParamsError: naming every problem and its fix.
    """
    problems = backbone_problems(backbone, image_size, weights_dir)
    if problems:
        raise ParamsError("; ".join(problems))


def backbone_problems(
    backbone: BackboneParams, image_size: tuple[int, int], weights_dir: Path | None = None
) -> list[str]:
    """What is wrong with the ``backbone`` section for images of ``image_size``.

    The arch must be known; ``simple_cnn`` is trained from scratch and its conv blocks must
    leave at least one pixel; a ``keras.applications`` model has a minimum input size; a
    weights file must be in ``weights_dir`` (when given).
    """
    try:
        arch = resolve_arch(backbone.arch)
    except ValueError as exc:
        return [str(exc)]
    if arch == SIMPLE_CNN:
        return _simple_cnn_problems(backbone, image_size)
    smallest = ARCHS[arch].min_size
    problems = []
    if min(image_size) < smallest:
        problems.append(
            f"{arch} needs images of at least {smallest}x{smallest}; prepare.image_size is "
            f"{list(image_size)}. Raise prepare.image_size."
        )
    weights = backbone.weights
    named_file = weights not in ("imagenet", "none") and weights_dir is not None
    if named_file and not (weights_dir / weights).is_file():
        problems.append(
            f"backbone.weights {weights!r} is not 'imagenet', 'none' or a weights file in "
            f"{weights_dir}; copy or link the file there and set backbone.weights to its name"
        )
    return problems


def _simple_cnn_problems(backbone: BackboneParams, image_size: tuple[int, int]) -> list[str]:
    cnn, problems = backbone.simple_cnn, []
    if backbone.weights != "none":
        problems.append(
            "backbone.weights must be 'none' for simple_cnn (it is trained from scratch); "
            f"got {backbone.weights!r}"
        )
    blocks = len(cnn.filters)
    output = simple_cnn_output(
        image_size, blocks, cnn.kernel_size, cnn.strides, cnn.padding, cnn.pool_size
    )
    if min(output) < 1:
        problems.append(
            f"prepare.image_size {list(image_size)} is too small for {blocks} conv blocks "
            f"(backbone.simple_cnn.filters {list(cnn.filters)}, backbone.simple_cnn.kernel_size "
            f"{cnn.kernel_size}, backbone.simple_cnn.strides {cnn.strides}, "
            f"backbone.simple_cnn.padding {cnn.padding!r}, backbone.simple_cnn.pool_size "
            f"{cnn.pool_size}): nothing would be left of the image. Raise prepare.image_size, "
            "or use fewer filters, a smaller stride or pool, or padding 'same'"
        )
    return problems


def source_problems(source: str, root: Path | None = None) -> list[str]:
    """What is wrong with ``fetch.source``: a URL must be http(s) with a host; a local
    path (relative to ``root``) must exist, when ``root`` is given."""
    if _SCHEME.match(source):
        try:
            url = urlsplit(source)
            host = url.hostname
        except ValueError as exc:  # e.g. an unclosed [ of an IPv6 address
            return [f"fetch.source {source!r} is not a valid URL ({exc})"]
        if url.scheme.lower() not in URL_SCHEMES:
            return [
                f"fetch.source {source!r} uses the unsupported URL scheme {url.scheme!r}; use "
                "an http(s):// URL of an archive, a dataset descriptor such as "
                "data/builtin/digits.yaml, or a local archive or folder"
            ]
        if not host:
            return [f"fetch.source {source!r} names no host; write it as https://host/path"]
        return []
    if root is not None and not (root / source).exists():
        return [
            f"fetch.source {source!r} does not exist ({(root / source).absolute()}); give an "
            "existing archive or folder (relative paths are relative to the project root), "
            "a URL, or a dataset descriptor such as data/builtin/digits.yaml"
        ]
    return []
