"""``/v1/answer`` with ``"stream": true``: server-sent events over real HTTP on loopback (the API app under
uvicorn in a thread), over scripted stages whose timing and failures the tests choose: the events in
order, each as soon as its stage has finished; the answer event is the non-streamed body; bad requests
and a failed first stage are JSON errors with their status; a later failure is an ``error`` event; the
deadline covers the stream; a client that disconnects cancels the stage in flight; a stage call whose
replica died is sent again (``serve.app.HandleBackend``); ``: ping`` comments while a stage is slow.

The same over the real Serve app (the events through Serve's proxy, the same answer with and without
``stream``) and the web page that reads the stream: tests/test_web_page.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from re2g.types import Hit
from test_serve import free_port

def parse_sse(text: str) -> list[tuple[str, dict]]:
    """``(event, data)`` of every event in a text/event-stream body (comments skipped)."""
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        if data:
            out.append((name, json.loads("\n".join(data))))
    return out


def read_events(client: httpx.Client, body: dict, stop_after: str | None = None):
    """POST ``body`` (``stream`` true unless it says otherwise) and read the stream: (response,
    [(event, data, seconds since the request)], raw text).
    ``stop_after``: close the connection once that event has arrived."""
    t0 = time.perf_counter()
    events, raw = [], ""
    with client.stream("POST", "/v1/answer", json={"stream": True, **body}) as r:
        if not r.headers["content-type"].startswith("text/event-stream"):
            r.read()
            return r, [], r.text
        buf = ""
        for chunk in r.iter_text():
            raw += chunk
            buf += chunk
            while "\n\n" in buf:
                block, buf = buf.split("\n\n", 1)
                for name, data in parse_sse(block + "\n\n"):
                    events.append((name, data, time.perf_counter() - t0))
                    if name == stop_after:
                        return r, events, raw
    return r, events, raw


class ScriptedBackend:
    """:class:`serve.api.Backend` whose stages take ``delays[stage]`` seconds, then raise ``fail[stage]`` if
    set; records the stages started, finished and cancelled."""

    def __init__(self):
        self.reset()

    def reset(self, delays: dict | None = None, fail: dict | None = None):
        self.delays = {"retrieve": 0.02, "rerank": 0.02, "generate": 0.02, **(delays or {})}
        self.fail = dict(fail or {})
        self.started: list[str] = []
        self.finished: list[str] = []
        self.cancelled: list[str] = []

    async def _stage(self, name: str):
        self.started.append(name)
        try:
            await asyncio.sleep(self.delays[name])
        except asyncio.CancelledError:
            self.cancelled.append(name)
            raise
        if self.fail.get(name) is not None:
            raise self.fail[name]
        self.finished.append(name)

    async def retrieve(self, query):
        await self._stage("retrieve")
        return [Hit(pid=f"p{i}", score=10.0 - i, rank=i, source=("dpr", "bm25")[i % 2], title=f"T{i}",
                    text=f"passage {i} about {query}") for i in range(8)]

    async def rerank(self, query, hits, top_k):
        await self._stage("rerank")
        order = sorted(hits, key=lambda h: h.pid, reverse=True)[:top_k]
        return [h.with_(rerank_score=1.0 - j, rerank_rank=j) for j, h in enumerate(order)]

    async def generate(self, query, reranked):
        await self._stage("generate")
        w = 1.0 / len(reranked)
        prov = [h.with_(weight=w) for h in reranked]
        cands = [SimpleNamespace(text="an answer", logprob=-0.5), SimpleNamespace(text="another", logprob=-2.0)]
        return SimpleNamespace(query=query, answer="an answer", candidates=cands, provenance=prov)

    async def health(self):
        return {"retriever": {"ok": True, "detail": "scripted"}}

    def count_tokens(self, query):
        return len(query.split())


class LoopbackServer:
    """An ASGI app under uvicorn on a free loopback port, in a thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started and time.time() < deadline:
            time.sleep(0.01)
        assert self.server.started, "uvicorn did not start"
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def backend():
    return ScriptedBackend()


@pytest.fixture(scope="module")
def client(backend):
    from serve.api import ApiSettings, create_api

    server = LoopbackServer(create_api(backend, ApiSettings(stream_ping_s=0.1, retrieve_k=8, default_n_docs=3,
                                                            request_timeout_s=10)))
    try:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            yield c
    finally:
        server.stop()


def without_timings(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "timings"}


# --------------------------------------------------------------------------- the events


def test_events_come_in_order_as_each_stage_finishes(client, backend):
    from serve.schemas import AnswerResponse, RerankResponse, RetrieveResponse

    backend.reset(delays={"retrieve": 0.1, "rerank": 0.1, "generate": 0.6})
    r, events, raw = read_events(client, {"query": "who wrote it", "n_docs": 2, "top_k": 6})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), raw
    assert r.headers["cache-control"] == "no-cache"
    assert [e for e, _, _ in events] == ["retrieved", "reranked", "answer", "done"], raw
    (_, retrieved, t_ret), (_, reranked, t_rr), (_, answer, t_ans), (_, done, _) = events
    # each event as soon as its stage has finished: the evidence 0.6 s (generation) before the answer
    assert t_ret <= t_rr < t_ans - 0.3, events
    assert ": ping" in raw.split("event: reranked")[1].split("event: answer")[0]   # while generating

    retrieved, reranked = RetrieveResponse.model_validate(retrieved), RerankResponse.model_validate(reranked)
    assert [h.pid for h in retrieved.hits] == [f"p{i}" for i in range(6)]           # top_k candidates
    assert [p.pid for p in reranked.passages] == ["p5", "p4"] and reranked.passages[0].source == "bm25"
    assert retrieved.timings.retrieve >= 0.09 and reranked.timings.rerank >= 0.09 and reranked.timings.generate is None
    assert done == {"ok": True}

    # the answer event is the body the same request without stream gets
    plain = client.post("/v1/answer", json={"query": "who wrote it", "n_docs": 2, "top_k": 6})
    assert plain.status_code == 200 and plain.headers["content-type"] == "application/json"
    assert without_timings(answer) == without_timings(plain.json())
    AnswerResponse.model_validate(answer)
    assert [p["pid"] for p in answer["provenance"]] == [p.pid for p in reranked.passages]
    assert answer["timings"]["generate"] >= 0.59

    # return_passages false: no passage text in any event
    _, events, _ = read_events(client, {"query": "who wrote it", "return_passages": False})
    payload = {e: d for e, d, _ in events}
    assert all(h["text"] is None for h in payload["retrieved"]["hits"])
    assert all(p["text"] is None for p in payload["reranked"]["passages"] + payload["answer"]["provenance"])


def test_bad_requests_and_a_failed_first_stage_are_json_errors(client, backend):
    """Nothing has been sent before the first event: the status and JSON body of the non-streamed answer."""
    from ray.serve.exceptions import BackPressureError

    backend.reset()
    for body, field in (({"query": " ", "stream": True}, "query"), ({"query": "x", "stream": "yes"}, "stream"),
                        ({"query": "x", "stream": True, "n_docs": 0}, "n_docs")):
        r, events, text = read_events(client, body)
        assert r.status_code == 422 and not events, text
        assert r.json()["errors"][0]["field"] == field
    assert not backend.started

    backend.reset(fail={"retrieve": BackPressureError(num_queued_requests=5, max_queued_requests=4)})
    r, _, text = read_events(client, {"query": "x", "stream": True})
    assert r.status_code == 503 and r.json()["error"] == "overloaded" and r.headers["retry-after"], text

    backend.reset(delays={"retrieve": 2.0})
    r, _, text = read_events(client, {"query": "x", "stream": True, "timeout_s": 0.2})
    assert r.status_code == 504 and r.json()["error"] == "deadline_exceeded", text
    assert backend.cancelled == ["retrieve"]


def test_a_later_failure_is_an_error_event(client, backend):
    from ray.serve.exceptions import DeploymentUnavailableError

    for fail, code in ((DeploymentUnavailableError("Generator"), "unavailable"), (RuntimeError("boom"), "internal")):
        backend.reset(fail={"generate": fail})
        r, events, raw = read_events(client, {"query": "x", "stream": True})
        assert r.status_code == 200, raw
        assert [e for e, _, _ in events] == ["retrieved", "reranked", "error", "done"], raw
        err, done = events[2][1], events[3][1]
        assert err["error"] == code and err["message"] and done == {"ok": False}

    # the deadline covers the whole stream: generation past it is cancelled
    backend.reset(delays={"generate": 5.0})
    t0 = time.perf_counter()
    r, events, raw = read_events(client, {"query": "x", "stream": True, "timeout_s": 0.5})
    assert time.perf_counter() - t0 < 2.0
    assert [e for e, _, _ in events] == ["retrieved", "reranked", "error", "done"], raw
    assert events[2][1]["error"] == "deadline_exceeded" and "0.5 s" in events[2][1]["message"]
    assert backend.cancelled == ["generate"]


def test_a_client_that_disconnects_cancels_the_remaining_work(client, backend):
    backend.reset(delays={"generate": 5.0})
    r, events, _ = read_events(client, {"query": "x", "stream": True}, stop_after="reranked")
    assert [e for e, _, _ in events] == ["retrieved", "reranked"]
    deadline = time.time() + 3
    while not backend.cancelled and time.time() < deadline:
        time.sleep(0.02)
    assert backend.cancelled == ["generate"] and "generate" not in backend.finished
    assert client.get("/healthz").status_code == 200


def test_a_stage_call_that_lost_its_replica_is_sent_again():
    """The ingress's backend in Serve (``HandleBackend``) over handles whose generator replica dies once:
    the stream carries on to the answer."""
    from ray.exceptions import ActorDiedError

    from serve.api import ApiSettings, create_api
    from serve.app import HandleBackend

    stages = ScriptedBackend()

    class Method:
        def __init__(self, fn, failures=()):
            self.fn, self.failures, self.calls = fn, list(failures), 0

        def remote(self, *args):
            self.calls += 1
            failure = self.failures.pop(0) if self.failures else None

            async def result():
                if failure is not None:
                    raise failure
                return await self.fn(*args)

            return result()

    generate = Method(stages.generate, [ActorDiedError()])
    backend = HandleBackend(SimpleNamespace(retrieve=Method(stages.retrieve)),
                            SimpleNamespace(rerank=Method(stages.rerank)), SimpleNamespace(generate=generate), None,
                            retry_backoff_s=0.01)
    backend.count_tokens = stages.count_tokens
    server = LoopbackServer(create_api(backend, ApiSettings(retrieve_k=8)))
    try:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            r, events, raw = read_events(c, {"query": "x", "stream": True})
    finally:
        server.stop()
    assert [e for e, _, _ in events] == ["retrieved", "reranked", "answer", "done"], raw
    assert generate.calls == 2 and backend.retries == 1


def test_openapi_documents_the_event_stream(client):
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/v1/answer"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/AnswerRequest")
    stream = spec["components"]["schemas"]["AnswerRequest"]["properties"]["stream"]
    assert stream["type"] == "boolean" and stream["default"] is False
    content = op["responses"]["200"]["content"]
    assert content["application/json"]["schema"]["$ref"].endswith("/AnswerResponse")
    events = content["text/event-stream"]["itemSchema"]["oneOf"]
    names = [e["properties"]["event"]["const"] for e in events]
    assert names == ["retrieved", "reranked", "answer", "error", "done"]
    for e in events[:4]:
        ref = e["properties"]["data"]["contentSchema"]["$ref"]
        assert ref.rsplit("/", 1)[-1] in spec["components"]["schemas"], ref
    docs = client.get("/docs").text
    assert "text/event-stream" in docs and "curl -sN" in docs
