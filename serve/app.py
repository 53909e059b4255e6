"""The Ray Serve application: ``Retriever``, ``Reranker`` and ``Generator`` deployments composed by a
FastAPI ``Ingress`` through DeploymentHandles.

```
HTTP ─ proxy ─ Ingress ─┬─ Retriever   query encoder + dense shards + BM25 + fusion
                        ├─ Reranker    cross-encoder
                        └─ Generator   seq2seq (BART) or causal-LM reader, RAG-Sequence/Token decoding
```
(the Ingress: FastAPI; validation, API key, limits, deadline)

Each model deployment wraps exactly one stage object of :mod:`re2g.stages` (``stage``: its
``retrieve`` / ``rerank`` / ``generate``), loaded by :mod:`re2g.run` from the run directory: the same
objects the in-process :class:`re2g.pipeline.Re2GPipeline` composes and ``re2g predict`` runs. Each
has its own replicas (autoscaling), resources (fractional CPUs, GPUs where configured) and
``max_ongoing_requests`` from ``cfg.serve`` (:class:`re2g.config.ServeConfig`), and dynamic batching
(``@serve.batch``) whose size and wait come in the ``user_config`` (so ``serve/config.yaml`` or a
redeploy can change them live; ``max_batch_size: 1`` turns batching off). A batch computes on the
replica's user event loop; the requests that arrive meanwhile form the next batch.

With ``serve.batching`` the ingress also coalesces: the stage calls of concurrent requests go as one
``retrieve_many`` / ``rerank_many`` / ``generate_many`` call per batch (``serve.backend.Coalescer``), so a batch
pays one handle call's overhead instead of one per request (on small models that overhead is as large
as the compute: docs/benchmarks.md).

Run it:

* ``re2g serve RUN_DIR`` (``serve.cli.serve_command``): local Ray, prints the URL, blocks until Ctrl-C;
* ``serve run serve.app:build_app run_dir=RUN_DIR``, or ``serve run serve/config.yaml`` / ``serve deploy``
  (``import_path: serve.app:build_app``, ``args: {run_dir, config, overrides}``).

At build time :func:`build_app` checks the run directory on files (:func:`re2g.run.resolve_run`), so a
bad run fails at once; each replica then loads its piece, checks its vocabulary, and runs one probe
before it takes traffic. ``check_health`` probes again when a replica has been idle, so a broken piece
(a dead JVM, a lost shard actor, NaN scores) takes the replica out.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from re2g.config import Re2GConfig, ServeConfig, ServeDeploymentConfig
from re2g.index.fusion import retrieve_k
from re2g.models.decoding import Answer
from re2g.run import RunPieces, load_generator, load_reranker, load_retriever, resolve_run, run_config
from re2g.types import Candidate
from serve.backend import Coalescer, replica_lost  # noqa: F401  (tests import them from serve.app)
from serve.backend import HandleBackend, coalesce_settings
from serve.components import load_query_tokenizer, start_shard_index
from serve.metrics import ComponentMetrics

log = logging.getLogger("re2g.serve")

DEFAULT_RUN_DIR = "runs/quickstart"
DEPLOYMENT_NAMES = ("Retriever", "Reranker", "Generator", "Ingress")


# --------------------------------------------------------------------------- shared plumbing


def batch_user_config(d: ServeDeploymentConfig, batching: bool) -> dict:
    """The ``user_config`` of a model deployment: its dynamic-batching settings."""
    return {"max_batch_size": d.max_batch_size if batching else 1, "batch_wait_timeout_s": d.batch_wait_timeout_s}


class _Stage:
    """What the three model deployments share: the compute thread, batching settings, metrics and health.
    Each holds one stage object of :mod:`re2g.stages` as ``stage``.

    ``_probe`` (per deployment) runs a tiny input through the loaded stage and raises when it is broken.
    """

    kind = "stage"

    def _init_stage(self, run_dir: str, cfg: dict, dcfg_name: str) -> RunPieces:
        self.cfg = Re2GConfig.model_validate(cfg)
        s = self.cfg.serve
        self.dcfg: ServeDeploymentConfig = getattr(s, dcfg_name)
        self._busy = 0
        self._last_ok = 0.0
        self._batches = 0
        self._items = 0
        self._compute_s = 0.0
        self._period = s.health_probe_period_s
        self._probe_timeout = max(1.0, 0.8 * s.health_check_timeout_s)
        self.metrics = ComponentMetrics(self.kind)
        from re2g.runtime import pick_device

        self.device = pick_device(self.cfg.device)   # cuda only where Ray gave this replica a GPU
        _set_threads(self.dcfg.num_cpus)
        self.reconfigure(batch_user_config(self.dcfg, s.batching))
        return resolve_run(run_dir, self.cfg)

    async def _compute(self, n: int, fn, *args):
        """Run ``fn(*args)`` (a batch of ``n`` requests) and record metrics.

        It runs on the replica's user event loop, blocking it: requests that arrive meanwhile wait in
        Serve's queue and join the next batch together. (On a thread pool instead, the compute thread
        holds the GIL for most of a small model's Python-heavy step, the loop takes requests in one by
        one, and batches stay near size 1: measured with benchmarks/serve_load.py on 2 CPUs.)"""
        t0 = time.perf_counter()
        self._busy += 1
        try:
            out = fn(*args)
        finally:
            self._busy -= 1
        dt = time.perf_counter() - t0
        self._last_ok = time.monotonic()
        self._batches += 1
        self._items += n
        self._compute_s += dt
        self.metrics.observe(n, dt)
        return out

    def stats(self) -> dict:
        """Batches computed, requests in them and compute seconds since start (this replica)."""
        return {"batches": self._batches, "items": self._items, "compute_s": self._compute_s}

    def _batcher(self):
        raise NotImplementedError

    def reconfigure(self, user_config: dict) -> None:
        """Serve calls this with the deployment's ``user_config``: the dynamic-batching settings."""
        b = self._batcher()
        if "max_batch_size" in user_config:
            b.set_max_batch_size(max(1, int(user_config["max_batch_size"])))
        if "batch_wait_timeout_s" in user_config:
            b.set_batch_wait_timeout_s(max(0.0, float(user_config["batch_wait_timeout_s"])))

    def _probe(self) -> None:
        raise NotImplementedError

    async def check_health(self) -> None:
        """Raise when the piece is broken. A replica that computed recently is alive; an idle one runs
        :meth:`_probe` (a tiny input; Serve's health-check timeout bounds it)."""
        if self._busy or (self._last_ok and time.monotonic() - self._last_ok < self._period):
            return
        self._probe()
        self._last_ok = time.monotonic()

    async def health(self) -> dict:
        """For ``/healthz``: ``{"ok": bool, "detail": str}`` (never raises)."""
        try:
            await self.check_health()
            return {"ok": True, "detail": self._describe()}
        except Exception as e:
            return {"ok": False, "detail": f"{type(e).__name__}: {e}"}

    def _describe(self) -> str:
        return f"{self.kind} on {self.device}"


def _set_threads(num_cpus: float) -> None:
    """Torch intra-op threads = the CPUs this replica reserved (at least 1): replicas share the machine."""
    import torch

    torch.set_num_threads(max(1, math.ceil(num_cpus)))


def _finite(values) -> bool:
    return all(math.isfinite(float(v)) for v in values)


# --------------------------------------------------------------------------- model deployments


@serve.deployment(name="Retriever")
class Retriever(_Stage):
    """The :class:`re2g.stages.Retriever` of the run: query encoder + dense shards (in the replica, or in
    shard actors shared by all replicas) + BM25, fused as ``cfg.retrieval`` says. ``retrieve`` is
    dynamically batched: one encoder pass, one dense search and one BM25 batch search for all queries
    of a batch."""

    kind = "retrieve"

    def __init__(self, run_dir: str, cfg: dict):
        pieces = self._init_stage(run_dir, cfg, "retriever")
        s = self.cfg.serve
        shard_actors = s.shard_actors if s.shard_actors is not None else self.cfg.index.shard_actors
        self.stage = load_retriever(pieces, self.cfg, self.device,
                                    open_index=start_shard_index if shard_actors else None)
        self._probe()      # starts the JVM and faiss; fails here, clearly, if a piece is broken

    @property
    def loaded(self):
        """Old name of :attr:`stage` (tests/test_serve.py reads ``loaded.dense_index``)."""
        return self.stage

    def _batcher(self):
        return self._retrieve_batch

    async def retrieve(self, query: str) -> list[Candidate]:
        """Fused, deduplicated candidates for one query, best first (batched with concurrent calls)."""
        return await self._retrieve_batch(query)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _retrieve_batch(self, queries: list[str]) -> list[list[Candidate]]:
        return await self._compute(len(queries), self.stage.retrieve, queries)

    async def retrieve_many(self, queries: list[str]) -> list[list[Candidate]]:
        """Candidates for a list of queries, computed as one batch (``/v1/answer:batch``, and the
        ingress's coalesced calls)."""
        return await self._compute(len(queries), self.stage.retrieve, list(queries))

    def _probe(self) -> None:
        import ray

        idx = self.stage.dense_index
        if idx is not None and hasattr(idx, "actors"):
            ray.get([a.ready.remote() for a in idx.actors], timeout=self._probe_timeout)
        hits = self.stage.retrieve(["health check"])[0]
        if not _finite(h.score for h in hits):
            raise RuntimeError("the retriever returned non-finite scores")
        if idx is not None and self.cfg.retrieval.dpr_top_k > 0 and not any(h.source == "dpr" for h in hits):
            raise RuntimeError("the dense index returned no hit")

    def _describe(self) -> str:
        parts = []
        idx = self.stage.dense_index
        if idx is not None:
            kind = "shard actors" if hasattr(idx, "actors") else "in-replica shards"
            parts.append(f"dense ({len(idx)} passages, {kind})")
        if self.stage.bm25 is not None:
            parts.append("bm25")
        return f"{' + '.join(parts)}, k={self.stage.k}, on {self.device}"


@serve.deployment(name="Reranker")
class Reranker(_Stage):
    """The :class:`re2g.stages.Reranker` of the run (the cross-encoder). ``rerank`` is dynamically
    batched: the (query, passage) pairs of every request in a batch are scored together."""

    kind = "rerank"

    def __init__(self, run_dir: str, cfg: dict):
        pieces = self._init_stage(run_dir, cfg, "reranker")
        self.stage = load_reranker(pieces, self.cfg, self.device)
        self._probe()

    @property
    def pipe(self):
        """Old attribute (tests/test_serve.py reads ``pipe.reranker``): the cross-encoder, ``stage.model``."""
        return SimpleNamespace(reranker=self.stage.model)

    def _batcher(self):
        return self._rerank_batch

    def _rank(self, queries: list[str], hits: list[list[Candidate]]) -> list[list[Candidate]]:
        return self.stage.rerank(queries, hits, top_k=max([len(h) for h in hits] + [1]))

    async def rerank(self, query: str, hits: list[Candidate], top_k: int | None = None) -> list[Candidate]:
        """``hits`` sorted by the cross-encoder's score, best first, the first ``top_k`` (None: all)."""
        ranked = await self._rerank_batch(query, list(hits))
        return ranked if top_k is None else ranked[:top_k]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _rerank_batch(self, queries: list[str], hits: list[list[Candidate]]) -> list[list[Candidate]]:
        return await self._compute(len(queries), self._rank, queries, hits)

    async def rerank_many(self, queries: list[str], hits: list[list[Candidate]],
                          top_k: int | None = None) -> list[list[Candidate]]:
        """:meth:`rerank` for a list of queries, computed as one batch."""
        ranked = await self._compute(len(queries), self._rank, list(queries), [list(h) for h in hits])
        return ranked if top_k is None else [r[:top_k] for r in ranked]

    def _probe(self) -> None:
        import torch

        with torch.inference_mode():
            z = self.stage.model.score_pairs(["health check"], ["re2g"], ["a passage to score"], batch_size=1)
        if not _finite(z.float().cpu().tolist()):
            raise RuntimeError("the reranker returned a non-finite score")


@serve.deployment(name="Generator")
class Generator(_Stage):
    """The :class:`re2g.stages.Generator` of the run (a seq2seq or causal-LM reader with RAG-Sequence or
    RAG-Token decoding, ``cfg.generation``). ``generate`` is dynamically batched: beam search runs on the sources of every
    request in a batch together."""

    kind = "generate"

    def __init__(self, run_dir: str, cfg: dict):
        pieces = self._init_stage(run_dir, cfg, "generator")
        self.stage = load_generator(pieces, self.cfg, self.device)
        self._probe()

    def _batcher(self):
        return self._generate_batch

    async def generate(self, query: str, reranked: list[Candidate]) -> Answer:
        """The :class:`re2g.models.decoding.Answer` for one query and its reranked passages."""
        return await self._generate_batch(query, list(reranked))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, queries: list[str], reranked: list[list[Candidate]]) -> list[Answer]:
        return await self._compute(len(queries), self.stage.generate, queries, reranked)

    async def generate_many(self, queries: list[str], reranked: list[list[Candidate]]) -> list[Answer]:
        """Answers for a list of queries, computed as one batch."""
        return await self._compute(len(queries), self.stage.generate, list(queries), [list(r) for r in reranked])

    def _probe(self) -> None:
        import torch

        g = self.stage.model
        enc = g.tokenize_sources(["re2g / a passage // health check"])
        ids, mask = enc["input_ids"].to(g.device), enc["attention_mask"].to(g.device)
        with torch.inference_mode():
            if getattr(g.model.config, "is_encoder_decoder", False):    # seq2seq: the encoder's states (1, S, d)
                out, what = g.model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state, "encoder"
            else:                                                       # causal LM: the prompt's logits (1, S, V)
                out, what = g.model(input_ids=ids, attention_mask=mask).logits, "language model"
        if not bool(torch.isfinite(out).all()):
            raise RuntimeError(f"the generator's {what} returned non-finite values")


# --------------------------------------------------------------------------- ingress


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """The HTTP front: the FastAPI app of :mod:`serve.api` over the three deployments' handles. The app
    is built in the replica (``__serve_build_asgi_app__``), with this deployment's limits, API key and
    CORS origins."""

    def __init__(self, retriever, reranker, generator, run_dir: str, cfg: dict, api_key: str | None = None):
        self.cfg = Re2GConfig.model_validate(cfg)
        pieces = resolve_run(run_dir, self.cfg)
        self.backend = HandleBackend(retriever, reranker, generator, load_query_tokenizer(pieces),
                                     coalesce=coalesce_settings(self.cfg.serve))
        self.settings = api_settings(self.cfg, pieces, api_key)

    def retries(self) -> dict:
        """``{"pid": this replica's process, "retries": stage calls it sent again after losing a replica}``."""
        return {"pid": os.getpid(), "retries": self.backend.retries}

    def __serve_build_asgi_app__(self):
        from serve.api import create_api

        return create_api(self.backend, self.settings)


def api_settings(cfg: Re2GConfig, pieces: RunPieces, api_key: str | None = None):
    """The :class:`serve.api.ApiSettings` of the ingress for a run (what :func:`build_app` checks and
    every ingress replica enforces). Raises :class:`re2g.errors.ConfigError` when ``serve.max_body_bytes``
    cannot hold a request with one query or passage (the schema's limits are fitted to it)."""
    from re2g.errors import ConfigError
    from serve.api import ApiSettings
    from serve.schemas import MAX_N_DOCS, RequestLimits

    s, r = cfg.serve, cfg.retrieval
    k = retrieve_k(r, dense=pieces.dense_dir is not None, bm25=pieces.bm25_dir is not None)
    settings = ApiSettings(
        app_name=s.app_name, api_key=api_key or None, api_key_header=s.api_key_header,
        cors_origins=tuple(s.cors_origins), max_body_bytes=s.max_body_bytes,
        max_query_tokens=s.max_query_tokens or cfg.models.query_max_length,
        request_timeout_s=s.request_timeout_s, retry_after_s=s.retry_after_s,
        max_batch_queries=s.max_batch_queries, retrieve_k=max(1, k),
        default_n_docs=r.rerank_top_k, max_n_docs=MAX_N_DOCS, batching=s.batching)
    try:
        RequestLimits.fit(retrieve_k=settings.retrieve_k, max_n_docs=settings.max_n_docs,
                          max_batch_queries=settings.max_batch_queries, max_body_bytes=settings.max_body_bytes)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return settings


# --------------------------------------------------------------------------- building the application


def deployment_options(d: ServeDeploymentConfig, s: ServeConfig, *, batched: bool = True) -> dict[str, Any]:
    """Serve options of one deployment from its config section."""
    actor: dict[str, Any] = {"num_cpus": d.num_cpus}
    if d.num_gpus:
        actor["num_gpus"] = d.num_gpus
    autoscaling: dict[str, Any] = {"min_replicas": d.min_replicas, "max_replicas": d.max_replicas,
                                   "target_ongoing_requests": d.target_ongoing_requests}
    if d.initial_replicas is not None:
        autoscaling["initial_replicas"] = d.initial_replicas
    opts: dict[str, Any] = {
        "ray_actor_options": actor,
        "autoscaling_config": autoscaling,
        "max_ongoing_requests": d.max_ongoing_requests,
        "max_queued_requests": d.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": s.retry_after_s},
        "health_check_period_s": s.health_check_period_s,
        "health_check_timeout_s": s.health_check_timeout_s,
        "max_constructor_retry_count": 2,
    }
    if batched:
        opts["user_config"] = batch_user_config(d, s.batching)
    return opts


def resolve_api_key(s: ServeConfig) -> str | None:
    """``serve.api_key``, else the environment variable ``serve.api_key_env``; None: no authentication."""
    if s.api_key:
        return s.api_key
    if s.api_key_env:
        return os.environ.get(s.api_key_env) or None
    return None


def bind_app(run_dir: str, cfg: Re2GConfig, *, api_key: str | None = None):
    """The application graph for a run directory and config (no checks; see :func:`build_app`)."""
    s = cfg.serve
    c = cfg.model_dump(mode="json")
    retriever = Retriever.options(**deployment_options(s.retriever, s)).bind(run_dir, c)
    reranker = Reranker.options(**deployment_options(s.reranker, s)).bind(run_dir, c)
    generator = Generator.options(**deployment_options(s.generator, s)).bind(run_dir, c)
    return Ingress.options(**deployment_options(s.ingress, s, batched=False)).bind(
        retriever, reranker, generator, run_dir, c, api_key)


class AppArgs(BaseModel):
    """Arguments of :func:`build_app` (``serve run serve.app:build_app run_dir=...`` or ``args:`` in the
    Serve config file)."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field(DEFAULT_RUN_DIR, description="the run directory (models, indexes, passages)")
    config: str | None = Field(None, description="re2g config YAML (default: RUN_DIR/config.yaml)")
    overrides: list[str] = Field(default_factory=list, description="section.field=value overrides, "
                                 "e.g. serve.generator.max_replicas=4")


def build_app(args: dict | None = None):
    """Serve application builder: check the run directory, then bind the four deployments.

    ``args``: ``run_dir`` (relative paths resolve against the current directory of the process that
    builds the app), ``config``, ``overrides`` (a list, or one string). Raises
    :class:`re2g.errors.ArtifactError` / :class:`re2g.errors.ConfigError` with a clear message."""
    raw = dict(args or {})
    if isinstance(raw.get("overrides"), str):
        raw["overrides"] = [raw["overrides"]]
    a = AppArgs.model_validate(raw)
    run_dir = str(Path(a.run_dir).expanduser().resolve())
    cfg = run_config(run_dir, a.config, a.overrides)
    api_settings(cfg, resolve_run(run_dir, cfg))
    return bind_app(run_dir, cfg, api_key=resolve_api_key(cfg.serve))


def __getattr__(name: str):
    """``serve.app:app`` -- the application with default settings for ``serve build`` (which needs an
    Application object, not a builder); ``serve/config.yaml`` is generated from it."""
    if name == "app":
        return bind_app(DEFAULT_RUN_DIR, Re2GConfig())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
