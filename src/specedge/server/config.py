"""`ServerConfig`: everything `specedge serve` needs, validated once at start-up.

Sources, later ones winning: the defaults below, a YAML file (`--config server.yaml`, keys as
the field names, dashes or underscores), then command-line flags. `load_server_config` merges
them and validates the result; every message names the flag and the YAML key to fix. The
config is frozen: nothing changes it after start-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from specedge.config_file import flag_and_key as _where
from specedge.config_file import role_settings
from specedge.core.draft import TreeShape
from specedge.errors import SpecEdgeError

MAX_PORT = 65535


class ConfigError(SpecEdgeError):
    """The server configuration is invalid (the message says how to fix it)."""


@dataclass(frozen=True)
class ServerConfig:
    model: str = ""
    host: str = "127.0.0.1"
    port: int = 50051  # gRPC; 0 picks a free port
    metrics_port: int = 9400  # HTTP /metrics and /health; 0 picks a free port
    max_batch: int = 16  # trees per batched forward
    max_batch_tokens: int = 4096  # verified tokens (roots + nodes) per batched forward
    max_sessions: int = 16  # concurrent sessions = KV slots
    max_tree_nodes: int = 64
    max_tree_depth: int = 16
    max_context: int = 2048  # prompt + generated tokens per session (capped by the model)
    prefill_chunk: int = 256  # prompt tokens per prefill forward (bounds a prefill's stall)
    batch_wait_ms: float = 2.0  # longest wait for a predicted arrival to fill a batch
    session_timeout: float = 60.0  # seconds without a tree before a session is evicted
    shutdown_grace: float = 5.0  # seconds running sessions get to finish on SIGTERM
    device: str = "cpu"
    dtype: str | None = None  # float32 | bfloat16 | float16; None: best for the device
    auth_token: str | None = None  # bearer token required from clients; None: no auth
    # The OpenAI-compatible HTTP API served by the server itself, for users with no edge: None
    # serves none, 0 picks a free port. With a `draft` model the server drafts the trees
    # itself (server-only speculative decoding); without one it decodes autoregressively.
    api_port: int | None = None
    draft: str | None = None
    budget: int = 32  # server-side draft tree: nodes per round
    depth: int = 6  # draft tree depth (draft steps per tree)
    width: int = 4  # children proposed per expanded node
    beams: int = 8  # nodes expanded per draft step
    lookup: int = 8  # context lookup chain length, 0 = off

    @property
    def tree_shape(self) -> TreeShape:
        return TreeShape(self.budget, self.depth, self.width, self.beams, lookup=self.lookup)

    def validate(self) -> ServerConfig:
        """Return self, or raise ConfigError naming the first invalid setting."""
        if not self.model:
            raise ConfigError("no target model: pass --model (or `model:` in the config file)")
        for name in ("port", "metrics_port", "api_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_PORT:
                raise ConfigError(
                    f"{_where(name)} must be a port in 0..{MAX_PORT} (0 = any free "
                    f"port), got {value}"
                )
        ports = {
            "--port": self.port,
            "--metrics-port": self.metrics_port,
            "--api-port": self.api_port,
        }
        taken: dict[int, str] = {}
        for flag, value in ports.items():
            if value in taken and value != 0:
                raise ConfigError(f"{taken[value]} and {flag} are both {value}; pick two ports")
            if value is not None:
                taken[value] = flag
        for name in (
            "max_batch",
            "max_batch_tokens",
            "max_sessions",
            "max_tree_nodes",
            "max_tree_depth",
            "prefill_chunk",
            "budget",
            "depth",
            "width",
            "beams",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_where(name)} must be >= 1, got {getattr(self, name)}")
        if self.lookup < 0:
            raise ConfigError(f"{_where('lookup')} must be >= 0, got {self.lookup}")
        if self.max_context < 2:
            raise ConfigError(f"{_where('max_context')} must be >= 2, got {self.max_context}")
        if self.max_batch_tokens < self.max_tree_nodes + 1:
            raise ConfigError(
                f"{_where('max_batch_tokens')} ({self.max_batch_tokens}) must hold one full tree: "
                f"at least --max-tree-nodes + 1 = {self.max_tree_nodes + 1}"
            )
        for name in ("batch_wait_ms", "shutdown_grace"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(f"{_where(name)} must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.session_timeout) and self.session_timeout > 0):
            raise ConfigError(
                f"{_where('session_timeout')} must be > 0 seconds, got {self.session_timeout}"
            )
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(
                f"{_where('device')} must be cpu, cuda or cuda:N, got {self.device!r}"
            )
        if self.dtype is not None:
            from specedge.model.loader import DTYPES

            if self.dtype.lower() not in DTYPES:
                raise ConfigError(
                    f"{_where('dtype')} must be one of {', '.join(DTYPES)}, got {self.dtype!r}"
                )
        if self.auth_token is not None and not self.auth_token.strip():
            raise ConfigError("the auth token is empty: pass a non-empty --auth-token or file")
        self._validate_drafting()
        return self

    def _validate_drafting(self) -> None:
        if self.draft is None:
            return
        if not self.draft:
            raise ConfigError(f"{_where('draft')} is empty; name a draft model or leave it out")
        if self.api_port is None:
            raise ConfigError(
                "--draft drafts for the server's own HTTP API; add --api-port (`api_port` in "
                "the config file)"
            )
        if self.budget > self.max_tree_nodes:
            raise ConfigError(
                f"{_where('budget')} ({self.budget}) exceeds --max-tree-nodes "
                f"({self.max_tree_nodes}); lower the budget or raise the cap"
            )
        if self.depth > self.max_tree_depth:
            raise ConfigError(
                f"{_where('depth')} ({self.depth}) exceeds --max-tree-depth "
                f"({self.max_tree_depth}); lower the depth or raise the cap"
            )


def load_server_config(
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    auth_token_file: Path | None = None,
) -> ServerConfig:
    """Defaults < YAML file < `overrides` (flags; None values are ignored), then validate.
    `auth_token_file` (flag or the YAML key of that name) holds the token on its first line."""
    settings = role_settings(config_file, overrides, auth_token_file, _FIELD_TYPES, ConfigError)
    return replace(ServerConfig(), **settings).validate()


# ---- helpers ------------------------------------------------------------------------------------
_FIELD_TYPES = {f.name: str(f.type) for f in fields(ServerConfig)}
