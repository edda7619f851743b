"""ASGI middleware around every request, outermost first: metrics (count and time every request, the refused ones
too), then the guard (API key, then body size) that refuses a request before any route reads it."""
from __future__ import annotations

import time
from typing import Dict, Optional

from .errors import error_response
from .metrics import ServiceMetrics
from .settings import APIKeys

# endpoints counted under their own path; any other path is "/static" or "other", so that requests for made-up
# paths cannot grow the number of series without bound
KNOWN_ENDPOINTS = {"/", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/v1/models", "/v1/caption",
                   "/v1/vqa", "/v1/search", "/v1/thumbnail", "/v1/tags", "/v1/subtitle"}


def endpoint_label(path: str) -> str:
    """The ``endpoint`` label of a request for ``path``."""
    if path in KNOWN_ENDPOINTS:
        return path
    return "/static" if path.startswith("/static/") else "other"


class MetricsMiddleware:
    """Counts requests by endpoint, method and status, times them, and tracks how many are in flight."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = endpoint_label(scope["path"])
        status = {"code": 500}  # if the app fails before it responds
        start = time.perf_counter()

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(endpoint=endpoint, method=scope["method"], status=str(status["code"])).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)


class GuardMiddleware:
    """401 before any work for protected paths; 413 for bodies over the limit (read at most limit+1 bytes): that of
    the path in ``path_limits`` (video uploads), else ``max_body_bytes``."""

    def __init__(self, app, keys: APIKeys, max_body_bytes: int, path_limits: Optional[Dict[str, int]] = None):
        self.app, self.keys, self.max_body = app, keys, max_body_bytes
        self.path_limits = dict(path_limits or {})

    @staticmethod
    def _presented_key(scope) -> Optional[str]:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip()
        return headers.get("x-api-key")

    def _protected(self, path: str) -> bool:
        return self.keys.enabled and (path.startswith("/v1/") or path == "/metrics")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self._protected(scope["path"]) and not self.keys.check(self._presented_key(scope)):
            has_key = self._presented_key(scope) is not None
            msg = ("API key not accepted" if has_key else
                   "missing API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")
            resp = error_response(401, "unauthorized", msg, {"WWW-Authenticate": "Bearer"})
            return await resp(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        limit = self.path_limits.get(scope["path"], self.max_body)

        def too_large():  # built only when needed: most requests are not
            return error_response(413, "payload_too_large", f"request body is over the limit of {limit:,} bytes")

        if length is not None and length.isdigit() and int(length) > limit:
            return await too_large()(scope, receive, send)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    return await too_large()(scope, receive, send)
                chunks.append(chunk)
                more = message.get("more_body", False)
            body = b"".join(chunks)
            sent = False

            async def replay():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)
