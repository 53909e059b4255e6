"""No request lost when a replica dies: the real Serve app (shared tiny run directory, the proxy
middleware of ``serve.proxy``, default replica counts: 2 ingress replicas, 1 of each model deployment;
the plain app on the session's Serve instance, deployed once for this module and tests/test_web_page.py)
answers a bounded load of ``/v1/answer`` on loopback while one replica of each deployment in turn is
killed with SIGKILL, and every request gets a 200.

Also the pieces alone: which errors count as a lost replica, the ingress's stage calls sent again, and
the proxy middleware (a request resent when the proxy ends it without a response; the proxy's own
plain-text errors answered as the API's JSON error body).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from test_serve import PLAIN_APP, PLAIN_OVERRIDES

APP = PLAIN_APP          # the plain app, shared with tests/test_web_page.py
KILLED = ("Generator", "Reranker", "Retriever", "Ingress")
# the load per killed deployment; larger for a measurement, e.g. the issue's:
# RE2G_RESILIENCE_REQUESTS=300 RE2G_RESILIENCE_CONCURRENCY=8 pytest -s tests/test_serve_resilience.py -k killed
REQUESTS = int(os.environ.get("RE2G_RESILIENCE_REQUESTS", "40"))
CONCURRENCY = int(os.environ.get("RE2G_RESILIENCE_CONCURRENCY", "4"))
KILL_AFTER = REQUESTS // 5     # answered requests before the kill (the load is running then)
# the serve config's defaults (deadline 30 s, health checks every 2 s: a dead replica is noticed within
# them), with small CPU reservations (test_serve.PLAIN_OVERRIDES); more from the environment (then the app
# is deployed again, with them, for this module)
OVERRIDES = PLAIN_OVERRIDES + [o for o in os.environ.get("RE2G_RESILIENCE_OVERRIDES", "").split(",") if o]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


# --------------------------------------------------------------------------- the pieces alone


def test_replica_lost_classifies_serve_errors():
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
    from ray.serve.exceptions import (BackPressureError, DeploymentUnavailableError, RayServeException,
                                      ReplicaUnavailableError)

    from serve.app import replica_lost

    upstream = RayServeException("upstream actor died")
    upstream.__cause__ = ActorDiedError()
    wrapped = RayTaskError("f", "tb", ActorDiedError())
    for e in (ActorDiedError(), ActorUnavailableError("gone", None), ReplicaUnavailableError("r1"), upstream,
              wrapped):
        assert replica_lost(e), e
    for e in (BackPressureError(num_queued_requests=5, max_queued_requests=4), DeploymentUnavailableError("d"),
              ValueError("bad input"), asyncio.TimeoutError()):
        assert not replica_lost(e), e


def test_stage_calls_are_sent_again_when_a_replica_dies():
    """HandleBackend retries a call that lost its replica (here: twice), not one that failed otherwise;
    the API's deadline ends the retries (504)."""
    from fastapi.testclient import TestClient
    from ray.exceptions import ActorDiedError

    from re2g.types import Hit
    from serve.api import ApiSettings, create_api
    from serve.app import HandleBackend

    class Method:
        def __init__(self, outcomes):
            self.outcomes = list(outcomes)
            self.calls = 0

        def remote(self, *args):
            self.calls += 1
            outcome = self.outcomes.pop(0) if self.outcomes else self.last

            async def result():
                if isinstance(outcome, BaseException):
                    raise outcome
                return outcome

            self.last = outcome
            return result()

    class Handle:
        def __init__(self, outcomes):
            self.retrieve = Method(outcomes)

    hit = Hit(pid="p", score=1.0, rank=0, source="dpr", title="t", text="x")
    flaky = Handle([ActorDiedError(), ActorDiedError(), [hit]])
    backend = HandleBackend(flaky, None, None, lambda q: {"input_ids": q.split()}, retry_backoff_s=0.01)
    backend.count_tokens = lambda q: len(q.split())
    with TestClient(create_api(backend, ApiSettings())) as c:
        r = c.post("/v1/retrieve", json={"query": "x"})
    assert r.status_code == 200 and [h["pid"] for h in r.json()["hits"]] == ["p"], r.text
    assert flaky.retrieve.calls == 3 and backend.retries == 2

    broken = Handle([ValueError("bad")])
    backend = HandleBackend(broken, None, None, None, retry_backoff_s=0.01)
    backend.count_tokens = lambda q: 1
    with TestClient(create_api(backend, ApiSettings()), raise_server_exceptions=False) as c:
        assert c.post("/v1/retrieve", json={"query": "x"}).status_code == 500
    assert broken.retrieve.calls == 1

    dead = Handle([ActorDiedError()])
    dead.retrieve.last = ActorDiedError()
    backend = HandleBackend(dead, None, None, None, retry_backoff_s=0.01)
    backend.count_tokens = lambda q: 1
    with TestClient(create_api(backend, ApiSettings())) as c:
        r = c.post("/v1/retrieve", json={"query": "x", "timeout_s": 0.3})
    assert r.status_code == 504 and r.json()["error"] == "deadline_exceeded", r.text
    assert dead.retrieve.calls > 3


def _asgi_call(app, method="POST", body=b'{"query": "x"}'):
    """Run one request through an ASGI app; returns (status, headers, body, calls seen by the inner app)."""
    sent = []
    chunks = [body]

    async def receive():
        if chunks:
            return {"type": "http.request", "body": chunks.pop(), "more_body": False}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": "/v1/answer", "headers": [], "query_string": b""}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_proxy_middleware_resends_and_answers_json():
    from serve.proxy import ResilientProxyMiddleware

    seen = []

    async def dies_once(scope, receive, send):       # what Serve's proxy does when the ingress replica died
        message = await receive()
        seen.append(message["body"])
        if len(seen) == 1:
            return                                    # no response at all
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"ok": true}'})

    status, _, body = _asgi_call(ResilientProxyMiddleware(dies_once, backoff_s=0.01))
    assert (status, body) == (200, b'{"ok": true}') and seen == [b'{"query": "x"}'] * 2

    async def never(scope, receive, send):
        await receive()

    t0 = time.perf_counter()
    status, headers, body = _asgi_call(ResilientProxyMiddleware(never, deadline_s=0.3, backoff_s=0.01))
    assert status == 503 and json.loads(body)["error"] == "unavailable" and headers[b"retry-after"] == b"1"
    assert time.perf_counter() - t0 < 2

    async def backpressure(scope, receive, send):   # the proxy's own refusal: text/plain
        await receive()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"2")]})
        await send({"type": "http.response.body", "body": b"Request dropped due to backpressure (num_queued_requests=4)."})

    status, headers, body = _asgi_call(ResilientProxyMiddleware(backpressure))
    err = json.loads(body)
    assert status == 503 and headers[b"retry-after"] == b"2" and headers[b"content-type"] == b"application/json"
    assert err["error"] == "overloaded" and "backpressure" in err["message"] and err["errors"] == []

    async def app_error(scope, receive, send):      # the API's own JSON errors pass untouched
        await receive()
        await send({"type": "http.response.start", "status": 422, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"error": "invalid_request"}'})

    assert _asgi_call(ResilientProxyMiddleware(app_error))[::2] == (422, b'{"error": "invalid_request"}')


# --------------------------------------------------------------------------- the real app


def replica_pids(deployment: str) -> set[int]:
    """PIDs of the worker processes of a deployment's replicas (process title ``ray::ServeReplica:APP:NAME``)."""
    import psutil

    tag = f"ServeReplica:{APP}:{deployment}"
    pids = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(tag in part for part in (p.info["cmdline"] or [])):
                pids.add(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def wait_until_computing(pid: int, timeout: float = 5.0) -> None:
    """Return once process ``pid`` is on a CPU (>= 10 ms of CPU time within 20 ms): a model replica is
    then computing a batch, so the kill hits requests it has accepted (else Serve's router would route
    them elsewhere itself, and the test would not test the ingress's retries)."""
    import psutil

    proc = psutil.Process(pid)
    deadline = time.time() + timeout
    while time.time() < deadline:
        t0 = sum(proc.cpu_times()[:2])
        time.sleep(0.02)
        if sum(proc.cpu_times()[:2]) - t0 >= 0.01:
            return


def ingress_retries() -> int:
    """Stage calls the ingress replicas sent again, summed over the replicas (asked until each answered)."""
    from ray import serve

    h = serve.get_deployment_handle("Ingress", app_name=APP)
    seen: dict[int, int] = {}
    for _ in range(40):
        r = h.retries.remote().result(timeout_s=30)
        seen[r["pid"]] = r["retries"]
        if len(seen) >= running_replicas("Ingress"):
            break
    return sum(seen.values())


def running_replicas(deployment: str) -> int:
    from ray import serve

    d = serve.status().applications[APP].deployments[deployment]
    return int(d.replica_states.get("RUNNING", 0))


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def served(serve_instance, serve_run_dir):
    return serve_instance.app(APP, serve_run_dir, OVERRIDES)


async def load_while_killing(url: str, queries: list[str], deployment: str) -> dict:
    """REQUESTS /v1/answer at CONCURRENCY; once KILL_AFTER are answered, SIGKILL one replica of
    ``deployment``. Returns statuses, latencies and the killed PID."""
    results: list[tuple[object, float]] = []
    todo = iter(range(REQUESTS))
    killed: dict = {}

    async def client(c: httpx.AsyncClient):
        for i in todo:
            t0 = time.perf_counter()
            try:
                r = await c.post("/v1/answer", json={"query": queries[i % len(queries)], "n_docs": 2})
                status = r.status_code
                if status != 200:
                    killed.setdefault("errors", []).append(r.text[:300])
            except httpx.HTTPError as e:
                status = type(e).__name__
            results.append((status, time.perf_counter() - t0))

    async def killer():
        while len(results) < KILL_AFTER:
            await asyncio.sleep(0.02)
        pid = sorted(replica_pids(deployment))[0]
        await asyncio.to_thread(wait_until_computing, pid)
        os.kill(pid, signal.SIGKILL)
        killed.update(pid=pid, at=len(results))

    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        await asyncio.gather(killer(), *(client(c) for _ in range(CONCURRENCY)))
    return {"statuses": [s for s, _ in results], "latencies": [t for _, t in results], **killed}


def test_no_request_lost_when_a_replica_is_killed(served, dev_queries_resilience):
    t_start = time.perf_counter()
    expected = {name: running_replicas(name) for name in KILLED}
    assert expected == {"Generator": 1, "Reranker": 1, "Retriever": 1, "Ingress": 2}, expected
    with httpx.Client(base_url=served, timeout=60) as c:           # warm: every stage has answered once
        assert c.post("/v1/answer", json={"query": dev_queries_resilience[0]}).status_code == 200
    rows = []
    for name in KILLED:
        before = replica_pids(name)
        assert len(before) == expected[name], (name, before)
        retries_before = ingress_retries() if name != "Ingress" else 0
        t0 = time.perf_counter()
        out = asyncio.run(load_while_killing(served, dev_queries_resilience, name))
        load_s = time.perf_counter() - t0
        # a replacement replica runs (a new process) before the next kill
        wait_for(lambda: running_replicas(name) == expected[name] and len(replica_pids(name)) == expected[name]
                 and replica_pids(name) != before, 90, f"{name} replaced")
        ok = out["statuses"].count(200)
        retried = ingress_retries() - retries_before if name != "Ingress" else None
        rows.append({"replica_killed": name, "requests": len(out["statuses"]), "answered_200": ok,
                     "lost": len(out["statuses"]) - ok, "worst_latency_s": round(max(out["latencies"]), 2),
                     "load_s": round(load_s, 1), "recovered_s": round(time.perf_counter() - t0, 1),
                     "stage_calls_sent_again": retried, "killed_pid": out["pid"], "killed_after": out["at"],
                     "errors": out.get("errors", [])[:3]})
    table = "\n".join(["| replica killed | 200 | lost | worst latency | stage calls sent again |", "|---|---|---|---|---|"] +
                      [f"| {r['replica_killed']} | {r['answered_200']}/{r['requests']} | {r['lost']} | "
                       f"{r['worst_latency_s']:.1f} s | {r['stage_calls_sent_again']} |" for r in rows])
    print(f"\n{table}\n(total {time.perf_counter() - t_start:.0f} s)")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "serve_resilience.json").write_text(json.dumps({"concurrency": CONCURRENCY, "rows": rows}, indent=1))
    for r in rows:
        assert r["lost"] == 0, rows
        assert r["requests"] == REQUESTS and r["killed_pid"] not in replica_pids(r["replica_killed"])
    # the kills hit requests a model replica had accepted: the ingress sent those calls again
    assert sum(r["stage_calls_sent_again"] or 0 for r in rows) > 0, rows


@pytest.fixture(scope="module")
def dev_queries_resilience(tiny_sample):
    rows = [json.loads(line) for line in (tiny_sample / "tasks" / "slot_filling-dev-kilt.jsonl").open()]
    return [r["input"] for r in rows[:8]]
