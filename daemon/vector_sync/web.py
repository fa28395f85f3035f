"""The one aiohttp listener: /webhook, /healthz, /readyz and /metrics, run inside the daemon's loop.

`AppRunner(handle_signals=False)`: the daemon, not aiohttp, owns the signals.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from loguru import logger

from vector_sync.metrics import Metrics
from vector_sync.sources.webhook import WebhookReceiver

Readiness = Callable[[], Awaitable[dict[str, Any]]]
"""Returns {"ready": bool, ...details}: what is and is not ready."""

SHUTDOWN_TIMEOUT_SECONDS = 2.0


class HttpServer:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        metrics: Metrics,
        readiness: Readiness,
        webhook: WebhookReceiver | None,
    ) -> None:
        self._host = host
        self._port = port
        self._metrics = metrics
        self._readiness = readiness
        self._webhook = webhook
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def _build(self) -> web.Application:
        @web.middleware
        async def count_responses(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                # Routing errors (404, 405) keep the JSON error shape of every other answer.
                response = web.json_response({"error": exc.reason}, status=exc.status)
            except Exception:
                # A bug, not the input's fault: log it, and let a webhook sender retry later.
                logger.exception("unexpected error answering {method} {path}", method=request.method, path=request.path)
                response = web.json_response(
                    {"error": "temporarily unavailable"}, status=503, headers={"Retry-After": "5"}
                )
            if request.path == "/webhook":
                self._metrics.webhook_responses.labels(str(response.status)).inc()
            return response

        app = web.Application(middlewares=[count_responses])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_route)
        if self._webhook is not None:
            app.router.add_post("/webhook", self._webhook.handle)
        return app

    async def start(self) -> None:
        runner = web.AppRunner(
            self._build(), handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS
        )
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        await site.start()
        self._runner = runner
        sockets = [server_socket for server in runner.sites for server_socket in _sockets(server)]
        self.port = sockets[0].getsockname()[1] if sockets else self._port
        logger.info("http listening on {host}:{port}", host=self._host, port=self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        details = await self._readiness()
        return web.json_response(details, status=200 if details.get("ready") else 503)

    async def _metrics_route(self, _request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(), content_type="text/plain", charset="utf-8")


def _sockets(site: web.BaseSite) -> list[Any]:
    server = getattr(site, "_server", None)
    return list(getattr(server, "sockets", None) or [])
