"""The published OpenAPI schema says what the server enforces: a schemathesis run (its engine, as
``schemathesis run`` drives it: examples, coverage and fuzzing phases, positive and negative data)
over the real API app in-process -- ``serve.api.create_api`` with the settings the ingress computes
(``serve.app.api_settings``) over the real Retriever, Reranker and Generator deployment classes of the
shared tiny run directory, called directly instead of through DeploymentHandles -- with the checks
``not_a_server_error``, ``status_code_conformance``, ``response_schema_conformance``,
``positive_data_acceptance`` and ``negative_data_rejection``: no failure and no server exception.
``/v1/answer`` with ``"stream": true`` answers server-sent events, each checked against its documented
schema (the response's ``itemSchema``; ``response_schema_conformance``); ``stream_has_no_server_error``
checks that a stream ends with ``done`` and has no ``error`` event but ``deadline_exceeded`` (a server
error after a stream started is an event, its HTTP status already 200).

The same run over HTTP against the served app (``schemathesis run http://HOST:PORT/openapi.json --checks
... --mode all``, with ``504`` allowed for ``not_a_server_error`` as here) found nothing either.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

schemathesis = pytest.importorskip("schemathesis")

CHECKS = ("not_a_server_error", "status_code_conformance", "response_schema_conformance",
          "positive_data_acceptance", "negative_data_rejection", "stream_has_no_server_error")
MAX_EXAMPLES = int(os.environ.get("RE2G_SCHEMA_MAX_EXAMPLES", "25"))    # per operation, phase and mode
SEED = int(os.environ.get("RE2G_SCHEMA_SEED", "17"))


STREAMS: list[list[str]] = []       # the event names of each stream checked


@schemathesis.check
def stream_has_no_server_error(ctx, response, case):
    """A text/event-stream response ends with ``done`` and has no ``error`` event but ``deadline_exceeded``
    (the 504 of a stream that started)."""
    ctype = next((v[0] for k, v in response.headers.items() if k.lower() == "content-type" and v), "")
    if not ctype.startswith("text/event-stream"):
        return None
    from test_serve_stream import parse_sse

    events = parse_sse(response.content.decode("utf-8"))
    STREAMS.append([e for e, _ in events])
    errors = [d for e, d in events if e == "error" and d.get("error") != "deadline_exceeded"]
    if errors:
        raise AssertionError(f"error event in the stream: {errors[0]}")
    if not events or events[-1][0] != "done":
        raise AssertionError(f"the stream did not end with done: {[e for e, _ in events]}")
    return None


class LocalBackend:
    """:class:`serve.api.Backend` over the deployment classes in this process (their unbatched methods:
    the ASGI test client runs each request on an event loop of its own)."""

    def __init__(self, retriever, reranker, generator, tokenizer):
        self.retriever, self.reranker, self.generator, self.tokenizer = retriever, reranker, generator, tokenizer

    async def retrieve(self, query):
        return (await self.retriever.retrieve_many([query]))[0]

    async def retrieve_many(self, queries):
        return await self.retriever.retrieve_many(queries)

    async def rerank(self, query, hits, top_k):
        return (await self.reranker.rerank_many([query], [hits], top_k))[0]

    async def rerank_many(self, queries, hits, top_k):
        return await self.reranker.rerank_many(queries, hits, top_k)

    async def generate(self, query, reranked):
        return (await self.generator.generate_many([query], [reranked]))[0]

    async def generate_many(self, queries, reranked):
        return await self.generator.generate_many(queries, reranked)

    async def health(self):
        names = ("retriever", "reranker", "generator")
        results = await asyncio.gather(*(s.health() for s in (self.retriever, self.reranker, self.generator)))
        return dict(zip(names, results))

    def count_tokens(self, query):
        return len(self.tokenizer(query)["input_ids"])


@pytest.fixture(scope="module")
def app(ray_local, serve_run_dir):
    import torch

    from serve.api import create_api
    from serve.app import Generator, Reranker, Retriever, api_settings
    from serve.components import load_query_tokenizer, preflight, resolve_config

    run = serve_run_dir
    cfg = resolve_config(run, overrides=["serve.api_key_env=null"])
    pieces = preflight(run, cfg)
    threads = torch.get_num_threads()           # the stages set their replica's thread count
    c = cfg.model_dump(mode="json")
    try:
        backend = LocalBackend(Retriever.func_or_class(str(run), c), Reranker.func_or_class(str(run), c),
                               Generator.func_or_class(str(run), c), load_query_tokenizer(pieces))
        yield create_api(backend, api_settings(cfg, pieces))
    finally:
        torch.set_num_threads(threads)


def run_schemathesis(app, max_examples: int, seed: int = 17) -> tuple[dict, list[str]]:
    """Run schemathesis's engine over the app; returns (calls per check and status, failures)."""
    from collections import Counter

    from schemathesis.config import SchemathesisConfig
    from schemathesis.engine import Status, events, from_schema

    config = SchemathesisConfig.from_dict({
        "seed": seed,
        "cache": {"enabled": False},            # no .schemathesis/ state in the working tree
        "generation": {"mode": "all", "max-examples": max_examples},
        "phases": {"stateful": {"enabled": False}},
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS},
                   # 504 is the documented answer to a deadline the request set itself (a timeout_s of
                   # 5e-324 s, the coverage phase's smallest value above the exclusive minimum 0)
                   "not_a_server_error": {"enabled": True, "expected-statuses": ["2xx", "3xx", "4xx", "504"]}},
    })
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    counts: Counter = Counter()
    failures: list[str] = []
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            for checks in event.recorder.checks.values():
                for check in checks:
                    counts[(check.name, str(check.status))] += 1
                    if check.status == Status.FAILURE:
                        info = check.failure_info
                        failures.append(f"{event.phase} {event.label} {check.name}: {info.failure}\n{info.code_sample}")
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            failures.append(f"error: {getattr(event, 'label', '')} {getattr(event, 'value', event)!r}")
    return dict(counts), failures


def test_schemathesis_finds_no_disagreement_between_schema_and_server(app):
    t0 = time.perf_counter()
    counts, failures = run_schemathesis(app, MAX_EXAMPLES, SEED)
    elapsed = time.perf_counter() - t0
    calls = sum(n for (name, _), n in counts.items() if name == "not_a_server_error")
    print(f"schemathesis: {calls} requests in {elapsed:.1f} s; checks: {counts}")
    assert not failures, "\n\n".join(dict.fromkeys(failures))
    for name in CHECKS:                 # every check ran, on positive and on negative data
        assert counts.get((name, "success"), 0) > 0, (name, counts)
    assert calls >= 100, counts
    answered = [s for s in STREAMS if s == ["retrieved", "reranked", "answer", "done"]]
    print(f"streams: {len(STREAMS)}, {len(answered)} with an answer")
    assert answered, STREAMS
