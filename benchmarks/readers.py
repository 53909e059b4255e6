"""Readers on one question set: exact match with the reranker's top-1 and top-5 passages (marginalized)
and seconds per question, for every reader of a run plus Gemma 3 270M zero-shot, in one run.

    python -m benchmarks.readers --run-dir RUN_DIR [--questions 50] [--task slot_filling]
                                 [--reader LABEL=DIR ...] [--no-gemma | --gemma-only] [--batch-size 8]

The questions are the first ``--questions`` of the run's ``<task>`` dev split. Their passages are
retrieved and reranked ONCE (the run's query encoder + dense index + BM25, fused, then its reranker;
``--biencoder`` / ``--reranker`` pick other model directories) and held fixed for every reader:
**top-1** gives the reader the reranker's first passage only, **top-5** its first five weighted by
softmax of the reranker scores (RAG marginalization as ``generation`` configures it). Each reader decodes
with the decoding its preset gives it: the run's ``generation`` section for the run's readers, the
``small`` preset's (RAG-Sequence thorough, greedy per passage, 12 new tokens) for Gemma.

Readers: every generator checkpoint under ``RUN_DIR/models`` (``init/generator*``, ``generator*``,
``e2e-*/generator``, any other directory holding a saved generator), or the ``--reader LABEL=DIR``
given; plus Gemma 3 270M base (the opt-in ``gemma3-270m`` asset; skipped with a note when it is not
fetched, or with ``--no-gemma``). Gemma is a base model that continues text: a slot-filling query
``Name [SEP] relation`` is handed to it as the question ``What is the relation of Name?`` (see
:func:`slot_question`) inside the causal class's default prompt (``Title: {title}\\nPassage:
{text}\\nQuestion: {query}\\nAnswer:``); retrieval and reranking always see the original query.

Seconds: wall and CPU (``time.process_time``: this process, all its threads) per question over
batches of ``--batch-size`` (each batch at top-1, then top-5, before the next batch), model load and
one warm-up question on one passage excluded (load reported apart). Writes ``<out>/readers.json``
(every answer, the passages' pids and scores, the gold page's rank), rewritten after every batch so
that an interrupted run keeps what it measured, and prints a table. ``--gemma-only`` measures Gemma
alone (e.g. in a second process over the same run: the passages come out the same, the JSON has
their pids to check). Same-run ratios: each reader's top-5 / top-1 seconds, and each reader's seconds over
the first reader's.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import common

NAME = "readers"
GEMMA = "gemma3-270m"
DEPTHS = (1, 5)
SLOT_SEP = " [SEP] "
#: the causal class's default prompt (re2g.models.causal.DEFAULT_PROMPT_TEMPLATE), named here so the
#: results say which prompt Gemma saw
GEMMA_PROMPT = "Title: {title}\nPassage: {text}\nQuestion: {query}\nAnswer:"
#: the small preset's decoding for its Gemma reader (re2g/presets/small.yaml: generation)
GEMMA_GENERATION = {"marginalization": "sequence", "decoding": "thorough", "num_beams": 1, "max_new_tokens": 12}


# --------------------------------------------------------------------------- pure helpers


def slot_question(query: str) -> str:
    """A slot-filling query ``"Name [SEP] relation"`` as an English question for a base LM:
    ``"What is the relation of Name?"``; any other query unchanged (QA questions already are one)."""
    if SLOT_SEP not in query:
        return query
    name, relation = query.split(SLOT_SEP, 1)
    if not name.strip() or not relation.strip():
        raise ValueError(f"slot-filling query {query!r}: expected 'Name [SEP] relation' with both parts")
    return f"What is the {relation.strip()} of {name.strip()}?"


def em_of(answers: Sequence[str], golds: Sequence[Sequence[str]]) -> float:
    """Mean over questions of KILT's exact match of the answer against the best of its gold answers."""
    from re2g.eval.kilt import exact_match

    if len(answers) != len(golds):
        raise ValueError(f"{len(answers)} answers for {len(golds)} questions")
    if not answers:
        return 0.0
    return sum(max((exact_match(a, g) for g in gs), default=0.0) for a, gs in zip(answers, golds)) / len(answers)


def contains_of(answers: Sequence[str], golds: Sequence[Sequence[str]]) -> float:
    """Mean over questions of whether a gold answer's normalized words appear, in order and whole, in
    the normalized answer (not EM: "She was a physician." contains "physician";
    :func:`re2g.eval.retrieval.contains_answer`)."""
    from re2g.eval.retrieval import contains_answer

    if not answers:
        return 0.0
    return sum(contains_answer(a, gs) for a, gs in zip(answers, golds)) / len(answers)


def gold_rank(passages: Sequence[Any], gold_pages: set[str]) -> int | None:
    """1-based rank of the first passage from a gold page (None: none in the list)."""
    for i, p in enumerate(passages):
        if p.page_id is not None and str(p.page_id) in gold_pages:
            return i + 1
    return None


def answer_in_text(passages: Sequence[Any], golds: Sequence[str]) -> bool:
    """Whether some gold answer appears (normalized, as KILT's EM normalizes) in some passage's title + text."""
    from re2g.eval.retrieval import contains_answer

    return any(contains_answer(f"{p.title or ''} {p.text or ''}", golds) for p in passages)


def sample_size(run_dir: Path, cfg) -> str:
    """The size the run's sample was made at (``sample/sample.json``; else the config's)."""
    from re2g.data.sample import load_sample_summary

    summary = load_sample_summary(run_dir / "sample")
    return summary.size if summary is not None else cfg.data.sample.size


# --------------------------------------------------------------------------- readers


@dataclasses.dataclass
class ReaderSpec:
    """One reader to measure: a label, a model directory and how to configure it."""

    label: str
    path: str
    kind: str                       # seq2seq | causal
    overrides: list[str] = dataclasses.field(default_factory=list)   # config overrides for loading/decoding
    rewrite_slot_queries: bool = False


def find_readers(run_dir: Path) -> list[ReaderSpec]:
    """Every saved generator under ``RUN_DIR/models`` (depth 1 and 2: ``init/generator``,
    ``generator``, ``e2e-distill/generator``…), untrained ones first, labelled by their path."""
    from re2g.errors import ArtifactError
    from re2g.models.causal import checkpoint_kind
    from re2g.models.fingerprint import read_model_meta

    models = run_dir / "models"
    if not models.is_dir():
        raise FileNotFoundError(f"{models}: no models directory (is {run_dir} a run directory?)")
    found = []
    for d in sorted([*models.glob("*"), *models.glob("*/*")]):
        if not d.is_dir():
            continue
        meta = read_model_meta(d)
        if meta is None or meta.get("kind") != "generator":
            continue
        try:
            kind = checkpoint_kind(d)
        except ArtifactError:
            continue
        found.append(ReaderSpec(str(d.relative_to(models)), str(d), kind))
    found.sort(key=lambda r: (not r.label.startswith("init"), r.label))
    return found


def gemma_reader() -> tuple[ReaderSpec | None, str | None]:
    """Gemma 3 270M from the asset cache, or ``(None, why)`` when it is not fetched."""
    from re2g.assets import AssetMissingError, asset_path

    try:
        path = asset_path(GEMMA)
    except AssetMissingError as e:
        return None, f"Gemma 3 270M row skipped: {e}"
    over = ["models.generator_kind=causal", *(f"generation.{k}={v}" for k, v in GEMMA_GENERATION.items())]
    return ReaderSpec("Gemma 3 270M base, zero-shot", str(path), "causal", over, rewrite_slot_queries=True), None


def load_reader(pieces, cfg, spec: ReaderSpec):
    """The reader as the run's loader builds it (:func:`re2g.run.load_generator`), with ``spec``'s
    overrides on the run's config. Gemma's prompt is the causal class's default (the run's
    ``models.generator_prompt_template`` must be unset: checked)."""
    from re2g.config import load_config
    from re2g.run import load_generator

    run_cfg = load_config(Path(pieces.run_dir) / "config.yaml", overrides=spec.overrides) if spec.overrides else cfg
    stage = load_generator(dataclasses.replace(pieces, generator=spec.path), run_cfg)
    if spec.rewrite_slot_queries and stage.model.prompt_template != GEMMA_PROMPT:
        raise ValueError(f"{pieces.run_dir}/config.yaml: models.generator_prompt_template is set "
                         f"({stage.model.prompt_template!r}); the Gemma row expects the default {GEMMA_PROMPT!r}")
    return stage


# --------------------------------------------------------------------------- measurement


def _cpu_wall(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def measure_reader(stage, queries: list[str], passages: list[list[Any]], depth: int, batch_size: int):
    """Answers of ``stage`` (a :class:`re2g.stages.Generator`) for every query from the first ``depth``
    of its passages, in batches; returns ``(answers, wall s, CPU s)``."""
    answers: list = []
    wall = cpu = 0.0
    for i in range(0, len(queries), batch_size):
        qs = queries[i:i + batch_size]
        ps = [p[:depth] for p in passages[i:i + batch_size]]
        out, w, c = _cpu_wall(lambda qs=qs, ps=ps: stage.generate(qs, ps))
        answers += out
        wall, cpu = wall + w, cpu + c
    return answers, wall, cpu


def retrieve_fixed(pipe, queries: list[str], batch_size: int) -> tuple[list[list[Any]], float]:
    """The reranker's top-5 for every query (retrieve + rerank once); returns them and the seconds."""
    out: list[list[Any]] = []
    t0 = time.perf_counter()
    for i in range(0, len(queries), batch_size):
        qs = queries[i:i + batch_size]
        out += pipe.rerank(qs, pipe.retrieve(qs), max(DEPTHS))
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True, help="a run directory with a retriever and reranker")
    p.add_argument("--questions", type=int, default=50, help="the first N dev questions of --task")
    p.add_argument("--task", default=None, help="dev task file of RUN_DIR/sample (default: the run's train.task)")
    p.add_argument("--reader", action="append", default=[], metavar="LABEL=DIR",
                   help="a reader to measure (repeatable; default: every generator under RUN_DIR/models)")
    p.add_argument("--no-gemma", action="store_true", help="leave out Gemma 3 270M even when it is fetched")
    p.add_argument("--gemma-only", action="store_true", help="measure Gemma 3 270M alone (no run reader)")
    p.add_argument("--biencoder", default=None, help="query encoder directory (default: the run's)")
    p.add_argument("--reranker", default=None, help="reranker directory (default: RUN_DIR/models/reranker)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate call")
    p.add_argument("--out", type=Path, default=common.DEFAULT_OUT, help="where readers.json is written")
    args = p.parse_args(argv)
    if args.questions < 1 or args.batch_size < 1:
        p.error("--questions and --batch-size must be at least 1")

    import torch

    from re2g.data.kilt import read_kilt
    from re2g.data.sample import task_file
    from re2g.pipeline import Re2GPipeline
    from re2g.run import resolve_run, run_config

    run = args.run_dir
    cfg = run_config(run)
    task = args.task or cfg.train.task
    dev_path = run / "sample" / task_file(task, "dev")
    if not dev_path.is_file():
        raise FileNotFoundError(f"{dev_path}: no dev file for task {task!r} in the run's sample")
    dev = [e for e in read_kilt(str(dev_path)) if e.answers][:args.questions]
    if len(dev) < args.questions:
        raise ValueError(f"{dev_path}: {len(dev)} dev questions with answers, --questions asks for {args.questions}")
    queries = [e.input for e in dev]
    golds = [list(e.answers) for e in dev]
    gold_pages = [{str(pv.wikipedia_id) for pv in e.provenance} for e in dev]

    if args.gemma_only and (args.no_gemma or args.reader):
        p.error("--gemma-only goes with neither --no-gemma nor --reader")
    if args.gemma_only:
        specs = []
    elif args.reader:
        from re2g.models.causal import checkpoint_kind

        specs = []
        for r in args.reader:
            label, sep, path = r.partition("=")
            if not sep or not label or not path:
                p.error(f"--reader {r!r}: expected LABEL=DIR")
            specs.append(ReaderSpec(label, path, checkpoint_kind(path)))
    else:
        specs = find_readers(run)
    notes = []
    if not args.no_gemma:
        g, why = gemma_reader()
        if g is not None:
            specs.append(g)
        elif args.gemma_only:
            raise FileNotFoundError(why)
        else:
            notes.append(why)
    if not specs:
        raise ValueError(f"{run}/models: no generator to measure (and no Gemma)")

    result = common.Result(NAME)
    pieces = resolve_run(run, cfg, biencoder=args.biencoder, reranker=args.reranker)
    pipe, load_s = common.timed(lambda: Re2GPipeline.from_run_dir(run, cfg, biencoder=args.biencoder,
                                                                  reranker=args.reranker))
    passages, retrieve_s = retrieve_fixed(pipe, queries, args.batch_size)
    del pipe
    ranks = [gold_rank(ps, gp) for ps, gp in zip(passages, gold_pages)]
    result.params = {"size": sample_size(run, cfg), "run_dir": str(run), "task": task, "questions": len(dev),
                     "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(),
                     "query_encoder": pieces.biencoder, "reranker": pieces.reranker,
                     "dense_index": pieces.dense_dir, "bm25": pieces.bm25_dir,
                     "generation_run": cfg.generation.model_dump(mode="json"),
                     "generation_gemma": GEMMA_GENERATION, "gemma_prompt": GEMMA_PROMPT,
                     "gemma_question": "What is the {relation} of {name}? (slot_question)",
                     "readers": [dataclasses.asdict(s) for s in specs]}
    retrieval = {f"gold page in top-{k}": sum(r is not None and r <= k for r in ranks) / len(ranks) for k in DEPTHS}
    retrieval.update({f"a gold answer string in top-{k} text": sum(answer_in_text(ps[:k], gs) for ps, gs in
                                                                    zip(passages, golds)) / len(dev) for k in DEPTHS})
    result.results = {"retrieval": {**{k: round(v, 3) for k, v in retrieval.items()},
                                    "load_s": round(load_s, 2), "retrieve_rerank_s": round(retrieve_s, 2)},
                      "questions": [{"query": q, "gold": gs, "gold_rank": r,
                                     "passages": [{"pid": c.pid, "title": c.title, "rerank_score": c.rerank_score}
                                                  for c in ps]}
                                    for q, gs, r, ps in zip(queries, golds, ranks, passages)],
                      "readers": {}}

    table = common.new_table(f"Readers on {len(dev)} {task} dev questions, passages fixed (reranker top-1 / top-5)",
                             ["reader", "kind", "EM top-1", "EM top-5", "s/q top-1 wall", "CPU", "s/q top-5 wall",
                              "CPU", "load s"])
    first = None
    for spec in specs:
        stage, load = common.timed(lambda spec=spec: load_reader(pieces, cfg, spec))
        qs = [slot_question(q) for q in queries] if spec.rewrite_slot_queries else queries
        measure_reader(stage, qs[:1], passages[:1], 1, 1)   # warm-up (one question, one passage), not timed
        row: dict[str, Any] = {"path": spec.path, "kind": spec.kind, "load_s": round(load, 2),
                               "decoding": {"num_beams": stage.cfg.num_beams, "decoding": stage.cfg.decoding,
                                            "marginalization": stage.cfg.marginalization,
                                            "max_new_tokens": stage.cfg.max_new_tokens},
                               "prompt_template": getattr(stage.model, "prompt_template", None),
                               "reader_queries": qs[:3]}
        result.results["readers"][spec.label] = row
        got: dict[int, list] = {k: [] for k in DEPTHS}
        secs = {k: [0.0, 0.0] for k in DEPTHS}
        # batch by batch, every depth on the batch before the next one: an interrupted run leaves both
        # depths over the same questions (the JSON is rewritten after each batch)
        for i in range(0, len(qs), args.batch_size):
            for k in DEPTHS:
                out, w, c = measure_reader(stage, qs[i:i + args.batch_size], passages[i:i + args.batch_size], k,
                                           args.batch_size)
                got[k] += out
                secs[k][0] += w
                secs[k][1] += c
                texts = [a.answer for a in got[k]]
                n = len(texts)
                row[f"top{k}"] = {"questions_done": n, "em": round(em_of(texts, golds[:n]), 4),
                                  "gold_in_answer": round(contains_of(texts, golds[:n]), 4),
                                  "s_per_q_wall": round(secs[k][0] / n, 4), "s_per_q_cpu": round(secs[k][1] / n, 4),
                                  "answers": texts, "load_average_after": common.load_average()}
            result.write(args.out)
        t1, t5 = row["top1"], row["top5"]
        result.ratios[f"{spec.label}: s/question top-5 / top-1 (wall)"] = common.ratio(t5["s_per_q_wall"],
                                                                                        t1["s_per_q_wall"])
        if first is None:
            first = spec.label
        else:
            result.ratios[f"{spec.label} / {first}: s/question top-5 (CPU)"] = common.ratio(
                t5["s_per_q_cpu"], result.results["readers"][first]["top5"]["s_per_q_cpu"])
        table.add_row(spec.label, spec.kind, f"{t1['em']:.2f}", f"{t5['em']:.2f}", common.fmt(t1["s_per_q_wall"], 2),
                      common.fmt(t1["s_per_q_cpu"], 2), common.fmt(t5["s_per_q_wall"], 2),
                      common.fmt(t5["s_per_q_cpu"], 2), common.fmt(load, 1))
        del stage
        print(f"[readers] {spec.label}: EM top-1 {t1['em']:.2f}, top-5 {t5['em']:.2f}; "
              f"s/q {t1['s_per_q_wall']:.2f} / {t5['s_per_q_wall']:.2f} wall", flush=True)
    result.ratios = {k: v for k, v in result.ratios.items() if v is not None}
    notes.append(f"retrieval held fixed: {retrieval}")
    result.notes = notes
    for n in notes:
        print(n)
    return common.finish(result, table, args.out)


if __name__ == "__main__":
    main()
