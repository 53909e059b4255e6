"""Training data: queries with their positive passages, hard-negative mining, candidate lists, and
the planning of micro-batches (conflict-free for DPR) that the training loop reads from Ray Data.

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

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from re2g.config import MiningConfig
from re2g.index.fusion import normalize_text

T = TypeVar("T")
PassageInfo = tuple[str, str, "str | None"]  # (title, text, wikipedia_id)
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
    """Write records as jsonl (atomically: temporary file, then rename). Returns the count."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(p)
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


# --------------------------------------------------------------------------- batches


def pid_key(pid: str) -> int:
    """A stable 63-bit integer key of a passage id (for comparing passages across workers)."""
    return int.from_bytes(hashlib.blake2b(pid.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def pack_conflict_free(items: Sequence[T], batch_size: int, passages_of: Callable[[T], set[str]],
                       positives_of: Callable[[T], set[str]], *, open_batches: int = 8) -> tuple[list[list[T]], int]:
    """Greedy packing into batches of exactly ``batch_size`` where no passage of an item is a
    positive of another item in the batch. Items go to the first open batch they fit; at most
    ``open_batches`` are open at once (a new one opens when none fits; the oldest is dropped when
    too many are open). Returns (full batches in order of completion, items left out)."""
    done: list[list[T]] = []
    openb: list[tuple[list[T], set[str], set[str]]] = []  # (items, passages, positives)
    dropped = 0
    for it in items:
        ps, pos = passages_of(it), positives_of(it)
        for b in openb:
            if not (ps & b[2]) and not (pos & b[1]):
                break
        else:
            if len(openb) >= open_batches:
                dropped += len(openb.pop(0)[0])
            b = ([], set(), set())
            openb.append(b)
        b[0].append(it)
        b[1].update(ps)
        b[2].update(pos)
        if len(b[0]) == batch_size:
            done.append(b[0])
            openb.remove(b)
    dropped += sum(len(b[0]) for b in openb)
    return done, dropped


def _passage(lookup: Mapping[str, PassageInfo], pid: str) -> dict:
    title, text, _ = lookup[pid]
    return {"pid": pid, "key": pid_key(pid), "title": title, "text": text}


def _sample_negatives(rng: random.Random, r: QueryRecord, n: int, top: int, all_pids: Sequence[str]) -> list[str]:
    pool = r.negatives[:top]
    picked = rng.sample(pool, min(n, len(pool)))
    pos = set(r.positives)
    while len(picked) < n:  # too few mined: random corpus passages fill up (equal shapes on all ranks)
        p = all_pids[rng.randrange(len(all_pids))]
        if p not in pos and p not in picked:
            picked.append(p)
    return picked


@dataclass
class Plan:
    """Micro-batches in training order (every epoch) and the step arithmetic of a run."""

    rows: list[list[dict]]   # micro-batches of examples
    steps: int               # optimizer steps
    dropped: int             # examples left out by packing / trimming
    per_epoch: int           # micro-batches per epoch (before trimming)


def _finish_plan(epochs: list[list[list[dict]]], world: int, grad_accum: int, max_steps: int | None,
                 dropped: int) -> Plan:
    rows = [mb for ep in epochs for mb in ep]
    unit = world * grad_accum
    steps = len(rows) // unit
    if max_steps is not None:
        steps = min(steps, max_steps)
    if steps == 0:
        from re2g.errors import ConfigError

        raise ConfigError(f"too little training data: {len(rows)} micro-batches for {world} workers x "
                          f"{grad_accum} accumulation steps (lower train.*.batch_size)")
    keep = steps * unit
    dropped += sum(len(mb) for mb in rows[keep:])
    return Plan(rows[:keep], steps, dropped, len(epochs[0]) if epochs else 0)


def plan_dpr(records: Sequence[QueryRecord], lookup: Mapping[str, PassageInfo], *, batch_size: int,
             epochs: int, hard_negatives: int, sample_from_top: int, world: int, grad_accum: int,
             max_steps: int | None, seed: int) -> Plan:
    """DPR micro-batches: each example = query, one positive (random among the query's), and
    ``hard_negatives`` sampled from its mined top ``sample_from_top``; batches are conflict-free
    (:func:`pack_conflict_free`); new positives, negatives and order every epoch."""
    rng = random.Random(seed)
    all_pids = sorted(lookup)
    records = [r for r in records if any(p in lookup for p in r.positives)]
    epochs_out, dropped = [], 0
    for _ in range(epochs):
        order = list(records)
        rng.shuffle(order)
        items = []
        for r in order:
            positives = [p for p in r.positives if p in lookup]
            pos = rng.choice(positives)
            negs = _sample_negatives(rng, r, hard_negatives, sample_from_top, all_pids)
            items.append({"query": r.query, "positive": _passage(lookup, pos),
                          "negatives": [_passage(lookup, p) for p in negs],
                          "positive_keys": [pid_key(p) for p in r.positives],
                          "_passages": {pos, *negs}, "_positives": set(r.positives)})
        batches, d = pack_conflict_free(items, batch_size, lambda x: x["_passages"], lambda x: x["_positives"])
        dropped += d
        for b in batches:
            for x in b:
                x.pop("_passages", None)
                x.pop("_positives", None)
        epochs_out.append(batches)
    return _finish_plan(epochs_out, world, grad_accum, max_steps, dropped)


@dataclass
class ListStats:
    """Queries skipped when building candidate lists."""

    queries: int = 0
    kept: int = 0
    no_positive: int = 0
    only_positives: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def candidate_list(r: QueryRecord, pids: Sequence[str], *, max_len: int, max_positives: int,
                   rng: random.Random | None = None) -> tuple[list[str], list[bool]] | None:
    """A list of at most ``max_len`` candidates with at most ``max_positives`` positives (the
    first ones) and the negatives in order (or sampled with ``rng``); None when the candidates
    hold no positive or no negative."""
    pos_set = set(r.positives)
    pos = [p for p in dict.fromkeys(pids) if p in pos_set][:max_positives]
    neg = [p for p in dict.fromkeys(pids) if p not in pos_set]
    if not pos or not neg:
        return None
    room = max_len - len(pos)
    neg = rng.sample(neg, min(room, len(neg))) if rng is not None else neg[:room]
    items = [(p, True) for p in pos] + [(p, False) for p in neg]
    if rng is not None:
        rng.shuffle(items)
    return [p for p, _ in items], [y for _, y in items]


def plan_lists(records: Sequence[QueryRecord], lookup: Mapping[str, PassageInfo], *, source: str,
               batch_size: int, epochs: int, max_len: int, max_positives: int, world: int, grad_accum: int,
               max_steps: int | None, seed: int, pad_to: int | None = None) -> tuple[Plan, ListStats]:
    """Reranker / joint micro-batches: per query a candidate list from ``source`` (``candidates``:
    the hybrid list; ``negatives``: positives + mined negatives) with labels. Queries with no
    positive or only positives among the candidates are skipped and counted. ``pad_to``: fill each
    list with random corpus passages up to this length (fixed-size lists)."""
    rng = random.Random(seed)
    all_pids = sorted(lookup)
    stats = ListStats()
    usable = []
    for r in records:
        stats.queries += 1
        pids = r.candidates if source == "candidates" else [*r.positives, *r.negatives]
        pids = [p for p in pids if p in lookup]
        lst = candidate_list(r, pids, max_len=max_len, max_positives=max_positives)
        if lst is None:
            pos = set(r.positives)
            if any(p in pos for p in pids):
                stats.only_positives += 1
            else:
                stats.no_positive += 1
            continue
        usable.append((r, pids))
    stats.kept = len(usable)
    epochs_out = []
    for _ in range(epochs):
        order = list(usable)
        rng.shuffle(order)
        items = []
        for r, pids in order:
            cand, labels = candidate_list(r, pids, max_len=max_len, max_positives=max_positives, rng=rng)
            if pad_to is not None:
                pos = set(r.positives)
                while len(cand) < pad_to:
                    p = all_pids[rng.randrange(len(all_pids))]
                    if p not in pos and p not in cand:
                        cand.append(p)
                        labels.append(False)
            items.append({"query": r.query, "passages": [_passage(lookup, p) for p in cand], "labels": labels})
        epochs_out.append([items[i:i + batch_size] for i in range(0, len(items) - batch_size + 1, batch_size)])
    dropped = sum(len(usable) % batch_size for _ in range(epochs))
    return _finish_plan(epochs_out, world, grad_accum, max_steps, dropped), stats


def to_dataset(plan: Plan, max_blocks: int = 200):
    """The plan as a Ray Dataset of rows ``{"batch": json}`` (one micro-batch per row), in order."""
    import ray

    rows = [{"batch": json.dumps(mb, ensure_ascii=False)} for mb in plan.rows]
    return ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), max_blocks)))


def decode_batch(row: Mapping[str, Any]) -> list[dict]:
    """A dataset row -> its micro-batch (list of examples)."""
    return json.loads(row["batch"])
