"""The training stages end to end: inputs, hard negatives, candidates, the Ray Train run, and the
dev evaluation before and after (written as ``eval.json`` beside the checkpoint and the model).

What ``re2g train …``, ``re2g mine-negatives``, ``re2g candidates`` and ``jobs/*.py`` call. Every
function expects the caller to have connected to Ray (``re2g.runtime.connect_ray``). Mining and the
reranker's candidates run over Ray Data: a pool of retrieval actors, each opening BM25 (its JVM) and
the dense index itself; the driver only reads the queries and writes the results.

Run directory (see ``re2g.layout``)::

    RUN_DIR/sample, passages, index/bm25        inputs (made here when missing, for the sample task)
    RUN_DIR/train/negatives.jsonl               mined hard negatives (training queries)
    RUN_DIR/train/candidates-{train,dev}.jsonl  hybrid candidates for the reranker
    RUN_DIR/train/<stage>/                      ray/ (Ray Train storage, checkpoints), metrics.jsonl,
                                                tensorboard/, eval.json, config.yaml
    RUN_DIR/models/<stage>/                     the trained model(s) (save_pretrained) + eval.json
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from re2g.artifacts import staged_dir, write_json_atomic, write_text_atomic
from re2g.config import Re2GConfig, StageTrainConfig, save_config
from re2g.errors import ArtifactError
from re2g.layout import RunLayout, join
from re2g.train.data import (load_queries, mine_negatives, mine_negatives_ray, read_records,
                             retrieve_candidates, retrieve_candidates_ray, write_records)
from re2g.train.plans import plan_dpr, plan_lists, to_dataset
from re2g.train.evaluate import DevSet, metrics_dict, report
from re2g.train.loop import LoopSpec, StageRun, run_loop


@dataclass
class TrainInputs:
    """Where a training run reads from."""

    train_file: str
    dev_file: str
    passages: str
    bm25_index: str
    tokenizer: str | None
    negatives: str
    work_dir: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def prepare_inputs(cfg: Re2GConfig, *, build: bool = True) -> TrainInputs:
    """Resolve the inputs of a run; with ``build``, make the missing ones for the sample task
    (generate the sample, split passages with Ray Data, build the BM25 index)."""
    layout = RunLayout(cfg.run_dir)
    sample = Path(layout.sample)
    if cfg.data.train_file is None or cfg.data.dev_file is None or cfg.data.knowledge_source is None:
        if not (sample / "knowledge_source.jsonl").exists():
            if not build:
                raise ArtifactError(f"{sample}: the sample task is missing (run `re2g sample {sample}`)")
            from re2g.data.sample import generate_sample

            generate_sample(sample, cfg.data.sample, vocab_size=cfg.models.tiny.vocab_size, progress=False,
                            overwrite=True)
    task = cfg.train.task
    train_file = cfg.data.train_file or str(sample / "tasks" / f"{task}-train-kilt.jsonl")
    dev_file = cfg.data.dev_file or str(sample / "tasks" / f"{task}-dev-kilt.jsonl")
    source = cfg.data.knowledge_source or str(sample / "knowledge_source.jsonl")
    passages = layout.passages
    if not Path(passages).exists():
        if not build:
            raise ArtifactError(f"{passages}: passages missing (run `re2g passages`)")
        from re2g.data.passages import split_knowledge_source

        split_knowledge_source(source, passages, cfg.passages, skip_bad_rows=cfg.data.skip_bad_rows)
    bm25 = layout.bm25_index
    if not Path(bm25).exists():
        if not build:
            raise ArtifactError(f"{bm25}: BM25 index missing (run `re2g index`)")
        from re2g.index.bm25 import build_bm25_index

        build_bm25_index(passages, bm25, threads=cfg.bm25.threads, k1=cfg.bm25.k1, b=cfg.bm25.b)
    tok = sample / "tokenizers" / "wordpiece"
    work = join(cfg.run_dir, "train")
    return TrainInputs(train_file, dev_file, passages, bm25, str(tok) if tok.exists() else None,
                       cfg.train.negatives or join(work, "negatives.jsonl"), work)


_LOCATORS: dict[str, object] = {}


def _locator(passages: str):
    """The provenance locator of a passages artifact, built once per process over its memory-mapped
    store's sorted pid index (``PassageLocator.from_store``: no Python object per passage)."""
    from re2g.data.provenance import PassageLocator
    from re2g.train.stages import passage_lookup

    if passages not in _LOCATORS:
        _LOCATORS[passages] = PassageLocator.from_store(passage_lookup(passages))
    return _LOCATORS[passages]


def _bm25(cfg: Re2GConfig, inputs: TrainInputs):
    from re2g.index.bm25 import BM25Retriever

    return BM25Retriever.from_dir(inputs.bm25_index, k1=cfg.bm25.k1, b=cfg.bm25.b, threads=cfg.bm25.threads)


def mine(cfg: Re2GConfig, inputs: TrainInputs, *, retriever=None, dense_index: str | None = None,
         out: str | None = None, overwrite: bool = False, use_ray: bool = True) -> tuple[str, dict]:
    """Mine hard negatives for the training queries into ``out`` (default ``inputs.negatives``);
    skipped when the file exists and not ``overwrite``. Returns (path, stats).

    BM25, or with ``dense_index`` the DPR index searched with ``models.query_encoder`` (a second
    round). By default over Ray Data (:func:`re2g.train.data.mine_negatives_ray`: a pool of
    retrieval actors sized by ``train.mining``); ``use_ray=False`` computes the same file in this
    process, and so does passing a ready ``retriever`` object (it is not shipped to actors)."""
    from re2g.train.stages import passage_lookup

    out = out or inputs.negatives
    if Path(out).exists() and not overwrite:
        return out, {"skipped": "exists"}
    records, load = load_queries(inputs.train_file, _locator(inputs.passages),
                                 threshold=cfg.train.mining.positive_threshold)
    t0 = time.time()
    if retriever is not None or not use_ray:
        retriever = retriever or (_dense(cfg, inputs, dense_index) if dense_index else _bm25(cfg, inputs))
        mined, stats = mine_negatives(records, retriever, passage_lookup(inputs.passages), cfg.train.mining,
                                      batch_size=cfg.train.mining.batch_size)
        how = {"ray_data": False}
    else:
        mined, stats, run = mine_negatives_ray(records, _factory(cfg, inputs, dense_index, hybrid=False),
                                               inputs.passages, cfg.train.mining, threads=cfg.bm25.threads,
                                               torch_threads=_torch_threads(cfg, dense_index))
        how = {"ray_data": True, **run.to_dict()}
    write_records(out, mined)
    info = {"path": out, "load": load.__dict__, "mining": stats.to_dict(),
            "run": {**how, "seconds": round(time.time() - t0, 3)}}
    write_json_atomic(Path(out).with_suffix(".stats.json"), info)
    return out, info


def _dense(cfg: Re2GConfig, inputs: TrainInputs, dense_index: str):
    """The DPR retriever over ``dense_index`` with the query encoder ``models`` names."""
    from re2g.index.retrievers import open_retrievers
    from re2g.models.factory import load_biencoder

    enc = load_biencoder(cfg.models, inputs.tokenizer)
    return open_retrievers(cfg, passages=inputs.passages, dense_dir=dense_index, bm25_dir=None,
                           query_encoder=enc)["dpr"]


def _hybrid(cfg: Re2GConfig, inputs: TrainInputs, dense_index: str | None):
    from re2g.index.fusion import HybridRetriever

    dense = _dense(cfg, inputs, dense_index) if dense_index else None
    return HybridRetriever(dense, _bm25(cfg, inputs), cfg.retrieval)


def _factory(cfg: Re2GConfig, inputs: TrainInputs, dense_index: str | None, *, hybrid: bool):
    """A picklable zero-argument callable that opens the retriever inside a Ray Data actor: the
    hybrid one (candidates), or for mining the dense one with ``dense_index``, else BM25."""
    if hybrid:
        return functools.partial(_hybrid, cfg, inputs, dense_index)
    if dense_index:
        return functools.partial(_dense, cfg, inputs, dense_index)
    return functools.partial(_bm25, cfg, inputs)


def _torch_threads(cfg: Re2GConfig, dense_index: str | None) -> int | None:
    """Torch threads per retrieval actor when a query encoder runs in it (None: BM25 only)."""
    if not dense_index:
        return None
    return max(1, int(cfg.train.mining.actor_cpus or 1))


def candidates(cfg: Re2GConfig, inputs: TrainInputs, split: str, *, dense_index: str | None = None,
               overwrite: bool = False, use_ray: bool = True) -> str:
    """The hybrid retriever's merged candidates (DPR part only with ``dense_index``) for the
    ``train`` or ``dev`` queries, written to ``RUN_DIR/train/candidates-<split>.jsonl``. By default
    over Ray Data (:func:`re2g.train.data.retrieve_candidates_ray`, the pool sized by
    ``train.mining``); ``use_ray=False``: the same file computed in this process."""
    return candidate_files(cfg, inputs, (split,), dense_index=dense_index, overwrite=overwrite, use_ray=use_ray)[split]


def candidate_files(cfg: Re2GConfig, inputs: TrainInputs, splits: Sequence[str], *, dense_index: str | None = None,
                    overwrite: bool = False, use_ray: bool = True) -> dict[str, str]:
    """:func:`candidates` for several splits: the ones not written yet go through one retrieval
    pass (one actor pool, one JVM and index load per actor), then are written per split."""
    bad = [s for s in splits if s not in ("train", "dev")]
    if bad:
        from re2g.errors import ConfigError

        raise ConfigError(f"candidates: split {bad[0]!r}: expected train or dev")
    outs = {s: join(inputs.work_dir, f"candidates-{s}.jsonl") for s in splits}
    todo = [s for s in dict.fromkeys(splits) if overwrite or not Path(outs[s]).exists()]
    if not todo:
        return outs
    locator = _locator(inputs.passages)
    per_split = {s: load_queries(inputs.train_file if s == "train" else inputs.dev_file, locator,
                                 threshold=cfg.train.mining.positive_threshold)[0] for s in todo}
    records = [r for s in todo for r in per_split[s]]
    k = cfg.train.reranker.candidates_top_k
    if use_ray:
        recs, _ = retrieve_candidates_ray(records, _factory(cfg, inputs, dense_index, hybrid=True), k,
                                          cfg.train.mining, threads=cfg.bm25.threads,
                                          torch_threads=_torch_threads(cfg, dense_index))
    else:
        recs = retrieve_candidates(records, _hybrid(cfg, inputs, dense_index), k,
                                   batch_size=cfg.train.mining.batch_size)
    start = 0
    for s in todo:  # the records come back in the order they went in
        write_records(outs[s], recs[start:start + len(per_split[s])])
        start += len(per_split[s])
    return outs


# --------------------------------------------------------------------------- running a stage


@dataclass
class StageResult:
    """A trained stage: where its model is, dev metrics before/after, the Ray Train run."""

    stage: str
    model_dir: str
    before: dict[str, dict]
    after: dict[str, dict]
    run: StageRun
    data: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"stage": self.stage, "model_dir": self.model_dir, "before": self.before, "after": self.after,
                "run": self.run.to_dict(), "data": self.data}

    def table(self):
        """Dev metrics before and after training, one row per system."""
        from rich.table import Table

        rows = [(f"{name} (before)", m) for name, m in self.before.items()]
        rows += [(f"{name} (after)", m) for name, m in self.after.items()]
        keys = list(rows[0][1]) if rows else []
        t = Table(title=f"{self.stage}: dev retrieval, before and after training ({self.run.steps} steps, "
                  f"{self.run.seconds:.0f} s)")
        t.add_column("system")
        for k in keys:
            t.add_column(k.replace("dev_", ""), justify="right")
        for name, m in rows:
            t.add_row(name, *(f"{m.get(k, float('nan')):.3f}" for k in keys))
        return t


def _dev(cfg: Re2GConfig, inputs: TrainInputs, stage_cfg: StageTrainConfig, cands: str | None = None) -> DevSet:
    if cands is not None:
        recs = read_records(cands)
    else:
        recs, _ = load_queries(inputs.dev_file, _locator(inputs.passages),
                               threshold=cfg.train.mining.positive_threshold)
    return DevSet.from_records(recs, stage_cfg.max_dev_queries)


def _use_gpu(cfg: Re2GConfig) -> bool:
    if cfg.train.use_gpu is not None:
        return cfg.train.use_gpu
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1


def _eval_module(stage, module) -> dict:
    import torch

    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            return stage.evaluate(module)
    finally:
        module.train(was)


def _strip(m: dict) -> dict:
    return {k[4:] if k.startswith("dev_") else k: v for k, v in m.items()}


def run_stage(cfg: Re2GConfig, stage, plan, stage_cfg: StageTrainConfig, inputs: TrainInputs, *,
              baselines: dict[str, dict] | None = None, fail_once_at_step: int | None = None,
              data_info: dict | None = None, log=print) -> StageResult:
    """Evaluate the initial model, train it with :func:`re2g.train.loop.run_loop`, load the final
    checkpoint's model back with ``from_pretrained``, evaluate it, and write ``eval.json`` beside the
    checkpoint, in ``RUN_DIR/train/<stage>/`` and in ``RUN_DIR/models/<stage>/``."""
    import torch

    out_dir = Path(inputs.work_dir) / stage.name
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir)
    torch.manual_seed(stage_cfg.seed)
    before = dict(baselines or {})
    t0 = time.time()
    before_metrics = _eval_module(stage, stage.build())
    before.update(_split_systems(stage.name, before_metrics))
    log(f"[{stage.name}] dev before training ({time.time() - t0:.1f} s): "
        + ", ".join(f"{k}={v:.3f}" for k, v in before_metrics.items()))

    use_gpu = _use_gpu(cfg)
    threads = None if use_gpu else max(1, int(cfg.train.cpus_per_worker))
    spec = LoopSpec(
        stage=stage, steps=plan.steps, micro_batch=stage_cfg.batch_size, grad_accum=stage_cfg.grad_accum,
        warmup_steps=int(math.ceil(stage_cfg.warmup_fraction * plan.steps)), deepspeed=cfg.train.deepspeed,
        use_gpu=use_gpu, seed=stage_cfg.seed, log_every=stage_cfg.log_every,
        checkpoint_every=stage_cfg.checkpoint_every or max(1, plan.per_epoch // (cfg.train.num_workers
                                                                                 * stage_cfg.grad_accum)),
        eval_every=stage_cfg.eval_every, threads=threads, metrics_path=str(out_dir / "metrics.jsonl"),
        tensorboard_dir=str(out_dir / "tensorboard"), fail_once_at_step=fail_once_at_step,
        fail_marker=str(out_dir / f".fail-once-{uuid.uuid4().hex[:8]}") if fail_once_at_step else None)
    name = f"{stage.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    log(f"[{stage.name}] {plan.steps} steps x {stage_cfg.batch_size} x {cfg.train.num_workers} workers "
        f"x {stage_cfg.grad_accum} accumulation, ZeRO-{cfg.train.deepspeed.zero_stage}, "
        f"{'GPU' if use_gpu else 'CPU'}")
    run = run_loop(spec, to_dataset(plan), num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                   cpus_per_worker=cfg.train.cpus_per_worker, max_failures=cfg.train.max_failures,
                   storage=str(out_dir / "ray"), name=name, keep_checkpoints=cfg.train.keep_checkpoints)
    if run.checkpoint_dir is None or not Path(run.checkpoint_dir, "model").exists():
        raise ArtifactError(f"{stage.name}: the run ended without a checkpoint ({run.storage})")
    model_dir = Path(RunLayout(cfg.run_dir).model(stage.name))
    checkpoint_model = Path(run.checkpoint_dir, "model")
    after_metrics = _eval_module(stage, stage.load(checkpoint_model))
    after = _split_systems(stage.name, after_metrics)
    result = StageResult(stage.name, str(model_dir), before, after, run, data_info or {})
    payload = json.dumps(result.to_dict(), indent=2, default=str)
    # the model directory is built aside (model, eval.json, config) and renamed into place: a crash
    # never leaves a half-copied model directory that loads
    with staged_dir(model_dir, overwrite=True) as staging:
        shutil.copytree(checkpoint_model, staging.path, dirs_exist_ok=True)
        Path(staging.path, "eval.json").write_text(payload)
        save_config(cfg, staging.path)
    for d in (out_dir, Path(run.checkpoint_dir)):
        write_text_atomic(Path(d, "eval.json"), payload)
    return result


def _split_systems(name: str, metrics: dict) -> dict[str, dict]:
    """``dev_*`` metrics of one model -> {system: metrics}; joint has a retriever and a reranker."""
    main = {k[4:]: v for k, v in metrics.items() if k.startswith("dev_") and not k.startswith("dev_reranker_")}
    out = {name if name != "joint" else "joint-retriever": main}
    rr = {k[len("dev_reranker_"):]: v for k, v in metrics.items() if k.startswith("dev_reranker_")}
    if rr:
        out["joint-reranker"] = rr
    return out


def _stage_args(cfg: Re2GConfig, inputs: TrainInputs, stage_cfg: StageTrainConfig) -> dict:
    return dict(models=cfg.models, tokenizer_dir=inputs.tokenizer, passages=inputs.passages, lr=stage_cfg.lr,
                weight_decay=stage_cfg.weight_decay)


def train_dpr(cfg: Re2GConfig, *, inputs: TrainInputs | None = None, fail_once_at_step: int | None = None,
              log=print) -> StageResult:
    """Stage 1: mine BM25 hard negatives (if not there), plan conflict-free batches, train the
    bi-encoder on Ray Train + DeepSpeed, evaluate dev before/after (also BM25 for reference)."""
    from re2g.train.stages import DPRStage, passage_lookup

    inputs = inputs or prepare_inputs(cfg)
    c = cfg.train.dpr
    neg_path, mining = mine(cfg, inputs)
    records = read_records(neg_path)
    lookup = passage_lookup(inputs.passages)
    plan = plan_dpr(records, lookup, batch_size=c.batch_size, epochs=c.epochs, hard_negatives=c.hard_negatives,
                    sample_from_top=c.sample_from_top, world=cfg.train.num_workers, grad_accum=c.grad_accum,
                    max_steps=c.max_steps, seed=c.seed)
    dev = _dev(cfg, inputs, c)
    bm25 = _bm25(cfg, inputs).batch_search(dev.queries, 20)
    baselines = {"bm25": _strip(metrics_dict(report("bm25", [[h.pid for h in hs] for hs in bm25], dev, lookup)))}
    dev.negatives = [[h.pid for h in hs] for hs in bm25]  # in the dense eval pool (train.dpr.eval_pool_size)
    stage = DPRStage(dev=dev, remote_grad=c.remote_grad, eval_pool_size=c.eval_pool_size, eval_pool_seed=c.seed,
                     **_stage_args(cfg, inputs, c))
    return run_stage(cfg, stage, plan, c, inputs, baselines=baselines, fail_once_at_step=fail_once_at_step,
                     data_info={"negatives": neg_path, "mining": mining, "train_queries": len(records),
                                "micro_batches": len(plan.rows), "dropped_examples": plan.dropped}, log=log)


def train_reranker(cfg: Re2GConfig, *, inputs: TrainInputs | None = None, fail_once_at_step: int | None = None,
                   log=print) -> StageResult:
    """Stage 3: the cross-encoder on the hybrid (DPR + BM25, or BM25 alone without
    ``train.reranker.dense_index``) candidates of each training query; dev Recall@1 of the
    reranked lists against the retriever's own order."""
    from re2g.train.stages import RerankerStage, passage_lookup

    inputs = inputs or prepare_inputs(cfg)
    c = cfg.train.reranker
    files = candidate_files(cfg, inputs, ("train", "dev"), dense_index=c.dense_index)  # one retrieval pass
    train_c, dev_path = read_records(files["train"]), files["dev"]
    lookup = passage_lookup(inputs.passages)
    plan, stats = plan_lists(train_c, lookup, source="candidates", batch_size=c.batch_size, epochs=c.epochs,
                             max_len=c.max_pairs_per_query, max_positives=c.max_positives,
                             world=cfg.train.num_workers, grad_accum=c.grad_accum, max_steps=c.max_steps, seed=c.seed)
    log(f"[reranker] candidate lists: {stats.kept} kept, {stats.no_positive} without a positive, "
        f"{stats.only_positives} with only positives (skipped)")
    dev = _dev(cfg, inputs, c, dev_path)
    hybrid = {"retriever order": _strip(metrics_dict(report("hybrid", dev.candidates, dev, lookup)))}
    stage = RerankerStage(dev=dev, init_from_biencoder=c.init_from_biencoder, **_stage_args(cfg, inputs, c))
    return run_stage(cfg, stage, plan, c, inputs, baselines=hybrid, fail_once_at_step=fail_once_at_step,
                     data_info={"lists": stats.to_dict(), "micro_batches": len(plan.rows)}, log=log)


def train_joint(cfg: Re2GConfig, *, inputs: TrainInputs | None = None, fail_once_at_step: int | None = None,
                log=print) -> StageResult:
    """RocketQAv2-style: retriever and reranker trained together on lists of positives + mined hard
    negatives; dev Recall@k of the retriever (whole corpus) and of the reranker (hybrid candidates)."""
    from re2g.train.stages import JointStage, passage_lookup

    inputs = inputs or prepare_inputs(cfg)
    c = cfg.train.joint
    neg_path, _ = mine(cfg, inputs)
    lookup = passage_lookup(inputs.passages)
    plan, stats = plan_lists(read_records(neg_path), lookup, source="negatives", batch_size=c.batch_size,
                             epochs=c.epochs, max_len=c.list_size, max_positives=c.max_positives,
                             world=cfg.train.num_workers, grad_accum=c.grad_accum, max_steps=c.max_steps,
                             seed=c.seed, pad_to=c.list_size)
    dev = _dev(cfg, inputs, c, candidates(cfg, inputs, "dev", dense_index=cfg.train.reranker.dense_index))
    stage = JointStage(dev=dev, reranker_lr=c.reranker_lr, kl_weight=c.kl_weight, ce_weight=c.ce_weight,
                       eval_pool_size=c.eval_pool_size, eval_pool_seed=c.seed, **_stage_args(cfg, inputs, c))
    return run_stage(cfg, stage, plan, c, inputs, fail_once_at_step=fail_once_at_step,
                     data_info={"lists": stats.to_dict(), "micro_batches": len(plan.rows)}, log=log)
