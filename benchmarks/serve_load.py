"""Load test of the Serve app: ``POST /v1/answer`` at concurrency 1, 4, 16, 32, with dynamic batching on
and off in the same run, and where a request's time goes.

    python -m benchmarks.serve_load                      # a tiny run directory, built once under bench_out/cache/
    python -m benchmarks.serve_load --run-dir runs/quickstart --concurrency 1 4 16 32

A closed loop: ``c`` clients each send a request, wait for the answer, send the next; a level stops after
``--requests-per-client`` requests per client (at least ``--min-requests`` in all) or ``--max-seconds``,
whichever comes first. Loopback only (the app listens on 127.0.0.1). Batching is ``serve.batching``:
on, the ingress coalesces concurrent requests' stage calls (``serve.app.Coalescer``) and the model
deployments batch what reaches them one by one (``@serve.batch``); off, every call goes alone
(``max_batch_size`` 1). Each level runs on and off back to back (the app is redeployed when the mode
changes, so the order alternates between levels).

Where the time goes, two ways:

* ``stage_profile`` (before Serve starts, in this process, 1 torch thread as a replica has): CPU
  milliseconds per query of every piece of the three stages (tokenization, encoders, faiss, BM25, beam
  search, rescoring, pickling the stage's output as a handle call does), for ``--profile-batch`` queries
  one by one and as one batch;
* per level, CPU milliseconds per answered request of every process of this Ray instance, grouped by
  hop (client, Serve's HTTP proxy, ingress, the three model replicas, controller, Ray's own processes),
  and the replicas' compute milliseconds per request and mean batch size.

Writes ``<out>/serve_load.json`` (latency p50/p95/p99 and mean in ms, requests/s, errors, mean batch size
per stage, CPU per hop, on/off ratios, the stage profile, machine, parameters) and ``<out>/serve_load.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

RUN_OVERRIDES = ["index.exact=true", "index.num_shards=2", "generation.num_beams=2", "generation.max_new_tokens=6"]
STAGES = ("Retriever", "Reranker", "Generator")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run-dir", type=Path, default=None, help="serve this run directory (default: a tiny one, "
                   "built once under <out>/cache/serve_run)")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="where serve_load.json/.png go")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--min-requests", type=int, default=16)
    p.add_argument("--max-seconds", type=float, default=30.0, help="time cap per concurrency level")
    p.add_argument("--warmup", type=int, default=4, help="requests before each mode (not measured)")
    p.add_argument("--max-batch-size", type=int, default=16, help="dynamic batching: batch size when on")
    p.add_argument("--batch-wait-s", type=float, default=0.01, help="dynamic batching: wait for a batch when on")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    p.add_argument("--profile-batch", type=int, default=16, help="stage profile: queries one by one vs one "
                   "batch of this many (0: no stage profile)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- the run directory


def tiny_run_dir(cache: Path) -> Path:
    """A tiny run directory (sample task, passages, untrained tiny models, exact dense index + BM25),
    built once and reused."""
    run = cache / "serve_run" / "run"
    done = run.parent / "complete"
    if done.exists():
        return run
    from re2g.config import PassageConfig, SampleConfig, load_config, save_config
    from re2g.data.passages import split_knowledge_source
    from re2g.data.sample import generate_sample
    from re2g.index.embed import embed_corpus_local
    from re2g.index.retrievers import build_indexes
    from re2g.models.init import init_models

    if run.parent.exists():
        shutil.rmtree(run.parent)
    sample = run.parent / "sample"
    generate_sample(sample, SampleConfig(size="tiny"), progress=False)
    split_knowledge_source(str(sample / "knowledge_source.jsonl"), str(run / "passages"), PassageConfig())
    init_models(load_config(preset="tiny").models, run / "models", tokenizers_dir=sample / "tokenizers")
    cfg = load_config(preset="tiny", overrides=RUN_OVERRIDES + [f"run_dir={run}"])
    save_config(cfg, run)
    embed_corpus_local(str(run / "passages"), str(run / "models" / "biencoder"), str(run / "embeddings"),
                       batch_size=64, progress=False)
    build_indexes(cfg, passages=str(run / "passages"), embeddings=str(run / "embeddings"),
                  dense_dir=str(run / "index" / "dense"), bm25_dir=str(run / "index" / "bm25"), use_ray=False)
    done.touch()
    return run


def load_queries(run: Path, n: int = 64) -> list[str]:
    """Dev queries of the sample task next to the run (else made-up ones)."""
    for f in sorted(run.parent.glob("**/tasks/*-dev-kilt.jsonl")) + sorted(run.glob("**/tasks/*-dev-kilt.jsonl")):
        rows = [json.loads(line)["input"] for line in f.open() if line.strip()]
        if rows:
            return rows[:n]
    return [f"query number {i} about the knowledge source" for i in range(n)]


# --------------------------------------------------------------------------- load generation


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]) of ``xs``; None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


async def run_level(url: str, queries: list[str], concurrency: int, total: int, max_seconds: float) -> dict:
    """``concurrency`` closed-loop clients, ``total`` requests at most, ``max_seconds`` at most."""
    import httpx

    latencies: list[float] = []
    server: dict[str, list[float]] = {"retrieve": [], "rerank": [], "generate": [], "total": []}
    errors: dict[str, int] = {}
    issued = 0
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(ac: httpx.AsyncClient, k: int) -> None:
        nonlocal issued
        while issued < total and time.perf_counter() < deadline:
            q = queries[issued % len(queries)]
            issued += 1
            t0 = time.perf_counter()
            try:
                r = await ac.post(url + "/v1/answer", json={"query": q})
                code = str(r.status_code)
            except httpx.HTTPError as e:
                code = type(e).__name__
            if code == "200":
                latencies.append(time.perf_counter() - t0)
                for k, v in r.json()["timings"].items():
                    if v is not None and k in server:
                        server[k].append(v * 1000)
            else:
                errors[code] = errors.get(code, 0) + 1

    async with httpx.AsyncClient(timeout=120, limits=limits) as ac:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(ac, k) for k in range(concurrency)))
        elapsed = time.perf_counter() - t0
    ms = [x * 1000 for x in latencies]
    return {"concurrency": concurrency, "requests": len(latencies) + sum(errors.values()), "ok": len(latencies),
            "errors": errors, "seconds": round(elapsed, 3),
            "req_per_s": round(len(latencies) / elapsed, 3) if elapsed > 0 else None,
            "p50_ms": _r(percentile(ms, 50)), "p95_ms": _r(percentile(ms, 95)), "p99_ms": _r(percentile(ms, 99)),
            "mean_ms": _r(statistics.fmean(ms) if ms else None),
            # where the time goes, as the ingress measured it (queueing and batching waits included);
            # client mean - server total mean = proxy + waiting to enter the ingress
            "server_mean_ms": {k: _r(statistics.fmean(v) if v else None) for k, v in server.items()}}


def _r(x):
    return None if x is None else round(x, 1)


async def front_capacity(url: str, concurrency: int, total: int) -> dict:
    """Requests/s of ``GET /v1/info`` (proxy + ingress, no model): the front door's capacity here."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    done = 0

    async def client(ac):
        nonlocal done
        while done < total:
            done += 1
            await ac.get(url + "/v1/info")

    async with httpx.AsyncClient(timeout=60, limits=limits) as ac:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(ac) for _ in range(concurrency)))
        dt = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": total, "req_per_s": round(total / dt, 1)}


async def stage_stats(app_name: str) -> dict:
    """Batches and requests each model deployment computed so far (one replica each here)."""
    from ray import serve

    out = {}
    for name in STAGES:
        h = serve.get_deployment_handle(name, app_name=app_name)
        out[name] = await h.stats.remote()
    return out


def mean_batches(before: dict, after: dict) -> dict:
    out = {}
    for name in STAGES:
        b = after[name]["batches"] - before[name]["batches"]
        n = after[name]["items"] - before[name]["items"]
        out[name] = round(n / b, 2) if b else None
    return out


# --------------------------------------------------------------------------- where the time goes


class _Timers:
    """CPU seconds (``time.process_time``: every thread of this process, the JVM's included) spent in
    wrapped callables, by label; wrappers are removed by :meth:`restore`."""

    def __init__(self):
        self.cpu: dict[str, float] = {}
        self._undo: list = []

    def wrap(self, obj, name: str, label: str) -> None:
        f = getattr(obj, name)

        def timed(*a, **k):
            t0 = time.process_time()
            try:
                return f(*a, **k)
            finally:
                self.cpu[label] = self.cpu.get(label, 0.0) + time.process_time() - t0

        self._undo.append((obj, name, obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else _MISSING))
        setattr(obj, name, timed)

    def restore(self) -> None:
        for obj, name, old in reversed(self._undo):
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        self._undo.clear()


_MISSING = object()


def stage_profile(run: Path, cfg, queries: list[str], batch: int) -> dict:
    """CPU ms per query of each stage and of its pieces, for ``batch`` queries one by one and as one batch
    (in this process, 1 torch thread, the in-process pipeline the deployments wrap). ``pickle`` is a
    pickle round trip of the stage's output: what a DeploymentHandle call adds for it."""
    import pickle

    import torch

    import re2g.models.decoding as decoding
    from re2g.pipeline import Re2GPipeline

    torch.set_num_threads(1)
    pipe = Re2GPipeline.from_run_dir(run, cfg, device="cpu")
    qs = (queries * (batch // max(1, len(queries)) + 1))[:batch]
    t = _Timers()
    dense, bm25 = pipe.retriever.dense, pipe.retriever.bm25   # the stage's parts (either may be None)
    if dense is not None:
        t.wrap(dense.query_encoder, "embed_queries", "retrieve: query encoder (tokenize + forward)")
        t.wrap(dense.index, "search_vectors", "retrieve: faiss search + passage lookup")
    if bm25 is not None:
        t.wrap(bm25, "batch_search", "retrieve: BM25 (Lucene + hits)")
    t.wrap(pipe.reranker.model, "tokenize", "rerank: tokenize pairs (+ exact-match types)")
    t.wrap(pipe.reranker.model.model, "forward", "rerank: cross-encoder forward")
    g = pipe.generator.model
    t.wrap(g, "tokenize_sources", "generate: tokenize sources")
    t.wrap(g, "tokenize_targets", "generate: tokenize candidates")
    for name, label in (("encode_sources", "generate: encoder (incl. tokenize sources)"),
                        ("beam_search", "generate: beam search (incl. detokenize)"),
                        ("score_targets", "generate: rescoring, decoder only (incl. tokenize candidates)")):
        if hasattr(decoding, name):
            t.wrap(decoding, name, label)
    try:
        pipe.answer_batch(qs[:2])                               # warm: JVM, faiss, first calls
        hits = pipe.retrieve(qs)
        reranked = pipe.rerank(qs, hits)
        stages = (("retrieve", pipe.retrieve, (qs,)), ("rerank", pipe.rerank, (qs, hits)),
                  ("generate", pipe.generate, (qs, reranked)))
        out: dict = {"batch": batch, "torch_threads": 1, "unit": "CPU ms per query", "stages": {}}
        for stage, fn, args in stages:
            for i in range(batch):                             # warm (the JVM's JIT above all), not timed
                fn(*[a[i:i + 1] for a in args])
            fn(*args)
            row: dict = {}
            for mode in ("one_by_one", "batch"):
                t.cpu.clear()
                t0 = time.process_time()
                if mode == "one_by_one":
                    results = [fn(*[a[i:i + 1] for a in args])[0] for i in range(batch)]
                else:
                    results = fn(*args)
                total = time.process_time() - t0
                t1 = time.process_time()
                for x in results:
                    pickle.loads(pickle.dumps(x))
                pk = time.process_time() - t1
                pieces = {k: round(v / batch * 1000, 2) for k, v in t.cpu.items() if k.startswith(stage)}
                pieces[f"{stage}: pickle round trip of the output"] = round(pk / batch * 1000, 2)
                row[mode] = {"total": round(total / batch * 1000, 2), "pieces": pieces}
            row["one_by_one_over_batch"] = round(row["one_by_one"]["total"] / row["batch"]["total"], 2) \
                if row["batch"]["total"] else None
            out["stages"][stage] = row
        one = sum(v["one_by_one"]["total"] for v in out["stages"].values())
        bat = sum(v["batch"]["total"] for v in out["stages"].values())
        out["all_stages"] = {"one_by_one": round(one, 2), "batch": round(bat, 2),
                             "one_by_one_over_batch": round(one / bat, 2) if bat else None}
        return out
    finally:
        t.restore()
        close = getattr(bm25, "close", None)
        if close is not None:
            close()


HOPS = ("client", "proxy", "ingress", "Retriever", "Reranker", "Generator", "controller", "ray")


def _hop(title: str, is_me: bool) -> str:
    if is_me:
        return "client"                     # the load generator (and the Ray driver's threads)
    if "ProxyActor" in title:
        return "proxy"
    if "ServeController" in title:
        return "controller"
    if "ServeReplica" in title:
        for name in ("Ingress", "Retriever", "Reranker", "Generator"):
            if title.rstrip().endswith(name) or f":{name}" in title:
                return "ingress" if name == "Ingress" else name
    return "ray"                            # gcs, raylet, idle workers, dashboard agents, shard actors


def cpu_by_hop() -> dict[str, float]:
    """CPU seconds so far of this process and every process under it (this Ray instance), by hop."""
    import psutil

    me = psutil.Process()
    out = {h: 0.0 for h in HOPS}
    for p in [me] + me.children(recursive=True):
        try:
            c = p.cpu_times()
            title = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        out[_hop(title, p.pid == me.pid)] += c.user + c.system
    return out


# --------------------------------------------------------------------------- main


def machine() -> dict:
    from importlib import metadata

    def v(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "loadavg_at_start": load, "ray": v("ray"), "torch": v("torch"), "transformers": v("transformers")}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, color in (("batching_on", "tab:blue"), ("batching_off", "tab:orange")):
        rows = results[mode]
        c = [r["concurrency"] for r in rows]
        label = mode.replace("_", " ")
        a1.plot(c, [r["req_per_s"] or 0 for r in rows], "o-", color=color, label=label)
        a2.plot(c, [r["p50_ms"] or 0 for r in rows], "o-", color=color, label=f"{label}: p50")
        a2.plot(c, [r["p95_ms"] or 0 for r in rows], "s--", color=color, alpha=0.6, label=f"{label}: p95")
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(c, [str(x) for x in c])
        ax.set_xlabel("concurrent clients")
        ax.grid(alpha=0.3)
        ax.legend()
    a1.set_ylabel("answers / s")
    a1.set_title("throughput, POST /v1/answer")
    a2.set_ylabel("latency (ms)")
    a2.set_title("latency")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _profile_in_subprocess(run: Path, cfg, queries: list[str], batch: int) -> dict:
    """:func:`stage_profile` in a fresh process, without Ray (its JVM and torch settings stay out of
    this one)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(stage_profile, run, cfg, queries, batch).result()


def _level(url: str, app_name: str, queries: list[str], c: int, total: int, max_seconds: float) -> dict:
    before, cpu0 = asyncio.run(stage_stats(app_name)), cpu_by_hop()
    row = asyncio.run(run_level(url, queries, c, total, max_seconds))
    after, cpu1 = asyncio.run(stage_stats(app_name)), cpu_by_hop()
    ok = max(1, row["ok"])
    row["mean_batch_size"] = mean_batches(before, after)
    row["compute_ms_per_request"] = {
        n: _r((after[n]["compute_s"] - before[n]["compute_s"]) * 1000 / ok) for n in STAGES}
    row["cpu_ms_per_request"] = {h: _r((cpu1[h] - cpu0[h]) * 1000 / ok) for h in HOPS}
    row["cpu_ms_per_request"]["all"] = _r(sum(cpu1[h] - cpu0[h] for h in HOPS) * 1000 / ok)
    return row


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from re2g.runtime import connect_ray

    connect_ray()                                  # Ray first (then the JVM, in the retriever replica)
    from serve.components import preflight, resolve_config

    args.out.mkdir(parents=True, exist_ok=True)
    run = (args.run_dir or tiny_run_dir(args.out / "cache")).resolve()
    queries = load_queries(run)
    top = max(args.concurrency)
    overrides = [
        # admit every client: no 503 in a measurement
        f"serve.ingress.max_ongoing_requests={max(64, 2 * top)}", f"serve.ingress.max_queued_requests={4 * top}",
        "serve.api_key_env=null", "serve.request_timeout_s=120",
    ]
    for d in ("retriever", "reranker", "generator"):
        overrides += [f"serve.{d}.max_ongoing_requests={max(top, args.max_batch_size)}",
                      f"serve.{d}.max_queued_requests={4 * top}", f"serve.{d}.max_batch_size={args.max_batch_size}",
                      f"serve.{d}.batch_wait_timeout_s={args.batch_wait_s}"]
    overrides += list(args.overrides)
    cfg = resolve_config(run, overrides=overrides)
    preflight(run, cfg)
    t_start = time.time()
    profile = None
    if args.profile_batch > 0:
        profile = _profile_in_subprocess(run, cfg, queries, args.profile_batch)
        for stage, row in profile["stages"].items():
            print(f"profile {stage:9s} CPU ms/query: one by one {row['one_by_one']['total']:7.2f}  "
                  f"batch of {args.profile_batch} {row['batch']['total']:7.2f}  "
                  f"({row['one_by_one_over_batch']}x)", flush=True)

    from ray import serve

    from serve.app import bind_app
    from serve.proxy import start_serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_serve({"host": "127.0.0.1", "port": port})  # as `re2g serve` starts it (the resending proxy)
    url = f"http://127.0.0.1:{port}"
    app_name = "re2g-bench"
    modes = (("batching_on", True), ("batching_off", False))
    results: dict = {m: [] for m, _ in modes}
    front: dict = {}
    deployed = None
    try:
        for i, c in enumerate(args.concurrency):
            # on and off back to back at each level (the order alternates, so the app is redeployed only
            # when the mode changes: serve.run replaces the replicas)
            for mode, batching in (modes if i % 2 == 0 else modes[::-1]):
                if deployed != mode:
                    mode_cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"batching": batching})})
                    serve.run(bind_app(str(run), mode_cfg), name=app_name, route_prefix="/")
                    deployed = mode
                asyncio.run(run_level(url, queries, 2, args.warmup, 60))
                if not front and batching:
                    front = asyncio.run(front_capacity(url, top, 10 * top))
                    print(f"front door (GET /v1/info, c={top}): {front['req_per_s']} req/s", flush=True)
                total = max(args.min_requests, c * args.requests_per_client)
                row = _level(url, app_name, queries, c, total, args.max_seconds)
                results[mode].append(row)
                print(f"{mode:13s} c={c:3d}  {row['ok']:4d} ok  {row['req_per_s']:7.2f} req/s  "
                      f"p50 {row['p50_ms']} ms  p95 {row['p95_ms']} ms  p99 {row['p99_ms']} ms  "
                      f"errors {row['errors']}  batch {row['mean_batch_size']}  "
                      f"CPU ms/request {row['cpu_ms_per_request']}", flush=True)
    finally:
        serve.shutdown()

    ratios = {}
    for on, off in zip(results["batching_on"], results["batching_off"]):
        c = on["concurrency"]
        ratios[str(c)] = {
            "throughput_on_over_off": round(on["req_per_s"] / off["req_per_s"], 3)
            if on["req_per_s"] and off["req_per_s"] else None,
            "p50_off_over_on": round(off["p50_ms"] / on["p50_ms"], 3) if on["p50_ms"] and off["p50_ms"] else None,
            "p95_off_over_on": round(off["p95_ms"] / on["p95_ms"], 3) if on["p95_ms"] and off["p95_ms"] else None,
            "cpu_per_request_off_over_on": round(off["cpu_ms_per_request"]["all"] / on["cpu_ms_per_request"]["all"], 3)
            if on["cpu_ms_per_request"]["all"] and off["cpu_ms_per_request"]["all"] else None,
        }
    report = {
        "benchmark": "serve_load",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "params": {"run_dir": str(run), "concurrency": args.concurrency,
                   "requests_per_client": args.requests_per_client, "min_requests": args.min_requests,
                   "max_seconds": args.max_seconds, "max_batch_size_on": args.max_batch_size,
                   "batch_wait_s": args.batch_wait_s, "overrides": overrides, "endpoint": "POST /v1/answer",
                   "loopback": True, "profile_batch": args.profile_batch},
        "results": results,
        "ratios": ratios,
        "front_door": front,
        "stage_profile": profile,
        "seconds": round(time.time() - t_start, 1),
        "notes": [
            "closed loop: each client waits for its answer before the next request",
            "batching on = serve.batching: the ingress coalesces concurrent requests' stage calls into one "
            "call per batch, and the model deployments batch single calls (@serve.batch); off = every call "
            "alone (max_batch_size 1); each level runs on and off back to back",
            "mean_batch_size: requests per computed batch in each deployment during the level",
            "compute_ms_per_request: the replicas' compute seconds (a batch's time shared by its requests)",
            "cpu_ms_per_request: CPU time of every process of this Ray instance by hop, per answered request "
            "(client = this process: the load generator and the Ray driver)",
            "stage_profile: CPU ms per query in one process with 1 torch thread, one by one vs one batch",
            "the load generator shares the machine's CPUs with the replicas",
        ],
    }
    (args.out / "serve_load.json").write_text(json.dumps(report, indent=2))
    plot(results, args.out / "serve_load.png")
    print(json.dumps(ratios, indent=2))
    print(f"wrote {args.out / 'serve_load.json'} and {args.out / 'serve_load.png'}")
    return report


if __name__ == "__main__":
    main()
