"""Config files for ``fastnca train --config FILE``: a preset name and config overrides, in TOML or JSON.

A file is one flat table: an optional ``preset`` (a name from ``fastnca presets``) and any fields of
:class:`fastnca.config.Config` (``fastnca/config.py`` documents them)::

    # run.toml
    preset = "small"
    iterations = 2000
    lr = 5e-4

Every run's ``config.json`` is such a file (every field, no preset), so ``fastnca train --config
runs/x/config.json --out runs/y`` repeats a run's settings; its ``resolved`` table (how that run resolved its
backend and precision on its machine, ``fastnca.run``) is ignored when read back. Values are checked against the
fields' types.
TOML needs Python >= 3.11 (``tomllib``) or the ``tomli`` package on 3.10.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from fastnca.config import RESOLVED_KEY, RETIRED_KEYS, Config, unknown_key_message

__all__ = ["load_config_file", "check_value"]


def _load_toml(path: Path) -> Any:
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:
        try:
            import tomli as tomllib  # the same parser, for Python 3.10
        except ModuleNotFoundError:
            raise ValueError(
                f"--config {str(path)!r}: TOML files need Python >= 3.11 or the tomli package "
                "(pip install tomli); or write the same settings as JSON"
            ) from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"--config {str(path)!r}: not valid TOML ({err})") from None
    except UnicodeDecodeError as err:  # TOML is UTF-8 by definition
        raise ValueError(f"--config {str(path)!r}: not UTF-8 text ({err.reason} at byte {err.start}); "
                         "save it as UTF-8") from None


def check_value(key: str, value: Any) -> Any:
    """``value`` if it has the type of Config field ``key`` (ints are accepted for floats), else ValueError."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    if key not in fields:
        raise ValueError(unknown_key_message(key))
    default = getattr(Config(), key)
    kind = str(fields[key].type)
    if value is None and "None" in kind:
        return None
    if isinstance(default, bool) or kind.startswith("bool"):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"{key}: expected a value of type {kind}, got {value!r}")
    return value


def load_config_file(path: str | os.PathLike[str]) -> tuple[str | None, dict[str, Any]]:
    """Read a ``.toml`` or ``.json`` config file.

    Returns:
        ``(preset, overrides)``: the file's ``preset`` (None when it names none) and its typed Config fields.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unreadable file, an unknown key or a value of the wrong type (the message names it).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {str(p)!r}: no such file")
    suffix = p.suffix.lower()
    if suffix == ".toml":
        data = _load_toml(p)
    elif suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))  # JSON files are UTF-8 (RFC 8259), whatever the locale
        except UnicodeDecodeError as err:
            raise ValueError(f"--config {str(p)!r}: not UTF-8 text ({err.reason} at byte {err.start}); "
                             "save it as UTF-8") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"--config {str(p)!r}: not valid JSON ({err})") from None
    else:
        raise ValueError(f"--config {str(p)!r}: expected a .toml or .json file")
    if not isinstance(data, dict):
        raise ValueError(f"--config {str(p)!r}: expected a table of settings at the top level")
    data = dict(data)
    data.pop(RESOLVED_KEY, None)  # a run's record of what its machine resolved, not a setting
    for key in RETIRED_KEYS:  # an earlier release's run config: the setting no longer exists
        data.pop(key, None)
    preset = data.pop("preset", None)
    if preset is not None and not isinstance(preset, str):
        raise ValueError(f"--config {str(p)!r}: preset: expected a preset name, got {preset!r}")
    overrides = {}
    for key, value in data.items():
        try:
            overrides[key] = check_value(key, value)
        except ValueError as err:
            raise ValueError(f"--config {str(p)!r}: {err}") from None
    return preset, overrides
