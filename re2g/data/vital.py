"""A real-text task: English Wikipedia's vital articles as a KILT knowledge source, and ``vital_qa`` over it.

``generate_vital(out_dir, cfg)`` (``re2g sample OUT --source vital-articles``; ``generate_sample``
calls it when ``cfg.source`` is ``vital-articles``) writes the layout of the synthetic sample task,
so passages, BM25, training, the quickstart and serving run on it unchanged::

    out_dir/
      sample.json                      manifest (kind "sample"): config, counts, examples, file list
      knowledge_source.jsonl           KILT pages {"_id", "wikipedia_id", "wikipedia_title", "text": [title, p1, ...]}
      articles.jsonl                   per page: title, Wikidata description, topic, split, query or why not
      tasks/vital_qa-{split}-kilt.jsonl
      tokenizers/wordpiece/, tokenizers/bpe/   trained on this text (tiny models, as for the sample task)

**The text** is the ``vital-articles`` asset (:mod:`re2g.assets`, ``re2g assets fetch vital-articles``):
10,033 lead extracts of English Wikipedia's level-4 vital articles (REST summary API, CC BY-SA 4.0),
each with its Wikidata short description and a topic. A page is the title (paragraph 0, as in KILT's
Wikipedia) followed by the extract split into paragraphs on line breaks (238 extracts have more than
one paragraph; 77 words per extract on average, 7-311). The source carries no Wikipedia page ids:
``wikipedia_id`` is ``2000000 + the article's rank`` in the title order of the whole file, so an
article keeps its id in every sample, whatever its size.

**The task** ``vital_qa``: the query is the Wikidata short description, the answer the article's title,
the provenance the lead paragraph (paragraph 1, ``start_paragraph_id = end_paragraph_id = 1``, with the
page's ``wikipedia_id`` and title), e.g. "Taxon of carnivorous marsupials" -> "Dasyuromorphia". It is
named after its source and its KILT shape (an open-domain question with a short answer and paragraph
provenance, scored by KILT's QA metrics) and kept apart from the synthetic ``qa``, so the task files
of the two sources never share a name and ``train.task`` says which one a run trains on.

A page is in the knowledge source when its extract is not empty. It gives a query only when its
description can name it; the others stay as distractor pages (they compete in retrieval but are
never asked about):

* no description (171 articles);
* a description shared with another article of the whole file, compared case- and
  punctuation-insensitively ("Family of birds" x34, "Country in West Africa" x13, ...: 819 articles);
  a query must have one right page, and in KILT's terms its provenance one page;
* a one-word description ("Vegetable", "Emotion", "Tool": 13): a class, not an article;
* a description that contains the title as words ("City in Lviv Oblast, Ukraine" -> "Lviv": 67):
  the answer would be copied from the query and BM25 would match the title (49).

That leaves 8,981 queries over 10,033 pages (the full file). **Splits are by article**: each article's
split comes from a seeded hash of its title (``train_fraction``/``dev_fraction`` of ``data.sample``),
so it does not depend on the sample's size and a test or dev article never appears in a training
query (one query per article); the knowledge source holds every page of every split, as a KILT
knowledge source does. ``size`` ``tiny`` keeps 500 articles, ``demo`` the whole file (``bench`` is
the synthetic task's); ``n_entities`` sets the number of articles, picked by a second seeded hash,
so a smaller sample's pages are a subset of a larger one's with the same seed.

**Why BM25 alone is beatable.** The description is an editor's paraphrase of the lead ("Taxon of
carnivorous marsupials" vs "Dasyuromorphia is an order comprising most of the Australian carnivorous
marsupials ..."): a few words, often a class word the lead does not use ("Taxon", "Organism",
"Country in ...") and never the title, so word overlap with the right passage is small and the
class words match many pages. Measured on the whole file (seed 13, fractions 0.7/0.15: 10,033 pages,
12,382 passages of ``split_page``'s 50-100 words; queries train 6,302 / dev 1,343 / test 1,336),
passage Recall@k (the passage holding paragraph 1; here the same as page recall):

=============================================== ===== ===== ===== ===== ====== ======
retriever (dev)                                  R@1   R@5   R@12  R@20  R@100  MRR@10
=============================================== ===== ===== ===== ===== ====== ======
BM25 (re2g's Anserini index, k1 0.9, b 0.4)      0.593 0.806 0.876 0.898 0.955  0.685
all-MiniLM-L6-v2 zero-shot (mean, normalized)    0.437 0.754 0.867 0.911 0.978  0.572
=============================================== ===== ===== ===== ===== ====== ======

(test: BM25 0.582 / 0.811 / 0.862 / 0.905 / 0.951, MiniLM 0.419 / 0.754 / 0.862 / 0.904 / 0.975.)
MiniLM encoded "title text" (256 tokens) and the query (64), by plain ``transformers`` mean pooling.
BM25 misses the right page at rank 1 for 41% of the dev queries and leaves 4.5% outside its top 100;
the zero-shot dense encoder is behind it at the top but ahead from rank 20 on (so for at least 2.3%
of the queries it ranks in its top 100 a page BM25 does not): the room a fine-tuned DPR, the hybrid
and the reranker are there to take. Making the whole-file sample takes ~5 s, a 500-article one ~2 s.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from re2g.config import SampleConfig
from re2g.errors import ConfigError, DataFormatError

TASK = "vital_qa"
SOURCE = "vital-articles"
ARTICLES_FILE = "articles.jsonl"
WIKIPEDIA_ID_BASE = 2_000_000
#: articles per size (None: the whole file)
SIZES: dict[str, int | None] = {"tiny": 500, "demo": None}
#: reasons an article gives no query (articles.jsonl's ``query`` field holds the reason or "yes")
NO_DESCRIPTION = "no_description"
SHARED_DESCRIPTION = "shared_description"
ONE_WORD_DESCRIPTION = "one_word_description"
TITLE_IN_DESCRIPTION = "title_in_description"


@dataclass(frozen=True)
class VitalArticle:
    """One article of the vital-articles file."""

    wikipedia_id: str
    title: str
    paragraphs: tuple[str, ...]       # the extract's paragraphs (the page's paragraphs 1..n)
    description: str
    topic: str


def normalize_text(s: str) -> str:
    """Casefolded words of ``s`` joined by single spaces (accents kept, punctuation dropped)."""
    return " ".join(re.findall(r"\w+", unicodedata.normalize("NFKC", s).casefold()))


def split_paragraphs(extract: str) -> list[str]:
    """The extract's paragraphs: split on line breaks, whitespace collapsed, empty ones dropped."""
    return [" ".join(p.split()) for p in extract.splitlines() if p.strip()]


def load_vital_articles(path: str | Path | None = None) -> list[VitalArticle]:
    """The articles of the vital-articles JSON (``path``, else the fetched asset), in title order,
    with their ``wikipedia_id``; articles with an empty extract are left out."""
    from re2g.assets import asset_path

    p = Path(path) if path is not None else asset_path(SOURCE)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataFormatError(str(p), f"not readable as the vital-articles JSON: {e}") from None
    rows = list(raw.values()) if isinstance(raw, dict) else raw
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("title"), str) for r in rows):
        raise DataFormatError(str(p), "expected an object (or list) of articles with 'title', 'extract', "
                              "'description', 'topic'")
    rows = sorted(rows, key=lambda r: r["title"])
    out = []
    for rank, r in enumerate(rows):
        pars = split_paragraphs(str(r.get("extract") or ""))
        if not pars or not r["title"].strip():
            continue
        out.append(VitalArticle(wikipedia_id=str(WIKIPEDIA_ID_BASE + rank), title=r["title"].strip(),
                                paragraphs=tuple(pars), description=" ".join(str(r.get("description") or "").split()),
                                topic=str(r.get("topic") or "")))
    return out


def query_status(articles: list[VitalArticle]) -> dict[str, str]:
    """``wikipedia_id`` -> ``"yes"`` when the article's description makes a query, else the reason
    (see the module docstring). Judged over all of ``articles`` (pass the whole file)."""
    counts = Counter(normalize_text(a.description) for a in articles if a.description)
    out = {}
    for a in articles:
        d = normalize_text(a.description)
        if not d:
            out[a.wikipedia_id] = NO_DESCRIPTION
        elif counts[d] > 1:
            out[a.wikipedia_id] = SHARED_DESCRIPTION
        elif len(d.split()) < 2:
            out[a.wikipedia_id] = ONE_WORD_DESCRIPTION
        elif re.search(rf"(?<!\w){re.escape(normalize_text(a.title))}(?!\w)", d):
            out[a.wikipedia_id] = TITLE_IN_DESCRIPTION
        else:
            out[a.wikipedia_id] = "yes"
    return out


def _unit(seed: int, what: str, title: str) -> float:
    """A seeded hash of ``title`` in [0, 1)."""
    h = hashlib.sha256(f"re2g-vital-{seed}-{what}:{title}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_of(title: str, cfg: SampleConfig) -> str:
    """The split of an article: train / dev / test by a seeded hash of its title."""
    u = _unit(cfg.seed, "split", title)
    return "train" if u < cfg.train_fraction else "dev" if u < cfg.train_fraction + cfg.dev_fraction else "test"


def n_articles(cfg: SampleConfig) -> int | None:
    """How many articles the sample keeps (None: all)."""
    if cfg.n_entities is not None:
        return cfg.n_entities
    if cfg.size not in SIZES:
        raise ConfigError(f"data.sample.size={cfg.size!r} is not a size of the vital-articles source "
                          f"(tiny: {SIZES['tiny']} articles, demo: all); bench is the synthetic task's")
    return SIZES[cfg.size]


def select_articles(articles: list[VitalArticle], cfg: SampleConfig) -> list[VitalArticle]:
    """The sample's articles (in title order): all, or the ``n_articles(cfg)`` with the smallest seeded
    hash (a smaller sample's articles are a subset of a larger one's)."""
    n = n_articles(cfg)
    if n is None or n >= len(articles):
        return list(articles)
    keep = set(sorted(range(len(articles)), key=lambda i: _unit(cfg.seed, "pick", articles[i].title))[:n])
    return [a for i, a in enumerate(articles) if i in keep]


def task_record(a: VitalArticle) -> dict[str, Any]:
    """The KILT record of an article's query."""
    return {"id": f"{TASK}-{a.wikipedia_id}", "input": a.description,
            "output": [{"answer": a.title, "provenance": [{
                "wikipedia_id": a.wikipedia_id, "title": a.title,
                "start_paragraph_id": 1, "end_paragraph_id": 1}]}],
            "meta": {"topic": a.topic}}


def generate_vital(out_dir: str | Path, cfg: SampleConfig, vocab_size: int = 4000, progress: bool = True,
                   overwrite: bool = False, source: str | Path | None = None):
    """Write the vital-articles knowledge source and the ``vital_qa`` task for ``cfg`` into ``out_dir``
    (see the module docstring); returns a :class:`re2g.data.sample.SampleSummary`. Same ``cfg`` (and
    source file) -> byte-identical files. ``source``: the vital-articles JSON (default: the fetched
    asset; :class:`re2g.assets.AssetMissingError` says how to fetch it). Atomic like
    ``generate_sample``: an existing non-empty ``out_dir`` is refused unless ``overwrite``."""
    from re2g.assets import ASSETS
    from re2g.artifacts import staged_dir
    from re2g.data.sample import (KNOWLEDGE_SOURCE, SPLITS, SampleSummary, _dump, commit_sample,
                                  estimate_passages, task_file)
    from re2g.data.tokenizers import train_tokenizers

    t0 = time.time()
    if cfg.train_fraction + cfg.dev_fraction >= 1:
        raise ConfigError(f"data.sample.train_fraction + dev_fraction = {cfg.train_fraction + cfg.dev_fraction:g} "
                          "leaves no test articles (must be < 1)")
    n_articles(cfg)                                   # refuse a bad size before reading anything
    from re2g.assets import asset_path, sha256_file

    source_path = Path(source) if source is not None else asset_path(SOURCE)
    everything = load_vital_articles(source_path)
    status = query_status(everything)                 # judged over the whole file, whatever the sample's size
    articles = select_articles(everything, cfg)
    out = Path(out_dir)
    with staged_dir(out, overwrite=overwrite) as stage:
        tmp = stage.local
        tok_texts: list[str] = []
        paragraphs = words = est = expected = 0
        split = {a.wikipedia_id: split_of(a.title, cfg) for a in articles}
        with open(tmp / KNOWLEDGE_SOURCE, "w", encoding="utf-8") as ks, \
                open(tmp / ARTICLES_FILE, "w", encoding="utf-8") as af:
            for a in articles:
                text = [a.title, *a.paragraphs]
                ks.write(_dump({"_id": a.wikipedia_id, "wikipedia_id": a.wikipedia_id, "wikipedia_title": a.title,
                                "text": text}))
                af.write(_dump({"wikipedia_id": a.wikipedia_id, "title": a.title, "description": a.description,
                                "topic": a.topic, "split": split[a.wikipedia_id],
                                "query": status[a.wikipedia_id]}))
                pw = [len(p.split()) for p in a.paragraphs]
                paragraphs += len(pw)
                words += sum(pw)
                est += estimate_passages(pw)
                expected += -(-sum(pw) // 100)
                tok_texts.extend(text)

        (tmp / "tasks").mkdir()
        queries: dict[str, int] = {}
        examples: list[dict[str, str]] = []
        for s in SPLITS:
            recs = [task_record(a) for a in articles if split[a.wikipedia_id] == s and status[a.wikipedia_id] == "yes"]
            with open(tmp / task_file(TASK, s), "w", encoding="utf-8") as tf:
                tf.write("".join(_dump(r) for r in recs))
            queries[s] = len(recs)
            tok_texts.extend(r["input"] for r in recs)
            if recs:
                x = recs[int(_unit(cfg.seed, "example", s) * len(recs))]
                examples.append({"task": TASK, "split": s, "input": x["input"], "answer": x["output"][0]["answer"]})

        paths = train_tokenizers(tok_texts, tmp / "tokenizers", vocab_size)
        del tok_texts
        vocab = {kind: len(json.loads((p / "tokenizer.json").read_text())["model"]["vocab"])
                 for kind, p in paths.items()}

        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        per_split = {s: sum(1 for v in split.values() if v == s) for s in SPLITS}
        summary = SampleSummary(
            out_dir=str(out), size=cfg.size, seed=cfg.seed, entities=len(articles), pages=len(articles),
            paragraphs=paragraphs, words=words, expected_passages=expected, estimated_passages=est,
            queries={TASK: queries}, entities_per_split=per_split, examples=examples, files=files, vocab=vocab)
        stored = summary.to_dict()
        stored.pop("out_dir")
        stored.pop("seconds")
        spec = ASSETS[SOURCE]
        reasons = Counter(status[a.wikipedia_id] for a in articles)
        meta = {
            "config": cfg.model_dump(mode="json"),
            "source": {"asset": SOURCE, "package": spec.requirement, "license": spec.license,
                       "file": source_path.name, "sha256": sha256_file(source_path),
                       "articles_in_file": len(everything)},
            "task": TASK,
            "vocab_size": vocab_size,
            "queries_by_reason": dict(sorted(reasons.items())),
            "summary": stored,
        }
        commit_sample(tmp, meta, files, summary)
    summary.seconds = round(time.time() - t0, 2)
    return summary
