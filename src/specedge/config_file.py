"""Role configuration files: reading a YAML mapping of settings and checking value types.

Each role (server, edge) keeps a frozen dataclass of its settings; these helpers read its
YAML file (keys with dashes or underscores), merge the command-line flags and the auth token
file, and coerce values to the fields' types, raising the role's own error type with a
message that names both the flag and the YAML key.
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


def role_settings(
    config_file: Path | None,
    overrides: Mapping[str, Any] | None,
    auth_token_file: Path | None,
    field_types: Mapping[str, str],
    error: type[Exception],
) -> dict[str, Any]:
    """Defaults < YAML file < `overrides` (flags; None values are ignored), coerced.
    `auth_token_file` (flag or the YAML key of that name) holds the token on its first line;
    in YAML a relative path is relative to the config file, wherever the role starts."""
    settings: dict[str, Any] = {}
    if config_file is not None:
        settings.update(
            read_yaml_settings(config_file, field_types, error, extra_keys=("auth_token_file",))
        )
    yaml_token_file = settings.pop("auth_token_file", None)
    if yaml_token_file is not None:
        if settings.get("auth_token") is not None:
            raise error(f"{config_file}: set either auth_token or auth_token_file, not both")
        assert config_file is not None
        settings["auth_token"] = read_token(config_file.parent / str(yaml_token_file), error)
    flags = {key: value for key, value in (overrides or {}).items() if value is not None}
    if auth_token_file is not None:
        if "auth_token" in flags:
            raise error("pass either --auth-token or --auth-token-file, not both")
        flags["auth_token"] = read_token(auth_token_file, error)
    settings.update(flags)
    return coerce_settings(settings, field_types, error)


def read_token(path: Path, error: type[Exception]) -> str:
    """The first line of an auth token file, which must not be empty."""
    try:
        lines = path.read_text().splitlines()
    except OSError as cause:
        raise error(f"cannot read --auth-token-file {path}: {cause.strerror}") from None
    token = lines[0].strip() if lines else ""
    if not token:
        raise error(f"--auth-token-file {path} is empty; put the token on its first line")
    return token


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
