"""``params.yaml`` (and presets, and ``-S`` values) read as DVC reads them.

YAML 1.2 through ruamel, DVC's own reader: ``010`` is ten and ``1e-3`` a float, so the
stages, ``dvc params diff`` and ``dvc.lock`` agree on every value (PyYAML, YAML 1.1, would
train 8 epochs where DVC records 10). Aliases are refused before anything expands them (a
"billion laughs" file would otherwise take gigabytes just to print), and so are files over
:data:`MAX_PARAMS_BYTES`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

MAX_PARAMS_BYTES = 1024 * 1024  # a params file is a few kB; anything near this is a mistake


class ParamsError(ValueError):
    """A parameter is missing, unknown or of the wrong type or range."""


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping as DVC does (YAML 1.2), refusing aliases and oversized files.

    Raises:
        ParamsError: the file is missing, too big, not YAML, uses aliases or is no mapping;
            the message names the file.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_PARAMS_BYTES + 1)
    except FileNotFoundError:
        raise ParamsError(f"{path} not found; run from the project root or pass --params") from None
    if len(data) > MAX_PARAMS_BYTES:
        raise ParamsError(
            f"{path} is over {MAX_PARAMS_BYTES // 1024} KiB; a params file holds a few settings"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path} is not UTF-8 text ({exc})") from None
    data = parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML 1.2 text as DVC does; aliases are refused before anything expands them.

    Args:
        text: the YAML document.
        where: what it is, for error messages (a file name, ``-S train.epochs=5``).

    Returns:
        The parsed value.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError
    from ruamel.yaml.events import AliasEvent

    yaml = YAML(typ="safe", pure=True)  # YAML 1.2, like dvc.utils.serialize.load_yaml
    try:
        for event in yaml.parse(io.StringIO(text)):
            if isinstance(event, AliasEvent):
                mark = event.start_mark
                raise ParamsError(
                    f"{where} uses the YAML alias *{event.anchor} (line {mark.line + 1}); "
                    "aliases are not allowed in params: write the value out"
                )
        data = yaml.load(text)
    except YAMLError as exc:
        raise ParamsError(f"{where} is not valid YAML: {exc}") from None
    return data
