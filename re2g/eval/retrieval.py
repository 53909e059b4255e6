"""Retrieval metrics over ranked lists.

Pure functions over ids and texts:

- passage level: Recall@k (DPR's top-k accuracy: a gold passage among the first k) and MRR@k,
  against a set of positive passage ids;
- page level: R-Precision against Wikipedia page ids, as KILT scores provenance (duplicates of a
  page in a ranked list count once, at the page's best rank);
- answers (tasks without provenance: NQ-open, TriviaQA, WebQuestions): answer recall@k, DPR's
  top-k accuracy -- 1 when the text of one of the first k passages contains a gold answer,
  compared after KILT/SQuAD normalization (:func:`re2g.eval.kilt.normalize_answer`) as a
  whole-token sequence;
- BEIR qrels: nDCG@k with graded gains and Recall@k as the share of the relevant documents,
  computed as ``pytrec_eval`` (trec_eval's ``ndcg_cut`` and ``recall``) computes them for BEIR.

A report keeps two populations apart and never mixes them: ``n`` queries scored at passage and
page level (those with a positive passage in the corpus) and ``n_answer`` queries scored with
answer recall (those with a gold answer); a query with both is in both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from re2g.eval.kilt import normalize_answer
from re2g.eval.kilt import r_precision as kilt_r_precision


def recall_at_k(ranked: Sequence[str], gold: Iterable[str], k: int) -> float:
    """1.0 when any gold id is among the first ``k`` ranked ids, else 0.0 (DPR's top-k accuracy)."""
    g = set(gold)
    return float(any(r in g for r in ranked[:k]))


def mrr_at_k(ranked: Sequence[str], gold: Iterable[str], k: int = 10) -> float:
    """Reciprocal rank of the first gold id within the first ``k``; 0.0 when none is there."""
    g = set(gold)
    for i, r in enumerate(ranked[:k]):
        if r in g:
            return 1.0 / (i + 1)
    return 0.0


def dedup_keep_order(ids: Iterable[str]) -> list[str]:
    """Ids in order with later repeats dropped (pages of several passages count once)."""
    seen: set[str] = set()
    out = []
    for i in ids:
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


def r_precision(ranked_pages: Sequence[str], gold_pages: Iterable[str]) -> float:
    """R-Precision: with R distinct gold pages, the share of the first R distinct ranked pages that are gold."""
    g = set(gold_pages)
    if not g:
        return 0.0
    top = dedup_keep_order(ranked_pages)[: len(g)]
    return sum(p in g for p in top) / len(g)


def page_r_precision(ranked_pages: Sequence[str], gold_page_lists: Sequence[Sequence[str]]) -> float:
    """KILT's page-level R-Precision of a ranked list of (possibly repeated) pages: the distinct
    pages in order, scored against each gold output's page list, the best over outputs
    (:func:`re2g.eval.kilt.r_precision`). With a single output it equals :func:`r_precision`."""
    return kilt_r_precision(dedup_keep_order(ranked_pages), gold_page_lists)


# --------------------------------------------------------------------------- answers


def normalized_answers(answers: Iterable[str]) -> list[str]:
    """The distinct non-empty normalized forms of ``answers`` (an answer that normalizes to
    nothing, such as ``"The"``, can never match and is dropped)."""
    return list(dict.fromkeys(a for a in (normalize_answer(x) for x in answers if x) if a))


def contains_answer(text: str, answers: Iterable[str], *, normalized: bool = False) -> bool:
    """True when a gold answer occurs in ``text`` as a whole-token sequence after KILT/SQuAD
    normalization of both (lowercase, ASCII punctuation dropped, articles dropped, whitespace
    collapsed): ``"The Beatles!"`` is in ``"... by the beatles in 1963"``, ``"beat"`` is not.
    ``normalized=True``: ``text`` and ``answers`` are already normalized (see
    :func:`normalized_answers`)."""
    norm = text if normalized else normalize_answer(text)
    golds = answers if normalized else normalized_answers(answers)
    padded = f" {norm} "
    return any(f" {a} " in padded for a in golds)


def passage_has_answer(title: str, text: str, answers: Iterable[str], *, use_title: bool = False,
                       normalized: bool = False) -> bool:
    """:func:`contains_answer` on the passage text -- DPR's rule, behind its published top-k
    accuracies -- or also on its title when ``use_title`` (title and text matched separately, so
    no answer is made of the title's end and the text's start). Titles are off by default: where
    the answer is the page title (entity tasks), every passage of the page would hold it."""
    golds = answers if normalized else normalized_answers(answers)
    return (contains_answer(text, golds, normalized=normalized)
            or (use_title and bool(title) and contains_answer(title, golds, normalized=normalized)))


def answer_recall_at_k(has_answer: Sequence[bool], k: int) -> float:
    """Answer recall@k (DPR's top-k accuracy) from one flag per ranked passage (best first; see
    :func:`passage_has_answer`): 1.0 when one of the first ``k`` contains a gold answer."""
    if k <= 0:
        raise ValueError(f"k must be a positive integer, got {k}")
    return float(any(has_answer[:k]))


# --------------------------------------------------------------------------- BEIR (graded qrels)


def dcg_at_k(ranked: Sequence[str], qrels: Mapping[str, int], k: int = 10) -> float:
    """Discounted cumulative gain of the first ``k`` distinct ranked ids:
    ``sum_i gain_i / log2(i + 1)`` over ranks ``i = 1..k``, with ``gain`` = the qrel score (linear
    gains as trec_eval's ``ndcg_cut``; unjudged and non-positive scores gain 0)."""
    if k <= 0:
        raise ValueError(f"k must be a positive integer, got {k}")
    return sum(max(qrels.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(dedup_keep_order(ranked)[:k]))


def ndcg_at_k(ranked: Sequence[str], qrels: Mapping[str, int], k: int = 10) -> float:
    """nDCG@k: :func:`dcg_at_k` over the ideal DCG@k, the DCG of the query's judged documents
    sorted by score (best first). 0.0 when the query has no positive judgement."""
    if k <= 0:
        raise ValueError(f"k must be a positive integer, got {k}")
    ideal = sorted((s for s in qrels.values() if s > 0), reverse=True)[:k]
    idcg = sum(s / math.log2(i + 2) for i, s in enumerate(ideal))
    return dcg_at_k(ranked, qrels, k) / idcg if idcg > 0 else 0.0


def qrels_recall_at_k(ranked: Sequence[str], qrels: Mapping[str, int], k: int = 100) -> float:
    """BEIR's Recall@k (trec_eval's ``recall.k``): the share of the query's relevant documents
    (qrel score > 0) among the first ``k`` distinct ranked ids; 0.0 when none is relevant."""
    if k <= 0:
        raise ValueError(f"k must be a positive integer, got {k}")
    rel = {d for d, s in qrels.items() if s > 0}
    if not rel:
        return 0.0
    return sum(d in rel for d in dedup_keep_order(ranked)[:k]) / len(rel)


# --------------------------------------------------------------------------- reports


@dataclass
class RetrievalReport:
    """Mean metrics over queries for one system; ``per_query`` keeps each query's values.

    ``n``: queries scored at passage/page level (``recall@k``, ``mrr@k``, ``rprec_page``, or the
    BEIR metrics); ``n_answer``: queries scored with ``answer_recall@k``. Each mean is over its
    own population."""

    name: str
    n: int
    metrics: dict[str, float]
    per_query: list[dict[str, float]] = field(default_factory=list, repr=False)
    n_answer: int = 0

    def to_dict(self) -> dict:
        return {"name": self.name, "n": self.n, "n_answer": self.n_answer,
                **{k: round(v, 6) for k, v in self.metrics.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> "RetrievalReport":
        """The inverse of :meth:`to_dict` (without ``per_query``)."""
        return cls(name=d["name"], n=int(d.get("n", 0)), n_answer=int(d.get("n_answer", 0)),
                   metrics={k: float(v) for k, v in d.items() if k not in ("name", "n", "n_answer")})


ANSWER_PREFIX = "answer_"


def _means(per: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The mean of each key over the rows that have it (keys in order of first appearance)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row in per:
        for k, v in row.items():
            sums[k] = sums.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + 1
    return {k: sums[k] / counts[k] for k in sums}


def evaluate_rankings(name: str, rankings: Sequence[Sequence[str]], golds: Sequence[Iterable[str] | None], *,
                      ks: Sequence[int] = (1, 5, 12, 24), mrr_k: int = 10,
                      page_rankings: Sequence[Sequence[str]] | None = None,
                      page_golds: Sequence[Iterable[str]] | None = None,
                      page_gold_lists: Sequence[Sequence[Sequence[str]]] | None = None,
                      answer_flags: Sequence[Sequence[bool] | None] | None = None,
                      answer_ks: Sequence[int] | None = None) -> RetrievalReport:
    """Per-query metrics averaged over queries.

    Passage level, for each query whose gold is not ``None``: Recall@k for each ``k`` and
    MRR@``mrr_k`` (and ``rprec_page`` when ``page_rankings`` are given: KILT's R-Precision against
    ``page_gold_lists`` -- one page list per gold output -- or else against the page set in
    ``page_golds``). Answers, for each query whose ``answer_flags`` entry is not ``None`` (one flag
    per ranked passage, see :func:`passage_has_answer`): ``answer_recall@k`` for each of
    ``answer_ks`` (default ``ks``). ``n`` and ``n_answer`` count the two populations."""
    if len(rankings) != len(golds):
        raise ValueError(f"{len(rankings)} rankings for {len(golds)} gold sets")
    if answer_flags is not None and len(answer_flags) != len(rankings):
        raise ValueError(f"{len(rankings)} rankings for {len(answer_flags)} answer flag lists")
    answer_ks = tuple(ks if answer_ks is None else answer_ks)
    per = []
    n = n_answer = 0
    for i, (r, g) in enumerate(zip(rankings, golds)):
        row: dict[str, float] = {}
        if g is not None:
            n += 1
            g = set(g)
            row.update({f"recall@{k}": recall_at_k(r, g, k) for k in ks})
            row[f"mrr@{mrr_k}"] = mrr_at_k(r, g, mrr_k)
            if page_rankings is not None and page_gold_lists is not None:
                row["rprec_page"] = page_r_precision(page_rankings[i], page_gold_lists[i])
            elif page_rankings is not None and page_golds is not None:
                row["rprec_page"] = r_precision(page_rankings[i], page_golds[i])
        flags = answer_flags[i] if answer_flags is not None else None
        if flags is not None:
            n_answer += 1
            row.update({f"{ANSWER_PREFIX}recall@{k}": answer_recall_at_k(flags, k) for k in answer_ks})
        per.append(row)
    return RetrievalReport(name=name, n=n, n_answer=n_answer, metrics=_means(per), per_query=per)


def reports_table(reports: Sequence[RetrievalReport], title: str = "retrieval"):
    """A rich table with one row per system and one column per metric: ``queries`` (``n``, the
    population of the passage/page metrics) and, when answers were scored, ``with answers``
    (``n_answer``, the population of ``answer_recall@k``). A metric a system lacks shows ``-``."""
    from rich.table import Table

    keys = list(dict.fromkeys(k for r in reports for k in r.metrics))
    answers = any(r.n_answer for r in reports)
    t = Table(title=title)
    t.add_column("system")
    t.add_column("queries", justify="right")
    if answers:
        t.add_column("with answers", justify="right")
    for k in keys:
        t.add_column(k, justify="right")
    for r in reports:
        counts = [str(r.n)] + ([str(r.n_answer)] if answers else [])
        t.add_row(r.name, *counts, *(f"{r.metrics[k]:.3f}" if k in r.metrics else "-" for k in keys))
    if answers:
        t.caption = ("queries: those with a positive passage (recall@k, mrr, rprec_page); with answers: those with "
                     "a gold answer (answer_recall@k: a top-k passage holds a normalized answer)")
    return t


# --------------------------------------------------------------------------- running retrievers


def _page_of(hit) -> str:
    wid = getattr(hit, "wikipedia_id", None)
    if wid:
        return str(wid)
    return str(hit.pid).split("::", 1)[0]


def _retrieve(name: str, retriever, queries: Sequence[str], k: int, batch_size: int, progress: bool) -> list:
    from tqdm.auto import tqdm

    hits: list = []
    for s in tqdm(range(0, len(queries), batch_size), desc=f"retrieve {name}", disable=not progress):
        hits.extend(retriever.batch_search(list(queries[s:s + batch_size]), k))
    return hits


LABEL_ANSWERS = frozenset({"SUPPORTS", "REFUTES", "NOT ENOUGH INFO"})  # FEVER's labels: not answer strings


def evaluate_retrievers(retrievers, examples, locator, *, ks: Sequence[int] = (1, 5, 12, 24), mrr_k: int = 10,
                        answer_ks: Sequence[int] | None = None, use_title: bool = False,
                        label_answers: Iterable[str] = LABEL_ANSWERS,
                        batch_size: int = 512, progress: bool = False) -> tuple[list[RetrievalReport], int]:
    """Run each retriever (``name -> object with batch_search(queries, k)`` returning hits with
    ``pid``, ``title``, ``text``, ``wikipedia_id``) over KILT ``examples`` and score its rankings.

    Examples with a positive passage (from ``locator``, a
    :class:`re2g.data.provenance.PassageLocator`; page-level provenance makes every passage of its
    page a positive) get passage-level Recall@k / MRR@k and KILT's page-level R-Precision.
    Examples with a gold answer get ``answer_recall@k`` for each of ``answer_ks`` (default ``ks``),
    matched in each hit's text (also its title when ``use_title``); answers in ``label_answers``
    (FEVER's ``SUPPORTS`` / ``REFUTES``) are class labels, not strings to find, and are not used.
    An example with both gets both; ``n`` and ``n_answer`` of each report count the two populations.

    Examples with neither a positive passage nor an answer are left out; their count is returned
    beside the reports (callers print it, so nothing is dropped silently).
    """
    from re2g.eval.kilt import gold_answers

    labels = frozenset(label_answers)
    kept, golds, page_lists, answers = [], [], [], []
    for ex in examples:
        pos = locator.positives(ex)
        ans = normalized_answers(a for a in gold_answers(ex) if a not in labels)
        if pos.pids or ans:
            kept.append(ex)
            golds.append(pos.pids or None)
            page_lists.append(pos.page_lists)
            answers.append(ans or None)
    skipped = len(examples) - len(kept)
    queries = [ex.input for ex in kept]
    answer_ks = tuple(ks if answer_ks is None else answer_ks)
    k_max = max(max(ks), mrr_k, max(answer_ks, default=1))
    norm_cache: dict[str, tuple[str, str]] = {}
    reports = []
    for name, retriever in retrievers.items():
        hits = _retrieve(name, retriever, queries, k_max, batch_size, progress)
        rankings = [[h.pid for h in hs] for hs in hits]
        page_rankings = [[_page_of(h) for h in hs] for hs in hits]
        flags: list[list[bool] | None] = []
        for hs, ans in zip(hits, answers):
            if ans is None:
                flags.append(None)
                continue
            row = []
            for h in hs:
                if h.pid not in norm_cache:
                    if not (h.text or h.title):
                        raise ValueError(f"retriever {name!r} returned hit {h.pid!r} without passage text; "
                                         "answer recall needs it (open the dense retriever with passages)")
                    norm_cache[h.pid] = (normalize_answer(h.title or ""), normalize_answer(h.text or ""))
                title, text = norm_cache[h.pid]
                row.append(passage_has_answer(title, text, ans, use_title=use_title, normalized=True))
            flags.append(row)
        reports.append(evaluate_rankings(name, rankings, golds, ks=ks, mrr_k=mrr_k, page_rankings=page_rankings,
                                         page_gold_lists=page_lists, answer_flags=flags, answer_ks=answer_ks))
    return reports, skipped


@dataclass(frozen=True)
class BeirQueries:
    """What a BEIR split offers for scoring: the queries with a relevant document (``qids``,
    ``texts``, ``qrels``) and the counts left out -- judged queries without any relevant document
    (``no_relevant``) and judged query ids missing from ``queries.jsonl`` (``missing``)."""

    qids: list[str]
    texts: list[str]
    qrels: list[dict[str, int]]
    no_relevant: int = 0
    missing: int = 0


def beir_queries(queries, qrels: Mapping[str, Mapping[str, int]]) -> BeirQueries:
    """Pair BEIR queries (objects with ``qid`` and ``text``, e.g. :class:`re2g.data.corpora.Query`)
    with their qrels (``{qid: {doc_id: score}}``, see :func:`re2g.data.corpora.qrels_by_query`).
    Only judged queries are scored (``queries.jsonl`` usually holds every split's queries), in the
    order of the qrels."""
    text = {q.qid: q.text for q in queries}
    qids, texts, rels = [], [], []
    no_relevant = missing = 0
    for qid, judged in qrels.items():
        if qid not in text:
            missing += 1
        elif not any(s > 0 for s in judged.values()):
            no_relevant += 1
        else:
            qids.append(qid)
            texts.append(text[qid])
            rels.append(dict(judged))
    return BeirQueries(qids, texts, rels, no_relevant=no_relevant, missing=missing)


def evaluate_beir(name: str, rankings: Sequence[Sequence[str]], qrels: Sequence[Mapping[str, int]], *,
                  ndcg_k: int = 10, recall_k: int = 100) -> RetrievalReport:
    """BEIR's figures averaged over queries: ``ndcg@{ndcg_k}`` (:func:`ndcg_at_k`) and
    ``qrels_recall@{recall_k}`` (:func:`qrels_recall_at_k`; BEIR prints it as Recall@100, named
    apart here from ``recall@k``, which is DPR's top-k accuracy)."""
    if len(rankings) != len(qrels):
        raise ValueError(f"{len(rankings)} rankings for {len(qrels)} qrel sets")
    per = [{f"ndcg@{ndcg_k}": ndcg_at_k(r, q, ndcg_k), f"qrels_recall@{recall_k}": qrels_recall_at_k(r, q, recall_k)}
           for r, q in zip(rankings, qrels)]
    return RetrievalReport(name=name, n=len(per), metrics=_means(per), per_query=per)


def evaluate_beir_retrievers(retrievers, queries: BeirQueries, *, ndcg_k: int = 10, recall_k: int = 100,
                             ignore_identical_ids: bool = True, batch_size: int = 512,
                             progress: bool = False) -> list[RetrievalReport]:
    """Run each retriever over the judged BEIR queries and score with :func:`evaluate_beir`.
    ``ignore_identical_ids`` (BEIR's default) drops a retrieved document whose id equals the
    query id (ArguAna, Quora hold the queries in the corpus) before cutting at the depth."""
    depth = max(ndcg_k, recall_k) + (1 if ignore_identical_ids else 0)
    reports = []
    for name, retriever in retrievers.items():
        hits = _retrieve(name, retriever, queries.texts, depth, batch_size, progress)
        rankings = [[h.pid for h in hs if not (ignore_identical_ids and h.pid == qid)]
                    for qid, hs in zip(queries.qids, hits)]
        reports.append(evaluate_beir(name, rankings, queries.qrels, ndcg_k=ndcg_k, recall_k=recall_k))
    return reports
