"""Server-sent events of ``/v1/answer`` with ``"stream": true``: one event per finished stage
(:func:`sse_event`), sent by :class:`EventStream` as a producer task queues them."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from serve.schemas import ErrorResponse, StreamDone


def sse_event(event: str, data: BaseModel | dict) -> bytes:
    """One server-sent event: ``event: NAME`` and the JSON of ``data`` on one ``data:`` line."""
    body = data.model_dump_json() if isinstance(data, BaseModel) else json.dumps(data, separators=(",", ":"))
    return f"event: {event}\ndata: {body}\n\n".encode()


PING = b": ping\n\n"
STREAM_END = None      # what the producer puts in the queue last


class EventStream(StreamingResponse):
    """``text/event-stream`` of ``(event, payload)`` items that a producer task puts in ``queue`` (then
    ``None``), starting with ``first``; an ``error`` item's payload is the :class:`ApiError`, sent as its
    :class:`ErrorResponse`; ``done`` last (``ok``: no ``error`` event was sent). A ``: ping``
    comment goes out after ``ping_s`` s without an event, so proxies keep an idle connection open.

    The client's disconnect (``http.disconnect``, a failed send, or the request's task cancelled, as
    Serve does when the HTTP client goes away) cancels the producer, and with it the stage call in flight
    (a DeploymentHandle call cancelled is cancelled in its replica)."""

    media_type = "text/event-stream"

    def __init__(self, first: tuple[str, Any], queue: asyncio.Queue, producer: asyncio.Task, ping_s: float):
        super().__init__(iter(()), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.first, self.queue, self.producer, self.ping_s = first, queue, producer, ping_s

    async def _next(self, send) -> tuple[str, Any] | None:
        while True:
            try:
                return await asyncio.wait_for(self.queue.get(), self.ping_s)
            except (asyncio.TimeoutError, TimeoutError):
                await send({"type": "http.response.body", "body": PING, "more_body": True})

    async def __call__(self, scope, receive, send) -> None:
        async def watch():
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            except Exception:               # no receive left to read: the same as gone
                pass
            self.producer.cancel()          # nobody is listening: stop the stages still to run

        watcher = asyncio.create_task(watch())
        ok = True
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            item = self.first
            while item is not STREAM_END:
                name, payload = item
                if name == "error":
                    ok = False
                    payload = ErrorResponse(error=payload.error, message=payload.message, errors=payload.errors)
                await send({"type": "http.response.body", "body": sse_event(name, payload), "more_body": True})
                item = await self._next(send)
            await send({"type": "http.response.body", "body": sse_event("done", StreamDone(ok=ok)),
                        "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:                     # the client went away while we sent
            pass
        finally:
            watcher.cancel()
            self.producer.cancel()
