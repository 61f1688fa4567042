"""Role configuration files: reading a YAML mapping of settings and checking value types.

Each role (server, edge) keeps a frozen dataclass of its settings; these helpers read its
YAML file (keys with dashes or underscores) and coerce values to the fields' types, raising
the role's own error type with a message that names both the flag and the YAML key.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import yaml


def flag_and_key(name: str) -> str:
    return f"--{name.replace('_', '-')} (`{name}` in the config file)"


def read_yaml_settings(
    path: Path,
    field_names: Collection[str],
    error: type[Exception],
    extra_keys: Collection[str] = (),
) -> dict[str, Any]:
    """The file's settings, keys normalised to underscores; unknown keys are an error."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as cause:
        raise error(f"cannot read config file {path}: {cause.strerror}") from cause
    except yaml.YAMLError as cause:
        raise error(f"{path} is not valid YAML: {cause}") from cause
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(
            f"{path} must hold a mapping of settings (key: value), got {type(data).__name__}"
        )
    settings = {str(key).replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(settings) - set(field_names) - set(extra_keys))
    if unknown:
        valid = ", ".join([*field_names, *extra_keys])
        raise error(f"{path}: unknown setting(s) {', '.join(unknown)}; valid: {valid}")
    return settings


def coerce_settings(
    settings: Mapping[str, Any], field_types: Mapping[str, str], error: type[Exception]
) -> dict[str, Any]:
    """Check each value's type against its field's annotation (YAML gives ints for floats)."""
    out: dict[str, Any] = {}
    for name, value in settings.items():
        kind = field_types[name]
        if value is None and "None" in kind:
            out[name] = None
        elif kind.startswith("int"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise error(f"{flag_and_key(name)} must be an integer, got {value!r}")
            out[name] = value
        elif kind.startswith("float"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise error(f"{flag_and_key(name)} must be a number, got {value!r}")
            out[name] = float(value)
        else:
            if not isinstance(value, str):
                raise error(f"{flag_and_key(name)} must be a string, got {value!r}")
            out[name] = value
    return out
