"""Training data: queries with their positive passages, hard-negative mining and candidate lists
(the micro-batch plans built from them are in :mod:`re2g.train.plans`; ``plan_dpr``, ``plan_lists``,
``to_dataset`` and ``decode_batch`` are re-exported here for existing callers).

Mining and the candidates run in this process (:func:`mine_negatives`, :func:`retrieve_candidates`)
or over Ray Data (:func:`mine_negatives_ray`, :func:`retrieve_candidates_ray`: ``from_items`` of the
query records -> ``map_batches`` with :class:`QueryRetrieval` on an ``ActorPoolStrategy`` pool, each
actor opening its own retriever); both give the same records in the same order.

Mined negatives file (jsonl, one row per training query)::

    {"id", "query", "answers": [...], "positives": [pid...], "pages": [wikipedia_id...],
     "negatives": [pid...]}    # best first, already filtered

Candidates file (jsonl): the same with ``"candidates": [pid...]`` (the hybrid retriever's merged
list, best first) instead of ``negatives``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from re2g.config import MiningConfig
from re2g.index.fusion import normalize_text
from re2g.train.plans import decode_batch, plan_dpr, plan_lists, to_dataset  # noqa: F401 (re-exported)
from re2g.types import PassageInfo

VERDICTS = {"SUPPORTS", "REFUTES"}


@dataclass
class QueryRecord:
    """A training or dev query with its gold passages (pids) and pages (wikipedia ids)."""

    id: str
    query: str
    answers: list[str]
    positives: list[str]
    pages: list[str]
    negatives: list[str] = field(default_factory=list)
    candidates: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadStats:
    """Queries read and skipped (no positive passage in the corpus)."""

    read: int = 0
    kept: int = 0
    no_positive: int = 0


def load_queries(kilt_path: str, locator, *, threshold: float = 0.75,
                 limit: int | None = None) -> tuple[list[QueryRecord], LoadStats]:
    """KILT examples -> :class:`QueryRecord` with positives from ``locator`` (a ``PassageLocator``);
    examples whose provenance matches no passage are skipped and counted."""
    from re2g.data.kilt import read_kilt
    from re2g.data.provenance import page_ids

    stats = LoadStats()
    out: list[QueryRecord] = []
    for ex in read_kilt(kilt_path):
        if limit is not None and len(out) >= limit:
            break
        stats.read += 1
        prov = ex.provenance
        pos = locator.positive_pids(prov, threshold)
        if not pos:
            stats.no_positive += 1
            continue
        out.append(QueryRecord(ex.id, ex.input, list(ex.answers), pos, page_ids(prov)))
    stats.kept = len(out)
    return out, stats


def write_records(path: str | Path, records: Iterable[QueryRecord]) -> int:
    """Write records as jsonl, whole or not at all (:func:`re2g.artifacts.open_atomic`). Returns the count."""
    from re2g.artifacts import open_atomic

    n = 0
    with open_atomic(path) as f:
        for r in records:
            f.write((json.dumps(r.to_dict(), ensure_ascii=False) + "\n").encode("utf-8"))
            n += 1
    return n


def read_records(path: str | Path) -> list[QueryRecord]:
    """Read a negatives or candidates jsonl written by :func:`write_records`."""
    from re2g.errors import DataFormatError

    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(QueryRecord(**json.loads(line)))
            except (ValueError, TypeError) as e:
                raise DataFormatError(str(path), f"not a training record: {e}", line=i) from None
    return out


# --------------------------------------------------------------------------- hard negatives


def is_fact_verification(records: Sequence[QueryRecord]) -> bool:
    """True when every answer is a verdict (SUPPORTS / REFUTES): answer filtering makes no sense."""
    answers = {a for r in records for a in r.answers}
    return bool(answers) and answers <= VERDICTS


def contains_answer(passage_text: str, answers: Iterable[str]) -> bool:
    """True when a normalized answer occurs as whole words in the normalized passage text."""
    hay = f" {normalize_text(passage_text)} "
    return any(a and f" {a} " in hay for a in (normalize_text(x) for x in answers))


@dataclass
class MiningStats:
    """What :func:`filter_negatives` dropped, summed over queries."""

    queries: int = 0
    retrieved: int = 0
    kept: int = 0
    dropped_positive: int = 0
    dropped_same_text: int = 0
    dropped_answer: int = 0
    no_negative: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def filter_negatives(record: QueryRecord, hit_pids: Sequence[str], lookup: Mapping[str, PassageInfo], *,
                     drop_answers: bool, keep: int, stats: MiningStats | None = None) -> list[str]:
    """Hard negatives for one query from retrieved pids (best first): drop positives, passages whose
    normalized text equals a positive's, and (``drop_answers``) passages containing an answer."""
    stats = stats if stats is not None else MiningStats()
    pos = set(record.positives)
    pos_texts = {normalize_text(lookup[p][1]) for p in record.positives if p in lookup}
    out: list[str] = []
    for pid in hit_pids:
        stats.retrieved += 1
        if pid in pos:
            stats.dropped_positive += 1
            continue
        title, text, _ = lookup.get(pid, ("", "", None))
        if normalize_text(text) in pos_texts:
            stats.dropped_same_text += 1
            continue
        if drop_answers and contains_answer(f"{title} {text}", record.answers):
            stats.dropped_answer += 1
            continue
        if pid not in out:
            out.append(pid)
        if len(out) >= keep:
            break
    stats.kept += len(out)
    stats.queries += 1
    stats.no_negative += int(not out)
    return out


def mine_negatives(records: Sequence[QueryRecord], retriever, lookup: Mapping[str, PassageInfo],
                   cfg: MiningConfig, *, batch_size: int = 256) -> tuple[list[QueryRecord], MiningStats]:
    """BM25 (or any retriever with ``batch_search``) top-``cfg.top_k`` per query, filtered by
    :func:`filter_negatives`; answer filtering per ``cfg.drop_answer_passages`` (None: on unless the
    task is fact verification). Returns new records with ``negatives`` set, and the counts."""
    drop = cfg.drop_answer_passages
    if drop is None:
        drop = not is_fact_verification(records)
    stats = MiningStats()
    out: list[QueryRecord] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        hits = retriever.batch_search([r.query for r in chunk], cfg.top_k)
        for r, hs in zip(chunk, hits):
            neg = filter_negatives(r, [h.pid for h in hs], lookup, drop_answers=drop, keep=cfg.keep, stats=stats)
            out.append(QueryRecord(r.id, r.query, r.answers, r.positives, r.pages, negatives=neg))
    return out, stats


def retrieve_candidates(records: Sequence[QueryRecord], retriever, k: int | None = None, *,
                        batch_size: int = 256) -> list[QueryRecord]:
    """Each record with ``candidates`` = the retriever's merged list (pids, best first)."""
    out = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        hits = retriever.batch_search([r.query for r in chunk], k)
        for r, hs in zip(chunk, hits):
            out.append(QueryRecord(r.id, r.query, r.answers, r.positives, r.pages,
                                   negatives=r.negatives, candidates=[h.pid for h in hs]))
    return out


# --------------------------------------------------------------------------- over Ray Data


def pool_size(actors: int | None, cluster_cpus: float) -> int:
    """Retrieval actors of the Ray Data pool: ``actors`` when set, else min(2, cluster CPUs - 1),
    at least 1 (one CPU stays free for Ray Data's own tasks)."""
    if actors is not None:
        return int(actors)
    return max(1, min(2, int(cluster_cpus) - 1))


class QueryRetrieval:
    """Ray Data callable class: one retriever per actor, applied to batches of query records.

    ``make_retriever`` (a picklable zero-argument callable, e.g. a ``functools.partial`` of a
    module-level function) is called once, in the actor: the JVM behind BM25 and the dense index
    with its query encoder start there, never in the driver. Rows in: ``{"order": int, "record":
    json}`` (a :class:`QueryRecord`); rows out: the same with the record's new list set, plus
    ``"stats": json``.

    * ``task="candidates"``: ``candidates`` = the retriever's top ``k`` pids, as
      :func:`retrieve_candidates` does; ``stats`` is ``{}``.
    * ``task="negatives"``: ``negatives`` = the top ``mining.top_k`` filtered by
      :func:`filter_negatives` with ``drop_answers`` (decided by the caller over all queries), as
      :func:`mine_negatives` does; the passage lookup is read from ``passages`` in the actor, and
      ``stats`` holds the row's :class:`MiningStats` counts (they add up over rows).

    ``torch_threads`` caps torch's intra-op threads (for a dense retriever's query encoder), so
    several actors on one node do not oversubscribe its cores.
    """

    def __init__(self, make_retriever: Callable[[], Any], *, task: str, k: int | None = None,
                 passages: str | None = None, mining: dict | None = None, drop_answers: bool = True,
                 torch_threads: int | None = None):
        if task not in ("candidates", "negatives"):
            raise ValueError(f"task: got {task!r}, expected 'candidates' or 'negatives'")
        if torch_threads:
            import torch

            torch.set_num_threads(int(torch_threads))
        self.task = task
        self.k = k
        self.retriever = make_retriever()
        self.mining = MiningConfig.model_validate(mining or {})
        self.drop_answers = drop_answers
        self.lookup: Mapping[str, PassageInfo] = {}
        if task == "negatives":
            if passages is None:
                raise ValueError("task='negatives' needs the passages (for the passage lookup)")
            from re2g.index.dense import load_passage_lookup

            self.lookup = load_passage_lookup(passages)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list]:
        records = [QueryRecord(**json.loads(x)) for x in batch["record"]]
        top = self.mining.top_k if self.task == "negatives" else self.k
        hits = self.retriever.batch_search([r.query for r in records], top)
        out, stats = [], []
        for r, hs in zip(records, hits):
            pids = [h.pid for h in hs]
            if self.task == "negatives":
                st = MiningStats()
                neg = filter_negatives(r, pids, self.lookup, drop_answers=self.drop_answers,
                                       keep=self.mining.keep, stats=st)
                rec = QueryRecord(r.id, r.query, r.answers, r.positives, r.pages, negatives=neg)
                stats.append(json.dumps(st.to_dict()))
            else:
                rec = QueryRecord(r.id, r.query, r.answers, r.positives, r.pages, negatives=r.negatives,
                                  candidates=pids)
                stats.append("{}")
            out.append(json.dumps(rec.to_dict(), ensure_ascii=False))
        return {"order": [int(o) for o in batch["order"]], "record": out, "stats": stats}


@dataclass
class PoolRun:
    """How a Ray Data retrieval pass ran: actors, CPUs each reserved, queries per batch, seconds."""

    actors: int
    actor_cpus: float
    batch_size: int
    blocks: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def retrieve_over_ray_data(records: Sequence[QueryRecord], make_retriever: Callable[[], Any], *, task: str,
                           k: int | None = None, passages: str | None = None, mining: MiningConfig | None = None,
                           drop_answers: bool = True, actors: int | None = None, actor_cpus: float | None = None,
                           threads: int = 1, batch_size: int = 256, resources: Mapping[str, float] | None = None,
                           torch_threads: int | None = None) -> tuple[list[tuple[QueryRecord, dict]], PoolRun]:
    """Run :class:`QueryRetrieval` over ``records`` with Ray Data (the caller has connected to Ray):
    ``from_items`` of the records (one block per ``batch_size`` queries, at least one per actor)
    -> ``map_batches`` on ``ActorPoolStrategy(size=actors)`` (None: :func:`pool_size`), each actor
    reserving ``actor_cpus`` CPUs (None: ``threads``, capped by
    :func:`re2g.index.embed.actor_cpu_request` so the pool leaves Ray Data a CPU; fractions allowed)
    and the custom ``resources``. Returns ((record, stats) in the order of ``records``, how it ran)."""
    import math
    import time

    import ray

    from re2g.errors import ArtifactError
    from re2g.index.embed import actor_cpu_request

    cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
    n_actors = pool_size(actors, cluster_cpus)
    cpus = float(actor_cpus) if actor_cpus is not None else actor_cpu_request(n_actors, threads, cluster_cpus, False)
    n = len(records)
    blocks = max(1, min(n, max(math.ceil(n / batch_size), n_actors)))
    run = PoolRun(n_actors, cpus, batch_size, blocks, 0.0)
    if n == 0:
        return [], run
    t0 = time.time()
    items = [{"order": i, "record": json.dumps(r.to_dict(), ensure_ascii=False)} for i, r in enumerate(records)]
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(
        QueryRetrieval,
        fn_constructor_kwargs=dict(make_retriever=make_retriever, task=task, k=k, passages=passages,
                                   mining=(mining or MiningConfig()).model_dump(), drop_answers=drop_answers,
                                   torch_threads=torch_threads),
        batch_size=None,  # one block (at most batch_size queries) per call
        compute=ray.data.ActorPoolStrategy(size=n_actors),
        num_cpus=cpus,
        resources=dict(resources) if resources else None,
    )
    rows = sorted(ds.take_all(), key=lambda row: int(row["order"]))
    if [int(row["order"]) for row in rows] != list(range(n)):
        raise ArtifactError(f"Ray Data retrieval returned {len(rows)} rows for {n} queries")
    out = [(QueryRecord(**json.loads(row["record"])), json.loads(row["stats"])) for row in rows]
    run.seconds = round(time.time() - t0, 3)
    return out, run


def mine_negatives_ray(records: Sequence[QueryRecord], make_retriever: Callable[[], Any], passages: str,
                       cfg: MiningConfig, *, threads: int = 1, torch_threads: int | None = None
                       ) -> tuple[list[QueryRecord], MiningStats, PoolRun]:
    """:func:`mine_negatives` over Ray Data: the same records in the same order and the same counts,
    computed by a pool of retrieval actors (``cfg.actors``, ``cfg.actor_cpus``, ``cfg.batch_size``,
    ``cfg.actor_resources``), each opening its retriever with ``make_retriever`` and reading the
    passage lookup from ``passages``. Returns (records, counts, how it ran)."""
    drop = cfg.drop_answer_passages
    if drop is None:
        drop = not is_fact_verification(records)
    pairs, run = retrieve_over_ray_data(records, make_retriever, task="negatives", passages=passages, mining=cfg,
                                        drop_answers=drop, actors=cfg.actors, actor_cpus=cfg.actor_cpus,
                                        threads=threads, batch_size=cfg.batch_size, resources=cfg.actor_resources,
                                        torch_threads=torch_threads)
    stats = MiningStats()
    for _, st in pairs:
        for key, value in st.items():
            setattr(stats, key, getattr(stats, key) + value)
    return [r for r, _ in pairs], stats, run


def retrieve_candidates_ray(records: Sequence[QueryRecord], make_retriever: Callable[[], Any], k: int | None,
                            cfg: MiningConfig, *, threads: int = 1, torch_threads: int | None = None
                            ) -> tuple[list[QueryRecord], PoolRun]:
    """:func:`retrieve_candidates` over Ray Data (the pool as in :func:`mine_negatives_ray`, sized
    by ``cfg``): the same records in the same order. Returns (records, how it ran)."""
    pairs, run = retrieve_over_ray_data(records, make_retriever, task="candidates", k=k, actors=cfg.actors,
                                        actor_cpus=cfg.actor_cpus, threads=threads, batch_size=cfg.batch_size,
                                        resources=cfg.actor_resources, torch_threads=torch_threads)
    return [r for r, _ in pairs], run


