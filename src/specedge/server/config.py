"""`ServerConfig`: everything `specedge serve` needs, validated once at start-up.

Sources, later ones winning: the defaults below, a YAML file (`--config server.yaml`, keys as
the field names, dashes or underscores), then command-line flags. Each field is declared once
with `setting`: its default, the help of its `--kebab-case` option and its allowed range.
`load_server_config` merges the sources and validates the result; every message names the
flag and the YAML key to fix. The config is frozen: nothing changes it after start-up.
"""

from __future__ import annotations

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
from specedge.errors import SpecEdgeError
from specedge.model.attention import ATTENTION_KERNELS
from specedge.model.attention import AUTO as AUTO_ATTENTION
from specedge.server.scheduler import SchedulerPolicy

_TREE = TreeShape()  # the tree-shape defaults
_POLICY = SchedulerPolicy()  # the batching defaults


# An Open carries the prompt: at most 5 bytes per token id (a varint of 32 bits), plus the rest.
OPEN_BYTES_PER_TOKEN = 5
OPEN_OVERHEAD_BYTES = 1024


class ConfigError(SpecEdgeError):
    """The server configuration is invalid (the message says how to fix it)."""


@dataclass(frozen=True)
class ServerConfig:
    model: str = setting("", f"Target model: {MODEL_HELP}.")
    host: str = setting("127.0.0.1", "Listen address.")
    port: int = setting(50051, "gRPC port, 0 = any free.")
    metrics_port: int = setting(9400, "HTTP /metrics and /health port, 0 = any free.")
    max_batch: int = setting(_POLICY.max_batch, "Trees per batched forward.", minimum=1)
    max_batch_tokens: int = setting(
        _POLICY.max_batch_tokens, "Verified tokens (roots + nodes) per batched forward.", minimum=1
    )
    max_sessions: int = setting(16, "Concurrent sessions, memory permitting.", minimum=1)
    kv_memory: float | None = setting(
        None,
        "GB of KV cache, shared by all sessions in blocks (default: half the free memory, "
        "at most what --max-sessions sessions of --max-context need).",
        minimum=0,
        exclusive=True,
    )
    tensor_parallel: int = setting(
        1,
        "Processes the target is split over (torch.distributed: NCCL on GPUs, gloo on CPU).",
        minimum=1,
    )
    max_tree_nodes: int = setting(64, "Nodes per tree.", minimum=1)
    max_tree_depth: int = setting(16, "Tree depth.", minimum=1)
    max_context: int = setting(
        2048, "Prompt + generated tokens per session (capped by the model).", minimum=2
    )
    prefill_chunk: int = setting(
        _POLICY.prefill_chunk,
        "Prompt tokens per prefill forward (bounds a prefill's stall).",
        minimum=1,
    )
    batch_wait_ms: float = setting(
        1000 * _POLICY.max_wait,
        "Longest wait (ms) for a predicted arrival to fill a batch.",
        minimum=0,
    )
    session_timeout: float = setting(
        60.0, "Evict a session silent for this many seconds.", minimum=0, exclusive=True
    )
    drain_timeout: float = setting(
        30.0,
        "Seconds running sessions get to finish on SIGTERM/SIGINT while new ones are refused "
        "(a second signal stops at once).",
        minimum=0,
    )
    max_message_bytes: int = setting(
        1 << 20,
        "Largest gRPC message accepted from an edge (an Open holds the prompt, up to 5 bytes "
        "per token).",
        minimum=1024,
    )
    max_concurrent_rpcs: int | None = setting(
        None,
        "gRPC calls served at once; more are refused with RESOURCE_EXHAUSTED "
        "(default: 2 x --max-sessions + 16).",
        minimum=1,
    )
    max_failed_forwards: int = setting(
        3,
        "Consecutive failed model forwards after which /health answers 503 and gRPC health "
        "NOT_SERVING (until one succeeds).",
        minimum=1,
    )
    stuck_timeout: float = setting(
        30.0,
        "Seconds one model job may run (or 100x its modelled cost, if longer) before the "
        "model thread counts as stuck: /health 503, gRPC health NOT_SERVING.",
        minimum=0,
        exclusive=True,
    )
    device: str = setting(DEFAULT_DEVICE, DEVICE_HELP)
    dtype: str | None = setting(None, "float32|bfloat16|float16 (default: best for the device).")
    auth_token: str | None = setting(
        None, "Require 'authorization: Bearer TOKEN' from edges (default: no auth)."
    )
    tls_cert: str | None = setting(
        None,
        "PEM certificate chain: serve gRPC over TLS, with --tls-key (default: plaintext).",
        path=True,
    )
    tls_key: str | None = setting(None, "PEM private key (unencrypted) of --tls-cert.", path=True)
    tls_client_ca: str | None = setting(
        None,
        "PEM CA certificate(s): edges must present a certificate one of them signed (mutual TLS).",
        path=True,
    )
    # The OpenAI-compatible HTTP API served by the server itself, for users with no edge. With
    # a `draft` model the server drafts the trees itself (server-only speculative decoding);
    # without one it decodes autoregressively.
    api_port: int | None = setting(
        None, "Also serve the OpenAI-compatible HTTP API here, 0 = any free (default: off)."
    )
    draft: str | None = setting(
        None,
        "Draft model for the HTTP API: speculative decoding on the server "
        "(default: autoregressive).",
    )
    api_key_file: str | None = setting(None, f"{API_KEY_FILE_HELP} (--api-port)", path=True)
    protect_metrics: bool = setting(False, f"{PROTECT_METRICS_HELP} (--metrics-port, API port)")
    max_body_bytes: int = setting(MAX_BODY_BYTES, MAX_BODY_HELP, minimum=1024)
    stream_timeout: float = setting(30.0, STREAM_TIMEOUT_HELP, minimum=0, exclusive=True)
    queue_timeout: float = setting(30.0, QUEUE_TIMEOUT_HELP, minimum=0, exclusive=True)
    budget: str = setting(AUTO_BUDGET, f"Server-side drafting: {BUDGET_HELP}")
    depth: int = setting(_TREE.depth, "Server-side tree depth (draft steps).", minimum=1)
    width: int = setting(_TREE.width, "Children proposed per expanded node.", minimum=1)
    beams: int = setting(_TREE.beams, "Nodes expanded per draft step.", minimum=1)
    lookup: int = setting(_TREE.lookup, "Context lookup chain length, 0 = off.", minimum=0)

    verify: str = setting(
        "goodput",
        "goodput: verify of each tree the prefix that pays (DESIGN.md section 12); "
        "all: every node sent (for experiments).",
    )
    stream_lookup: int = setting(
        8,
        "While the server decodes an edge's session itself: the longest context lookup chain "
        "each step verifies, cut to what pays (0 = one token a step).",
        minimum=0,
    )
    profile_cost: bool = setting(
        False, "Redo the start-up cost profile instead of reading the cached one."
    )
    attention: str = setting(
        AUTO_ATTENTION,
        f"Attention kernel: {' | '.join(ATTENTION_KERNELS)} (auto: native on the CPU, "
        "bmm there without a C compiler, sdpa on GPUs; flex: FlexAttention, compiled at the "
        "first forward).",
    )

    @property
    def tree_shape(self) -> TreeShape:
        return TreeShape(
            budget_cap(self.budget), self.depth, self.width, self.beams, lookup=self.lookup
        )

    @property
    def adaptive(self) -> bool:
        """Server-side trees sized by what the selection verifies (`--budget auto`)."""
        return parse_budget(self.budget) is None

    @property
    def concurrent_rpcs(self) -> int:
        """gRPC calls served at once (`--max-concurrent-rpcs`, or its default)."""
        if self.max_concurrent_rpcs is not None:
            return self.max_concurrent_rpcs
        return 2 * self.max_sessions + 16

    def validate(self) -> ServerConfig:
        """Return self, or raise ConfigError naming the first invalid setting."""
        if not self.model:
            raise ConfigError("no target model: pass --model (or `model:` in the config file)")
        for name in ("port", "metrics_port", "api_port"):
            check_port(self, name, ConfigError)
        self._validate_distinct_ports()
        check_ranges(self, ConfigError)
        check_budget(self, ConfigError)
        if self.attention not in ATTENTION_KERNELS:
            raise ConfigError(
                f"{_where('attention')} must be one of {', '.join(ATTENTION_KERNELS)}, "
                f"got {self.attention!r}"
            )
        if self.verify not in ("goodput", "all"):
            raise ConfigError(f"{_where('verify')} must be goodput or all, got {self.verify!r}")
        if self.max_batch_tokens < self.max_tree_nodes + 1:
            raise ConfigError(
                f"{_where('max_batch_tokens')} ({self.max_batch_tokens}) must hold one full tree: "
                f"at least --max-tree-nodes + 1 = {self.max_tree_nodes + 1}"
            )
        open_bytes = OPEN_BYTES_PER_TOKEN * self.max_context + OPEN_OVERHEAD_BYTES
        if self.max_message_bytes < open_bytes:
            raise ConfigError(
                f"{_where('max_message_bytes')} ({self.max_message_bytes}) cannot hold the Open "
                f"of a full-context prompt (--max-context {self.max_context}: up to "
                f"{open_bytes} bytes); raise it or lower --max-context"
            )
        check_device_and_dtype(self, ConfigError)
        check_auth_token(self, ConfigError)
        self._validate_security()
        self._validate_drafting()
        return self

    def exposure_warnings(self) -> list[str]:
        """What start-up warns of: plaintext or open doors on an address others can reach."""
        if is_loopback(self.host):
            return []
        warnings = []
        if self.tls_cert is None:
            warnings.append(
                f"gRPC on {self.host} is plaintext: the bearer token and every prompt's token ids "
                "cross the network in clear; pass --tls-cert and --tls-key"
            )
        if self.auth_token is None:
            warnings.append(f"gRPC on {self.host} takes any edge; pass --auth-token-file")
        if self.api_port is not None and self.api_key_file is None:
            warnings.append(f"the HTTP API on {self.host} takes any client; pass --api-key-file")
        return warnings

    def _validate_security(self) -> None:
        check_certificate(self, "tls_cert", "tls_key", ConfigError)
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError(
                "--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS with the "
                "edges' certificates checked too"
            )
        check_ca_file(self, "tls_client_ca", ConfigError)
        check_key_file(self, "api_key_file", ConfigError)
        if self.protect_metrics and self.api_key_file is None:
            raise ConfigError("--protect-metrics needs --api-key-file (the keys it requires)")
        if self.api_key_file is not None and self.api_port is None and not self.protect_metrics:
            raise ConfigError(
                "--api-key-file protects the server's HTTP API: add --api-port (or "
                "--protect-metrics for /health and /metrics alone)"
            )

    def _validate_distinct_ports(self) -> None:
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
        if budget_cap(self.budget) > self.max_tree_nodes:
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
    settings = role_settings(
        config_file, overrides, auth_token_file, _FIELD_TYPES, ConfigError, _PATH_FIELDS
    )
    return replace(ServerConfig(), **settings).validate()


# ---- helpers ------------------------------------------------------------------------------------
_FIELD_TYPES = {f.name: str(f.type) for f in fields(ServerConfig)}
_PATH_FIELDS = path_fields(ServerConfig)
