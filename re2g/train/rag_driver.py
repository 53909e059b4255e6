"""The driver side of stages 2 and 4: what ``re2g train generator|e2e|e2e-options``,
``jobs/train_generator.py`` and ``jobs/train_e2e.py`` call (the caller has connected to Ray).

Here, and only here, the side effects of starting a stage: the dense index built when missing
(:func:`ensure_dense_index`), the starting model directories found or initialised
(:func:`start_generator`, :func:`start_reranker`), BM25 retrieved once for every training and dev
query, the index-shard actors started and stopped; then ``re2g.train.api.run_stage`` trains and
evaluates. Models go to ``RUN_DIR/models/generator`` (stage 2) and ``RUN_DIR/models/e2e-<option>``.

The generator is either kind. Built from config (``models.generator`` unset), its kind is the tiny
config's (``models.tiny.generator_arch``: bart -> seq2seq, llama -> causal): the untrained one is
``RUN_DIR/models/init/generator``, or ``init/generator-<kind>`` when that directory holds the other
kind (a run set up for BART can train a causal reader beside it); stage 4 refuses a stage-2
generator of another kind than the config asks for.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from re2g.train.rag_eval import options_markdown
from re2g.train.rag_stages import E2EStage, GenerationStage, plan_examples, training_examples
from re2g.train.rag_steps import QUERY_ENCODER_OPTIONS, IndexHandle, bm25_entries


def start_index_actors(index_dir: str, *, num_cpus: float = 0.0, expected_fingerprint: str | None = None,
                       tag: str = "") -> tuple[IndexHandle, Any]:
    """Start one named shard actor per shard of ``index_dir`` (the caller has connected to Ray) and
    return the handle the training workers attach with, and the ``ActorShardedIndex`` (to shut down)."""
    import uuid

    import ray

    from re2g.index.shards import ActorShardedIndex

    ns = ray.get_runtime_context().namespace
    prefix = f"re2g-train{('-' + tag) if tag else ''}-{uuid.uuid4().hex[:8]}-shard-"
    idx = ActorShardedIndex.start(index_dir, expected_fingerprint=expected_fingerprint, num_cpus=num_cpus,
                                  name_prefix=prefix, namespace=ns, spread=True)
    return IndexHandle(str(Path(index_dir).absolute()), prefix, len(idx.names), ns), idx


def bm25_top(cfg, inputs, queries: Sequence[str]) -> list[list[list]]:
    """BM25 top-``retrieval.bm25_top_k`` per query as :func:`bm25_entries` (retrieved once, in the driver)."""
    from re2g.train.api import _bm25

    k = cfg.retrieval.bm25_top_k
    if k <= 0:
        return [[] for _ in queries]
    return [bm25_entries(hs) for hs in _bm25(cfg, inputs).batch_search(list(queries), k)]


def _layout(cfg):
    from re2g.layout import RunLayout

    return RunLayout(cfg.run_dir)


def _biencoder_for_index(cfg, explicit: str | None, dense_dir: str, prefer: Sequence[str] = ()) -> str:
    """The bi-encoder whose context encoder made the dense index: ``explicit``, else the first of
    ``prefer`` and ``RUN_DIR/models/{dpr,dpr_init,biencoder}`` whose saved fingerprint is the index's."""
    from re2g.errors import ArtifactError
    from re2g.index.dense import read_manifest
    from re2g.models.fingerprint import read_model_meta
    from re2g.pipeline import BIENCODER_DIRS

    want = read_manifest(dense_dir)["encoder_fingerprint"]
    layout = _layout(cfg)
    tried = [explicit] if explicit else [*prefer, *(layout.model(n) for n in BIENCODER_DIRS),
                                         str(Path(layout.model("init")) / "biencoder")]
    for d in tried:
        meta = read_model_meta(d) if d and Path(d).is_dir() else None
        if meta and meta.get("fingerprint") == want:
            return str(d)
    raise ArtifactError(f"{dense_dir}: no bi-encoder matching the index's encoder fingerprint {want} among "
                        f"{', '.join(str(t) for t in tried)} (set train.generator.biencoder / train.e2e.biencoder, "
                        "or rebuild the index with `re2g embed` + `re2g index`)")


def ensure_dense_index(cfg, inputs, dense_dir: str, biencoder_dir: str | None, log=print) -> None:
    """Build ``dense_dir`` (embed with Ray Data, then the shards) when it does not exist."""
    if Path(dense_dir, "manifest.json").is_file():
        return
    from re2g.errors import ArtifactError
    from re2g.index.embed import embed_corpus
    from re2g.index.retrievers import build_indexes
    from re2g.pipeline import pick_biencoder_dir

    layout = _layout(cfg)
    init = Path(layout.model("init")) / "biencoder"
    bi = biencoder_dir or pick_biencoder_dir(layout) or (str(init) if init.is_dir() else None)
    if bi is None:
        if cfg.models.query_encoder is not None:
            raise ArtifactError(f"{dense_dir}: no dense index; build it with `re2g embed` + `re2g index`")
        bi = _init_model(cfg, inputs, "biencoder")
    emb = str(Path(_layout(cfg).embeddings))
    log(f"[index] no dense index: embedding the passages with {bi} and building {dense_dir}")
    embed_corpus(inputs.passages, bi, emb, batch_size=cfg.index.embed_batch_size, actors=cfg.index.embed_actors,
                 overwrite=True)
    build_indexes(cfg, passages=inputs.passages, embeddings=emb, dense_dir=dense_dir, bm25_dir=None, overwrite=True)


def _is_stage2_output(d: Path) -> bool:
    return (d / "biencoder").is_dir()


def _init_model(cfg, inputs, name: str) -> str:
    """``RUN_DIR/models/init/<name>`` (as ``re2g init-models`` makes it), built from config when missing."""
    d = Path(_layout(cfg).model("init")) / name
    if not d.is_dir():
        from re2g.models.init import init_models

        tok = Path(inputs.tokenizer).parent if inputs.tokenizer else None
        base = name.split("-")[0]          # generator-<kind>: built as "generator" aside, then renamed
        if base == name:
            init_models(cfg.models, d.parent, tokenizers_dir=tok, which=(name,))
        else:
            import shutil

            aside = d.parent / f".build-{name}"
            shutil.rmtree(aside, ignore_errors=True)
            init_models(cfg.models, aside, tokenizers_dir=tok, which=(base,))[base].rename(d)
            shutil.rmtree(aside, ignore_errors=True)
    return str(d)


def config_generator_kind(models_cfg) -> str:
    """The generator kind a config builds when ``models.generator`` is unset: ``models.generator_kind``
    if set, else the tiny architecture's (bart: seq2seq, llama: causal)."""
    if models_cfg.generator_kind != "auto":
        return models_cfg.generator_kind
    return "causal" if models_cfg.tiny.generator_arch == "llama" else "seq2seq"


def _kind_of(path: Path) -> str:
    from re2g.models.causal import checkpoint_kind

    return checkpoint_kind(path)


def start_generator(cfg, inputs) -> str:
    """Where stage 2 starts: ``models.generator`` if set, else ``RUN_DIR/models/init/generator``; an
    untrained ``RUN_DIR/models/generator`` (``re2g init-models RUN_DIR/models``) is moved there first,
    as stage 2 writes its output to ``RUN_DIR/models/generator``. Built from config when none exists;
    when it holds another generator kind than the config builds (:func:`config_generator_kind`),
    ``RUN_DIR/models/init/generator-<kind>`` instead."""
    if cfg.models.generator is not None:
        return cfg.models.generator
    out, init = Path(_layout(cfg).model("generator")), Path(_layout(cfg).model("init")) / "generator"
    if not init.is_dir() and out.is_dir() and not _is_stage2_output(out):
        import shutil

        from re2g.artifacts import staged_dir

        with staged_dir(init) as staging:       # a crash mid-copy leaves no half-copied init model that loads
            shutil.copytree(out, staging.path, dirs_exist_ok=True)
    want = config_generator_kind(cfg.models)
    if init.is_dir() and _kind_of(init) != want:
        return _init_model(cfg, inputs, f"generator-{want}")
    return _init_model(cfg, inputs, "generator")


def e2e_start_generator(cfg, inputs, stage2: Path) -> str:
    """Where stage 4's generator starts: ``train.e2e.generator``, else stage 2's (``stage2``), else the
    untrained one (:func:`start_generator`). With ``models.generator`` unset, a stage-2 generator of
    another kind than the config builds is a :class:`ConfigError` (training the other kind by mistake)."""
    c = cfg.train.e2e
    if c.generator:
        return c.generator
    if not stage2.is_dir():
        return start_generator(cfg, inputs)
    if cfg.models.generator is None and _kind_of(stage2) != config_generator_kind(cfg.models):
        from re2g.errors import ConfigError

        raise ConfigError(f"{stage2}: stage 2's generator is {_kind_of(stage2)} but the config builds a "
                          f"{config_generator_kind(cfg.models)} one (models.tiny.generator_arch="
                          f"{cfg.models.tiny.generator_arch}, models.generator_kind={cfg.models.generator_kind}); "
                          "run `re2g train generator` with this config first, or set train.e2e.generator")
    return str(stage2)


def start_reranker(cfg, inputs) -> str:
    """Where stage 4's reranker starts: ``RUN_DIR/models/reranker`` (stage 3), else ``models.reranker``,
    else ``RUN_DIR/models/init/reranker`` (built from config when missing)."""
    d = Path(_layout(cfg).model("reranker"))
    if d.is_dir():
        return str(d)
    return cfg.models.reranker or _init_model(cfg, inputs, "reranker")


def _dev_gold(inputs, limit: int | None) -> list:
    from re2g.data.kilt import read_kilt

    gold = [ex for ex in read_kilt(inputs.dev_file) if ex.answers]
    return gold[:limit] if limit else gold


def _with_eval_every(stage_cfg, plan, num_workers: int):
    """Evaluate at every checkpoint (so each checkpoint has its ``eval.json``) unless set."""
    if stage_cfg.eval_every is not None:
        return stage_cfg
    every = stage_cfg.checkpoint_every or max(1, plan.per_epoch // (num_workers * stage_cfg.grad_accum))
    return stage_cfg.model_copy(update={"eval_every": every})


def _dev(gold):
    from re2g.train.evaluate import DevSet

    return DevSet([g.input for g in gold], [[] for _ in gold], [[] for _ in gold])


def train_generator(cfg, *, inputs=None, fail_once_at_step: int | None = None, log=print):
    """Stage 2 on Ray Train + DeepSpeed, retrieval through index-shard actors; dev EM/F1/accuracy and
    provenance R-Precision/Recall@5 before and after. Returns a ``StageResult``; the model goes to
    ``RUN_DIR/models/generator`` (the generator's files, loadable as a plain generator directory, and
    ``biencoder/``: the trained query encoder with the index's context encoder)."""
    from re2g.train.api import prepare_inputs, run_stage

    inputs = inputs or prepare_inputs(cfg)
    c = cfg.train.generator
    dense_dir = c.dense_index or _layout(cfg).dense_index
    ensure_dense_index(cfg, inputs, dense_dir, c.biencoder, log=log)
    bi = _biencoder_for_index(cfg, c.biencoder, dense_dir)
    gen = c.generator or start_generator(cfg, inputs)
    examples = training_examples(inputs.train_file)
    plan = plan_examples(examples, batch_size=c.batch_size, epochs=c.epochs, world=cfg.train.num_workers,
                         grad_accum=c.grad_accum, max_steps=c.max_steps, seed=c.seed)
    kind = c.marginalization or cfg.generation.marginalization
    gold = _dev_gold(inputs, c.max_dev_queries)
    handle, actors = start_index_actors(dense_dir, num_cpus=c.index_actor_cpus, tag="gen")
    try:
        stage = GenerationStage(models=cfg.models, tokenizer_dir=inputs.tokenizer, passages=inputs.passages,
                                dev=_dev(gold), lr=c.lr, weight_decay=c.weight_decay, index=handle, biencoder_dir=bi,
                                generator_dir=gen, gold=gold, generation=cfg.generation, marginalization=kind,
                                query_encoder_lr=c.query_encoder_lr, n_docs=c.n_docs,
                                train_query_encoder=c.train_query_encoder, reinit_std=c.reinit_std, lora=c.lora)
        log(f"[generator] {len(examples)} training examples, DPR top-{c.n_docs} from {handle.num_shards} shard "
            f"actors, RAG-{kind.capitalize()}; bi-encoder {bi}, generator {gen}"
            + (f" (weights redrawn, std {c.reinit_std})" if c.reinit_std else "")
            + (f", LoRA r={c.lora.r}" if c.lora.enabled else ""))
        return run_stage(cfg, stage, plan, _with_eval_every(c, plan, cfg.train.num_workers), inputs,
                         fail_once_at_step=fail_once_at_step, log=log,
                         data_info={"train_examples": len(examples), "micro_batches": len(plan.rows),
                                    "dev_examples": len(gold), "biencoder": bi, "generator": gen,
                                    "dense_index": dense_dir, "marginalization": kind})
    finally:
        actors.shutdown()


def train_e2e(cfg, *, query_encoder: str | None = None, inputs=None, fail_once_at_step: int | None = None,
              log=print):
    """Stage 4 on Ray Train + DeepSpeed with the query-encoder option ``query_encoder`` (default
    ``train.e2e.query_encoder``): DPR (actors) + BM25 candidates, reranker top-k to BART weighted by the
    reranker. Starts from stage 2's query encoder and generator (``RUN_DIR/models/generator``) and
    stage 3's reranker when they exist. The models go to ``RUN_DIR/models/e2e-<option>/``
    (``biencoder/``, ``reranker/``, ``generator/``)."""
    from re2g.train.api import prepare_inputs, run_stage

    inputs = inputs or prepare_inputs(cfg)
    c = cfg.train.e2e
    option = query_encoder or c.query_encoder
    if option not in QUERY_ENCODER_OPTIONS:
        from re2g.errors import ConfigError

        raise ConfigError(f"train.e2e.query_encoder: got {option!r}: expected one of {', '.join(QUERY_ENCODER_OPTIONS)}")
    layout = _layout(cfg)
    stage2 = Path(layout.model("generator"))
    dense_dir = c.dense_index or layout.dense_index
    ensure_dense_index(cfg, inputs, dense_dir, c.biencoder, log=log)
    bi = _biencoder_for_index(cfg, c.biencoder, dense_dir, prefer=[str(stage2 / "biencoder")])
    gen = e2e_start_generator(cfg, inputs, stage2)
    rr = c.reranker or start_reranker(cfg, inputs)
    r = cfg.retrieval
    examples = training_examples(inputs.train_file)
    for x, hits in zip(examples, bm25_top(cfg, inputs, [x["query"] for x in examples])):
        x["bm25"] = hits
    gold = _dev_gold(inputs, c.max_dev_queries)
    dev_bm25 = bm25_top(cfg, inputs, [g.input for g in gold])
    plan = plan_examples(examples, batch_size=c.batch_size, epochs=c.epochs, world=cfg.train.num_workers,
                         grad_accum=c.grad_accum, max_steps=c.max_steps, seed=c.seed)
    kind = c.marginalization or cfg.generation.marginalization
    handle, actors = start_index_actors(dense_dir, num_cpus=c.index_actor_cpus, tag="e2e")
    try:
        stage = E2EStage(models=cfg.models, tokenizer_dir=inputs.tokenizer, passages=inputs.passages, dev=_dev(gold),
                         lr=c.lr, weight_decay=c.weight_decay, name=f"e2e-{option}", index=handle, biencoder_dir=bi,
                         generator_dir=gen, reranker_dir=rr, gold=gold, generation=cfg.generation,
                         marginalization=kind, query_encoder_lr=c.query_encoder_lr, reranker_lr=c.reranker_lr,
                         option=option, retrieval=r, temperature=c.distill_temperature,
                         distill_weight=c.distill_weight, dev_bm25=dev_bm25, lora=c.lora)
        log(f"[e2e-{option}] {len(examples)} training examples; DPR top-{r.dpr_top_k} ({handle.num_shards} shard "
            f"actors) + BM25 top-{r.bm25_top_k} -> reranker top-{r.rerank_top_k} -> RAG-{kind.capitalize()}; "
            f"bi-encoder {bi}, reranker {rr}, generator {gen}" + (f", LoRA r={c.lora.r}" if c.lora.enabled else ""))
        return run_stage(cfg, stage, plan, _with_eval_every(c, plan, cfg.train.num_workers), inputs,
                         fail_once_at_step=fail_once_at_step, log=log,
                         data_info={"train_examples": len(examples), "micro_batches": len(plan.rows),
                                    "dev_examples": len(gold), "option": option, "biencoder": bi, "reranker": rr,
                                    "generator": gen, "dense_index": dense_dir, "marginalization": kind,
                                    "temperature": c.distill_temperature, "distill_weight": c.distill_weight})
    finally:
        actors.shutdown()


def compare_e2e_options(cfg, options: Sequence[str] = QUERY_ENCODER_OPTIONS, *, inputs=None, out: str | None = None,
                        log=print) -> dict[str, Any]:
    """Stage 4 once per query-encoder option from the same starting models (stage 2's query encoder
    and generator, stage 3's reranker), each into ``RUN_DIR/models/e2e-<option>``; writes the
    comparison (:func:`options_markdown`) to ``out`` (default ``RUN_DIR/reports/e2e_options.md``).
    Returns ``{"results": {option: StageResult}, "markdown": str, "path": str}``."""
    from re2g.layout import join
    from re2g.train.api import prepare_inputs

    inputs = inputs or prepare_inputs(cfg)
    results = {}
    for option in options:
        results[option] = train_e2e(cfg, query_encoder=option, inputs=inputs, log=log)
    md = options_markdown(results)
    path = out or join(_layout(cfg).reports, "e2e_options.md")
    from re2g.artifacts import write_text_atomic

    write_text_atomic(path, md)
    return {"results": results, "markdown": md, "path": str(path)}
