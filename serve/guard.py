"""What the API refuses, and how: :class:`ApiError` (every error answered as JSON,
:class:`serve.schemas.ErrorResponse`), the :class:`GuardMiddleware` that checks the API key, the body's
size and its content type before routing, FastAPI's validation errors as one :class:`ApiError`
(:func:`validation_error`), and the error responses every route documents (:data:`ERROR_RESPONSES`).
"""

from __future__ import annotations

import hmac
from typing import Any, Sequence

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from serve.metrics import IngressMetrics
from serve.schemas import ErrorResponse, FieldError

KNOWN_ROUTES = frozenset({"/", "/docs", "/openapi.json", "/healthz", "/v1/info", "/v1/answer", "/v1/answer:batch",
                          "/v1/retrieve", "/v1/rerank"})
JSON_TYPES = ("application/json",)
READ_AS_JSON = ("", "application/x-www-form-urlencoded", "text/plain")   # curl -d, fetch with a string body


class ApiError(Exception):
    """An error answered as JSON with ``status``, an error code, a message and the fields at fault."""

    def __init__(self, status: int, error: str, message: str, errors: Sequence[tuple[str, str]] = (),
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.errors = [FieldError(field=f, reason=r) for f, r in errors]
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=self.error, message=self.message, errors=self.errors)
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


def bad_field(name: str, reason: str, status: int = 422) -> ApiError:
    return ApiError(status, "invalid_request", f"{name}: {reason}", [(name, reason)])


def internal_error(exc: BaseException) -> ApiError:
    """The 500 of an unexpected exception (logged where it is caught)."""
    return ApiError(500, "internal", f"internal error ({type(exc).__name__}); see the ingress logs")


# --------------------------------------------------------------------------- middleware


def _route_path(scope: dict) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


async def _send_error(scope, receive, send, err: ApiError) -> None:
    await err.response()(scope, receive, send)


class GuardMiddleware:
    """API key (``/v1/*``), body size limit, content type, and the request counter -- before routing.

    The whole body of a POST is read here (at most ``max_body_bytes``; a larger ``Content-Length`` is
    refused before reading) and handed on, so a slow or huge upload never reaches the app."""

    def __init__(self, app, settings, metrics: IngressMetrics):
        self.app = app
        self.s = settings
        self.metrics = metrics
        self._key = settings.api_key.encode() if settings.api_key else None
        self._header = settings.api_key_header.lower().encode("latin-1")

    def _authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        given = None
        for k, v in headers:
            if k == self._header:
                given = v.strip()
            elif k == b"authorization" and given is None and v[:7].lower() == b"bearer ":
                given = v[7:].strip()
        return given is not None and hmac.compare_digest(given, self._key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = _route_path(scope)
        route = path if path in KNOWN_ROUTES else "other"
        status_seen: list[int] = []

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_seen.append(int(message["status"]))
            await send(message)

        try:
            err = None
            headers = scope.get("headers") or []
            if self._key is not None and path.startswith("/v1/") and scope.get("method") != "OPTIONS" \
                    and not self._authorized(headers):
                err = ApiError(401, "unauthorized", f"missing or wrong API key: send it in the "
                               f"{self.s.api_key_header} header (or Authorization: Bearer KEY)",
                               [(self.s.api_key_header, "missing or wrong API key")],
                               headers={"WWW-Authenticate": f'ApiKey header="{self.s.api_key_header}"'})
            elif scope.get("method") in ("POST", "PUT", "PATCH"):
                err, receive = await self._read_body(scope, receive, path)
            if err is not None:
                await _send_error(scope, receive, send_wrapper, err)
                return
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.request(route, status_seen[0] if status_seen else 499)

    async def _read_body(self, scope, receive, path: str):
        limit = self.s.max_body_bytes
        too_large = ApiError(413, "payload_too_large", f"the request body is larger than {limit} bytes",
                             [("body", f"larger than {limit} bytes")])
        headers = list(scope.get("headers") or [])
        for k, v in headers:
            if k == b"content-length":
                try:
                    if int(v) > limit:
                        return too_large, receive
                except ValueError:
                    return ApiError(400, "invalid_request", "Content-Length is not a number",
                                    [("content-length", "not a number")]), receive
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return ApiError(400, "invalid_request", "client disconnected"), receive
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return too_large, receive
            chunks.append(body)
            if not message.get("more_body", False):
                break
        data = b"".join(chunks)
        if path.startswith("/v1/"):
            ctype = next((v.decode("latin-1") for k, v in headers if k == b"content-type"), "")
            base = ctype.split(";")[0].strip().lower()
            if base in READ_AS_JSON:
                headers = [(k, v) for k, v in headers if k != b"content-type"] + \
                          [(b"content-type", b"application/json")]
                scope["headers"] = headers
            elif not (base in JSON_TYPES or base.endswith("+json")):
                return ApiError(415, "unsupported_media_type", f"the body must be JSON, got {ctype!r}",
                                [("content-type", f"expected application/json, got {ctype!r}")]), receive
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        return None, replay


# --------------------------------------------------------------------------- validation errors


def _field_name(loc: Sequence[Any]) -> str:
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or "body"


def _reason(e: dict) -> str:
    t, msg = e.get("type", ""), str(e.get("msg", ""))
    if t == "missing":
        return "required"
    if t == "string_too_long":
        n = len(e["input"]) if isinstance(e.get("input"), str) else "too many"
        return f"has {n} characters; the limit is {(e.get('ctx') or {}).get('max_length')} characters"
    if t == "extra_forbidden":
        return "unknown field"
    if t in ("model_attributes_type", "dict_type", "model_type"):
        return "expected a JSON object"
    return msg.removeprefix("Value error, ")


def validation_error(exc: RequestValidationError, query_note: str = "") -> ApiError:
    """FastAPI's validation errors as one :class:`ApiError`: 400 for a body that is not JSON, else 422.
    ``query_note`` is appended to the reason of a query that is too long."""
    errs = exc.errors()
    bad_json = next((e for e in errs if e.get("type") == "json_invalid"), None)
    if bad_json is not None:
        ctx = bad_json.get("ctx") or {}
        pos = bad_json["loc"][1] if len(bad_json.get("loc", ())) > 1 else "?"
        reason = f"not valid JSON: {ctx.get('error', 'decode error')} at character {pos}"
        return ApiError(400, "invalid_json", f"body: {reason}", [("body", reason)])
    fields = []
    for e in errs:
        loc = e.get("loc", ())
        if loc and loc[0] not in ("body",):      # query/path/header parameters: keep their kind
            fields.append((".".join(str(p) for p in loc), _reason(e)))
        else:
            name, reason = _field_name(loc), _reason(e)
            if query_note and e.get("type") == "string_too_long" and (name == "query" or name.startswith("queries[")):
                reason += query_note
            fields.append((name, reason))
    if not fields:
        fields = [("body", "invalid")]
    message = "; ".join(f"{f}: {r}" for f, r in fields)
    return ApiError(422, "invalid_request", message, fields)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "the body is not JSON"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key"},
    413: {"model": ErrorResponse, "description": "the body is larger than serve.max_body_bytes (never for a "
          "schema-valid request in compact JSON: the item limits are chosen so)"},
    415: {"model": ErrorResponse, "description": "the body is not JSON (content type)"},
    422: {"model": ErrorResponse, "description": "a field is wrong (named in errors[].field)"},
    503: {"model": ErrorResponse, "description": "queues full (see Retry-After) or a deployment unavailable"},
    504: {"model": ErrorResponse, "description": "the deadline passed"},
}
