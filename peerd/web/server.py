"""The HTTP server: `/metrics`, the page `/` with its assets, `/api/status` and `/api/rounds`.

aiohttp serves on the event loop of the process (the daemon's uvloop, or `peerd cluster`'s
watcher loop): no thread per connection, and memory bounded under a flood: at most
MAX_CONNECTIONS are served at once (more are closed on accept, counted and logged once per
interval), a connection that has not sent a whole request after IDLE_TIMEOUT_S is closed,
request heads are capped by aiohttp's own limits and bodies are never read. Every route is
GET or HEAD: another method answers 405, an unknown path 404; nothing changes state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any, Protocol, TypeVar

from aiohttp import web

log = logging.getLogger("peerd.web")

MAX_CONNECTIONS = 64
IDLE_TIMEOUT_S = 10.0
REFUSAL_LOG_INTERVAL_S = 60.0
# A stopping daemon gives requests under way this long to finish.
SHUTDOWN_GRACE_S = 1.0
# The page, its script and style: package data (pyproject.toml), never fetched from elsewhere.
ASSETS = {"index.html": "text/html", "page.js": "text/javascript", "page.css": "text/css"}
# Browsers may keep the assets a while; the API is always fresh.
ASSET_CACHE = "max-age=60"


T = TypeVar("T")


class NotServed(LookupError):
    """Asked for something this source does not have (answered 404 with the message)."""


class PageSource(Protocol):
    """What the page shows; a daemon and `peerd cluster` each provide one."""

    async def status(self) -> dict[str, Any]: ...

    async def rounds(self, peer_id: str | None, since: int) -> dict[str, Any]: ...

    def metrics(self) -> bytes | None: ...


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such numbers (a loss before the first round) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def encode_json(body: dict[str, Any]) -> str:
    return json.dumps(_finite(body), separators=(",", ":"))


def json_response(text: str) -> web.Response:
    return web.Response(text=text, content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _since(request: web.Request) -> int:
    text = request.query.get("since", "0")
    try:
        since = int(text)
    except ValueError:
        raise web.HTTPBadRequest(text=f"since={text!r} is invalid: must be a round number "
                                 ">= 0") from None
    if since < 0:
        raise web.HTTPBadRequest(text=f"since={since} is invalid: must be >= 0")
    return since


OffLoop = Callable[..., Awaitable[Any]]


def build_app(source: PageSource, off_loop: OffLoop) -> web.Application:
    """The routes; `off_loop(function, *args)` runs CPU work away from the event loop."""
    # Bodies are never read; the cap stops aiohttp buffering one should a handler ever try.
    app = web.Application(client_max_size=1024)
    static = resources.files("peerd.web") / "static"

    def asset(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        body = (static / name).read_bytes()  # read once: a few kilobytes

        async def serve(request: web.Request) -> web.Response:
            return web.Response(body=body, content_type=ASSETS[name],
                                headers={"Cache-Control": ASSET_CACHE})
        return serve

    async def metrics(request: web.Request) -> web.Response:
        text = source.metrics()
        if text is None:
            raise web.HTTPNotFound(text="no Prometheus metrics here")
        return web.Response(body=text, headers={"Content-Type": "text/plain; version=0.0.4"})

    async def status(request: web.Request) -> web.Response:
        return json_response(await off_loop(encode_json, await source.status()))

    async def rounds(request: web.Request) -> web.Response:
        try:
            body = await source.rounds(request.query.get("peer"), _since(request))
        except NotServed as error:
            raise web.HTTPNotFound(text=str(error)) from None
        return json_response(await off_loop(encode_json, body))

    app.router.add_get("/", asset("index.html"))
    for name in ("page.js", "page.css"):
        app.router.add_get(f"/{name}", asset(name))
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/status", status)
    app.router.add_get("/api/rounds", rounds)
    return app


class _Refused(asyncio.Protocol):
    """A connection beyond the cap: closed at once, nothing read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()


class WebServer:
    """Serves a PageSource on host:port of the running loop until stopped."""

    def __init__(self, source: PageSource, max_connections: int = MAX_CONNECTIONS,
                 idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
        self.source = source
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.refused = 0  # connections closed on accept, beyond the cap
        self._refusal_logged_at = -math.inf
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        # File reads and JSON building run off the loop on one thread: requests queue there
        # instead of each taking a thread (and, in glibc, a malloc arena) of their own.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="web")

    async def off_loop(self, function: Callable[..., T], *args: Any) -> T:
        """Run `function(*args)` on the server's worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, function, *args)

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: any free port); returns the bound port."""
        if self._runner is not None:
            raise RuntimeError("web server already started")
        # access_log off: a poll a second per open page would flood the journal.
        runner = web.AppRunner(build_app(self.source, self.off_loop), access_log=None,
                               keepalive_timeout=self.idle_timeout_s,
                               shutdown_timeout=SHUTDOWN_GRACE_S)
        await runner.setup()
        handlers = runner.server
        assert handlers is not None

        def protocol() -> asyncio.BaseProtocol:
            # Connections accepted in one batch are counted only once they start, so the cap
            # may be passed by at most a backlog's worth.
            if len(handlers.connections) >= self.max_connections:
                self._refuse()
                return _Refused()
            return handlers()

        try:
            self._server = await asyncio.get_running_loop().create_server(
                protocol, host, port, backlog=self.max_connections, reuse_address=True)
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        return int(self._server.sockets[0].getsockname()[1])

    def _refuse(self) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._refusal_logged_at >= REFUSAL_LOG_INTERVAL_S:
            self._refusal_logged_at = now
            log.warning("web server: %d connections open, refusing more (%d refused so far)",
                        self.max_connections, self.refused)

    async def stop(self) -> None:
        """Stop listening, close every connection and free the port; a no-op when not started."""
        if self._runner is None:
            return
        assert self._server is not None
        self._server.close()
        await self._runner.cleanup()  # closes the open connections
        await self._server.wait_closed()
        self._worker.shutdown(wait=True)
        self._runner = self._server = None
