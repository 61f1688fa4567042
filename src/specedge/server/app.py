"""`specedge serve`: wires the model, the executor, the gRPC service and the metrics endpoint,
and with `--api-port` the server's own OpenAI-compatible API (server-side drafting with
`--draft`, autoregressive decoding without).

Start-up order: bind the gRPC, metrics and API ports, load the target and the draft (`GET
/health` answers 503 "loading" meanwhile), allocate the KV slots, start the executor, the gRPC
service and the API, then log `serving MODEL on HOST:PORT`; from that line on, `/health`
answers 200 and so does Info. `/health` and the standard gRPC health service (grpc.health.v1)
tell the same truth: 503 / NOT_SERVING while loading, draining, or degraded (the model keeps
failing or its thread is stuck: `server.health`), 200 / SERVING otherwise. SIGINT/SIGTERM
drain (`SpecEdgeServer.drain`): /health says 503 "draining" and gRPC health NOT_SERVING, new
sessions are refused (UNAVAILABLE) and so are API requests (503, Retry-After), running ones get
`--drain-timeout` seconds to finish, then everything stops and the process exits 0 (a second
signal ends the drain at once; sessions still running are cut with a clean error).

Security (`rpc.security`): gRPC over TLS with `--tls-cert/--tls-key` (mutual with
`--tls-client-ca`), the bearer token checked by an interceptor before any handler runs
(`--auth-token`), API keys on the HTTP API (`--api-key-file`); plaintext or open doors on an
address others can reach are logged as warnings at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from functools import partial
from typing import Any

import grpc

from specedge.background import LoopThread
from specedge.core.draft import DraftEngine
from specedge.core.model_runner import ModelRunner
from specedge.core.target import GenerationLimits, TargetEngine
from specedge.credentials import BearerKeys, read_key_file
from specedge.errors import SpecEdgeError
from specedge.model.kv_cache import pool_blocks
from specedge.model.loader import (
    LoadedModel,
    check_same_tokenizer,
    load_model,
    parse_dtype,
    tokenizer_fingerprint,
)
from specedge.model.parallel import local_config
from specedge.rpc.codec import (
    PROTOCOL_VERSION,
    HealthService,
    ServerInfo,
    UndecodableRequests,
    add_verifier_service,
)
from specedge.rpc.security import ServerTls, TokenAuth
from specedge.server.api import ApiAuth, ApiLimits, HttpApiServer, ServedModel, create_app
from specedge.server.config import ServerConfig
from specedge.server.cost_profile import load_or_profile
from specedge.server.executor import VerificationExecutor
from specedge.server.health import ModelHealth, publish_health
from specedge.server.local_sessions import LocalSessions
from specedge.server.metrics import MetricsHttpServer, ServerMetrics
from specedge.server.scheduler import SchedulerPolicy
from specedge.server.service import VerifierService
from specedge.server.tensor_parallel import rank_kv_memory, start_tensor_parallel

logger = logging.getLogger(__name__)

API_FAREWELL_S = 1.0  # seconds API clients get, after the grace, to receive their errors
DRAIN_FAREWELL_S = 0.5  # seconds, after a drain, for the last replies and streams to flush
DRAIN_POLL_S = 0.05  # how often a drain counts the sessions left
DRAIN_LOG_EVERY_S = 5.0  # how often a drain logs the sessions left
# Keepalive pings find dead edges (power loss, lost network) that never close their stream;
# the silent-session timeout catches live ones that stop sending.
GRPC_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class SpecEdgeServer:
    """One verification server. `start` binds everything (ports 0 pick free ones; read
    `port` / `metrics_port` / `api_port` afterwards); `stop` drains and releases. `loaded`
    and `draft` are preloaded models (tests, demos), else `config` names them."""

    def __init__(
        self,
        config: ServerConfig,
        loaded: LoadedModel | None = None,
        draft: LoadedModel | None = None,
    ) -> None:
        self.config = config
        self._loaded = loaded
        self._draft = draft
        self.metrics = ServerMetrics()
        self.port = 0
        self.metrics_port = 0
        self.api_port = 0
        self.executor: VerificationExecutor | None = None
        self.local_sessions: LocalSessions | None = None
        self._runner: ModelRunner | None = None  # the target's (its ranks' processes, if split)
        self._grpc: grpc.aio.Server | None = None
        self._http: MetricsHttpServer | None = None
        self._api: HttpApiServer | None = None
        self._grpc_health: HealthService | None = None
        self._publishing: asyncio.Task[None] | None = None
        self._status = "starting"
        self._model_name = config.model
        key_file = config.api_key_file
        self._api_keys = BearerKeys(read_key_file(key_file)) if key_file is not None else None

    async def start(self) -> None:
        """Bind both ports first (a taken port fails at once, not after loading the model),
        answer /health with 503 "loading" while the model loads, then serve."""
        config = self.config
        limits = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ]
        self._grpc = grpc.aio.server(
            options=GRPC_OPTIONS + limits,
            maximum_concurrent_rpcs=config.concurrent_rpcs,
            interceptors=self._interceptors(),
        )
        self._grpc_health = HealthService(self._grpc)
        address = f"{config.host}:{config.port}"
        for warning in config.exposure_warnings():
            logger.warning(warning)
        try:
            if config.tls_cert is None or config.tls_key is None:
                self.port = self._grpc.add_insecure_port(address)
            else:
                tls = ServerTls(config.tls_cert, config.tls_key, config.tls_client_ca)
                self.port = self._grpc.add_secure_port(address, tls.credentials())
        except RuntimeError as error:
            raise SpecEdgeError(
                f"cannot listen on {address} for gRPC ({error}); is another server running "
                "there? pick another --port"
            ) from None
        try:
            metrics_keys = self._api_keys if config.protect_metrics else None
            self._http = MetricsHttpServer(
                config.host, config.metrics_port, self.metrics.registry, self._health, metrics_keys
            )
        except OSError as error:
            raise SpecEdgeError(
                f"cannot listen on {config.host}:{config.metrics_port} for /metrics "
                f"({error.strerror}); pick another --metrics-port"
            ) from None
        self.metrics_port = self._http.port
        if config.api_port is not None:
            self._api = HttpApiServer(config.host, config.api_port, "--api-port")
            self.api_port = self._api.port
        self._status = "loading"
        self._http.start()
        try:
            await self._start_serving()
        except BaseException:
            await self.stop(grace=0.0)
            raise
        self._status = "ok"
        assert self._grpc_health is not None
        self._publishing = asyncio.create_task(
            publish_health(self._grpc_health, lambda: self._health()[0]), name="specedge-health"
        )
        logger.info("serving %s on %s:%d", self._model_name, config.host, self.port)
        logger.info("metrics on http://%s:%d/metrics", config.host, self.metrics_port)
        if self._api is not None and self.local_sessions is not None:
            logger.info(
                "OpenAI API on %s/v1 (%s decoding)", self._api.url, self.local_sessions.mode
            )

    async def _start_serving(self) -> None:
        config = self.config
        loaded = self._loaded
        if loaded is None:
            loaded = await asyncio.to_thread(_load_model, config.model, config)
        self._model_name = loaded.name
        engine = _build_engine(loaded, config)
        self._runner = engine.runner
        loaded = engine.runner.loaded  # split: rank 0's shard (the whole model can be freed)
        kv = engine.runner.kv
        kv_bytes = sum(t.numel() * t.element_size() for t in (kv.keys, kv.values))
        logger.info(
            "KV cache: %.2f GB, %s, %d blocks of %d positions (%d full-length sessions; "
            "up to %d sessions, each reserving what its prompt and max tokens need) "
            "(--kv-memory, --max-sessions, --max-context)",
            kv_bytes / 1e9,
            loaded.dtype,
            kv.num_blocks,
            kv.block_size,
            kv.num_blocks // kv.blocks_for(kv.max_len),
            kv.num_slots,
        )
        policy = SchedulerPolicy(
            max_batch=config.max_batch,
            max_batch_tokens=config.max_batch_tokens,
            prefill_chunk=config.prefill_chunk,
            max_wait=config.batch_wait_ms / 1000.0,
        )
        batch_cost = await asyncio.to_thread(
            load_or_profile, engine, loaded.name, refresh=config.profile_cost
        )
        self.executor = VerificationExecutor(
            engine,
            policy,
            self.metrics,
            batch_cost=batch_cost,
            goodput=config.verify == "goodput",
            health=ModelHealth(config.max_failed_forwards, config.stuck_timeout),
        )
        self.executor.start()
        info = ServerInfo(
            protocol_version=PROTOCOL_VERSION,
            model_name=loaded.name,
            tokenizer_fingerprint=tokenizer_fingerprint(loaded.tokenizer),
            vocab_size=engine.vocab_size,
            max_tree_nodes=config.max_tree_nodes,
            max_tree_depth=config.max_tree_depth,
            max_context=engine.runner.max_context,
        )
        service = VerifierService(
            self.executor,
            info,
            stop_token_ids=loaded.stop_token_ids,
            session_timeout=config.session_timeout,
            stream_lookup=config.stream_lookup,
        )
        assert self._grpc is not None and self._grpc_health is not None
        add_verifier_service(self._grpc, service.info, service.session, service.load)
        await self._grpc_health.set_serving(False)  # until the readiness line
        await self._grpc.start()
        if self._api is not None:
            await self._start_api(loaded)

    async def _start_api(self, target: LoadedModel) -> None:
        """The OpenAI-compatible API over server-side sessions (drafting with `--draft`)."""
        config = self.config
        assert self.executor is not None and self._api is not None
        draft_engine = None
        if config.draft is not None:
            draft = self._draft
            if draft is None:
                draft = await asyncio.to_thread(_load_model, config.draft, config)
            check_same_tokenizer(target, draft)
            draft_engine = _build_draft(draft, config, self.executor.engine.runner.max_context)
        self.local_sessions = LocalSessions(
            self.executor,
            draft_engine,
            max_sessions=config.max_sessions,
            queue_timeout=config.queue_timeout,
            status=lambda: str(self._health()[1]["status"]),
            adaptive=config.adaptive,
        )
        served = ServedModel(
            name=target.name,
            draft=config.draft,
            tokenizer=target.tokenizer,
            stop_token_ids=target.stop_token_ids,
            vocab_size=self.executor.engine.vocab_size,
        )
        limits = ApiLimits(config.max_body_bytes, config.stream_timeout)
        keys = self._api_keys
        auth = None if keys is None else ApiAuth(keys, config.protect_metrics)
        app = create_app(self.local_sessions, served, self.metrics, limits, auth)
        await self._api.start(app, handle_signals=False)

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The token check (`--auth-token`) before any handler runs, then INVALID_ARGUMENT
        for unary requests that are no message (`UndecodableRequests`)."""
        token = self.config.auth_token
        decoding: list[grpc.aio.ServerInterceptor] = [UndecodableRequests()]
        if token is None:
            return decoding
        return [TokenAuth(BearerKeys([token]), self.metrics.auth_failures.inc), *decoding]

    async def drain(
        self, timeout: float | None = None, stop_now: asyncio.Event | None = None
    ) -> None:
        """Enter draining: `/health` 503 "draining", gRPC health NOT_SERVING, new gRPC
        sessions refused with UNAVAILABLE and new API requests with 503 + Retry-After, while
        running sessions (edges' and the API's) go on. Returns when none is left, after
        `timeout` seconds (default `--drain-timeout`), or once `stop_now` is set."""
        timeout = self.config.drain_timeout if timeout is None else timeout
        self._status = "draining"
        if self.executor is not None:
            self.executor.drain()
        if self._grpc_health is not None:
            await self._grpc_health.set_serving(False)  # now, not at the next health poll
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        left = self._sessions_left()
        logger.info("draining: %d sessions in flight (up to %g s)", left, timeout)
        logged_at = loop.time()
        while left and loop.time() < deadline and not (stop_now and stop_now.is_set()):
            await asyncio.sleep(DRAIN_POLL_S)
            left = self._sessions_left()
            if left and loop.time() - logged_at >= DRAIN_LOG_EVERY_S:
                logger.info("draining: %d sessions left", left)
                logged_at = loop.time()
        if left:
            logger.info("drain ended with %d sessions left: they are cut", left)
        else:
            logger.info("drained: no session left")

    def _sessions_left(self) -> int:
        """Sessions still running: the executor's (edges' and the API's) and API requests
        waiting for a slot."""
        executor_sessions = self.executor.num_sessions if self.executor is not None else 0
        waiting = self.local_sessions.active_sessions if self.local_sessions is not None else 0
        return max(executor_sessions, waiting)

    async def stop(self, grace: float = 0.0) -> None:
        """Refuse new sessions and API requests, give running ones `grace` seconds, then fail
        what is left (an edge gets UNAVAILABLE, an API client a 503 or, mid-stream, an
        in-band error event) and release everything. `drain` first to let them finish."""
        self._status = "draining"
        if self._publishing is not None:
            self._publishing.cancel()
        if self._grpc_health is not None:
            await self._grpc_health.shutdown()
        services = []
        if self._grpc is not None:
            services.append(self._grpc.stop(grace))
        if self._api is not None:
            # Past the grace, the failed rounds still have to reach their clients.
            services.append(self._api.stop(grace + API_FAREWELL_S))
        stopping = asyncio.gather(*services)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(stopping), grace)
        if self.executor is not None:
            await self.executor.stop()
        await stopping
        if self._runner is not None:
            await asyncio.to_thread(self._runner.close)
        if self._http is not None:
            self._http.stop()
        self._status = "stopped"

    async def wait_for_signal(self) -> None:
        """Serve until SIGINT/SIGTERM, then drain for up to `--drain-timeout` seconds and stop
        (a second signal ends the drain at once)."""
        loop = asyncio.get_running_loop()
        signals = asyncio.Queue[int]()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, signals.put_nowait, sig)
        received = await signals.get()
        logger.info("%s: draining (signal again to stop now)", signal.Signals(received).name)
        stop_now = asyncio.Event()
        second = asyncio.create_task(signals.get())
        second.add_done_callback(lambda _: stop_now.set())
        await self.drain(stop_now=stop_now)
        if stop_now.is_set():
            logger.info("stopping now")
        await self.stop(0.0 if stop_now.is_set() else DRAIN_FAREWELL_S)
        second.cancel()
        logger.info("stopped")

    def _health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, the JSON of /health): the one health answer, also the gRPC health
        service's and the server API's."""
        executor = self.executor
        status = self._status
        problem = executor.problem() if executor is not None else None
        if status == "ok" and problem is not None:
            status = "degraded"
        body = {
            "status": status,
            "model": self._model_name,
            "active_sessions": executor.num_sessions if executor is not None else 0,
            "max_sessions": self.config.max_sessions,
        }
        if problem is not None:
            body["problem"] = problem
        return status == "ok", body


def run_server(config: ServerConfig) -> None:
    """The body of `specedge serve`: start, serve until a signal, drain."""

    async def main() -> None:
        server = SpecEdgeServer(config)
        await server.start()
        await server.wait_for_signal()

    asyncio.run(main())


class BackgroundServer:
    """A server on its own event loop in a daemon thread (tests, in-process demos).

    `start()` returns once it serves; `stop()` drains and joins the thread."""

    def __init__(
        self,
        config: ServerConfig,
        loaded: LoadedModel | None = None,
        draft: LoadedModel | None = None,
    ) -> None:
        self.server = SpecEdgeServer(config, loaded, draft)
        self._loop = LoopThread()

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def metrics_port(self) -> int:
        return self.server.metrics_port

    @property
    def api_port(self) -> int:
        return self.server.api_port

    def start(self) -> BackgroundServer:
        self._loop.start(self.server.start())
        return self

    def drain(self, timeout: float = 0.0) -> None:
        """Enter draining (`SpecEdgeServer.drain`) and wait up to `timeout` seconds for the
        running sessions; the server keeps draining afterwards, until `stop`."""
        self._loop.run(self.server.drain(timeout))

    def stop(self, grace: float = 0.0) -> None:
        self._loop.run(self.server.stop(grace))
        self._loop.close()


# ---- construction ------------------------------------------------------------------------------
def _load_model(name: str, config: ServerConfig) -> LoadedModel:
    dtype = parse_dtype(config.dtype) if config.dtype else None
    return load_model(name, config.device, dtype)


def _build_engine(loaded: LoadedModel, config: ServerConfig) -> TargetEngine:
    max_context = min(config.max_context, loaded.config.max_context)
    if max_context < config.max_context:
        logger.info(
            "--max-context %d exceeds the model's %d; using %d",
            config.max_context,
            loaded.config.max_context,
            max_context,
        )
    max_block = config.max_tree_nodes + 8  # room past the context for a tree and its root
    ranks = config.tensor_parallel
    # Each rank's KV cache holds its own heads: 1/N of a position's keys and values.
    kv_blocks = pool_blocks(
        local_config(loaded.config, ranks) if ranks > 1 else loaded.config,
        loaded.dtype,
        loaded.device,
        num_slots=config.max_sessions,
        max_len=max_context + max_block,
        memory_gb=rank_kv_memory(config.kv_memory, loaded.device, ranks),
    )
    build = (
        partial(start_tensor_parallel, loaded, ranks) if ranks > 1 else partial(ModelRunner, loaded)
    )
    runner: ModelRunner = build(
        num_slots=config.max_sessions,
        max_context=max_context,
        max_block=max_block,
        kv_blocks=kv_blocks,
        attention_kernel=config.attention,
    )
    limits = GenerationLimits(
        max_tree_nodes=config.max_tree_nodes, max_tree_depth=config.max_tree_depth
    )
    return TargetEngine(runner, limits)


def _build_draft(draft: LoadedModel, config: ServerConfig, max_context: int) -> DraftEngine:
    """The server-side draft: one KV slot per API session, as long as the target's context."""
    shape = config.tree_shape
    runner = ModelRunner(
        draft,
        num_slots=config.max_sessions,
        max_context=min(max_context, draft.config.max_context),
        max_block=shape.max_block,
    )
    logger.info(
        "server-side drafting with %s: trees of %s nodes, depth %d (--budget, --depth)",
        draft.name,
        f"up to {shape.budget}" if config.adaptive else shape.budget,
        shape.depth,
    )
    return DraftEngine(runner, shape)
