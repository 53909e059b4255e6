"""The HTTP layer: a FastAPI app over a :class:`Backend` (the deployments' handles in Serve; a fake in
unit tests). The ingress deployment builds it with :func:`create_api` in each replica.

Routes::

    GET  /                  the web page (serve/static/index.html)
    GET  /docs              API reference rendered from the OpenAPI document (no CDN)
    GET  /openapi.json      the OpenAPI document
    GET  /healthz           200 when every deployment answers its health check, else 503
    GET  /v1/info           limits and defaults of this deployment
    POST /v1/answer         retrieve -> rerank -> generate for one query (``"stream": true``: as events)
    POST /v1/answer:batch   the same for many queries, as one batch
    POST /v1/retrieve       fused DPR + BM25 candidates
    POST /v1/rerank         cross-encoder scores of given passages

Every error is JSON (:class:`serve.schemas.ErrorResponse`): 400 a body that is not JSON, 401 a missing or
wrong API key, 413 a body over ``max_body_bytes``, 415 a non-JSON content type, 422 a field that is
wrong (named, with the reason), 503 (+ ``Retry-After``) when the queues are full or a deployment is
down, 504 past the deadline (Serve's proxy's own errors too, through :mod:`serve.proxy`). ``curl -d``
sends ``application/x-www-form-urlencoded``; the API reads such bodies (and bodies without a content
type) as JSON.

``"stream": true`` on ``/v1/answer`` answers with server-sent events (:class:`EventStream`)::

    event: retrieved        RetrieveResponse: the candidates given to the reranker
    event: reranked         RerankResponse: the passages the generator reads, best first
    event: answer           AnswerResponse: the body the same request without stream gets
    event: error            ErrorResponse: a stage failed after the stream started (instead of answer)
    event: done             StreamDone: {"ok": true | false}, the last event

each event's JSON on one ``data:`` line, ``: ping`` comments after ``stream_ping_s`` s of silence. The
stream starts (status 200) with the ``retrieved`` event: a bad request, and a retrieval that fails or
misses the deadline, get the same status and JSON error body as without ``stream``. The deadline
(``timeout_s``) covers the whole stream; a client that disconnects cancels the stages still to run. The
answer comes whole, when it exists: beam search (RAG-Sequence and RAG-Token alike,
:mod:`re2g.models.decoding`) has no token to send before it has finished.

The request models come from :func:`serve.schemas.request_models` with this deployment's limits, so
``/openapi.json`` states what is checked (see :mod:`serve.schemas`); a query over ``max_query_tokens``
tokens is cut to them (:func:`fit_query`) rather than refused.

Around it: :mod:`serve.guard` (the errors, the API key / body / content-type middleware, validation
errors), :mod:`serve.events` (the event stream), :mod:`serve.schemas` (the bodies; the passage shapes
derived from :class:`re2g.types.Candidate`).
"""

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from re2g.models.decoding import Answer
from re2g.types import Candidate
from serve.events import STREAM_END, EventStream
from serve.guard import ERROR_RESPONSES, ApiError, GuardMiddleware, bad_field, internal_error, validation_error
from serve.metrics import IngressMetrics
from serve.schemas import (
    AnswerResponse,
    BatchAnswerResponse,
    CandidateOut,
    ComponentHealth,
    HealthResponse,
    HitOut,
    InfoResponse,
    ProvenanceOut,
    RequestLimits,
    RerankedOut,
    RerankResponse,
    RetrieveResponse,
    Timings,
    answer_stream_openapi,
    json_number,
    request_models,
)

log = logging.getLogger("re2g.serve")

STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class ApiSettings:
    """What the HTTP layer enforces (from ``cfg.serve`` and the run's retrieval settings)."""

    app_name: str = "re2g"
    api_key: str | None = None
    api_key_header: str = "X-API-Key"
    cors_origins: Sequence[str] = ()
    max_body_bytes: int = 2 * 1024 * 1024
    max_query_tokens: int = 64
    request_timeout_s: float = 30.0
    retry_after_s: float = 1.0
    max_batch_queries: int = 32
    retrieve_k: int = 24           # candidates the retrievers return (dpr_top_k + bm25_top_k)
    default_n_docs: int = 5        # retrieval.rerank_top_k
    max_n_docs: int = 20
    batching: bool = True
    stream_ping_s: float = 15.0    # a ": ping" comment after this long without an event (idle proxies)


class Backend(Protocol):
    """The three stages as awaitables (one query, or many as one batch), health, and token counting."""

    async def retrieve(self, query: str) -> list[Candidate]: ...

    async def retrieve_many(self, queries: list[str]) -> list[list[Candidate]]: ...

    async def rerank(self, query: str, hits: list[Candidate], top_k: int | None) -> list: ...

    async def rerank_many(self, queries: list[str], hits: list[list[Candidate]], top_k: int | None) -> list[list]: ...

    async def generate(self, query: str, reranked: list) -> Any: ...

    async def generate_many(self, queries: list[str], reranked: list[list]) -> list: ...

    async def health(self) -> dict[str, dict]: ...

    def count_tokens(self, query: str) -> int: ...


# --------------------------------------------------------------------------- conversions


def answer_out(a: Answer, timings: Timings, return_passages: bool = True, truncated: bool = False) -> AnswerResponse:
    """``re2g.models.decoding.Answer`` -> :class:`AnswerResponse` (its provenance candidates as
    :class:`ProvenanceOut`)."""
    return AnswerResponse(
        query=a.query, query_truncated=truncated, answer=a.answer,
        candidates=[CandidateOut(text=c.text, logprob=json_number(c.logprob)) for c in a.candidates],
        provenance=[ProvenanceOut.from_candidate(p, return_passages) for p in a.provenance], timings=timings)


# --------------------------------------------------------------------------- the app


def fit_query(query: str, count_tokens: Callable[[str], int], limit: int) -> tuple[str, bool]:
    """``(query, False)`` when it has at most ``limit`` tokens, else ``(its longest prefix that has, True)``,
    cut at a word boundary where there is one (a binary search over prefix lengths: a dozen counts)."""
    if count_tokens(query) <= limit:
        return query, False
    lo, hi = 0, len(query)              # count(query[:lo]) <= limit < count(query[:hi])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_tokens(query[:mid]) <= limit:
            lo = mid
        else:
            hi = mid
    cut = query[:lo]
    if lo < len(query) and not query[lo].isspace():
        words = cut.rsplit(None, 1)
        if len(words) == 2 and words[0].strip():
            cut = words[0]
    return cut.strip(), True


def _serve_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(back-pressure errors, unavailable errors) of Ray Serve / Ray, if importable."""
    try:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

        return (BackPressureError,), (DeploymentUnavailableError, RayActorError, ActorDiedError,
                                      ActorUnavailableError, RequestCancelledError)
    except ImportError:  # pragma: no cover
        return (), ()


def create_api(backend: Backend, settings: ApiSettings, *, metrics: IngressMetrics | None = None) -> FastAPI:
    """The FastAPI app of the ingress, over ``backend``."""
    from serve.docs import render_docs

    s = settings
    limits = RequestLimits.fit(retrieve_k=s.retrieve_k, max_n_docs=s.max_n_docs, max_batch_queries=s.max_batch_queries,
                               max_body_bytes=s.max_body_bytes)
    models = request_models(limits)
    errors = {**ERROR_RESPONSES, 413: {**ERROR_RESPONSES[413], "description": f"the body is larger than "
                                       f"{s.max_body_bytes} bytes (never for a schema-valid request in compact JSON)"}}
    query_note = f" (the query encoder reads at most {s.max_query_tokens} tokens)"
    metrics = metrics or IngressMetrics()
    backpressure, unavailable = _serve_errors()
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    app = FastAPI(title="re2g", version="1", docs_url=None, redoc_url=None,
                  description="Re2G on Ray Serve: retrieve (DPR + BM25), rerank (cross-encoder), generate "
                  "(the run's reader: BART-style seq2seq or a causal LM) with provenance.")

    # ---- errors: always JSON

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        return validation_error(exc, query_note).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return ApiError(exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        log.exception("internal error")
        return internal_error(exc).response()

    async def guarded(timeout_s: float | None, work: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``work`` under the deadline; Serve's overload and failure errors become 503, the deadline 504."""
        timeout = min(float(timeout_s), s.request_timeout_s) if timeout_s is not None else s.request_timeout_s
        try:
            return await asyncio.wait_for(work(), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise ApiError(504, "deadline_exceeded", f"no result within the deadline of {timeout:g} s "
                           "(retry later, or with a larger timeout_s)") from None
        except backpressure as e:
            retry = getattr(e, "retry_after_s", None) or s.retry_after_s
            raise ApiError(503, "overloaded", "every replica is busy and the queue is full; retry later",
                           headers={"Retry-After": str(max(1, math.ceil(retry)))}) from None
        except unavailable as e:
            raise ApiError(503, "unavailable", f"a deployment is unavailable ({type(e).__name__}); retry later",
                           headers={"Retry-After": str(max(1, math.ceil(s.retry_after_s)))}) from None

    def check_query(q: str) -> tuple[str, bool]:
        """The query as answered (stripped; cut to ``max_query_tokens`` tokens) and whether it was cut."""
        q, cut = fit_query(q.strip(), backend.count_tokens, s.max_query_tokens)
        if not q:      # only where max_query_tokens leaves no room for a word (a config error)
            raise bad_field("query", f"no word fits serve.max_query_tokens ({s.max_query_tokens})")
        return q, cut

    def depths(top_k: int | None, n_docs: int | None) -> tuple[int, int]:
        """(candidates to rerank, passages to generate from). The schema bounds both (top_k by the
        retrieval depth); n_docs above top_k reads top_k passages."""
        k = min(s.retrieve_k, limits.max_top_k if top_k is None else top_k)
        n = s.default_n_docs if n_docs is None else n_docs
        return k, max(1, min(n, k, s.max_n_docs))

    def timings(t: Sequence[float]) -> Timings:
        names = ("retrieve", "rerank", "generate")
        out = {n: b - a for n, a, b in zip(names, t, t[1:])}
        out["total"] = t[-1] - t[0]
        for n, v in out.items():
            metrics.stage(n, v)
        return Timings(**out)

    # ---- pages

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(render_docs(app.openapi()))

    @app.get("/healthz", response_model=HealthResponse, responses={503: {"model": HealthResponse}},
             summary="Health of every deployment")
    async def healthz() -> JSONResponse:
        """200 when the retriever, reranker and generator all pass their health check, else 503."""
        try:
            comps = await asyncio.wait_for(backend.health(), min(10.0, s.request_timeout_s))
        except (asyncio.TimeoutError, TimeoutError):
            comps = {"backend": {"ok": False, "detail": "health checks did not answer within 10 s"}}
        body = HealthResponse(status="ok" if all(c.get("ok") for c in comps.values()) else "unhealthy",
                              components={k: ComponentHealth(**v) for k, v in comps.items()})
        return JSONResponse(body.model_dump(), status_code=200 if body.status == "ok" else 503)

    @app.get("/v1/info", response_model=InfoResponse, responses={401: ERROR_RESPONSES[401]},
             summary="Limits and defaults")
    async def info() -> InfoResponse:
        return InfoResponse(app=s.app_name, auth_required=s.api_key is not None, api_key_header=s.api_key_header,
                            retrieve_k=s.retrieve_k, default_n_docs=s.default_n_docs, max_n_docs=s.max_n_docs,
                            max_query_tokens=s.max_query_tokens, max_batch_queries=s.max_batch_queries,
                            request_timeout_s=s.request_timeout_s, batching=s.batching)

    # ---- the API

    AnswerRequest, BatchAnswerRequest = models.AnswerRequest, models.BatchAnswerRequest
    RetrieveRequest, RerankRequest = models.RetrieveRequest, models.RerankRequest

    async def answer_stream(req, q: str, cut: bool, k: int, n_docs: int) -> EventStream:
        """``/v1/answer`` as server-sent events. The stages run in a task that queues each result as it
        exists; the response starts with the first (``retrieved``), so a failure before it is answered
        with its status and JSON body, as without ``stream``; a later failure becomes an ``error`` event."""
        queue: asyncio.Queue = asyncio.Queue()
        text = req.return_passages

        async def work():
            t = [time.perf_counter()]
            hits = (await backend.retrieve(q))[:k]
            t.append(time.perf_counter())
            queue.put_nowait(("retrieved", RetrieveResponse(
                query=q, query_truncated=cut, hits=[HitOut.from_candidate(h, text) for h in hits],
                timings=Timings(retrieve=t[1] - t[0], total=t[1] - t[0]))))
            reranked = await backend.rerank(q, hits, n_docs)
            t.append(time.perf_counter())
            queue.put_nowait(("reranked", RerankResponse(
                query=q, query_truncated=cut, passages=[RerankedOut.from_candidate(h, text) for h in reranked],
                timings=Timings(retrieve=t[1] - t[0], rerank=t[2] - t[1], total=t[2] - t[0]))))
            ans = await backend.generate(q, reranked)
            t.append(time.perf_counter())
            queue.put_nowait(("answer", answer_out(ans, timings(t), text, cut)))

        async def produce():
            try:
                await guarded(req.timeout_s, work)
            except ApiError as e:
                queue.put_nowait(("error", e))
            except Exception as e:
                log.exception("internal error in a stream")
                queue.put_nowait(("error", internal_error(e)))
            finally:
                queue.put_nowait(STREAM_END)

        producer = asyncio.create_task(produce())
        try:
            first = await queue.get()
        except BaseException:               # cancelled (the client left) before the first event
            producer.cancel()
            raise
        if first[0] == "error":             # nothing sent yet: the status and body of the non-streamed answer
            raise first[1]
        return EventStream(first, queue, producer, s.stream_ping_s)

    @app.post("/v1/answer", response_model=AnswerResponse, summary="Answer a query", responses={
        **errors, 200: {"description": "the answer; with stream: server-sent events (see the stream field)",
                        "content": {"text/event-stream": answer_stream_openapi()}}})
    async def answer(req: AnswerRequest) -> Any:
        """Retrieve (DPR + BM25, fused), rerank (cross-encoder), generate (the run's reader, seq2seq or causal
        LM, over the top ``n_docs`` passages, weighted by softmax of the rerank scores). Returns the answer,
        candidate answers with log-probabilities, the provenance passages with their scores, and seconds per stage.
        With ``"stream": true``: server-sent events ``retrieved``, ``reranked``, ``answer`` (this body), ``done``
        (``error`` instead of the rest when a stage fails after the first event); the answer comes whole, as
        beam search has no token to send before it has finished."""
        q, cut = check_query(req.query)
        k, n_docs = depths(req.top_k, req.n_docs)
        if req.stream:
            return await answer_stream(req, q, cut, k, n_docs)

        async def work():
            t = [time.perf_counter()]
            hits = (await backend.retrieve(q))[:k]
            t.append(time.perf_counter())
            reranked = await backend.rerank(q, hits, n_docs)
            t.append(time.perf_counter())
            ans = await backend.generate(q, reranked)
            t.append(time.perf_counter())
            return answer_out(ans, timings(t), req.return_passages, cut)

        return await guarded(req.timeout_s, work)

    @app.post("/v1/answer:batch", response_model=BatchAnswerResponse, responses=errors,
              summary="Answer many queries as one batch")
    async def answer_batch(req: BatchAnswerRequest) -> BatchAnswerResponse:
        """``/v1/answer`` for every query; each stage runs once for the whole list. Answers are in the
        order of ``queries``; the timings are the batch's."""
        fitted = [check_query(q) for q in req.queries]
        qs = [q for q, _ in fitted]
        k, n_docs = depths(req.top_k, req.n_docs)

        async def work():
            t = [time.perf_counter()]
            hits = [h[:k] for h in await backend.retrieve_many(qs)]
            t.append(time.perf_counter())
            reranked = await backend.rerank_many(qs, hits, n_docs)
            t.append(time.perf_counter())
            answers = await backend.generate_many(qs, reranked)
            t.append(time.perf_counter())
            tm = timings(t)
            return BatchAnswerResponse(answers=[answer_out(a, tm, req.return_passages, cut)
                                                for a, (_, cut) in zip(answers, fitted)], timings=tm)

        return await guarded(req.timeout_s, work)

    @app.post("/v1/retrieve", response_model=RetrieveResponse, responses=errors,
              summary="Retrieve candidates")
    async def retrieve(req: RetrieveRequest) -> RetrieveResponse:
        """DPR and BM25 candidates for the query, fused (``retrieval.fusion``) and deduplicated, best first."""
        q, cut = check_query(req.query)
        k, _ = depths(req.top_k, 1)

        async def work():
            t0 = time.perf_counter()
            hits = (await backend.retrieve(q))[:k]
            dt = time.perf_counter() - t0
            metrics.stage("retrieve", dt)
            return RetrieveResponse(query=q, query_truncated=cut, hits=[HitOut.from_candidate(h) for h in hits],
                                    timings=Timings(retrieve=dt, total=dt))

        return await guarded(req.timeout_s, work)

    @app.post("/v1/rerank", response_model=RerankResponse, responses=errors,
              summary="Rerank given passages")
    async def rerank(req: RerankRequest) -> RerankResponse:
        """Score each passage against the query with the cross-encoder; best first, the first ``top_k``."""
        q, cut = check_query(req.query)
        hits = [Candidate(pid=p.pid if p.pid is not None else str(i), score=0.0, rank=i, source="rerank",
                          title=p.title, text=p.text) for i, p in enumerate(req.passages)]

        async def work():
            t0 = time.perf_counter()
            ranked = await backend.rerank(q, hits, req.top_k)
            dt = time.perf_counter() - t0
            metrics.stage("rerank", dt)
            return RerankResponse(query=q, query_truncated=cut, passages=[RerankedOut.from_candidate(h) for h in ranked],
                                  timings=Timings(rerank=dt, total=dt))

        return await guarded(req.timeout_s, work)

    # ---- outermost first: CORS (so 401/413 answers carry its headers too), then the guard
    app.add_middleware(GuardMiddleware, settings=s, metrics=metrics)
    if s.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(s.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["content-type", "authorization", s.api_key_header.lower()],
                           max_age=600)
    return app

