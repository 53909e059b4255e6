"""The ingress's side of the stage calls: the three deployments' handles as the API's backend
(:class:`HandleBackend`), a call sent again when its replica was lost (:func:`replica_lost`), and
concurrent requests' calls of a stage coalesced into one ``*_many`` call per batch (:class:`Coalescer`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from re2g.config import ServeConfig
from re2g.types import Candidate

log = logging.getLogger("re2g.serve")


def _replica_lost_errors() -> tuple[type, ...]:
    """What a DeploymentHandle raises when the replica serving a call died or cannot be reached."""
    from ray.exceptions import RayActorError          # ActorDiedError, ActorUnavailableError
    from ray.serve.exceptions import ReplicaUnavailableError

    return RayActorError, ReplicaUnavailableError


def replica_lost(e: BaseException) -> bool:
    """True when ``e`` says a replica died or was unreachable (the call can go to another replica): a
    :class:`ray.exceptions.RayActorError` (``ActorDiedError``, ``ActorUnavailableError``), Serve's
    ``ReplicaUnavailableError``, or an error caused by one (Serve's "upstream actor died" error, a
    ``RayTaskError`` wrapping an actor's death). Overload (``BackPressureError``) and a deployment that
    failed to deploy (``DeploymentUnavailableError``) are not: they are answered with 503 at once."""
    lost = _replica_lost_errors()
    seen = 0
    while e is not None and seen < 4:
        if isinstance(e, lost):
            return True
        e = getattr(e, "cause", None) or e.__cause__
        seen += 1
    return False


class Coalescer:
    """One stage's calls from this ingress gathered into batches, without a timer.

    A call goes at once when fewer than ``max_in_flight`` batches of this stage are out; otherwise it
    waits, and when a batch comes back everything that waited (up to ``max_batch_size``) goes as one
    call ``send(items) -> results`` (same order). At light load a request never waits; under load the
    batches grow with it. A caller that gave up (the API's deadline cancelled it) is left out of the
    batch it waited for; a batch that fails fails each of its callers with the same error.

    Why in the ingress: a DeploymentHandle call costs CPU on both sides (routing, (de)serialization,
    Serve's per-request bookkeeping in the replica) -- on 2 cores about as much as the tiny models'
    compute per request (docs/benchmarks.md). Batching in the model replicas (``@serve.batch``) shares
    the compute but not that cost; one ``*_many`` call per batch shares both."""

    def __init__(self, send, max_batch_size: int, max_in_flight: int = 1):
        self.send = send
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_in_flight = max(1, int(max_in_flight))
        self._waiting: list[tuple[Any, asyncio.Future]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()

    async def __call__(self, item: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append((item, fut))
        self._dispatch()
        return await fut

    def _dispatch(self) -> None:
        while self._waiting and self._in_flight < self.max_in_flight:
            batch = [(i, f) for i, f in self._waiting[:self.max_batch_size] if not f.done()]
            del self._waiting[:self.max_batch_size]
            if not batch:
                continue
            self._in_flight += 1
            task = asyncio.ensure_future(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        try:
            results = await self.send([i for i, _ in batch])
        except asyncio.CancelledError:
            for _, f in batch:
                f.cancel()
            raise
        except Exception as e:
            for _, f in batch:
                if not f.done():
                    f.set_exception(e)
        else:
            for (_, f), r in zip(batch, results):
                if not f.done():
                    f.set_result(r)
        finally:
            self._in_flight -= 1
            self._dispatch()


class HandleBackend:
    """The API's backend in Serve: the three deployments' handles, and the query tokenizer.

    Stage calls are idempotent (a stage computes from its arguments alone), so a call whose replica
    died or was unreachable is sent again (:func:`replica_lost`), after ``retry_backoff_s`` doubling up
    to 1 s, until it succeeds: the API's deadline (``asyncio.wait_for`` around the whole request)
    bounds the retries, and cancels the call in flight when it passes. The handle's router routes the
    retry to a live replica, or holds it until the controller has started a replacement.

    ``coalesce`` (stage -> (max_batch_size, max_in_flight); None or a size of 1: that stage's calls go
    one by one): the single-query calls ``retrieve``/``rerank``/``generate`` of concurrent requests go to
    the deployments as one ``*_many`` call per batch (:class:`Coalescer`)."""

    def __init__(self, retriever, reranker, generator, tokenizer, *, retry_backoff_s: float = 0.05,
                 coalesce: dict[str, tuple[int, int]] | None = None):
        self.retriever = retriever
        self.reranker = reranker
        self.generator = generator
        self.tokenizer = tokenizer
        self.retry_backoff_s = retry_backoff_s
        self.retries = 0          # calls sent again (this ingress replica)
        senders = {"retrieve": self._retrieve_batch, "rerank": self._rerank_batch, "generate": self._generate_batch}
        self.coalescers: dict[str, Coalescer] = {
            stage: Coalescer(senders[stage], size, in_flight)
            for stage, (size, in_flight) in (coalesce or {}).items() if size > 1}

    async def _call(self, stage: str, method, *args):
        delay = self.retry_backoff_s
        while True:
            try:
                return await method.remote(*args)
            except Exception as e:
                if not replica_lost(e):
                    raise
                self.retries += 1
                log.warning("%s: a replica was lost (%s); sending the call again in %.2f s",
                            stage, type(e).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(1.0, 2 * delay)

    async def retrieve(self, query: str) -> list[Candidate]:
        if "retrieve" in self.coalescers:
            return await self.coalescers["retrieve"](query)
        return await self._call("retrieve", self.retriever.retrieve, query)

    async def retrieve_many(self, queries: list[str]) -> list[list[Candidate]]:
        return await self._call("retrieve", self.retriever.retrieve_many, queries)

    async def _retrieve_batch(self, queries: list[str]) -> list[list[Candidate]]:
        return await self.retrieve_many(queries)

    async def rerank(self, query: str, hits: list[Candidate], top_k: int | None) -> list[Candidate]:
        if "rerank" in self.coalescers:
            return await self.coalescers["rerank"]((query, hits, top_k))
        return await self._call("rerank", self.reranker.rerank, query, hits, top_k)

    async def rerank_many(self, queries, hits, top_k):
        return await self._call("rerank", self.reranker.rerank_many, queries, hits, top_k)

    async def _rerank_batch(self, items: list[tuple[str, list[Candidate], int | None]]) -> list[list[Candidate]]:
        ks = [k for _, _, k in items]
        top = None if None in ks else max(ks)            # one call; each request's own top_k cut here
        ranked = await self.rerank_many([q for q, _, _ in items], [h for _, h, _ in items], top)
        return [r if k is None else r[:k] for r, k in zip(ranked, ks)]

    async def generate(self, query: str, reranked: list[Candidate]):
        if "generate" in self.coalescers:
            return await self.coalescers["generate"]((query, reranked))
        return await self._call("generate", self.generator.generate, query, reranked)

    async def generate_many(self, queries, reranked):
        return await self._call("generate", self.generator.generate_many, queries, reranked)

    async def _generate_batch(self, items: list[tuple[str, list[Candidate]]]) -> list:
        return await self.generate_many([q for q, _ in items], [r for _, r in items])

    async def health(self) -> dict[str, dict]:
        names = ("retriever", "reranker", "generator")
        handles = (self.retriever, self.reranker, self.generator)
        results = await asyncio.gather(*(h.health.remote() for h in handles), return_exceptions=True)
        return {n: (r if isinstance(r, dict) else {"ok": False, "detail": f"{type(r).__name__}: {r}"})
                for n, r in zip(names, results)}

    def count_tokens(self, query: str) -> int:
        return len(self.tokenizer(query)["input_ids"])


def coalesce_settings(s: ServeConfig) -> dict[str, tuple[int, int]]:
    """What the ingress coalesces (:class:`HandleBackend`): with ``serve.batching``, each stage's calls
    in batches of up to its deployment's ``max_batch_size``, as many batches out at once as the stage
    has replicas at most; without it, nothing (every request's calls go alone)."""
    if not s.batching:
        return {}
    return {stage: (d.max_batch_size, d.max_replicas)
            for stage, d in (("retrieve", s.retriever), ("rerank", s.reranker), ("generate", s.generator))}
