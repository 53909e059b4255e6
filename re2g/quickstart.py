"""`re2g quickstart` (what `make demo` runs): the whole of Re2G on the embedded default.

A local Ray started in-process, the sample task, tiny models, every stage in order:

    sample -> passages (Ray Data) -> BM25 -> [zero-shot retrieval] -> mine negatives
    -> DPR (stage 1, Ray Train + DeepSpeed) -> embed (Ray Data) + HNSW shards (Ray tasks)
    -> retrieval report -> generation (stage 2) -> reranker (stage 3)
    -> end-to-end with distillation (stage 4) -> KILT evaluation on dev and test
    -> report (Markdown, JSON, plots) -> Serve app answering three sample questions

With a pretrained bi-encoder (the ``small`` preset's MiniLM, or any ``models.query_encoder``) the
zero-shot step embeds the corpus with it as it comes and scores BM25, it and their hybrid before
any training, so the report shows what stage 1 and the reranker add to real weights.
``quickstart.skip`` leaves steps out (the ``small`` preset: the generator side, whose reader is
still tiny). A step whose outputs exist for the same config is skipped (so a second run resumes
where the first stopped); ``fresh=True`` starts over. Each step's result is kept in
``RUN_DIR/.quickstart/STEP.json`` (``{"config": <config hash>, "result": {...}}``, written whole by
:func:`re2g.artifacts.write_json_atomic`): a resume marker, not an artifact, so it has no manifest of
its own; what a step made is checked by its outputs' manifests when they are loaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from re2g.artifacts import read_json, write_json_atomic
from re2g.config import Re2GConfig, save_config
from re2g.errors import ConfigError
from re2g.layout import RunLayout, join

STATE_DIR = ".quickstart"


@dataclass
class Step:
    """One quickstart step: ``run(ctx) -> result dict``; skipped when its ``outputs`` exist and its
    marker records the same config. ``needs`` names a module the step cannot run without."""

    name: str
    title: str
    run: Callable[["Context"], dict]
    outputs: Callable[["Context"], list[str]] = lambda ctx: []
    needs: str | None = None

    def available(self) -> bool:
        import importlib.util

        return self.needs is None or importlib.util.find_spec(self.needs) is not None


@dataclass
class Context:
    cfg: Re2GConfig
    layout: RunLayout
    console: Console
    results: dict = field(default_factory=dict)
    dev_limit: int | None = None
    test_limit: int | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def uses_sample(self) -> bool:
        """True when the run works on the bundled sample task (no knowledge source configured)."""
        return self.cfg.data.knowledge_source is None

    @property
    def knowledge_source(self) -> str:
        return self.cfg.data.knowledge_source or str(Path(self.layout.sample) / "knowledge_source.jsonl")

    def task_file(self, split: str) -> str:
        """The KILT task file of ``split`` (train/dev/test): the config's, else the sample task's."""
        from re2g.data.sample import task_file

        given = {"train": self.cfg.data.train_file, "dev": self.cfg.data.dev_file, "test": self.cfg.data.test_file}
        return given[split] or str(Path(self.layout.sample) / task_file(self.cfg.train.task, split))


def config_hash(cfg: Re2GConfig) -> str:
    """A short hash of the config (what decides whether a finished step can be reused). The ``ray``
    section (where to connect, how verbose) changes no step's output and is left out, so
    ``--set ray.verbose=true`` resumes a run instead of redoing it."""
    tree = cfg.model_dump(mode="json")
    tree.pop("ray", None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the steps


def _sample(ctx: Context) -> dict:
    from re2g.data.sample import generate_sample

    if not ctx.uses_sample:
        return {"skipped": f"knowledge source given: {ctx.knowledge_source}"}
    s = generate_sample(ctx.layout.sample, ctx.cfg.data.sample, vocab_size=ctx.cfg.models.tiny.vocab_size,
                        overwrite=True, progress=True)
    ctx.console.print(s.table())
    return {"summary": s.to_dict()}


def _passages(ctx: Context) -> dict:
    from re2g.data.passages import split_knowledge_source

    stats = split_knowledge_source(ctx.knowledge_source, ctx.layout.passages, ctx.cfg.passages,
                                   skip_bad_rows=ctx.cfg.data.skip_bad_rows, overwrite=True)
    ctx.console.print(stats.table())
    return {"passages": stats.to_dict()}


def _bm25(ctx: Context) -> dict:
    from re2g.index.bm25 import build_bm25_index

    info = build_bm25_index(ctx.layout.passages, ctx.layout.bm25_index, threads=ctx.cfg.bm25.threads,
                            overwrite=True, k1=ctx.cfg.bm25.k1, b=ctx.cfg.bm25.b)
    return {"bm25": info.to_dict()}


def _init_models(ctx: Context) -> dict:
    from re2g.models.init import init_models

    tokenizers = Path(ctx.layout.sample) / "tokenizers"
    # a named generator is referenced, not copied: readers find it as models.generator (re2g.models.init)
    written = init_models(ctx.cfg.models, ctx.run_dir / "models" / "init",
                          tokenizers_dir=tokenizers if tokenizers.exists() else None, reference=("generator",))
    return {"models": {k: str(v) for k, v in written.items()}}


def _inputs(ctx: Context):
    from re2g.train.api import prepare_inputs

    return prepare_inputs(ctx.cfg, build=False)


def _mine(ctx: Context) -> dict:
    from re2g.train.api import mine

    out, info = mine(ctx.cfg, _inputs(ctx), overwrite=True)
    return {"negatives": out, "info": info}


def _stage_summary(result, metric_system: str, metric: str, before_system: str | None = None,
                   label: str | None = None) -> dict:
    """before/after of one metric from a StageResult (``system`` rows inside before/after);
    ``before_system`` names another row as the baseline (the reranker's: the lists' own order)."""
    before_row = result.before.get(before_system or metric_system) or next(iter(result.before.values()), {})
    before = before_row.get(metric)
    after = (result.after.get(metric_system) or next(iter(result.after.values()), {})).get(metric)
    storage = Path(result.run.storage)  # RUN_DIR/train/<stage>/ray[/<run>]; the log is in RUN_DIR/train/<stage>
    log = next((str(d / "metrics.jsonl") for d in (storage, *storage.parents) if (d / "metrics.jsonl").exists()), None)
    return {"metric": label or f"dev {metric}", "before": before, "after": after, "model_dir": result.model_dir,
            "eval": result.to_dict(), "metrics_log": log}


def _dpr(ctx: Context) -> dict:
    from re2g.train.api import train_dpr

    res = train_dpr(ctx.cfg, inputs=_inputs(ctx), log=ctx.console.print)
    ctx.console.print(res.table())
    return _stage_summary(res, "dpr", "recall@5")


def _embed_and_index(ctx: Context, model_dir: str, embeddings: str, dense_dir: str) -> dict:
    """Embed the passages with ``model_dir`` (Ray Data) and build its HNSW shards (Ray tasks)."""
    from re2g.index.dense import build_dense_index
    from re2g.index.embed import embed_corpus, read_embeddings_meta

    stats = embed_corpus(ctx.layout.passages, model_dir, embeddings,
                         batch_size=ctx.cfg.index.embed_batch_size, actors=ctx.cfg.index.embed_actors,
                         max_length=ctx.cfg.models.passage_max_length, overwrite=True)
    ctx.console.print(stats.table())
    info = build_dense_index(embeddings, dense_dir, ctx.cfg.index, encoder_fingerprint=stats.fingerprint,
                             encoder_settings=read_embeddings_meta(embeddings).get("encoder_settings"),
                             overwrite=True)
    return {"embed": stats.to_dict(), "index": {k: v for k, v in info.__dict__.items() if k != "manifest"}}


def _embed_index(ctx: Context) -> dict:
    return _embed_and_index(ctx, ctx.layout.model("dpr"), ctx.layout.embeddings, ctx.layout.dense_index)


def _score_retrievers(ctx: Context, model_dir: str, dense_dir: str, label: str) -> dict:
    """BM25, the dense retriever of ``model_dir`` and their hybrid on the dev and test queries:
    ``{split: {system: metrics}}`` (tables printed)."""
    import pyarrow.parquet as pq

    from re2g.data.kilt import read_kilt
    from re2g.data.provenance import PassageLocator
    from re2g.eval.retrieval import evaluate_retrievers, reports_table
    from re2g.index.retrievers import open_retrievers
    from re2g.models.encoders import BiEncoder

    enc = BiEncoder.from_pretrained(model_dir, query_max_length=ctx.cfg.models.query_max_length)
    retrievers = open_retrievers(ctx.cfg, passages=ctx.layout.passages, dense_dir=dense_dir,
                                 bm25_dir=ctx.layout.bm25_index, query_encoder=enc)
    locator = PassageLocator.from_table(pq.read_table(ctx.layout.passages, columns=["pid"]))
    out = {}
    for split, limit in (("dev", ctx.dev_limit), ("test", ctx.test_limit)):
        if not Path(ctx.task_file(split)).exists():
            continue
        examples = read_kilt(ctx.task_file(split))[:limit]
        reports, skipped = evaluate_retrievers(retrievers, examples, locator, answer_ks=(5, 24))  # a table that fits
        ctx.console.print(reports_table(reports, title=f"{split} retrieval, {label} ({ctx.cfg.train.task})"))
        out[split] = {r.name: r.metrics for r in reports}
    return out


def _zeroshot(ctx: Context) -> dict:
    """The pretrained bi-encoder as it comes (no training), beside BM25 and their hybrid."""
    if ctx.cfg.models.query_encoder is None:
        return {"metric": "not run: no pretrained bi-encoder (stage 1 starts from scratch)"}
    model_dir = str(ctx.run_dir / "models" / "init" / "biencoder")
    index = _embed_and_index(ctx, model_dir, join(ctx.cfg.run_dir, "embeddings-zeroshot"),
                             join(ctx.cfg.run_dir, "index", "dense-zeroshot"))
    out = _score_retrievers(ctx, model_dir, join(ctx.cfg.run_dir, "index", "dense-zeroshot"), "zero-shot")
    renamed = {split: {("bm25" if name == "bm25" else f"{name} zero-shot"): m for name, m in systems.items()}
               for split, systems in out.items()}
    return {"retrieval": renamed, **index, "metric": "dev recall@5 (bi-encoder zero-shot)",
            "after": out["dev"]["dpr"]["recall@5"]}


def _retrieval(ctx: Context) -> dict:
    out = _score_retrievers(ctx, ctx.layout.model("dpr"), ctx.layout.dense_index, "after stage 1")
    return {"retrieval": out, "metric": "dev recall@24 (hybrid)", "after": out["dev"]["hybrid"]["recall@24"]}


def _generator(ctx: Context) -> dict:
    from re2g.train.generation import results_table, train_generator

    res = train_generator(ctx.cfg, inputs=_inputs(ctx), log=ctx.console.print)
    ctx.console.print(results_table(res))
    return _stage_summary(res, "generator", "em")


def _reranker(ctx: Context) -> dict:
    from re2g.train.api import train_reranker

    cfg = ctx.cfg.model_copy(deep=True)
    cfg.train.reranker.dense_index = ctx.layout.dense_index
    cfg.models.query_encoder = ctx.layout.model("dpr")
    # the reranker's BERT starts from stage 1's encoder: from scratch the tiny reranker ranked the
    # trained hybrid's lists below their own order (dev R@1 0.352 vs 0.417); from DPR 0.444
    if cfg.train.reranker.init_from_biencoder is None and cfg.models.reranker is None:
        cfg.train.reranker.init_from_biencoder = ctx.layout.model("dpr")
    res = train_reranker(cfg, inputs=_inputs(ctx), log=ctx.console.print)
    ctx.console.print(res.table())
    # what stage 3 adds: its order of the hybrid's dev lists against the order they come in
    return _stage_summary(res, "reranker", "recall@1", before_system="retriever order",
                          label="dev recall@1 (hybrid order -> reranked)")


def _e2e(ctx: Context) -> dict:
    from re2g.train.generation import results_table, train_e2e

    res = train_e2e(ctx.cfg, inputs=_inputs(ctx), query_encoder="distill", log=ctx.console.print)
    ctx.console.print(results_table(res))
    return _stage_summary(res, "e2e", "em")


def _kilt_eval(ctx: Context, models: dict[str, str | None], split: str, limit: int | None, name: str) -> dict:
    """Predict ``split`` with the run's pipeline (model dirs overridden by ``models``) and score it."""
    from re2g.data.kilt import read_kilt
    from re2g.eval.kilt import evaluate_kilt
    from re2g.predict import predict_file

    task = ctx.task_file(split)
    out = join(ctx.layout.reports, f"predictions-{name}-{split}.jsonl")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    predict_file(ctx.run_dir, task, out, cfg=ctx.cfg, limit=limit,
                 models={k: v for k, v in models.items() if v}, progress=True)
    gold = read_kilt(task)[:limit]
    guess = [json.loads(line) for line in Path(out).read_text().splitlines()]
    scores = evaluate_kilt(gold, guess)
    flat = {**scores["downstream"], **scores["retrieval"], **{k: v for k, v in scores["kilt"].items()}}
    return flat


def _systems(ctx: Context) -> dict[str, dict[str, str]]:
    """The systems evaluated, in stage order: model directories per component."""
    m, init = ctx.layout.model, ctx.run_dir / "models" / "init"
    systems = {"untrained": {"biencoder": m("dpr"), "reranker": str(init / "reranker"),
                             "generator": str(init / "generator")}}
    if Path(m("generator")).exists() and Path(m("reranker")).exists():
        stage2_qenc = Path(m("generator"), "biencoder")  # stage 2 trains the query encoder too
        systems["stages 1-3"] = {"biencoder": str(stage2_qenc) if stage2_qenc.exists() else m("dpr"),
                                 "reranker": m("reranker"), "generator": m("generator")}
    if Path(m("e2e-distill")).exists():
        e2e = Path(m("e2e-distill"))
        systems["stage 4 (distill)"] = {k: str(e2e / k) if (e2e / k).exists() else systems.get("stages 1-3", {}).get(k)
                                        for k in ("biencoder", "reranker", "generator")}
    return systems


def _evaluate(ctx: Context) -> dict:
    from rich.table import Table

    systems = _systems(ctx)
    out: dict = {}
    for split, limit in (("dev", ctx.dev_limit), ("test", ctx.test_limit)):
        out[split] = {}
        for name, models in systems.items():
            out[split][name] = _kilt_eval(ctx, {k: v if Path(v).exists() else None for k, v in models.items()},
                                          split, limit, name.replace(" ", "_").replace("(", "").replace(")", ""))
        t = Table(title=f"{split} answers (KILT metrics, {ctx.cfg.train.task})")
        keys = ["em", "f1", "accuracy", "Rprec", "recall@5", "KILT-em"]
        t.add_column("system")
        for k in keys:
            t.add_column(k, justify="right")
        for name, s in out[split].items():
            t.add_row(name, *(f"{s.get(k, float('nan')):.3f}" for k in keys))
        ctx.console.print(t)
    first, last = next(iter(out["dev"].values())), list(out["dev"].values())[-1]
    return {"downstream": out, "metric": "dev EM (untrained -> final)", "before": first.get("em"),
            "after": last.get("em")}


STEPS: list[Step] = [
    Step("sample", "sample knowledge task", _sample,
         lambda c: [join(c.layout.sample, "sample.json")] if c.uses_sample else []),
    Step("passages", "passages (Ray Data)", _passages, lambda c: [c.layout.passages]),
    Step("bm25", "BM25 index (Lucene)", _bm25, lambda c: [c.layout.bm25_index]),
    Step("init_models", "initial models", _init_models, lambda c: [join(c.cfg.run_dir, "models", "init")]),
    Step("zeroshot", "zero-shot retrieval (the pretrained bi-encoder as it comes)", _zeroshot,
         lambda c: [join(c.cfg.run_dir, "index", "dense-zeroshot")] if c.cfg.models.query_encoder else []),
    Step("mine", "hard negatives (BM25)", _mine, lambda c: [join(c.cfg.run_dir, "train", "negatives.jsonl")]),
    Step("dpr", "stage 1: DPR (Ray Train + DeepSpeed)", _dpr, lambda c: [c.layout.model("dpr")]),
    Step("index", "embed (Ray Data) + HNSW shards (Ray tasks)", _embed_index, lambda c: [c.layout.dense_index]),
    Step("retrieval", "retrieval report", _retrieval),
    Step("generator", "stage 2: generation (RAG)", _generator, lambda c: [c.layout.model("generator")],
         needs="re2g.train.generation"),
    Step("reranker", "stage 3: reranker", _reranker, lambda c: [c.layout.model("reranker")]),
    Step("e2e", "stage 4: end-to-end, distillation", _e2e, lambda c: [c.layout.model("e2e-distill")],
         needs="re2g.train.generation"),
    Step("evaluate", "KILT evaluation (dev, test)", _evaluate),
]


# --------------------------------------------------------------------------- running


def _marker(ctx: Context, step: Step) -> Path:
    return ctx.run_dir / STATE_DIR / f"{step.name}.json"


def run_quickstart(cfg: Re2GConfig, *, console: Console | None = None, fresh: bool = False,
                   only: list[str] | None = None, dev_limit: int | None = None,
                   test_limit: int | None = None) -> dict:
    """Run every step (or the ``only`` ones) into ``cfg.run_dir``; returns the run summary (also
    written as the report). The caller has connected to Ray."""
    console = console or Console()
    from re2g.progress import use_console

    use_console(console)  # training and Ray Data progress go where the tables go
    run_dir = Path(cfg.run_dir)
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir)
    ctx = Context(cfg=cfg, layout=RunLayout(str(run_dir)), console=console, dev_limit=dev_limit,
                  test_limit=test_limit)
    h = config_hash(cfg)
    unknown = set(cfg.quickstart.skip) - {s.name for s in STEPS}
    if unknown:
        raise ConfigError(f"quickstart.skip: unknown steps {sorted(unknown)}: expected some of "
                          f"{', '.join(s.name for s in STEPS)}")
    t_all = time.time()
    stages = []
    for i, step in enumerate(STEPS, 1):
        if only and step.name not in only:
            continue
        if step.name in cfg.quickstart.skip:
            console.rule(f"[bold]{i}/{len(STEPS)} {step.title}: left out (quickstart.skip)")
            stages.append({"name": step.name, "metric": "left out (quickstart.skip)", "skipped": True})
            continue
        if not step.available():
            console.rule(f"[bold]{i}/{len(STEPS)} {step.title}: not in this version ({step.needs} is missing)")
            stages.append({"name": step.name, "metric": "not available in this version", "skipped": True})
            continue
        marker = _marker(ctx, step)
        saved = read_json(marker)  # None when there is none, or it is unreadable: the step is redone
        done = isinstance(saved, dict) and saved.get("config") == h and isinstance(saved.get("result"), dict) \
            and all(Path(p).exists() for p in step.outputs(ctx))
        console.rule(f"[bold]{i}/{len(STEPS)} {step.title}" + (" (done before, skipped)" if done else ""))
        if done:
            result = saved["result"]
            seconds, skipped = result.get("_seconds"), True
        else:
            # no marker while the step runs: a step stopped half-way (Ctrl-C, SIGTERM, a crash) is
            # redone by the next run, never taken as finished on an older marker's word
            marker.unlink(missing_ok=True)
            t0 = time.time()
            result = step.run(ctx)
            seconds, skipped = round(time.time() - t0, 1), False
            result["_seconds"] = seconds
            write_json_atomic(marker, {"config": h, "result": result}, indent=None, default=str)
        ctx.results[step.name] = result
        stages.append({"name": step.name, "metric": result.get("metric", ""), "before": result.get("before"),
                       "after": result.get("after"), "seconds": seconds, "skipped": skipped})
    retrieval = {split: dict(systems) for split, systems in ctx.results.get("retrieval", {}).get("retrieval", {}).items()}
    for split, systems in (ctx.results.get("zeroshot") or {}).get("retrieval", {}).items():
        retrieval[split] = {**systems, **retrieval.get(split, {})}  # zero-shot rows first
    reranked = ((ctx.results.get("reranker") or {}).get("eval") or {}).get("after", {}).get("reranker")
    if reranked and "dev" in retrieval:  # the reranker's order of the hybrid's dev lists (stage 3)
        retrieval["dev"] = {**retrieval["dev"], "reranked": reranked}
    summary = {
        "run_dir": str(run_dir), "seconds": round(time.time() - t_all, 1), "stages": stages,
        "retrieval": retrieval,
        "downstream": ctx.results.get("evaluate", {}).get("downstream", {}),
        "training": {s: r["metrics_log"] for s, r in ctx.results.items() if isinstance(r, dict) and r.get("metrics_log")},
    }
    return summary
