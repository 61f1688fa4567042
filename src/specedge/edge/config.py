"""`EdgeConfig`: everything `specedge edge` needs, validated once at start-up.

Sources, later ones winning: the defaults below, a YAML file (`--config edge.yaml`, keys as the
field names, dashes or underscores), then command-line flags. `load_edge_config` merges them
and validates the result; every message names the flag and the YAML key to fix. The config is
frozen: nothing changes it after start-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from specedge.config_file import flag_and_key as _where
from specedge.config_file import role_settings
from specedge.core.draft import TreeShape
from specedge.edge.proactive import ProactivePolicy
from specedge.errors import SpecEdgeError

MAX_PORT = 65535


class EdgeConfigError(SpecEdgeError):
    """The edge configuration is invalid (the message says how to fix it)."""


@dataclass(frozen=True)
class EdgeConfig:
    model: str = ""  # the draft model
    server: str = ""  # HOST:PORT of `specedge serve`
    host: str = "127.0.0.1"
    port: int = 8000  # the OpenAI-compatible HTTP API; 0 picks a free port
    served_model_name: str = ""  # the name /v1/models lists; default: --model
    budget: int = 32  # draft tree nodes per round
    depth: int = 6  # draft tree depth (draft steps per tree)
    width: int = 4  # children proposed per expanded node
    beams: int = 8  # nodes expanded per draft step
    decay: float = 0.9  # score decay per tree level
    lookup: int = 8  # context lookup chain length, 0 = off
    proactive: str = "keep-depth"  # off | keep-depth | add-depth
    proactive_budget: int = 16  # nodes of a proactive subtree
    proactive_depth: int = 3  # depth (draft steps) of a proactive subtree
    max_sessions: int = 8  # concurrent generations (draft KV slots); more requests wait
    max_context: int = 2048  # prompt + generated tokens per request (capped by the model)
    connect_timeout: float = 5.0  # seconds for the handshake with the server
    reply_timeout: float = 60.0  # seconds to wait for one round's reply (or a prefill)
    startup_timeout: float = 30.0  # seconds to wait at start-up for the server to answer
    device: str = "cpu"
    dtype: str | None = None  # float32 | bfloat16 | float16; None: best for the device
    auth_token: str | None = None  # bearer token the server requires; None: no auth

    @property
    def tree_shape(self) -> TreeShape:
        return TreeShape(self.budget, self.depth, self.width, self.beams, self.decay, self.lookup)

    @property
    def subtree_shape(self) -> TreeShape:
        return TreeShape(
            self.proactive_budget, self.proactive_depth, self.width, self.beams, self.decay, 0
        )  # a subtree hangs from a bet, not from committed context: no lookup

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def validate(self) -> EdgeConfig:
        """Return self, or raise EdgeConfigError naming the first invalid setting."""
        if not self.model:
            raise EdgeConfigError("no draft model: pass --model (or `model:` in the config file)")
        host, _, port = self.server.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) <= MAX_PORT:
            raise EdgeConfigError(
                f"{_where('server')} must be HOST:PORT of `specedge serve`, got {self.server!r}"
            )
        if not 0 <= self.port <= MAX_PORT:
            raise EdgeConfigError(f"{_where('port')} must be in 0..{MAX_PORT}, got {self.port}")
        for name in (
            "budget",
            "depth",
            "width",
            "beams",
            "proactive_budget",
            "proactive_depth",
            "max_sessions",
        ):
            if getattr(self, name) < 1:
                raise EdgeConfigError(f"{_where(name)} must be >= 1, got {getattr(self, name)}")
        if self.lookup < 0:
            raise EdgeConfigError(f"{_where('lookup')} must be >= 0, got {self.lookup}")
        if not 0.0 < self.decay < 1.0:
            raise EdgeConfigError(f"{_where('decay')} must be in (0, 1), got {self.decay}")
        if self.proactive not in set(ProactivePolicy):
            raise EdgeConfigError(
                f"{_where('proactive')} must be one of "
                f"{', '.join(p.value for p in ProactivePolicy)}, got {self.proactive!r}"
            )
        if self.max_context < 2:
            raise EdgeConfigError(f"{_where('max_context')} must be >= 2, got {self.max_context}")
        for name in ("connect_timeout", "reply_timeout", "startup_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise EdgeConfigError(f"{_where(name)} must be > 0 seconds, got {value}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise EdgeConfigError(
                f"{_where('device')} must be cpu, cuda or cuda:N, got {self.device!r}"
            )
        if self.dtype is not None:
            from specedge.model.loader import DTYPES

            if self.dtype.lower() not in DTYPES:
                raise EdgeConfigError(
                    f"{_where('dtype')} must be one of {', '.join(DTYPES)}, got {self.dtype!r}"
                )
        if self.auth_token is not None and not self.auth_token.strip():
            raise EdgeConfigError("the auth token is empty: pass a non-empty --auth-token or file")
        return self


def load_edge_config(
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    auth_token_file: Path | None = None,
) -> EdgeConfig:
    """Defaults < YAML file < `overrides` (flags; None values are ignored), then validate.
    `auth_token_file` (flag or the YAML key of that name) holds the token on its first line."""
    settings = role_settings(config_file, overrides, auth_token_file, _FIELD_TYPES, EdgeConfigError)
    return replace(EdgeConfig(), **settings).validate()


# ---- helpers ------------------------------------------------------------------------------------
_FIELD_TYPES = {f.name: str(f.type) for f in fields(EdgeConfig)}
