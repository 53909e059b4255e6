"""The GPU paths, each run once on a machine with one CUDA GPU (under 8 minutes), one line per path.

    scripts/gpu_check.sh [--out bench_out/gpu_check.json] [--work DIR] [--only train,embed,...] [--cpu]

Paths (the project's own code, tiny models built from config, the tiny sample task):

- ``train``: a few bf16 steps of stage 1 (DPR) through :func:`re2g.train.loop.run_loop` -- Ray Train
  ``TorchTrainer`` with ``ScalingConfig(use_gpu=True)`` and ``deepspeed.initialize`` (DeepSpeed
  ``bf16.enabled``, ZeRO from the config) -- then the saved checkpoint loaded back (float32 weights).
- ``embed``: :func:`re2g.index.embed.embed_corpus` -- Ray Data ``map_batches`` with one GPU per
  encoder actor (bf16 on CUDA); the vectors compared with the same encoder's float32 CPU vectors.
- ``faiss``: faiss on the GPU. Where the installed faiss has cuVS (``GpuIndexCagra``): a CAGRA graph
  built on the GPU, converted to a CPU HNSW (``IndexHNSWCagra``), recall@10 against exact search;
  always: a GPU flat index (``GpuIndexFlatIP``) whose top-10 is compared with the CPU flat index's.
- ``serve``: the Serve application (:func:`serve.app.build_app`) over a dense-only run directory,
  its model deployments with ``ray_actor_options={"num_gpus": …}`` (fractions of the one GPU);
  ``/healthz`` must report each on ``cuda`` and ``POST /v1/answer`` must answer one query.

Each path prints ``<path> ok (<s>): …``, ``<path> failed (<s>): <why>`` or ``<path> skipped: <why>``;
the JSON (``--out``) holds the same plus the facts each path measured, and is rewritten after every
path (a run killed half-way leaves the paths done so far, the running one as ``running``).

Exit status: 0 every path ok; 1 a path failed; 3 no CUDA device (every path skipped, nothing
started: no Ray, no model). ``--cpu`` runs the same paths on the CPU (no GPU asked for, the CUDA
parts replaced by their CPU counterparts) to test this script's plumbing on a machine without one;
its lines say ``ok (cpu plumbing)`` and prove nothing about a GPU.

Status: written on a machine without a GPU. The CPU plumbing run (``--cpu``) passed here (all four ok,
384 s on 2 shared cores: faiss 16 s, embed 57 s, train 112 s, serve 122 s); the GPU run itself has not
been made by us yet.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable

PATHS = ("train", "embed", "faiss", "serve")
EXIT_OK, EXIT_FAILED, EXIT_NO_CUDA = 0, 1, 3
NO_CUDA = "no CUDA device"

# a path's bar for "ok"
MIN_COSINE = 0.99          # bf16 GPU vectors vs float32 CPU vectors of the same encoder, per passage
MIN_FLAT_AGREEMENT = 0.99  # share of the GPU flat index's top-10 ids that the CPU flat index also returns
MIN_GRAPH_RECALL = 0.90    # recall@10 of the CAGRA-built HNSW (CPU plumbing: faiss's HNSW) vs exact search
SERVE_TIMEOUT_S = 240.0    # the application must be up (every replica placed and healthy) within this


class CheckFailed(Exception):
    """A path ran and its result is wrong (the message says how)."""


@dataclass
class PathResult:
    """One path's outcome: ``status`` ok / failed / skipped / running, why, how long, what it measured."""

    path: str
    status: str
    detail: str = ""
    seconds: float | None = None
    facts: dict = field(default_factory=dict)

    def line(self) -> str:
        """The path's one line on the terminal."""
        took = f" ({self.seconds:.1f} s)" if self.seconds is not None else ""
        return f"{self.path:<6} {self.status}{took}: {self.detail}"


def exit_code(results: list[PathResult]) -> int:
    """0: every path ok; 3: every path skipped for want of a CUDA device; 1: anything else."""
    if results and all(r.status == "skipped" and r.detail.startswith(NO_CUDA) for r in results):
        return EXIT_NO_CUDA
    return EXIT_OK if results and all(r.status == "ok" for r in results) else EXIT_FAILED


def cuda_devices() -> list[str]:
    """Names of the CUDA devices torch sees (empty without one, or without a CUDA build of torch)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # torch missing or a broken CUDA install: no usable device
        return []


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("torch", "ray", "deepspeed", "faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_report(out: Path, results: list[PathResult], *, mode: str, devices: list[str], started: float) -> None:
    """The JSON report (written again after each path; atomic rename, so a reader never sees half a file)."""
    payload = {"check": "gpu_check", "mode": mode, "host": socket.gethostname(), "cuda_devices": devices,
               "versions": _versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
               "seconds": round(time.time() - started, 1), "exit_code": exit_code(results),
               "paths": {r.path: asdict(r) for r in results}}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, out)


# --------------------------------------------------------------------------- shared inputs


@dataclass
class Inputs:
    """The tiny pieces every path uses, built once under ``work``."""

    work: Path
    cfg: object          # re2g.config.Re2GConfig (tiny preset)
    sample: Path
    passages: Path
    models: dict         # name -> save_pretrained directory
    tokenizer: str


def tiny_config(work: Path):
    """The tiny preset on the tiny sample task, its run directory under ``work``."""
    from re2g.config import load_config

    return load_config(preset="tiny", overrides=[f"run_dir={work / 'run'}", "data.sample.size=tiny",
                                                 "models.passage_max_length=64", "models.query_max_length=32"])


def prepare(work: Path) -> Inputs:
    """The tiny sample task, its passages (Ray Data; Ray must be connected) and untrained tiny models."""
    from re2g.data.passages import split_knowledge_source
    from re2g.data.sample import generate_sample
    from re2g.models.init import init_models

    cfg = tiny_config(work)
    sample = work / "sample"
    if not (sample / "knowledge_source.jsonl").exists():
        generate_sample(sample, cfg.data.sample, vocab_size=cfg.models.tiny.vocab_size, progress=False,
                        overwrite=True)
    passages = work / "passages"
    if not passages.exists():
        split_knowledge_source(str(sample / "knowledge_source.jsonl"), str(passages), cfg.passages)
    models = work / "models"
    done = {n: models / n for n in ("biencoder", "reranker", "generator")}
    if not all(p.exists() for p in done.values()):
        done = init_models(cfg.models, models, tokenizers_dir=sample / "tokenizers")
    return Inputs(work, cfg, sample, passages, {k: Path(v) for k, v in done.items()},
                  str(sample / "tokenizers" / "wordpiece"))


# --------------------------------------------------------------------------- (a) training


def check_train(inp: Inputs, gpu: bool, steps: int = 4) -> tuple[str, dict]:
    """A few DPR steps on one Ray Train worker (one GPU, bf16) through the project's loop; the saved
    model loads back in float32."""
    import math

    import torch

    from re2g.config import DeepSpeedConfig
    from re2g.data.provenance import PassageLocator
    from re2g.train.data import load_queries, to_dataset
    from re2g.train.deepspeed_config import resolve_precision
    from re2g.train.evaluate import DevSet
    from re2g.train.loop import LoopSpec, run_loop
    from re2g.train.plans import plan_dpr
    from re2g.train.stages import DPRStage, passage_lookup

    cfg = inp.cfg
    task = inp.sample / "tasks" / f"{cfg.train.task}-train-kilt.jsonl"
    lookup = passage_lookup(str(inp.passages))
    records, _ = load_queries(str(task), PassageLocator.from_store(lookup))
    if not records:
        raise CheckFailed(f"{task}: no training query matched a passage")
    batch = 8
    plan = plan_dpr(records, lookup, batch_size=batch, epochs=1, hard_negatives=0, sample_from_top=1, world=1,
                    grad_accum=1, max_steps=steps, seed=0)
    dev = DevSet([r.query for r in records[:4]], [r.positives for r in records[:4]], [r.pages for r in records[:4]])
    stage = DPRStage(cfg.models, inp.tokenizer, str(inp.passages), dev, 1e-3, eval_pool_size=64)
    ds_cfg = DeepSpeedConfig(zero_stage=cfg.train.deepspeed.zero_stage, precision="bf16")
    out = inp.work / "train" / f"run-{int(time.time())}"
    out.mkdir(parents=True, exist_ok=True)
    spec = LoopSpec(stage=stage, steps=plan.steps, micro_batch=batch, grad_accum=1, warmup_steps=0, deepspeed=ds_cfg,
                    use_gpu=gpu, log_every=1, checkpoint_every=10 ** 9, threads=None if gpu else 1,
                    metrics_path=str(out / "metrics.jsonl"))
    run = run_loop(spec, to_dataset(plan), num_workers=1, use_gpu=gpu, cpus_per_worker=1.0, max_failures=0,
                   storage=str(out / "ray"), name="gpu-check-dpr")
    logs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [x["loss"] for x in logs if "loss" in x]
    if not losses or not all(math.isfinite(v) for v in losses):
        raise CheckFailed(f"losses {losses} (want finite values; {out / 'metrics.jsonl'})")
    if run.checkpoint_dir is None or not Path(run.checkpoint_dir, "model").exists():
        raise CheckFailed(f"no checkpoint with a model ({run.storage})")
    model = stage.load(Path(run.checkpoint_dir, "model"))
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    if dtypes != ["float32"]:
        raise CheckFailed(f"the saved model loads as {dtypes}, want float32 (bf16 training should save float32)")
    torch.manual_seed(spec.seed)  # the loop builds its model after this seed: the weights before training
    before = dict(stage.build().named_parameters())
    moved = max(float((p.detach() - before[n].detach()).abs().max()) for n, p in model.named_parameters())
    if not moved > 0:
        raise CheckFailed("the saved weights equal the initial ones: no optimizer step reached the model")
    precision = resolve_precision(ds_cfg, gpu)
    facts = {"precision": precision, "zero_stage": ds_cfg.zero_stage, "steps": run.steps, "losses": losses,
             "saved_dtype": dtypes[0], "max_weight_change": moved, "train_seconds": round(run.seconds, 1), "use_gpu": gpu}
    return (f"{precision}, ZeRO-{ds_cfg.zero_stage}, 1 {'GPU' if gpu else 'CPU'} worker, {run.steps} steps, "
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, saved as float32"), facts


# --------------------------------------------------------------------------- (b) embedding


def check_embed(inp: Inputs, gpu: bool) -> tuple[str, dict]:
    """Ray Data embedding with one GPU per actor; its vectors match the float32 CPU loop's."""
    import numpy as np
    import pyarrow.dataset as pads

    from re2g.index.embed import embed_corpus, embed_corpus_local

    model = str(inp.models["biencoder"])
    out = inp.work / "embed"
    stats = embed_corpus(str(inp.passages), model, str(out / "ray"), batch_size=64, actors=1,
                         device="auto" if gpu else "cpu", threads_per_actor=None if gpu else 1, overwrite=True)
    want = "cuda" if gpu else "cpu"
    if stats.device != want:
        raise CheckFailed(f"the encoder actor ran on {stats.device}, want {want} (does Ray see the GPU? "
                          "ray.cluster_resources()['GPU'])")
    ref = embed_corpus_local(str(inp.passages), model, str(out / "cpu"), batch_size=64, device="cpu",
                             overwrite=True, progress=False)

    def vectors(path: str) -> dict:
        t = pads.dataset(path, format="parquet").to_table(columns=["pid", "vector"])
        return dict(zip(t.column("pid").to_pylist(), np.asarray(t.column("vector").to_pylist(), dtype=np.float32)))

    a, b = vectors(str(out / "ray")), vectors(str(out / "cpu"))
    if set(a) != set(b):
        raise CheckFailed(f"{len(a)} Ray Data vectors vs {len(b)} CPU vectors: different pids")
    pids = sorted(a)
    A, B = np.stack([a[p] for p in pids]), np.stack([b[p] for p in pids])  # (N, D) each
    cos = (A * B).sum(1) / np.maximum(np.linalg.norm(A, axis=1) * np.linalg.norm(B, axis=1), 1e-12)  # (N,)
    worst = float(cos.min())
    if worst < MIN_COSINE:
        raise CheckFailed(f"lowest cosine between the actor's and the float32 CPU vectors {worst:.4f} < {MIN_COSINE}")
    facts = {"device": stats.device, "passages": stats.passages, "dim": stats.dim, "seconds": stats.seconds,
             "cpu_loop_seconds": ref.seconds, "min_cosine_vs_cpu_fp32": round(worst, 5)}
    return (f"{stats.passages} passages on 1 {stats.device} actor in {stats.seconds:.1f} s, "
            f"cosine vs float32 CPU >= {worst:.4f}"), facts


# --------------------------------------------------------------------------- (c) faiss


def faiss_gpu_support() -> dict:
    """What the installed faiss offers on the GPU: ``gpus`` (``faiss.get_num_gpus()``, 0 for faiss-cpu),
    ``flat`` (``GpuIndexFlatIP``), ``cagra`` (``GpuIndexCagra`` and cuVS compiled in)."""
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    opts = faiss.get_compile_options() if hasattr(faiss, "get_compile_options") else ""
    return {"gpus": int(gpus), "flat": hasattr(faiss, "GpuIndexFlatIP"),
            "cagra": hasattr(faiss, "GpuIndexCagra") and "CUVS" in opts.upper(), "compile_options": opts}


def synthetic_vectors(n: int, nq: int, dim: int, seed: int = 0):
    """Clustered unit vectors (n, dim) and queries near them (nq, dim), float32 (a stand-in corpus)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((64, dim)).astype(np.float32)
    xb = centers[rng.integers(0, 64, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    xq = xb[rng.integers(0, n, nq)] + 0.1 * rng.standard_normal((nq, dim)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    return xb, xq


def top_k_agreement(ids_a, ids_b) -> float:
    """Mean share of each row of ``ids_a`` (nq, k) found in the same row of ``ids_b`` (recall@k of a vs b)."""
    import numpy as np

    ids_a, ids_b = np.asarray(ids_a), np.asarray(ids_b)
    k = ids_a.shape[1]
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ids_a, ids_b)]))


def check_faiss(gpu: bool, n: int = 20_000, nq: int = 200, dim: int = 64, k: int = 10) -> tuple[str, dict]:
    """A GPU flat index against the CPU flat index, and a CAGRA graph converted to HNSW (where cuVS is
    compiled in) against exact search. On the CPU (plumbing): a second CPU flat index and faiss's HNSW."""
    import faiss

    xb, xq = synthetic_vectors(n, nq, dim)
    exact = faiss.IndexFlatIP(dim)
    exact.add(xb)
    _, ref = exact.search(xq, k)  # (nq, k)
    facts: dict = {"vectors": n, "queries": nq, "dim": dim, "k": k}
    support = faiss_gpu_support()
    facts["support"] = {k_: v for k_, v in support.items() if k_ != "compile_options"}
    if gpu:
        if support["gpus"] < 1 or not support["flat"]:
            raise CheckFailed(f"the installed faiss has no GPU support (faiss.get_num_gpus() = {support['gpus']}): "
                              "install the `gpu` extra (faiss-gpu-cu12) instead of faiss-cpu")
        res = faiss.StandardGpuResources()
        device_index = faiss.GpuIndexFlatIP(res, dim)
        flat_kind = "GpuIndexFlatIP"
    else:
        res, device_index, flat_kind = None, faiss.IndexFlatIP(dim), "IndexFlatIP (cpu plumbing)"
    device_index.add(xb)
    _, ids = device_index.search(xq, k)
    agreement = top_k_agreement(ids, ref)
    facts.update(flat=flat_kind, flat_agreement=round(agreement, 4))
    if agreement < MIN_FLAT_AGREEMENT:
        raise CheckFailed(f"{flat_kind}'s top-{k} agrees with the CPU flat index's on {agreement:.3f} < "
                          f"{MIN_FLAT_AGREEMENT}")
    if gpu and support["cagra"]:
        cfg = faiss.GpuIndexCagraConfig()
        cfg.graph_degree, cfg.intermediate_graph_degree = 32, 64
        cagra = faiss.GpuIndexCagra(res, dim, faiss.METRIC_INNER_PRODUCT, cfg)
        cagra.train(xb)  # builds the graph on the GPU
        # the CAGRA graph as the base level of a CPU HNSW (an IndexHNSWCagra whose M fits the graph degree)
        graph = faiss.index_gpu_to_cpu(cagra)
        graph_kind = f"GpuIndexCagra -> {type(graph).__name__}"
        if not hasattr(graph, "hnsw"):
            raise CheckFailed(f"faiss.index_gpu_to_cpu(GpuIndexCagra) gave {type(graph).__name__}, not an HNSW index")
    else:
        graph = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        graph.add(xb)
        graph_kind = "IndexHNSWFlat (cpu plumbing)" if not gpu else None
    if graph_kind is None:  # a GPU build of faiss without cuVS: the flat comparison is the check
        facts["graph"] = "skipped: the installed faiss has no cuVS (no GpuIndexCagra)"
        return f"{flat_kind} top-{k} = CPU flat on {agreement:.1%}; CAGRA not available (faiss without cuVS)", facts
    graph.hnsw.efSearch = 128
    _, gids = graph.search(xq, k)
    recall = top_k_agreement(gids, ref)
    facts.update(graph=graph_kind, graph_recall_at_k=round(recall, 4), graph_ntotal=int(graph.ntotal))
    if int(graph.ntotal) != n:
        raise CheckFailed(f"{graph_kind} holds {graph.ntotal} vectors, want {n}")
    if recall < MIN_GRAPH_RECALL:
        raise CheckFailed(f"{graph_kind} recall@{k} {recall:.3f} < {MIN_GRAPH_RECALL} against exact search")
    return f"{flat_kind} top-{k} = CPU flat on {agreement:.1%}; {graph_kind} recall@{k} {recall:.3f}", facts


# --------------------------------------------------------------------------- (d) Serve


def make_serve_run(inp: Inputs, gpu: bool) -> tuple[Path, list[str]]:
    """A dense-only run directory (no BM25, so no Java) and the Serve overrides: the three model
    deployments on fractions of the one GPU (``num_gpus``), small CPU reservations."""
    from re2g.config import load_config, save_config
    from re2g.index.embed import embed_corpus_local
    from re2g.index.retrievers import build_indexes

    run = inp.work / "serve-run"
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    shutil.copytree(inp.passages, run / "passages")
    for name in ("biencoder", "reranker", "generator"):
        shutil.copytree(inp.models[name], run / "models" / name)
    cfg = load_config(preset="tiny", overrides=[f"run_dir={run}", "index.exact=true", "index.num_shards=1",
                                                "generation.num_beams=1", "generation.max_new_tokens=4"])
    save_config(cfg, run)
    embed_corpus_local(str(run / "passages"), str(run / "models" / "biencoder"), str(run / "embeddings"),
                       batch_size=64, device="cpu", progress=False)
    build_indexes(cfg, passages=str(run / "passages"), embeddings=str(run / "embeddings"),
                  dense_dir=str(run / "index" / "dense"), bm25_dir=None, use_ray=False)
    gpus = {"retriever": 0.25, "reranker": 0.25, "generator": 0.5} if gpu else {}
    overrides = ["serve.api_key_env=null", "serve.ingress.num_cpus=0.1", "serve.ingress.min_replicas=1",
                 "serve.ingress.max_replicas=1"]
    for name in ("retriever", "reranker", "generator"):
        overrides += [f"serve.{name}.num_cpus=0.1", f"serve.{name}.num_gpus={gpus.get(name, 0)}"]
    return run, overrides


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_serve(inp: Inputs, gpu: bool, query: str = "where was the author born?") -> tuple[str, dict]:
    """The Serve app with GPU fractions per model deployment answers ``/healthz`` (each on ``cuda``)
    and one ``POST /v1/answer``."""
    import httpx
    from ray import serve

    from serve.app import build_app
    from serve.proxy import start_serve

    run, overrides = make_serve_run(inp, gpu)
    port = _free_port()
    start_serve({"host": "127.0.0.1", "port": port})
    app = build_app({"run_dir": str(run), "overrides": overrides})
    error: list[BaseException] = []

    def deploy() -> None:
        try:
            serve.run(app, name="re2g-gpu-check", route_prefix="/")
        except BaseException as e:  # shown as the path's failure
            error.append(e)

    t0 = time.time()
    th = threading.Thread(target=deploy, daemon=True)
    th.start()
    th.join(SERVE_TIMEOUT_S)
    try:
        if th.is_alive():
            st = serve.status().applications.get("re2g-gpu-check")
            raise CheckFailed(f"the app was not running after {SERVE_TIMEOUT_S:.0f} s (status: "
                              f"{getattr(st, 'status', None)}; a replica asking for a GPU Ray cannot give?)")
        if error:
            raise CheckFailed(f"serve.run: {type(error[0]).__name__}: {error[0]}")
        up_s = time.time() - t0
        url = f"http://127.0.0.1:{port}"
        h = httpx.get(f"{url}/healthz", timeout=60)
        comps = h.json().get("components", {}) if h.headers.get("content-type", "").startswith("application/json") \
            else {}
        if h.status_code != 200:
            raise CheckFailed(f"/healthz {h.status_code}: {h.text[:300]}")
        want = "cuda" if gpu else "cpu"
        off = {k: c.get("detail") for k, c in comps.items() if not str(c.get("detail", "")).endswith(f"on {want}")}
        if off or not comps:
            raise CheckFailed(f"/healthz: components not on {want}: {off or comps}")
        r = httpx.post(f"{url}/v1/answer", json={"query": query}, timeout=120)
        if r.status_code != 200 or "answer" not in r.json():
            raise CheckFailed(f"POST /v1/answer {r.status_code}: {r.text[:300]}")
        body = r.json()
        facts = {"up_seconds": round(up_s, 1), "components": {k: c.get("detail") for k, c in comps.items()},
                 "num_gpus": {o.split("=")[0].split(".")[1]: float(o.split("=")[1])
                              for o in overrides if ".num_gpus=" in o},
                 "answer": body["answer"], "provenance": len(body.get("provenance", []))}
        return (f"app up in {up_s:.0f} s, retriever/reranker/generator on {want} "
                f"(num_gpus {'0.25/0.25/0.5' if gpu else '0'}), POST /v1/answer 200 "
                f"({len(body.get('provenance', []))} passages)"), facts
    finally:
        try:
            serve.shutdown()
        except Exception:  # shutting down after a failed start: nothing more to report
            pass


# --------------------------------------------------------------------------- driver

CHECKS: dict[str, Callable] = {"train": check_train, "embed": check_embed, "faiss": check_faiss,
                               "serve": check_serve}
ORDER = ("faiss", "embed", "train", "serve")  # cheapest first; no Ray for faiss


def run_path(name: str, fn: Callable[[], tuple[str, dict]], *, plumbing: bool) -> PathResult:
    """Run one path; a wrong result or an exception becomes a ``failed`` line with the reason."""
    t0 = time.time()
    try:
        detail, facts = fn()
        status = "ok"
        if plumbing:
            detail = f"(cpu plumbing) {detail}"
    except CheckFailed as e:
        status, detail, facts = "failed", str(e), {}
    except Exception as e:
        status, detail = "failed", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        facts = {"traceback": traceback.format_exc()[-4000:]}
    return PathResult(name, status, detail, round(time.time() - t0, 1), facts)


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description="Run the GPU paths once (train, embed, faiss, serve); one line each.")
    p.add_argument("--out", type=Path, default=Path("bench_out/gpu_check.json"), help="the JSON report")
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: <out dir>/gpu_check_work)")
    p.add_argument("--only", default=",".join(PATHS), help=f"comma-separated paths out of {','.join(PATHS)}")
    p.add_argument("--cpu", action="store_true", help="CPU plumbing run: the same paths without a GPU "
                   "(tests this script; proves nothing about a GPU)")
    args = p.parse_args(argv)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in only if x not in PATHS]
    if bad or not only:
        p.error(f"--only: unknown path(s) {bad or only}; choose from {', '.join(PATHS)}")
    return args, only


def main(argv: list[str] | None = None) -> int:
    args, only = parse_args(argv)
    started = time.time()
    mode = "cpu-plumbing" if args.cpu else "gpu"
    if args.cpu:  # before torch, Ray or DeepSpeed load: no GPU seen here or in Ray's workers
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["DS_ACCELERATOR"] = "cpu"
    devices = [] if args.cpu else cuda_devices()
    order = [p for p in ORDER if p in only]
    results: list[PathResult] = []
    if not args.cpu and not devices:
        results = [PathResult(p, "skipped", f"{NO_CUDA} (torch.cuda.is_available() is False)") for p in order]
        for r in results:
            print(r.line(), flush=True)
        write_report(args.out, results, mode=mode, devices=devices, started=started)
        print(f"-> {args.out}", flush=True)
        return exit_code(results)

    work = args.work or args.out.parent / "gpu_check_work"
    work.mkdir(parents=True, exist_ok=True)
    gpu = not args.cpu
    pending = {p: PathResult(p, "running") for p in order}

    def save() -> None:
        write_report(args.out, [pending[p] for p in order], mode=mode, devices=devices, started=started)

    print(f"gpu_check ({mode}): {', '.join(devices) or 'no GPU'}; work in {work}", flush=True)
    inputs: Inputs | None = None
    setup_error: str | None = None
    for name in order:
        save()
        if name != "faiss" and inputs is None and setup_error is None:
            try:
                from re2g.config import RayConfig
                from re2g.runtime import connect_ray

                connect_ray(RayConfig(num_gpus=None if gpu else 0), log_dir=work / "logs")
                inputs = prepare(work)
            except Exception as e:
                setup_error = f"set-up (Ray, tiny sample, passages, models) failed: {type(e).__name__}: {e}"
        if name == "faiss":
            res = run_path(name, lambda: check_faiss(gpu), plumbing=not gpu)
        elif setup_error is not None:
            res = PathResult(name, "failed", setup_error, 0.0)
        else:
            res = run_path(name, lambda n=name, i=inputs: CHECKS[n](i, gpu), plumbing=not gpu)
        pending[name] = res
        print(res.line(), flush=True)
    save()
    print(f"-> {args.out}", flush=True)
    return exit_code(list(pending.values()))


if __name__ == "__main__":
    sys.exit(main())
