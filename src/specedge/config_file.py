"""Role settings, declared once: dataclass fields that are also command-line options and
config-file keys.

Each role (server, edge, bench, generate) keeps a frozen dataclass of its settings whose
fields are declared with `setting(default, help, ...)`: the field is the one source of the
setting's name, type, default, help text and allowed range. From those fields
`settings_options` gives the role's command one `--kebab-case` option each (help with the
default shown), `check_ranges` validates every declared range, and the helpers below read the
YAML file (keys with dashes or underscores), merge the command-line flags and the auth token
file, and coerce values to the fields' types. Every error is the role's own error type, with a
message that names both the flag and the YAML key.
"""

from __future__ import annotations

import inspect
import ipaddress
import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import MISSING, Field, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import typer
import yaml

MAX_PORT = 65535
MODEL_HELP = "alias (smollm2-135m, smollm2-135m-draft), .gguf file, model directory or hub id"
# `specedge.model.loader.AUTO_DEVICE`, spelled out here so that the command line loads no torch;
# `loader.resolve_device` turns it into a device when a model loads.
DEFAULT_DEVICE = "auto"
DEVICE_HELP = "auto (cuda when torch sees a GPU, else cpu), cpu, cuda or cuda:N."
# Limits of the OpenAI-compatible HTTP API, the same on the edge and the server.
MAX_BODY_BYTES = 4 << 20
MAX_BODY_HELP = "Largest HTTP request body in bytes; larger ones get 413."
STREAM_TIMEOUT_HELP = (
    "Seconds a streaming client may leave its stream unread; then its generation ends and "
    "frees its slot and KV cache."
)
QUEUE_TIMEOUT_HELP = "Seconds a request waits for a free session slot; then 503 with Retry-After."


def setting(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive: bool = False,
    show_default: bool = True,
    path: bool = False,
    comma_list: bool = False,
) -> Any:
    """A settings field: `default`, the `help` of its option (the default is shown after it),
    the option's name if not the field's (`flag`, without dashes), and its allowed range
    (`minimum`..`maximum`, open at both ends when `exclusive`; each element of a tuple).
    `show_default=False` leaves the default out of `--help` (the help text describes it).
    `path`: a file name, which a config file gives relative to itself (`path_fields`).
    `comma_list`: text of comma-separated items, which a config file may give as a YAML list
    (`comma_list_fields`)."""
    metadata = {
        "help": help,
        "flag": flag,
        "minimum": minimum,
        "maximum": maximum,
        "exclusive": exclusive,
        "show_default": show_default,
        "path": path,
        "comma_list": comma_list,
    }
    return field(default=default, metadata=metadata)


def flag_of(settings_class: type, name: str) -> str:
    """The command-line option of field `name`: `--kebab-case` of its name or its `flag`."""
    (found,) = (f for f in fields(settings_class) if f.name == name)
    return _flag(found)


def flag_and_key(name: str, settings_class: type | None = None) -> str:
    flag = flag_of(settings_class, name) if settings_class else _kebab(name)
    return f"{flag} (`{name}` in the config file)"


def check_ranges(settings: Any, error: type[Exception]) -> None:
    """Raise `error` naming the first field whose value is outside its declared range."""
    for each in fields(settings):
        low, high = each.metadata.get("minimum"), each.metadata.get("maximum")
        if low is None and high is None:
            continue
        value = getattr(settings, each.name)
        values = value if isinstance(value, tuple) else (value,)
        if not all(v is None or _in_range(v, each) for v in values):
            where = flag_and_key(each.name, type(settings))
            raise error(f"{where} must be {_describe_range(each)}, got {value}")


def check_nonempty(settings: Any, names: Sequence[str], error: type[Exception]) -> None:
    """Raise `error` naming the first of the list fields `names` that holds no value."""
    for name in names:
        if not getattr(settings, name):
            raise error(f"{flag_and_key(name, type(settings))} needs at least one value")


def check_choices(settings: Any, choices: dict[str, Sequence[str]], error: type[Exception]) -> None:
    """Raise `error` for the first field of `choices` whose value is not one it allows; a
    tuple field (`systems`) must hold at least one value, each allowed."""
    for name, allowed in choices.items():
        value = getattr(settings, name)
        values = value if isinstance(value, tuple) else (value,)
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            given = ", ".join(map(str, unknown)) or "(none given)"
            raise error(
                f"{flag_and_key(name, type(settings))}: unknown {given}; choose from "
                f"{', '.join(allowed)}"
            )


def check_port(settings: Any, name: str, error: type[Exception]) -> None:
    """A TCP port to listen on (None: not served)."""
    value = getattr(settings, name)
    if value is not None and not 0 <= value <= MAX_PORT:
        where = flag_and_key(name, type(settings))
        raise error(f"{where} must be a port in 0..{MAX_PORT} (0 = any free port), got {value}")


def check_device_and_dtype(settings: Any, error: type[Exception]) -> None:
    """`device` is auto, cpu, cuda or cuda:N; `dtype` (None: best for the device) one we
    load. Whether the device exists is checked when the model loads (`loader.resolve_device`)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", settings.device):
        raise error(
            f"{flag_and_key('device')} must be auto, cpu, cuda or cuda:N, got {settings.device!r}"
        )
    if settings.dtype is not None:
        from specedge.model.loader import DTYPES

        if settings.dtype.lower() not in DTYPES:
            raise error(
                f"{flag_and_key('dtype')} must be one of {', '.join(DTYPES)}, "
                f"got {settings.dtype!r}"
            )


def check_budget(settings: Any, error: type[Exception]) -> None:
    """`budget` is auto or a node count >= 1 (`core.limits.parse_budget`)."""
    from specedge.core.limits import parse_budget

    try:
        parse_budget(settings.budget)
    except ValueError as problem:
        raise error(f"{flag_and_key('budget', type(settings))} {problem}") from None


def check_auth_token(settings: Any, error: type[Exception]) -> None:
    if settings.auth_token is not None and not settings.auth_token.strip():
        raise error("the auth token is empty: pass a non-empty --auth-token or file")


# The HTTP APIs' keys, the same on the edge and the server.
API_KEY_FILE_HELP = (
    "File of API keys, one per line: the HTTP API then requires 'Authorization: Bearer KEY' "
    "(401 otherwise; default: open)."
)
PROTECT_METRICS_HELP = (
    "Require the API key on /health and /metrics too (default: open, for probes and scrapers)."
)


def path_fields(settings_class: type) -> tuple[str, ...]:
    """The fields declared with `setting(..., path=True)`."""
    return tuple(f.name for f in fields(settings_class) if f.metadata.get("path"))


def comma_list_fields(settings_class: type) -> tuple[str, ...]:
    """The fields declared with `setting(..., comma_list=True)`."""
    return tuple(f.name for f in fields(settings_class) if f.metadata.get("comma_list"))


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 possibly in brackets) is this machine only."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_readable(settings: Any, name: str, error: type[Exception]) -> None:
    """Setting `name` (None: unset) names a file this process can read."""
    path = getattr(settings, name)
    if path is None:
        return
    try:
        Path(path).read_bytes()
    except OSError as cause:
        where = flag_and_key(name, type(settings))
        raise error(f"{where}: cannot read {path}: {cause.strerror}") from None


def check_certificate(settings: Any, cert_name: str, key_name: str, error: type[Exception]) -> None:
    """The certificate and key settings come as a pair (or not at all), and load: PEM, the key
    unencrypted and matching the certificate (checked with the standard `ssl` module)."""
    cert, key = getattr(settings, cert_name), getattr(settings, key_name)
    where_cert, where_key = (flag_of(type(settings), n) for n in (cert_name, key_name))
    if (cert is None) != (key is None):
        given, missing = (where_cert, where_key) if key is None else (where_key, where_cert)
        raise error(f"{given} needs {missing}: pass the certificate and its private key together")
    if cert is None:
        return
    check_readable(settings, cert_name, error)
    check_readable(settings, key_name, error)
    if b"ENCRYPTED" in Path(key).read_bytes():
        raise error(
            f"{where_key} {key} is encrypted; gRPC reads unencrypted keys only "
            f"(decrypt it: openssl pkey -in {key} -out KEY.pem)"
        )
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, password=b"")
    except ssl.SSLError as cause:
        raise error(
            f"{where_cert} {cert} and {where_key} {key} do not load ({cause.reason or cause}): "
            "both must be PEM, the key the certificate's own"
        ) from None


def check_ca_file(settings: Any, name: str, error: type[Exception]) -> None:
    """Setting `name` (None: unset) names a readable file of PEM CA certificates."""
    path = getattr(settings, name)
    if path is None:
        return
    check_readable(settings, name, error)
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError as cause:
        where = flag_and_key(name, type(settings))
        raise error(
            f"{where}: {path} holds no PEM CA certificate ({cause.reason or cause})"
        ) from None


def check_key_file(settings: Any, name: str, error: type[Exception]) -> None:
    """Setting `name` (None: unset) names a readable file of bearer keys, one per line."""
    path = getattr(settings, name)
    if path is None:
        return
    check_readable(settings, name, error)
    from specedge.credentials import read_key_file

    try:
        read_key_file(path)
    except ValueError as cause:
        raise error(f"{flag_and_key(name, type(settings))}: {cause}") from None


def settings_options(
    settings_class: type,
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a Typer command one option per field of `settings_class`, before its own.

    The decorated command takes a keyword `flags`: the settings given on the command line
    (by field name, values as typed), so that a config file or the dataclass default applies
    to the others. The option's default shown in `--help` is the field's."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        own = inspect.signature(command, eval_str=True).parameters
        hints = get_type_hints(settings_class)
        options = [_option(each, hints[each.name]) for each in fields(settings_class)]
        names = {option.name for option in options}

        def run(typer_context: typer.Context, **values: Any) -> None:
            settings = {name: values.pop(name) for name in names}
            flags = {name: value for name, value in settings.items() if _given(typer_context, name)}
            command(**values, flags=flags)

        keyword = inspect.Parameter.KEYWORD_ONLY
        rest = [p.replace(kind=keyword) for p in own.values() if p.name != "flags"]
        context = inspect.Parameter("typer_context", keyword, annotation=typer.Context)
        run.__signature__ = inspect.Signature([context, *options, *rest])  # type: ignore[attr-defined]
        run.__name__, run.__doc__ = command.__name__, command.__doc__
        return run

    return decorate


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
    path_fields: Collection[str] = (),
    comma_list_fields: Collection[str] = (),
) -> dict[str, Any]:
    """Defaults < YAML file < `overrides` (flags; None values are ignored), coerced.
    `auth_token_file` (flag or the YAML key of that name) holds the token on its first line;
    in YAML a relative path (that file, or a value of `path_fields`) is relative to the config
    file, wherever the role starts, and a list for one of `comma_list_fields` is joined with
    commas."""
    settings: dict[str, Any] = {}
    if config_file is not None:
        settings.update(
            read_yaml_settings(config_file, field_types, error, extra_keys=("auth_token_file",))
        )
        for name in path_fields:
            if isinstance(settings.get(name), str):
                settings[name] = str(config_file.parent / settings[name])
        for name in comma_list_fields:
            if isinstance(settings.get(name), list):
                settings[name] = _joined(name, settings[name], error)
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


# ---- helpers ------------------------------------------------------------------------------------
def _joined(name: str, items: list[Any], error: type[Exception]) -> str:
    """A YAML list of text items as the comma-separated text of a `comma_list` setting."""
    if not items or not all(isinstance(item, str) and item.strip() for item in items):
        raise error(
            f"{flag_and_key(name)} must be a comma-separated string or a list of non-empty "
            f"strings, got {items!r}"
        )
    return ",".join(item.strip() for item in items)


def coerce_settings(
    settings: Mapping[str, Any], field_types: Mapping[str, str], error: type[Exception]
) -> dict[str, Any]:
    """Check each value's type against its field's annotation (YAML gives ints for floats)."""
    out: dict[str, Any] = {}
    for name, value in settings.items():
        kind = field_types[name]
        if value is None and "None" in kind:
            out[name] = None
        elif kind == "bool":
            if not isinstance(value, bool):
                raise error(f"{flag_and_key(name)} must be true or false, got {value!r}")
            out[name] = value
        elif kind.startswith("int"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise error(f"{flag_and_key(name)} must be an integer, got {value!r}")
            out[name] = value
        elif kind.startswith("float"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise error(f"{flag_and_key(name)} must be a number, got {value!r}")
            out[name] = float(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            out[name] = str(value)  # a text setting such as `budget: 24` (auto or a count)
        else:
            if not isinstance(value, str):
                raise error(f"{flag_and_key(name)} must be a string, got {value!r}")
            out[name] = value
    return out


def _kebab(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _flag(each: Field[Any]) -> str:
    return _kebab(each.metadata.get("flag") or each.name)


def _given(context: typer.Context, name: str) -> bool:
    """Whether option `name` was on the command line (Typer vendors click: compare by name)."""
    source = context.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def _in_range(value: float, each: Field[Any]) -> bool:
    low, high = each.metadata.get("minimum"), each.metadata.get("maximum")
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if each.metadata.get("exclusive"):
        return (low is None or value > low) and (high is None or value < high)
    return (low is None or value >= low) and (high is None or value <= high)


def _describe_range(each: Field[Any]) -> str:
    low, high = (_number(each.metadata.get(k)) for k in ("minimum", "maximum"))
    if each.metadata.get("exclusive"):
        if low is not None and high is not None:
            return f"in ({low}, {high})"
        return f"> {low}" if high is None else f"< {high}"
    if low is not None and high is not None:
        return f"in {low}..{high}"
    return f">= {low}" if high is None else f"<= {high}"


def _number(bound: float | None) -> str | None:
    return None if bound is None else f"{bound:g}"


def _option(each: Field[Any], kind: Any) -> inspect.Parameter:
    """The Typer option of one settings field: tuples are typed as comma-separated text."""
    default = ... if each.default is MISSING else each.default  # ...: a required option
    shown = each.metadata["show_default"] and default not in (None, "", (), ...)
    if isinstance(default, tuple):
        default = ",".join(str(v) for v in default) or None
        kind = str | None
    flag = _flag(each)
    if kind is bool:
        flag = f"{flag}/--no-{flag[2:]}"
    option = typer.Option(default, flag, help=each.metadata["help"], show_default=shown)
    return inspect.Parameter(
        each.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind
    )
