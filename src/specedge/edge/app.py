"""Wiring of `specedge edge`: the draft model, its worker thread, the server link, the HTTP API.

`build_edge` assembles an `EdgeRuntime` around a loaded draft model. `EdgeServer` checks the
server (handshake) before listening, then runs the API with uvicorn and logs one readiness line:
"edge serving MODEL at http://HOST:PORT". MODEL is the server's target (every token the edge
returns is the target's), unless `--served-model-name` names it otherwise; `/v1/models` lists
the draft with it. `BackgroundEdge` runs one in a thread (tests, demos);
`run_edge` is the blocking entry of the CLI.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace

from specedge.background import LoopThread
from specedge.core.draft import DraftEngine
from specedge.core.limits import TreeShape
from specedge.core.model_runner import ModelRunner
from specedge.credentials import BearerKeys, read_key_file
from specedge.edge.api import ApiAuth, ApiLimits, HttpApiServer, ServedModel, create_app
from specedge.edge.client import ClientIdentity, ServerConnection
from specedge.edge.config import EdgeConfig, ProactivePolicy
from specedge.edge.failover import FailoverPolicy, ServerPool
from specedge.edge.metrics import EdgeMetrics
from specedge.edge.proactive import ProactiveDrafter
from specedge.edge.replicas import ReplicaPolicy, ServerTarget
from specedge.edge.runtime import EdgeRuntime
from specedge.edge.worker import DraftWorker
from specedge.model.loader import LoadedModel, load_model, parse_dtype, tokenizer_fingerprint
from specedge.rpc.codec import ServerInfo
from specedge.rpc.security import ChannelSecurity

logger = logging.getLogger(__name__)


@dataclass
class Edge:
    runtime: EdgeRuntime
    draft: LoadedModel
    metrics: EdgeMetrics

    def served_model(self, config: EdgeConfig, target: ServerInfo) -> ServedModel:
        """What the API serves: the target's tokens, so the target's name (or
        `--served-model-name`), with the draft that proposes them."""
        return ServedModel(
            name=config.served_model_name or target.model_name,
            tokenizer=self.draft.tokenizer,  # the target's: the handshake checked the fingerprint
            stop_token_ids=self.draft.stop_token_ids,
            vocab_size=self.draft.config.vocab_size,
            draft=self.draft.name,
        )

    async def close(self) -> None:
        await self.runtime.connection.close()
        await asyncio.to_thread(self.runtime.worker.close)


def build_edge(config: EdgeConfig, draft: LoadedModel) -> Edge:
    """An edge around `draft`; nothing touches the network until a session (or `serve`)."""
    shape = config.tree_shape
    max_context = min(config.max_context, draft.config.max_context)
    # Room past the context: the tree (at its deepest, add-depth) plus a proactive subtree.
    deepest = TreeShape(shape.budget, config.depth + config.proactive_depth, config.width,
                        config.beams, lookup=config.lookup)  # fmt: skip
    runner = ModelRunner(
        draft,
        num_slots=config.max_sessions,
        max_context=max_context,
        max_block=deepest.max_block + config.subtree_shape.max_block,
    )
    engine = DraftEngine(runner, shape)
    drafter = ProactiveDrafter(
        engine, ProactivePolicy(config.proactive), config.subtree_shape, decay_p=config.decay
    )
    fingerprint = tokenizer_fingerprint(draft.tokenizer)
    identity = ClientIdentity(fingerprint, draft.config.vocab_size, shape, config.adaptive)
    security = ChannelSecurity(
        config.use_tls, config.tls_ca, config.tls_cert, config.tls_key, config.tls_server_name
    )

    def replica(address: str, target: ServerTarget) -> ServerConnection:
        """One replica's connection; a resolved name's certificate must carry the name."""
        named = security
        if target.is_name and security.server_name is None:
            named = replace(security, server_name=target.host)
        return ServerConnection(
            address,
            identity,
            auth_token=config.auth_token,
            security=named,
            connect_timeout_s=config.connect_timeout,
            reply_timeout_s=config.reply_timeout,
        )

    metrics = EdgeMetrics()
    connection = ServerPool(
        config.targets,
        replica,
        FailoverPolicy(timeout_s=config.failover_timeout),
        replica_policy=ReplicaPolicy(
            poll_interval_s=config.load_poll_interval,
            poll_timeout_s=config.connect_timeout,
            resolve_interval_s=config.resolve_interval,
        ),
        metrics=metrics,
    )
    runtime = EdgeRuntime(
        worker=DraftWorker(),
        draft=engine,
        drafter=drafter,
        connection=connection,
        fingerprint=fingerprint,
        max_context=max_context,
        max_sessions=config.max_sessions,
        adaptive=config.adaptive,
        server_decoding=config.server_decoding,
        queue_timeout=config.queue_timeout,
    )
    return Edge(runtime, draft, metrics)


class EdgeServer:
    """One edge: `start` handshakes with the server (a mismatch or an unreachable server is a
    start-up error), binds the HTTP API (port 0 picks a free one; read `url` afterwards) and
    logs the readiness line; `stop` shuts the API down and releases the model thread."""

    def __init__(self, config: EdgeConfig, draft: LoadedModel | None = None) -> None:
        self.config = config
        self._draft = draft
        self.edge: Edge | None = None
        self.url = ""
        self._http: HttpApiServer | None = None

    async def start(self) -> None:
        config = self.config
        draft = self._draft
        if draft is None:
            draft = await asyncio.to_thread(_load_draft, config)
        self.edge = edge = build_edge(config, draft)
        for warning in config.exposure_warnings():
            logger.warning(warning)
        try:
            info = await edge.runtime.connection.wait_ready(config.startup_timeout)
            logger.info("verification server %s: target %r", config.server, info.model_name)
            served = edge.served_model(config, info)
            limits = ApiLimits(config.max_body_bytes, config.stream_timeout)
            app = create_app(edge.runtime, served, edge.metrics, limits=limits, auth=_auth(config))
            self._http = HttpApiServer(config.host, config.port)
            await self._http.start(app)
        except BaseException:
            if self._http is not None:
                await self._http.stop(0.0)
            await edge.close()
            raise
        self.url = self._http.url
        logger.info("edge serving %s at %s", served.name, self.url)

    async def wait(self) -> None:
        """Until the API stops (SIGINT/SIGTERM in the main thread, or `stop`)."""
        assert self._http is not None
        await self._http.wait()

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.stop()
        if self.edge is not None:
            await self.edge.close()


class BackgroundEdge:
    """An edge on its own event loop in a daemon thread (tests, in-process demos).
    `start()` returns once it serves; `stop()` shuts it down and joins the thread."""

    def __init__(self, config: EdgeConfig, draft: LoadedModel | None = None) -> None:
        self.server = EdgeServer(config, draft)
        self._loop = LoopThread()

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def runtime(self) -> EdgeRuntime:
        assert self.server.edge is not None
        return self.server.edge.runtime

    def start(self) -> BackgroundEdge:
        self._loop.start(self.server.start())
        return self

    def stop(self) -> None:
        self._loop.run(self.server.stop())
        self._loop.close()


def _auth(config: EdgeConfig) -> ApiAuth | None:
    """The API keys the HTTP API requires (`--api-key-file`), or None: open."""
    if config.api_key_file is None:
        return None
    return ApiAuth(BearerKeys(read_key_file(config.api_key_file)), config.protect_metrics)


def _load_draft(config: EdgeConfig) -> LoadedModel:
    dtype = parse_dtype(config.dtype) if config.dtype else None
    return load_model(config.model, config.device, dtype)


def run_edge(config: EdgeConfig) -> None:
    """Load the draft model and serve until SIGINT/SIGTERM: the `specedge edge` command."""
    logging.getLogger("specedge").setLevel(logging.INFO)

    async def main() -> None:
        edge = EdgeServer(config)
        await edge.start()
        try:
            await edge.wait()
        finally:
            await edge.stop()

    asyncio.run(main())
