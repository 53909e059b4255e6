"""Micro-batch plans the training loop reads from Ray Data: conflict-free DPR batches
(:func:`plan_dpr`), fixed-size candidate lists for the reranker and joint training
(:func:`plan_lists`), equal counts per worker and step (:func:`finish_plan`), and the plan as a
Ray Dataset (:func:`to_dataset`, :func:`decode_batch`).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from re2g.types import PassageInfo

if TYPE_CHECKING:
    from re2g.train.data import QueryRecord

T = TypeVar("T")


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


def finish_plan(epochs: list[list[list[dict]]], world: int, grad_accum: int, max_steps: int | None,
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
    return finish_plan(epochs_out, world, grad_accum, max_steps, dropped)


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
    return finish_plan(epochs_out, world, grad_accum, max_steps, dropped), stats


def to_dataset(plan: Plan, max_blocks: int = 200):
    """The plan as a Ray Dataset of rows ``{"batch": json}`` (one micro-batch per row), in order."""
    import ray

    rows = [{"batch": json.dumps(mb, ensure_ascii=False)} for mb in plan.rows]
    return ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), max_blocks)))


def decode_batch(row: Mapping[str, Any]) -> list[dict]:
    """A dataset row -> its micro-batch (list of examples)."""
    return json.loads(row["batch"])
