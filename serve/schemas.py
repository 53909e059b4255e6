"""Typed bodies of the HTTP API (pydantic): what ``/v1/*`` accepts and returns.

Requests are strict: unknown fields, wrong JSON types (``"5"`` for an integer, ``1`` for a boolean)
and out-of-range numbers are refused with 422 and the name of the field. An integer field takes any
JSON number with an integral value (``74`` and ``74.0`` alike: both are integers to JSON Schema).

**The published schema is what the server enforces.** The request models are built per deployment by
:func:`request_models` from :class:`RequestLimits` (the run's retrieval depth, ``serve.max_batch_queries``,
``serve.max_body_bytes``), so ``/openapi.json`` states every limit a request is checked against:
``top_k`` up to the run's retrieval depth, ``queries`` / ``passages`` at most as many items as fit the
body limit in the worst case (:meth:`RequestLimits.worst_case_bytes`: every string at its ``maxLength``
in ``\\uXXXX`` escapes, 12 bytes a character), so a schema-valid request in compact JSON never gets 413.
What a JSON Schema cannot say is not refused: ``n_docs`` above ``top_k`` reads ``top_k`` passages, and a
query longer than ``serve.max_query_tokens`` query-encoder tokens is cut to them (the answer's ``query``
is the query as answered, ``query_truncated`` says so).

``"stream": true`` on ``/v1/answer`` answers with server-sent events (``text/event-stream``) instead of one
JSON body: ``retrieved`` (a :class:`RetrieveResponse`), ``reranked`` (a :class:`RerankResponse`), ``answer``
(the :class:`AnswerResponse` the request without ``stream`` gets), ``error`` (an :class:`ErrorResponse`, when a
stage fails after the stream started) and ``done`` (:class:`StreamDone`), each with its JSON on one ``data:``
line; :func:`answer_stream_openapi` documents them in ``/openapi.json`` (OpenAPI 3.2's ``itemSchema``, as
FastAPI writes it for its own event streams).

The passage shapes (:class:`HitOut`, :class:`RerankedOut`, :class:`ProvenanceOut`) are views of the one
candidate record :class:`re2g.types.Candidate` (``from_candidate``). Scores: ``score`` /
``retrieval_score`` is the retriever's (DPR inner product or BM25), ``rerank_score`` the cross-encoder's
logit z_r, ``weight`` the passage's p(z|x) = softmax(z_r) in the generator's marginalization,
``logprob`` a candidate answer's log p(y|x). Timings are seconds.
"""

import json
import math
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat,
                      StrictStr)

from re2g.types import Candidate

MAX_QUERY_CHARS = 1000      # a hard cap before any tokenization (queries are cut to the configured token limit)
MAX_TOP_K = 100             # retrieval candidates / reranked passages one request may ask for
MAX_N_DOCS = 20             # passages the generator reads
MAX_TIMEOUT_S = 600.0       # a request may shorten the server's deadline, never extend it
MAX_RERANK_PASSAGES = 100   # passages one /v1/rerank request may send (fewer when the body limit is smaller)
MAX_PASSAGE_CHARS = 2000    # a /v1/rerank passage's text (the reranker reads its first reranker_max_length tokens)
MAX_TITLE_CHARS = 200
MAX_PID_CHARS = 100
MAX_BATCH_QUERIES = 1024    # static bound; the configured serve.max_batch_queries is usually lower

# Python's str.isspace() characters, as one regex class that means the same to Python and to JSON
# Schema (ECMA-262) validators: ``\s`` does not (Python's includes U+001C..U+001F, ECMA's U+FEFF).
_WHITESPACE = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())
NOT_BLANK_PATTERN = "[^" + "".join(f"\\u{ord(c):04x}" for c in _WHITESPACE) + "]"
_NOT_BLANK = re.compile(NOT_BLANK_PATTERN)


def _not_blank(v: str) -> str:
    if not _NOT_BLANK.search(v):
        raise ValueError("must not be empty or only whitespace")
    return v


def _integral(v: Any) -> Any:
    """74.0 -> 74 (an integer to JSON Schema); anything else unchanged, for the strict int check."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _int(ge: int, le: int) -> Any:
    """A JSON integer in [ge, le]: an int, or a float with an integral value; not a bool or a string."""
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_integral)]


def _text(min_length: int, max_length: int, **kw) -> Any:
    """A string of [min_length, max_length] characters with at least one that is not whitespace."""
    return Annotated[StrictStr, Field(min_length=min_length, max_length=max_length,
                                      json_schema_extra={"pattern": NOT_BLANK_PATTERN}, **kw),
                     AfterValidator(_not_blank)]


class _Request(BaseModel):
    """Strict: unknown fields and type coercions are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)


# --------------------------------------------------------------------------- limits


ESCAPED_CHAR_BYTES = 12     # the most bytes one character takes in JSON: a surrogate pair in \\u escapes


@dataclass(frozen=True)
class RequestLimits:
    """The limits a deployment checks requests against; :func:`request_models` publishes them.

    ``retrieve_k``: candidates the retrievers return (top_k's maximum); ``max_batch_queries`` and
    ``max_rerank_passages`` are lowered by :meth:`fit` so the largest schema-valid body stays within
    ``max_body_bytes``."""

    retrieve_k: int = MAX_TOP_K
    max_n_docs: int = MAX_N_DOCS
    max_batch_queries: int = 32
    max_rerank_passages: int = MAX_RERANK_PASSAGES
    max_query_chars: int = MAX_QUERY_CHARS
    max_body_bytes: int = 2 * 1024 * 1024

    @property
    def max_top_k(self) -> int:
        return max(1, min(self.retrieve_k, MAX_TOP_K))

    @classmethod
    def fit(cls, *, retrieve_k: int, max_n_docs: int = MAX_N_DOCS, max_batch_queries: int = 32,
            max_body_bytes: int = 2 * 1024 * 1024) -> "RequestLimits":
        """Limits with as many batch queries and rerank passages as fit ``max_body_bytes`` (at most the
        configured / static bounds). Raises ValueError when not even one query or passage fits."""
        base = cls(retrieve_k=retrieve_k, max_n_docs=max_n_docs, max_batch_queries=1, max_rerank_passages=1,
                   max_body_bytes=max_body_bytes)
        sizes = base.worst_case_bytes()
        worst = max(sizes.values())
        if worst > max_body_bytes:
            raise ValueError(f"serve.max_body_bytes ({max_body_bytes}) is smaller than the largest request with one "
                             f"query or passage ({worst} bytes in the worst case): raise it")
        per_query = _item_bytes(_str(base.max_query_chars))
        per_passage = _item_bytes(_worst_passage())
        n_queries = 1 + (max_body_bytes - sizes["/v1/answer:batch"]) // per_query
        n_passages = 1 + (max_body_bytes - sizes["/v1/rerank"]) // per_passage
        return cls(retrieve_k=retrieve_k, max_n_docs=max_n_docs,
                   max_batch_queries=max(1, min(max_batch_queries, MAX_BATCH_QUERIES, n_queries)),
                   max_rerank_passages=max(1, min(MAX_RERANK_PASSAGES, n_passages)), max_body_bytes=max_body_bytes)

    def worst_case_bytes(self) -> dict[str, int]:
        """The largest body of each route that the published schema allows, in compact JSON (Python's
        ``json.dumps`` defaults: ``\\u`` escapes, ``", "`` / ``": "`` separators): every string at its
        maxLength of characters that take 12 bytes, every number at its longest."""
        q = _str(self.max_query_chars)
        num = 1.2345678901234567e-300          # the longest repr of a valid timeout_s (23 characters)
        k = float(self.max_top_k)              # integral floats are integers: 100.0 is longer than 100
        common = {"top_k": k, "n_docs": float(self.max_n_docs), "return_passages": False, "timeout_s": num}
        answer = {"query": q, **common, "stream": False}
        batch = {"queries": [q], **common}
        retrieve = {"query": q, "top_k": k, "timeout_s": num}
        rerank = {"query": q, "passages": [_worst_passage()], "top_k": float(MAX_TOP_K), "timeout_s": num}
        out = {"/v1/answer": _bytes(answer), "/v1/retrieve": _bytes(retrieve),
               "/v1/answer:batch": _bytes(batch) + (self.max_batch_queries - 1) * _item_bytes(q),
               "/v1/rerank": _bytes(rerank) + (self.max_rerank_passages - 1) * _item_bytes(_worst_passage())}
        return out


def _str(n: int) -> str:
    return "\U0010ffff" * n


def _worst_passage() -> dict:
    return {"pid": _str(MAX_PID_CHARS), "title": _str(MAX_TITLE_CHARS), "text": _str(MAX_PASSAGE_CHARS)}


def _bytes(obj: Any) -> int:
    return len(json.dumps(obj).encode())


def _item_bytes(item: Any) -> int:
    """Bytes one more array item adds (the item and its ", ")."""
    return _bytes(item) + 2


# --------------------------------------------------------------------------- requests


def request_models(lim: RequestLimits = RequestLimits()) -> SimpleNamespace:
    """The request models of a deployment with limits ``lim``: ``AnswerRequest``, ``BatchAnswerRequest``,
    ``RetrieveRequest``, ``RerankRequest``, ``PassageIn``."""
    QueryStr = Annotated[_text(1, lim.max_query_chars), Field(
        description="the question or claim; cut to the first serve.max_query_tokens query-encoder tokens "
        "(the response's query says what was answered)",
        examples=["Broushan Stovelain [SEP] place of birth"])]
    TimeoutS = Annotated[Annotated[StrictFloat, Field(gt=0, le=MAX_TIMEOUT_S)] | None, Field(
        description="deadline in seconds for this request (at most the server's serve.request_timeout_s); "
        "past it the answer is 504")]
    top_k_max = lim.max_top_k
    TopK = Annotated[_int(1, top_k_max) | None, Field(
        description=f"retrieved candidates given to the reranker (default and maximum: the run's "
        f"retrieval.dpr_top_k + retrieval.bm25_top_k = {top_k_max})")]
    n_docs_max = max(1, min(lim.max_n_docs, top_k_max))
    NDocs = Annotated[_int(1, n_docs_max) | None, Field(
        description="reranked passages the generator reads (default: the run's retrieval.rerank_top_k; "
        "above top_k: top_k)")]

    class AnswerRequest(_Request):
        """``POST /v1/answer``: retrieve, rerank and generate for one query."""

        query: QueryStr
        top_k: TopK = None
        n_docs: NDocs = None
        return_passages: StrictBool = Field(True, description="include the passages' text in the provenance "
                                            "(and, streamed, in the retrieved and reranked passages)")
        timeout_s: TimeoutS = None
        stream: StrictBool = Field(False, description="answer with server-sent events (text/event-stream): "
                                   "retrieved, reranked, answer (the body the request without stream gets), "
                                   "done; error instead when a stage fails after the first event. The answer "
                                   "comes whole: beam search yields no token before it has finished")

    class BatchAnswerRequest(_Request):
        """``POST /v1/answer:batch``: like /v1/answer for many queries, computed as one batch."""

        queries: list[QueryStr] = Field(min_length=1, max_length=lim.max_batch_queries,
                                         description="the queries (at most serve.max_batch_queries, and as many "
                                         "as fit serve.max_body_bytes)")
        top_k: TopK = None
        n_docs: NDocs = None
        return_passages: StrictBool = True
        timeout_s: TimeoutS = None

    class RetrieveRequest(_Request):
        """``POST /v1/retrieve``: DPR + BM25 candidates, fused and deduplicated."""

        query: QueryStr
        top_k: Annotated[_int(1, top_k_max) | None, Field(
            description=f"hits to return (default and maximum: retrieval.dpr_top_k + retrieval.bm25_top_k "
            f"= {top_k_max})")] = None
        timeout_s: TimeoutS = None

    class PassageIn(_Request):
        """A passage sent to /v1/rerank."""

        pid: Annotated[StrictStr, Field(max_length=MAX_PID_CHARS)] | None = Field(
            None, description="your id for it (default: its position)")
        title: StrictStr = Field("", max_length=MAX_TITLE_CHARS)
        text: _text(1, MAX_PASSAGE_CHARS)

    class RerankRequest(_Request):
        """``POST /v1/rerank``: score given passages against a query with the cross-encoder."""

        query: QueryStr
        passages: list[PassageIn] = Field(min_length=1, max_length=lim.max_rerank_passages,
                                          description=f"at most {MAX_RERANK_PASSAGES}, and as many as fit "
                                          "serve.max_body_bytes")
        top_k: Annotated[_int(1, MAX_TOP_K) | None, Field(description="passages to return, best first "
                                                          "(default: all)")] = None
        timeout_s: TimeoutS = None

    return SimpleNamespace(AnswerRequest=AnswerRequest, BatchAnswerRequest=BatchAnswerRequest,
                           RetrieveRequest=RetrieveRequest, RerankRequest=RerankRequest, PassageIn=PassageIn)


_DEFAULT = request_models()
AnswerRequest = _DEFAULT.AnswerRequest
BatchAnswerRequest = _DEFAULT.BatchAnswerRequest
RetrieveRequest = _DEFAULT.RetrieveRequest
RerankRequest = _DEFAULT.RerankRequest
PassageIn = _DEFAULT.PassageIn


# --------------------------------------------------------------------------- responses


QueryTruncated = Annotated[bool, Field(description="the query was cut to serve.max_query_tokens tokens "
                                      "(query is the part that was answered)")]


class Timings(BaseModel):
    """Seconds per stage as the ingress saw them (queueing and batching included)."""

    retrieve: float | None = None
    rerank: float | None = None
    generate: float | None = None
    total: float


def json_number(x: Any) -> float | None:
    """A JSON-safe float: None for None, NaN and infinities."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


class _PassageOut(BaseModel):
    """The API's shapes of a passage, each derived from :class:`re2g.types.Candidate` by
    :meth:`from_candidate`: its fields of the same names, the retriever's ``score`` also as
    ``retrieval_score``."""

    @classmethod
    def from_candidate(cls, c: Candidate, with_text: bool = True):
        """This shape of ``c``: ``text`` None unless ``with_text``; scores JSON-safe (a non-finite one is
        None, or 0.0 where the shape requires a number); a passage the client sent to /v1/rerank
        (source ``rerank``) has no source and no retrieval score."""
        values = dict(c.to_dict(), text=c.text if with_text else None, retrieval_score=c.score)
        if c.source == "rerank":
            values.update(source=None, score=None, retrieval_score=None)
        out = {}
        for name, f in cls.model_fields.items():
            v = json_number(values[name]) if name in _SCORES else values[name]
            out[name] = 0.0 if v is None and f.annotation is float else v
        return cls(**out)


_SCORES = frozenset({"score", "retrieval_score", "rerank_score", "weight"})


class HitOut(_PassageOut):
    """A retrieved passage."""

    pid: str
    title: str
    text: str | None
    wikipedia_id: str | None = None
    source: str = Field(description="the retriever that found it: dpr or bm25")
    score: float = Field(description="that retriever's score")
    rank: int = Field(description="0-based position in the fused list")


class RerankedOut(_PassageOut):
    """A passage after reranking, best first."""

    pid: str
    title: str
    text: str | None
    wikipedia_id: str | None = None
    source: str | None = None
    score: float | None = Field(None, description="the retriever's score (None for passages sent by the client)")
    rank: int = Field(description="position before reranking (retrieval rank, or index in the request)")
    rerank_score: float = Field(description="cross-encoder logit z_r")
    rerank_rank: int = Field(description="0-based position by rerank_score")


class ProvenanceOut(_PassageOut):
    """A passage the answer was generated from."""

    pid: str
    title: str
    text: str | None = Field(description="None when return_passages is false")
    wikipedia_id: str | None = None
    source: str | None = Field(description="the retriever that found it: dpr or bm25")
    retrieval_score: float | None
    rerank_score: float | None
    weight: float = Field(description="p(passage | query) = softmax of the rerank scores")


class CandidateOut(BaseModel):
    """A candidate answer and its log p(answer | query) under the passage-weighted generator."""

    text: str
    logprob: float | None = Field(description="log p(answer | query); None when it is -inf")


class AnswerResponse(BaseModel):
    """An answer with its candidates, provenance and per-stage timings."""

    query: str = Field(description="the query as answered")
    query_truncated: QueryTruncated = False
    answer: str
    candidates: list[CandidateOut]
    provenance: list[ProvenanceOut]
    timings: Timings


class BatchAnswerResponse(BaseModel):
    """Answers in the order of the queries; timings are the whole batch's."""

    answers: list[AnswerResponse]
    timings: Timings


class RetrieveResponse(BaseModel):
    query: str = Field(description="the query as searched")
    query_truncated: QueryTruncated = False
    hits: list[HitOut]
    timings: Timings


class RerankResponse(BaseModel):
    query: str = Field(description="the query as scored")
    query_truncated: QueryTruncated = False
    passages: list[RerankedOut]
    timings: Timings


class ComponentHealth(BaseModel):
    ok: bool
    detail: str = ""


class HealthResponse(BaseModel):
    status: Literal["ok", "unhealthy"]
    components: dict[str, ComponentHealth]


class InfoResponse(BaseModel):
    """What the page needs to know: limits and defaults of this deployment."""

    app: str
    auth_required: bool
    api_key_header: str
    retrieve_k: int
    default_n_docs: int
    max_n_docs: int
    max_query_tokens: int
    max_batch_queries: int
    request_timeout_s: float
    batching: bool


class FieldError(BaseModel):
    field: str = Field(description="where: a body field (query, top_k, queries[2], passages[0].text), "
                       "'body' for the body as a whole, or a header name")
    reason: str


class StreamDone(BaseModel):
    """The last event of a stream."""

    ok: bool = Field(description="the answer event was sent (false: an error event was)")


def answer_stream_openapi(ref_prefix: str = "#/components/schemas/") -> dict[str, Any]:
    """The ``text/event-stream`` media type of ``/v1/answer``'s 200 response: one ``itemSchema`` (an event,
    as OpenAPI 3.2 describes server-sent events: ``{event, data}``, ``data`` a JSON string) per event name,
    its ``data`` described by ``contentSchema``. Comment lines (``: ping``) are not events."""
    def event(name: str, data: dict, description: str) -> dict:
        return {"type": "object", "title": name, "description": description, "required": ["event", "data"],
                "properties": {"event": {"type": "string", "const": name},
                               "data": {"type": "string", "contentMediaType": "application/json",
                                        "contentSchema": data}}}

    def ref(model: type[BaseModel]) -> dict:
        return {"$ref": ref_prefix + model.__name__}

    return {"itemSchema": {"oneOf": [
        event("retrieved", ref(RetrieveResponse), "the candidates given to the reranker (sent first, once "
              "retrieval is done; timings: retrieve)"),
        event("reranked", ref(RerankResponse), "the passages the generator reads, best first (timings: retrieve, "
              "rerank)"),
        event("answer", ref(AnswerResponse), "the body the same request without stream gets"),
        event("error", ref(ErrorResponse), "a stage failed after the stream started (the HTTP status is 200 "
              "by then): deadline_exceeded, overloaded, unavailable or internal"),
        event("done", StreamDone.model_json_schema(), "the last event"),
    ]}}


class ErrorResponse(BaseModel):
    """Every error: a code, a sentence, and for bad requests the fields at fault."""

    error: str = Field(description="invalid_request, invalid_json, unauthorized, payload_too_large, "
                       "unsupported_media_type, not_found, method_not_allowed, deadline_exceeded, "
                       "overloaded, unavailable, internal")
    message: str
    errors: list[FieldError] = Field(default_factory=list)
