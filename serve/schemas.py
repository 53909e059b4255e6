"""Typed bodies of the HTTP API (pydantic): what ``/v1/*`` accepts and returns.

Requests are strict: unknown fields, wrong JSON types (``"5"`` for an integer, ``1`` for a boolean)
and out-of-range numbers are refused with 422 and the name of the field. Limits that depend on the
run (the query's token count, ``top_k`` against the retrieval depth) are checked by the app, with the
same error body (:class:`ErrorResponse`).

Scores: ``score`` / ``retrieval_score`` is the retriever's (DPR inner product or BM25), ``rerank_score``
the cross-encoder's logit z_r, ``weight`` the passage's p(z|x) = softmax(z_r) in the generator's
marginalization, ``logprob`` a candidate answer's log p(y|x). Timings are seconds.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

MAX_QUERY_CHARS = 2000      # a hard cap before any tokenization (the token limit is configured)
MAX_TOP_K = 100             # retrieval candidates / reranked passages one request may ask for
MAX_N_DOCS = 20             # passages the generator reads
MAX_TIMEOUT_S = 600.0       # a request may shorten the server's deadline, never extend it
MAX_RERANK_PASSAGES = 100   # passages one /v1/rerank request may send
MAX_BATCH_QUERIES = 1024    # static bound; the configured serve.max_batch_queries is usually lower


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty or only whitespace")
    return v


class _Request(BaseModel):
    """Strict: unknown fields and type coercions are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)


QueryStr = Annotated[StrictStr, Field(min_length=1, max_length=MAX_QUERY_CHARS, description="the question or claim",
                                      examples=["Broushan Stovelain [SEP] place of birth"]),
                     AfterValidator(_not_blank)]
TimeoutS = Annotated[StrictFloat | StrictInt | None, Field(
    None, gt=0, le=MAX_TIMEOUT_S, description="deadline in seconds for this request (at most the server's "
    "serve.request_timeout_s); past it the answer is 504")]


class AnswerRequest(_Request):
    """``POST /v1/answer``: retrieve, rerank and generate for one query."""

    query: QueryStr
    top_k: StrictInt | None = Field(None, ge=1, le=MAX_TOP_K, description="retrieved candidates given to the reranker "
                        "(default and maximum: the run's retrieval.dpr_top_k + retrieval.bm25_top_k)")
    n_docs: StrictInt | None = Field(None, ge=1, le=MAX_N_DOCS, description="reranked passages the generator "
                                     "reads (default: the run's retrieval.rerank_top_k; at most top_k)")
    return_passages: StrictBool = Field(True, description="include the passages' text in the provenance")
    timeout_s: TimeoutS = None


class BatchAnswerRequest(_Request):
    """``POST /v1/answer:batch``: like /v1/answer for many queries, computed as one batch."""

    queries: list[QueryStr] = Field(min_length=1, max_length=MAX_BATCH_QUERIES,
                                    description="the queries (at most serve.max_batch_queries)")
    top_k: StrictInt | None = Field(None, ge=1, le=MAX_TOP_K, description="as in /v1/answer, for every query")
    n_docs: StrictInt | None = Field(None, ge=1, le=MAX_N_DOCS, description="as in /v1/answer, for every query")
    return_passages: StrictBool = True
    timeout_s: TimeoutS = None


class RetrieveRequest(_Request):
    """``POST /v1/retrieve``: DPR + BM25 candidates, fused and deduplicated."""

    query: QueryStr
    top_k: StrictInt | None = Field(None, ge=1, le=MAX_TOP_K, description="hits to return (default and maximum: "
                        "retrieval.dpr_top_k + retrieval.bm25_top_k)")
    timeout_s: TimeoutS = None


class PassageIn(_Request):
    """A passage sent to /v1/rerank."""

    pid: StrictStr | None = Field(None, max_length=512, description="your id for it (default: its position)")
    title: StrictStr = Field("", max_length=1000)
    text: Annotated[StrictStr, Field(min_length=1, max_length=20000), AfterValidator(_not_blank)]


class RerankRequest(_Request):
    """``POST /v1/rerank``: score given passages against a query with the cross-encoder."""

    query: QueryStr
    passages: list[PassageIn] = Field(min_length=1, max_length=MAX_RERANK_PASSAGES)
    top_k: StrictInt | None = Field(None, ge=1, le=MAX_TOP_K,
                                    description="passages to return, best first (default: all)")
    timeout_s: TimeoutS = None


# --------------------------------------------------------------------------- responses


class Timings(BaseModel):
    """Seconds per stage as the ingress saw them (queueing and batching included)."""

    retrieve: float | None = None
    rerank: float | None = None
    generate: float | None = None
    total: float


class HitOut(BaseModel):
    """A retrieved passage."""

    pid: str
    title: str
    text: str | None
    wikipedia_id: str | None = None
    source: str = Field(description="the retriever that found it: dpr or bm25")
    score: float = Field(description="that retriever's score")
    rank: int = Field(description="0-based position in the fused list")


class RerankedOut(BaseModel):
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


class ProvenanceOut(BaseModel):
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

    query: str
    answer: str
    candidates: list[CandidateOut]
    provenance: list[ProvenanceOut]
    timings: Timings


class BatchAnswerResponse(BaseModel):
    """Answers in the order of the queries; timings are the whole batch's."""

    answers: list[AnswerResponse]
    timings: Timings


class RetrieveResponse(BaseModel):
    query: str
    hits: list[HitOut]
    timings: Timings


class RerankResponse(BaseModel):
    query: str
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


class ErrorResponse(BaseModel):
    """Every error: a code, a sentence, and for bad requests the fields at fault."""

    error: str = Field(description="invalid_request, invalid_json, unauthorized, payload_too_large, "
                       "unsupported_media_type, not_found, method_not_allowed, deadline_exceeded, "
                       "overloaded, unavailable, internal")
    message: str
    errors: list[FieldError] = Field(default_factory=list)
