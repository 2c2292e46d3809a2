"""The project on disk: where its root is, and params overrides written into ``params.yaml``.

Overrides (``tlp run -S``) and presets (partial params files in ``presets/``, ``tlp preset``)
are validated with the stages' own parser (:mod:`tasks.params`) before anything is written,
then written into ``params.yaml`` (like ``dvc exp run --set-param``), comments and key order
kept: ``dvc repro`` reproduces the run later, ``git diff params.yaml`` shows what changed.
This module imports neither Prefect nor DVC, so the command line stays fast.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tasks.common import atomic_path
from tasks.params import ParamsError, apply_overrides, parse_params, parse_yaml, read_yaml

MAX_VALUE_CHARS = 4096  # one -S value; a params value is never near this
PARAMS_FILE = "params.yaml"
PRESETS_DIR = "presets"


class NotAProjectError(RuntimeError):
    """The current folder is not inside a DVC project."""


def project_root(start: str | Path | None = None) -> Path:
    """The DVC project that contains ``start`` (default: the current folder).

    Raises:
        NotAProjectError: no folder from ``start`` upwards holds ``.dvc/`` and ``dvc.yaml``.
    """
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir() and (folder / "dvc.yaml").is_file():
            return folder
    raise NotAProjectError(
        f"{here} is not inside a DVC project (no folder from here up holds .dvc/ and "
        "dvc.yaml); cd into the pipeline's folder, or set TLP_PROJECT_DIR for a worker"
    )


def parse_set_options(options: list[str] | None) -> dict[str, Any]:
    """Turn ``-S key=value`` options into overrides; values are read as YAML.

    ``-S train.epochs=5`` gives ``{"train.epochs": 5}``, ``-S prepare.image_size=[64,64]``
    a list and ``-S fetch.sha256=`` ``None``.

    Raises:
        ParamsError: an option has no ``=`` or an empty key.
    """
    overrides: dict[str, Any] = {}
    for option in options or []:
        key, sep, value = option.partition("=")
        if not sep or not key.strip():
            raise ParamsError(f"-S {option!r}: expected key=value, e.g. -S train.epochs=5")
        if len(value) > MAX_VALUE_CHARS:
            raise ParamsError(f"-S {key.strip()}: the value is over {MAX_VALUE_CHARS} characters")
        overrides[key.strip()] = parse_yaml(value, f"-S {key.strip()}")
    return overrides


def validate_overrides(root: Path, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check overrides against ``params.yaml`` and return them with normalised values.

    The values are the parsed ones (``"5"`` becomes ``5`` for an int key), so what is
    written to ``params.yaml`` is exactly what the stages will read.

    Args:
        root: the project root.
        overrides: dotted keys and their new values, e.g. ``{"train.epochs": 5}``.

    Returns:
        The overrides with normalised values (empty if there are none).

    Raises:
        ParamsError: a key is unknown or a value is invalid; the message names it.
    """
    if not overrides:
        return {}
    raw = read_yaml(root / PARAMS_FILE)
    parsed = parse_params(apply_overrides(raw, dict(overrides))).model_dump(mode="json")
    return {key: lookup(parsed, key) for key in overrides}


@contextlib.contextmanager
def overrides_applied(root: Path, overrides: Mapping[str, Any]) -> Iterator[None]:
    """Write validated overrides into ``params.yaml`` for the block; undo them if it fails.

    On success the new values stay, so ``dvc repro`` reproduces the run. On failure the
    file is put back as it was, so the next run does not repeat a failing override.
    """
    path = root / PARAMS_FILE
    original = path.read_text(encoding="utf-8")
    write_overrides(root, overrides)
    try:
        yield
    except BaseException:
        if overrides:
            _write(path, original)
        raise


def presets(root: Path) -> list[str]:
    """Names of the presets in ``root/presets``."""
    return sorted(path.stem for path in (root / PRESETS_DIR).glob("*.yaml"))


def apply_preset(root: Path, name: str) -> dict[str, Any]:
    """Write a preset (a name in ``presets/``, or a YAML file) into ``params.yaml``.

    Returns:
        The values written, as dotted keys.

    Raises:
        ParamsError: no such preset (the message lists them), or a value is invalid
            (then nothing is written).
    """
    is_file = name.endswith((".yaml", ".yml"))
    path = Path(name) if is_file else root / PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ParamsError(f"unknown preset {name!r}; available: {', '.join(presets(root))}")
    changes = validate_overrides(root, dotted_keys(read_yaml(path)))
    write_overrides(root, changes)
    return changes


def write_overrides(root: Path, overrides: Mapping[str, Any]) -> None:
    """Write validated overrides into ``params.yaml``, keeping comments, order and quoting
    (a ruamel round-trip: DVC's YAML library)."""
    if not overrides:
        return
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedSeq
    from ruamel.yaml.representer import RoundTripRepresenter

    class Representer(RoundTripRepresenter):
        """Writes ``null`` (as params.yaml does), in this writer only: ``add_representer``
        changes the class it is called on, and DVC dumps dvc.lock with RoundTripRepresenter."""

    Representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    round_trip = YAML()
    round_trip.Representer = Representer
    round_trip.preserve_quotes = True
    round_trip.width = 4096  # never re-wrap long lines
    path = root / PARAMS_FILE
    data = round_trip.load(path.read_text(encoding="utf-8"))
    for dotted, value in overrides.items():
        *sections, key = dotted.split(".")
        node = data
        for section in sections:
            node = node.setdefault(section, {})
        if isinstance(value, list):  # [64, 64] stays on one line, like the rest of the file
            value = CommentedSeq(value)
            value.fa.set_flow_style()
        node[key] = value
    stream = io.StringIO()
    round_trip.dump(data, stream)
    _write(path, stream.getvalue())


def _write(path: Path, text: str) -> None:
    mode = path.stat().st_mode
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, mode)  # mkstemp creates 0600; keep the file's own permissions


def lookup(data: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted key (``"train.fine_tune.enabled"``), or ``None`` if it is absent."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def dotted_keys(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Sections as dotted keys: ``{"train": {"epochs": 5}}`` -> ``{"train.epochs": 5}``."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, Mapping) and value:
            flat.update(dotted_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
