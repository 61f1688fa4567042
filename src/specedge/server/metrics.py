"""Server metrics (Prometheus) and the small HTTP endpoint that serves them with `/health`.

Every metric lives in the server's own `CollectorRegistry`, so several servers in one process
(tests, the demo) never share counters. Names follow DESIGN.md section 8:

- `specedge_server_active_sessions`: open sessions (gauge);
- `specedge_server_queued_requests`: trees waiting for the next batch (gauge);
- `specedge_server_verify_batch_size`, `specedge_server_verify_seconds`: per batched forward;
- `specedge_server_rounds_total`, `specedge_server_emitted_tokens_total`,
  `specedge_server_accepted_tokens_total`, `specedge_server_draft_nodes_total`: per round;
- `specedge_server_busy_seconds_total`: time the model thread was running (verify, prefill and
  server-side drafting), of which `specedge_server_draft_seconds_total` drafting;
- `specedge_server_prefill_tokens_total`;
- `specedge_server_host_cpu_seconds`: CPU time of the process outside the model thread (the
  event loop, gRPC, HTTP), the host work the simulator charges per token (with one torch
  thread; intra-op threads of more would count as host);
- goodput selection (DESIGN.md section 12): `specedge_server_verified_nodes_total` (of the draft
  nodes received, those verified), `specedge_server_cut_rounds_total` (rounds whose non-empty
  tree was cut to nothing: a plain decoding step), `specedge_server_predicted_tokens_total` and
  `specedge_server_predicted_rounds_total` (the rounds with estimates, and the tokens their
  estimates predicted: compare with the tokens those rounds emitted,
  `specedge_server_estimated_round_tokens_total`), `specedge_server_idle_allowance_seconds`
  (the idle time per batch the selection counts as free: large when the server waits for its
  users, 0 when saturated), `specedge_server_streamed_rounds_total` (rounds the server decoded
  itself for edge sessions whose trees did not pay), `specedge_server_lookup_tokens_total` (tokens
  those steps took from the session's context lookup chain, beyond one a step);
- `specedge_server_batch_cost_seconds{term}`: the fitted cost model of a verification forward,
  seconds = fixed + per_sequence x sequences + per_row x rows (gauges, one per term);
- `specedge_server_received_bytes_total`, `specedge_server_sent_bytes_total`: serialized
  protobuf messages of the session streams (before gRPC framing);
- `specedge_server_sessions_total{outcome}`: sessions by how they ended, and refused ones
  (edge sessions and the server's own HTTP API sessions alike);
- `specedge_server_auth_failures_total`: gRPC calls refused for a missing or wrong bearer token
  (before any message was read: such a call never becomes a session);
- `specedge_server_api_requests_total{endpoint,outcome}`: requests to the server's own
  OpenAI-compatible API (`--api-port`), by HTTP status;
- `specedge_server_api_ttft_seconds`: time to first token of those requests (histogram).

The HTTP endpoint runs in its own thread (prometheus_client's threading WSGI server), so it
answers even while the event loop is busy.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from specedge.core.generation import GenerationStats
from specedge.credentials import BearerKeys

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
VERIFY_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._model_thread: int | None = None
        r = self.registry
        self.active_sessions = Gauge(
            "specedge_server_active_sessions", "Open generation sessions.", registry=r
        )
        self.queued_requests = Gauge(
            "specedge_server_queued_requests", "Trees waiting for the next batch.", registry=r
        )
        self.verify_batch_size = Histogram(
            "specedge_server_verify_batch_size",
            "Trees verified per batched target forward.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.verify_seconds = Histogram(
            "specedge_server_verify_seconds",
            "Wall time of one batched verification (forward, sampling, acceptance, compaction).",
            buckets=VERIFY_SECONDS_BUCKETS,
            registry=r,
        )
        self.verify_rows = Counter(
            "specedge_server_verify_rows",
            "Rows of the batched verification forwards: one per sequence plus its verified nodes.",
            registry=r,
        )
        self.rounds = Counter(
            "specedge_server_rounds", "Verification rounds (one tree each).", registry=r
        )
        self.emitted_tokens = Counter(
            "specedge_server_emitted_tokens",
            "Tokens emitted to sessions (accepted + bonus).",
            registry=r,
        )
        self.accepted_tokens = Counter(
            "specedge_server_accepted_tokens", "Emitted tokens that were draft nodes.", registry=r
        )
        self.draft_nodes = Counter(
            "specedge_server_draft_nodes", "Draft tree nodes received for verification.", registry=r
        )
        self.host_cpu_seconds = Gauge(
            "specedge_server_host_cpu_seconds",
            "CPU seconds of this process outside the model thread (event loop, gRPC, HTTP): "
            "with one torch thread, the host work that shares the server's cores with the "
            "model (what `specedge simulate --host-ms-per-token` charges).",
            registry=r,
        )
        self.busy_seconds = Counter(
            "specedge_server_busy_seconds",
            "Seconds the model thread was running (verification, prefill, server-side drafting).",
            registry=r,
        )
        self.draft_seconds = Counter(
            "specedge_server_draft_seconds",
            "Seconds of server-side drafting for the HTTP API (included in busy seconds).",
            registry=r,
        )
        self.prefill_tokens = Counter(
            "specedge_server_prefill_tokens", "Prompt tokens prefilled.", registry=r
        )
        self.verified_nodes = Counter(
            "specedge_server_verified_nodes",
            "Draft nodes verified (the prefix of each tree the goodput selection kept).",
            registry=r,
        )
        self.cut_rounds = Counter(
            "specedge_server_cut_rounds",
            "Rounds whose non-empty tree was cut to nothing (a plain decoding step).",
            registry=r,
        )
        self.predicted_rounds = Counter(
            "specedge_server_predicted_rounds",
            "Rounds whose tree came with acceptance estimates.",
            registry=r,
        )
        self.predicted_tokens = Counter(
            "specedge_server_predicted_tokens",
            "Tokens those rounds' estimates predicted (1 + the verified nodes' estimates).",
            registry=r,
        )
        self.estimated_round_tokens = Counter(
            "specedge_server_estimated_round_tokens",
            "Tokens those rounds emitted (compare with the predicted tokens).",
            registry=r,
        )
        self.lookup_tokens = Counter(
            "specedge_server_lookup_tokens",
            "Tokens that steps decoded server-side took from the session's context lookup chain.",
            registry=r,
        )
        self.streamed_rounds = Counter(
            "specedge_server_streamed_rounds",
            "Rounds decoded server-side for edge sessions whose trees did not pay.",
            registry=r,
        )
        self.idle_allowance = Gauge(
            "specedge_server_idle_allowance_seconds",
            "Server idle time per batch that goodput selection counts as free (spare capacity).",
            registry=r,
        )
        self.batch_cost = Gauge(
            "specedge_server_batch_cost_seconds",
            "Fitted verification cost: fixed + per_sequence x sequences + per_row x rows.",
            ["term"],
            registry=r,
        )
        self.received_bytes = Counter(
            "specedge_server_received_bytes",
            "Serialized bytes of edge messages received.",
            registry=r,
        )
        self.sent_bytes = Counter(
            "specedge_server_sent_bytes", "Serialized bytes of server replies sent.", registry=r
        )
        self.sessions = Counter(
            "specedge_server_sessions",
            "Sessions by outcome: finished, closed, cancelled, evicted, failed (bad input), "
            "refused (bad handshake, full, shutting down).",
            ["outcome"],
            registry=r,
        )
        self.auth_failures = Counter(
            "specedge_server_auth_failures",
            "gRPC calls refused for a missing or wrong bearer token (before any message).",
            registry=r,
        )
        self.api_requests = Counter(
            "specedge_server_api_requests",
            "Requests to the server's OpenAI-compatible API by endpoint and outcome.",
            ["endpoint", "outcome"],
            registry=r,
        )

        self.api_ttft = Histogram(
            "specedge_server_api_ttft_seconds",
            "Time to first token of requests to the server's own OpenAI-compatible API.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )

    def watch_model_thread(self, ident: int) -> None:
        """Count CPU outside thread `ident` (the model thread) as host CPU from now on."""
        self._model_thread = ident
        self.host_cpu_seconds.set_function(self._host_cpu)

    def _host_cpu(self) -> float:
        try:
            model = time.clock_gettime(time.pthread_getcpuclockid(self._model_thread or 0))
        except (OSError, OverflowError):  # the thread has ended (the server stopped)
            return 0.0
        return time.process_time() - model

    # ---- the HTTP API's reports (`openai_api.api.ApiMetrics`) ---------------------------

    def count_request(self, endpoint: str, outcome: str) -> None:
        self.api_requests.labels(endpoint, outcome).inc()

    def observe(self, stats: GenerationStats) -> None:
        """One API generation's time to first token (its rounds and tokens are counted as
        they are verified, with every other session's)."""
        if stats.ttft_s is not None:
            self.api_ttft.observe(stats.ttft_s)


# ---- HTTP: /metrics and /health -------------------------------------------------------------
HealthFunction = Callable[[], tuple[bool, dict[str, Any]]]  # -> (healthy, JSON body)
StartResponse = Callable[..., Any]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Scrapes every few seconds would flood the server log."""


class MetricsHttpServer:
    """`GET /metrics` (Prometheus text format) and `GET /health` (JSON; 200 when healthy,
    503 otherwise) on a background thread; with `keys`, only for `Authorization: Bearer KEY`
    (401 otherwise)."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        health: HealthFunction,
        keys: BearerKeys | None = None,
    ) -> None:
        metrics_app = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if keys is not None and not keys.accepts(environ.get("HTTP_AUTHORIZATION")):
                body = {"error": "missing or wrong API key: send 'Authorization: Bearer KEY'"}
                return _json_response(start_response, "401 Unauthorized", body)
            if path == "/metrics":
                return metrics_app(environ, start_response)  # type: ignore[no-any-return]
            if path == "/health":
                healthy, body = health()
                status = "200 OK" if healthy else "503 Service Unavailable"
                return _json_response(start_response, status, body)
            return _json_response(start_response, "404 Not Found", {"error": "not found"})

        self._server = make_server(
            host, port, app, server_class=ThreadingWSGIServer, handler_class=_QuietHandler
        )
        self.port: int = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="specedge-metrics-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


def _json_response(start_response: StartResponse, status: str, body: dict[str, Any]) -> list[bytes]:
    payload = json.dumps(body).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    start_response(status, headers)
    return [payload]
