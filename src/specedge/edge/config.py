"""`EdgeConfig`: everything `specedge edge` needs, validated once at start-up.

Sources, later ones winning: the defaults below, a YAML file (`--config edge.yaml`, keys as the
field names, dashes or underscores), then command-line flags. Each field is declared once with
`setting`: its default, the help of its `--kebab-case` option and its allowed range.
`load_edge_config` merges the sources and validates the result; every message names the flag
and the YAML key to fix. The config is frozen: nothing changes it after start-up.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from specedge.config_file import (
    API_KEY_FILE_HELP,
    DEFAULT_DEVICE,
    DEVICE_HELP,
    MAX_BODY_BYTES,
    MAX_BODY_HELP,
    MODEL_HELP,
    PROTECT_METRICS_HELP,
    QUEUE_TIMEOUT_HELP,
    STREAM_TIMEOUT_HELP,
    check_auth_token,
    check_budget,
    check_ca_file,
    check_certificate,
    check_device_and_dtype,
    check_key_file,
    check_port,
    check_ranges,
    comma_list_fields,
    is_loopback,
    path_fields,
    role_settings,
    setting,
)
from specedge.config_file import flag_and_key as _where
from specedge.core.limits import (
    AUTO_BUDGET,
    BUDGET_HELP,
    TreeShape,
    budget_cap,
    parse_budget,
)
from specedge.edge.replicas import ServerTarget
from specedge.errors import SpecEdgeError

_TREE = TreeShape()  # the tree-shape defaults


class EdgeConfigError(SpecEdgeError):
    """The edge configuration is invalid (the message says how to fix it)."""


class ProactivePolicy(enum.StrEnum):
    """What the edge drafts while a tree is verified (`edge.proactive`)."""

    OFF = "off"
    KEEP_DEPTH = "keep-depth"
    ADD_DEPTH = "add-depth"


@dataclass(frozen=True)
class EdgeConfig:
    model: str = setting("", f"Draft model: {MODEL_HELP}.")
    server: str = setting(
        "",
        "HOST:PORT of `specedge serve`, or several, comma-separated (in YAML also a list); a "
        "host name (or dns:///HOST:PORT) stands for every address it resolves to. New "
        "sessions go to the least-loaded serving replica; a session whose server fails "
        "continues on another (see --failover-timeout).",
        comma_list=True,
    )
    host: str = setting("127.0.0.1", "HTTP API address.")
    port: int = setting(8000, "HTTP API (OpenAI-compatible) port, 0 = any free.")
    served_model_name: str = setting("", "Name in /v1/models (default: the server's target).")
    budget: str = setting(AUTO_BUDGET, BUDGET_HELP)
    depth: int = setting(_TREE.depth, "Draft tree depth (draft steps per tree).", minimum=1)
    width: int = setting(_TREE.width, "Children proposed per expanded node.", minimum=1)
    beams: int = setting(_TREE.beams, "Nodes expanded per draft step.", minimum=1)
    decay: float = setting(
        _TREE.decay, "Score decay per tree level.", minimum=0, maximum=1, exclusive=True
    )
    lookup: int = setting(_TREE.lookup, "Context lookup chain length, 0 = off.", minimum=0)
    proactive: str = setting(
        ProactivePolicy.KEEP_DEPTH.value, f"Proactive drafting: {' | '.join(ProactivePolicy)}."
    )
    server_decoding: bool = setting(
        True,
        "Let the server decode a session itself (no round trip per token) while its trees do "
        "not pay; the edge resumes trees when its draft would.",
    )
    proactive_budget: int = setting(16, "Nodes of a proactive subtree.", minimum=1)
    proactive_depth: int = setting(3, "Depth (draft steps) of a proactive subtree.", minimum=1)
    max_sessions: int = setting(
        8, "Concurrent generations (draft KV slots); more requests wait.", minimum=1
    )
    max_context: int = setting(
        2048, "Prompt + generated tokens per request (capped by the model).", minimum=2
    )
    connect_timeout: float = setting(
        5.0, "Seconds for the handshake with the server.", minimum=0, exclusive=True
    )
    reply_timeout: float = setting(
        60.0, "Seconds to wait for one round's reply (or a prefill).", minimum=0, exclusive=True
    )
    failover_timeout: float = setting(
        5.0,
        "Seconds a broken session may spend re-opening on a listed server (retries with "
        "backoff) before the request fails.",
        minimum=0,
        exclusive=True,
    )
    load_poll_interval: float = setting(
        1.0,
        "Seconds between polls of each replica's health and load (where new sessions go).",
        minimum=0,
        exclusive=True,
    )
    resolve_interval: float = setting(
        30.0,
        "Seconds between resolutions of a --server host name (replicas come and go).",
        minimum=0,
        exclusive=True,
    )
    startup_timeout: float = setting(
        30.0, "Seconds to wait at start-up for the server to answer.", minimum=0, exclusive=True
    )
    max_body_bytes: int = setting(MAX_BODY_BYTES, MAX_BODY_HELP, minimum=1024)
    stream_timeout: float = setting(30.0, STREAM_TIMEOUT_HELP, minimum=0, exclusive=True)
    queue_timeout: float = setting(30.0, QUEUE_TIMEOUT_HELP, minimum=0, exclusive=True)
    device: str = setting(DEFAULT_DEVICE, DEVICE_HELP)
    dtype: str | None = setting(None, "float32|bfloat16|float16 (default: best for the device).")
    auth_token: str | None = setting(None, "Bearer token the server requires (default: no auth).")
    tls: bool = setting(
        False, "Connect to the server over TLS, trusting the system's CAs (implied by --tls-ca)."
    )
    tls_ca: str | None = setting(
        None,
        "PEM CA certificate(s) that sign the server's certificate: connect over TLS.",
        path=True,
    )
    tls_cert: str | None = setting(
        None,
        "PEM client certificate, with --tls-key, for a server that requires one (mutual TLS).",
        path=True,
    )
    tls_key: str | None = setting(None, "PEM private key (unencrypted) of --tls-cert.", path=True)
    tls_server_name: str | None = setting(
        None, "Name the server's certificate must carry (default: the host of --server)."
    )
    api_key_file: str | None = setting(None, API_KEY_FILE_HELP, path=True)
    protect_metrics: bool = setting(False, PROTECT_METRICS_HELP)

    @property
    def servers(self) -> tuple[str, ...]:
        """Each listed server as written, in order (`--server A,B`)."""
        return tuple(address.strip() for address in self.server.split(","))

    @property
    def targets(self) -> tuple[ServerTarget, ...]:
        """Each listed server parsed (`edge.replicas.ServerTarget`); valid after `validate`."""
        return tuple(ServerTarget.parse(address) for address in self.servers)

    @property
    def tree_shape(self) -> TreeShape:
        return TreeShape(
            budget_cap(self.budget), self.depth, self.width, self.beams, self.decay, self.lookup
        )

    @property
    def adaptive(self) -> bool:
        """Trees sized by what the server verifies (`--budget auto`)."""
        return parse_budget(self.budget) is None

    @property
    def use_tls(self) -> bool:
        return self.tls or self.tls_ca is not None

    @property
    def subtree_shape(self) -> TreeShape:
        return TreeShape(
            self.proactive_budget, self.proactive_depth, self.width, self.beams, self.decay, 0
        )  # a subtree hangs from a bet, not from committed context: no lookup

    def validate(self) -> EdgeConfig:
        """Return self, or raise EdgeConfigError naming the first invalid setting."""
        if not self.model:
            raise EdgeConfigError("no draft model: pass --model (or `model:` in the config file)")
        for address in self.servers:
            try:
                ServerTarget.parse(address)
            except ValueError as problem:
                raise EdgeConfigError(
                    f"{_where('server')} must be HOST:PORT or dns:///HOST:PORT of `specedge "
                    f"serve` (several comma-separated), got {self.server!r}: {problem}"
                ) from None
        if len(set(self.servers)) < len(self.servers):
            raise EdgeConfigError(f"{_where('server')} lists a server twice: {self.server!r}")
        check_port(self, "port", EdgeConfigError)
        check_ranges(self, EdgeConfigError)
        check_budget(self, EdgeConfigError)
        if self.proactive not in set(ProactivePolicy):
            raise EdgeConfigError(
                f"{_where('proactive')} must be one of "
                f"{', '.join(p.value for p in ProactivePolicy)}, got {self.proactive!r}"
            )
        check_device_and_dtype(self, EdgeConfigError)
        check_auth_token(self, EdgeConfigError)
        self._validate_security()
        return self

    def exposure_warnings(self) -> list[str]:
        """What start-up warns of: plaintext to a remote server, an open API others can reach."""
        warnings = []
        for target in self.targets:
            if not self.use_tls and not is_loopback(target.host):
                warnings.append(
                    f"the link to {target} is plaintext: the bearer token and every prompt's "
                    "token ids cross the network in clear; pass --tls-ca (or --tls)"
                )
        if self.api_key_file is None and not is_loopback(self.host):
            warnings.append(f"the HTTP API on {self.host} takes any client; pass --api-key-file")
        return warnings

    def _validate_security(self) -> None:
        check_certificate(self, "tls_cert", "tls_key", EdgeConfigError)
        for name in ("tls_cert", "tls_server_name"):
            if getattr(self, name) is not None and not self.use_tls:
                raise EdgeConfigError(
                    f"{_where(name)} is for a TLS link: add --tls-ca FILE (or --tls for the "
                    "system's CAs)"
                )
        check_ca_file(self, "tls_ca", EdgeConfigError)
        check_key_file(self, "api_key_file", EdgeConfigError)
        if self.protect_metrics and self.api_key_file is None:
            raise EdgeConfigError("--protect-metrics needs --api-key-file (the keys it requires)")


def load_edge_config(
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    auth_token_file: Path | None = None,
) -> EdgeConfig:
    """Defaults < YAML file < `overrides` (flags; None values are ignored), then validate.
    `auth_token_file` (flag or the YAML key of that name) holds the token on its first line."""
    settings = role_settings(
        config_file, overrides, auth_token_file, _FIELD_TYPES, EdgeConfigError, _PATH_FIELDS,
        comma_list_fields(EdgeConfig),
    )  # fmt: skip
    return replace(EdgeConfig(), **settings).validate()


# ---- helpers ------------------------------------------------------------------------------------
_FIELD_TYPES = {f.name: str(f.type) for f in fields(EdgeConfig)}
_PATH_FIELDS = path_fields(EdgeConfig)
