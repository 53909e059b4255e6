"""What runs in Ray Serve's HTTP proxy: a request sent again when the ingress replica holding it died,
and the proxy's own errors as the API's JSON error body.

Serve's proxy answers a request whose ingress replica died mid-request with a bare ``500 Internal
Server Error``, and its own refusals (the ingress's queue full, the application unavailable, its
timeout, an unknown route) as ``text/plain``. :class:`ResilientProxyMiddleware` wraps the proxy's ASGI
app: it keeps the request body (up to ``RE2G_PROXY_MAX_BODY_BYTES``), and when the proxy ends a
request without starting a response (the replica died: Serve's router has marked it dead, so the
request goes to another ingress replica, or waits for the replacement) it sends the request again,
until ``RE2G_PROXY_DEADLINE_S`` has passed (then 503 ``unavailable``). Every API request is
idempotent (answers are computed from the request alone). A non-JSON error the proxy produced
becomes :class:`serve.schemas.ErrorResponse` JSON with the same status and headers (``Retry-After``
kept). Nothing else is touched: a response streams through as soon as its first body chunk exists.

Serve loads proxy middlewares from the import path in ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
(read when the proxy process starts); :func:`controller_options` puts it, and the settings, in the
Serve controller's runtime environment, which the proxies it starts inherit:
``serve.start(..., controller_options=controller_options(cfg.serve))`` (:func:`start_serve`), or the
``controller_options:`` block of ``serve/config.yaml``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

log = logging.getLogger("re2g.serve.proxy")

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK_PATH = "serve.proxy:proxy_middlewares"
DEADLINE_ENV = "RE2G_PROXY_DEADLINE_S"
MAX_BODY_ENV = "RE2G_PROXY_MAX_BODY_BYTES"
DEFAULT_DEADLINE_S = 30.0
DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
STATUS_ERRORS = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 408: "deadline_exceeded",
                 413: "payload_too_large", 429: "overloaded", 499: "client_closed_request", 500: "internal",
                 502: "unavailable", 503: "unavailable", 504: "deadline_exceeded"}


def controller_options(serve_cfg: Any = None) -> dict:
    """``controller_options`` for ``serve.start``: the proxy middleware's import path, and its deadline
    (``serve.request_timeout_s``) and body limit (``serve.max_body_bytes``) from a ``ServeConfig``."""
    env = {CALLBACK_ENV: CALLBACK_PATH}
    if serve_cfg is not None:
        env[DEADLINE_ENV] = str(float(serve_cfg.request_timeout_s))
        env[MAX_BODY_ENV] = str(int(serve_cfg.max_body_bytes))
    return {"runtime_env": {"env_vars": env}}


def start_serve(http_options: dict, serve_cfg: Any = None, **kwargs) -> None:
    """``serve.start`` with the proxy middleware (:func:`controller_options`)."""
    from ray import serve

    serve.start(http_options=http_options, controller_options=controller_options(serve_cfg), **kwargs)


def proxy_middlewares() -> list:
    """The callback Serve's proxy calls (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    from starlette.middleware import Middleware

    return [Middleware(ResilientProxyMiddleware,
                       deadline_s=float(os.environ.get(DEADLINE_ENV, DEFAULT_DEADLINE_S)),
                       max_body_bytes=int(os.environ.get(MAX_BODY_ENV, DEFAULT_MAX_BODY_BYTES)))]


def error_body(status: int, message: str) -> bytes:
    """An :class:`serve.schemas.ErrorResponse` as JSON bytes (the proxy's 503 for a full queue:
    ``overloaded``; for a deployment that is down: ``unavailable``)."""
    code = "overloaded" if status in (429, 503) and "backpressure" in message.lower() else \
        STATUS_ERRORS.get(status, "http_error")
    return json.dumps({"error": code, "message": message, "errors": []}).encode()


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"").split(b";")[0].strip().lower()
    return ctype == b"application/json" or ctype.endswith(b"+json")


class ResilientProxyMiddleware:
    """ASGI middleware around Serve's proxy app (see the module's docstring).

    ``deadline_s``: how long a request may be sent again; ``max_body_bytes``: the largest body kept
    for sending again (a larger one goes through once, as the ingress refuses it anyway);
    ``backoff_s``: the wait before the first resend (doubling, at most 1 s)."""

    def __init__(self, app, deadline_s: float = DEFAULT_DEADLINE_S, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 backoff_s: float = 0.05):
        self.app = app
        self.deadline_s = deadline_s
        self.max_body_bytes = max_body_bytes
        self.backoff_s = backoff_s
        self.resent = 0          # requests sent again (this proxy)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        body, complete, disconnected = await self._read_body(receive)
        if not complete:          # too large to keep: once, as it is
            return await self.app(scope, _replay(body, receive, False, [False]), _JsonErrors(send))
        delay, attempt = self.backoff_s, 0
        while True:
            attempt += 1
            state = _Attempt(send)
            gone = [disconnected]
            await self.app(scope, _replay(body, receive, True, gone), state)
            if state.started:
                return
            if gone[0]:           # the client left: nobody to answer
                return
            if state.held is not None:       # an error whose body never completed: answer it as JSON
                return await state.flush_error()
            left = self.deadline_s - (time.monotonic() - t0)
            if left <= delay:
                log.warning("%s %s: no ingress replica answered within %.1f s (%d attempts)",
                            scope.get("method"), scope.get("path"), self.deadline_s, attempt)
                return await _send_json(send, 503, "the ingress was unavailable; retry later",
                                        [(b"retry-after", b"1")])
            self.resent += 1
            log.warning("%s %s: the ingress replica was lost; sending the request again (attempt %d)",
                        scope.get("method"), scope.get("path"), attempt + 1)
            await asyncio.sleep(delay)
            delay = min(1.0, 2 * delay)

    async def _read_body(self, receive) -> tuple[list[bytes], bool, bool]:
        """(chunks, whole body read, client disconnected)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return chunks, True, True
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if not message.get("more_body", False):
                return chunks, True, False
            if size > self.max_body_bytes:
                return chunks, False, False


def _replay(chunks: list[bytes], receive, complete: bool, gone: list[bool]):
    """A ``receive`` that gives the kept body again, then waits on the real one (for the disconnect)."""
    pending = list(chunks) or [b""]
    sent = 0

    async def replay():
        nonlocal sent
        if sent < len(pending):
            sent += 1
            more = sent < len(pending) or not complete
            return {"type": "http.request", "body": pending[sent - 1], "more_body": more}
        message = await receive()
        if message["type"] == "http.disconnect":
            gone[0] = True
        return message

    return replay


async def _send_json(send, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = error_body(status, message)
    hs = [(k, v) for k, v in headers if k.lower() not in (b"content-type", b"content-length")]
    await send({"type": "http.response.start", "status": status,
                "headers": hs + [(b"content-type", b"application/json"),
                                 (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _JsonErrors:
    """A ``send`` that passes responses through, except a non-JSON error response (4xx/5xx), which it
    collects and sends as the API's JSON error body."""

    def __init__(self, send):
        self.send = send
        self.started = False          # something went to the client
        self.held: dict | None = None  # the start of an error response being collected
        self.chunks: list[bytes] = []

    async def __call__(self, message):
        kind = message["type"]
        if kind == "http.response.start":
            headers = list(message.get("headers") or [])
            if int(message["status"]) >= 400 and not _is_json(headers):
                self.held = message
                return
            self.started = True
            return await self.send(message)
        if kind == "http.response.body" and self.held is not None:
            self.chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                await self.flush_error()
            return
        return await self.send(message)

    async def flush_error(self) -> None:
        held, self.held = self.held, None
        text = b"".join(self.chunks).decode("utf-8", "replace").strip() or "error"
        self.started = True
        await _send_json(self.send, int(held["status"]), text, list(held.get("headers") or []))


class _Attempt(_JsonErrors):
    """:class:`_JsonErrors` for one attempt: nothing reaches the client before the first body chunk,
    so an attempt that ends without a response can be made again."""

    def __init__(self, send):
        super().__init__(send)
        self.pending_start: dict | None = None

    async def __call__(self, message):
        kind = message["type"]
        if kind == "http.response.start" and not self.started:
            headers = list(message.get("headers") or [])
            if int(message["status"]) >= 400 and not _is_json(headers):
                self.held = message
            else:
                self.pending_start = message
            return
        if kind == "http.response.body" and self.pending_start is not None:
            start, self.pending_start = self.pending_start, None
            self.started = True
            await self.send(start)
            return await self.send(message)
        return await super().__call__(message)
