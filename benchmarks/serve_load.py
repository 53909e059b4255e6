"""Load test of the Serve app: ``POST /v1/answer`` at concurrency 1, 4, 16, 32, with dynamic batching on
and off in the same run.

    python -m benchmarks.serve_load                      # a tiny run directory, built once under bench_out/cache/
    python -m benchmarks.serve_load --run-dir runs/quickstart --concurrency 1 8 32

A closed loop: ``c`` clients each send a request, wait for the answer, send the next; a level stops after
``--requests-per-client`` requests per client (at least ``--min-requests`` in all) or ``--max-seconds``,
whichever comes first. Loopback only (the app listens on 127.0.0.1). Batching is switched through the
deployments' ``user_config`` (``max_batch_size`` 1 = off): a live reconfiguration, the same replicas.

Writes ``<out>/serve_load.json`` (latency p50/p95/p99 and mean in ms, requests/s, errors, mean batch size
per stage, on/off ratios, machine, parameters) and ``<out>/serve_load.png``.
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


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from re2g.runtime import connect_ray

    connect_ray()                                  # Ray first (then the JVM, in the retriever replica)
    from ray import serve

    from serve.app import bind_app
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from serve.proxy import start_serve

    start_serve({"host": "127.0.0.1", "port": port})  # as `re2g serve` starts it (the resending proxy)
    url = f"http://127.0.0.1:{port}"
    app_name = "re2g-bench"
    results: dict = {"batching_on": [], "batching_off": []}
    batch_sizes: dict = {"batching_on": {}, "batching_off": {}}
    front: dict = {}
    t_start = time.time()
    try:
        for mode, batching in (("batching_on", True), ("batching_off", False)):
            cfg = resolve_config(run, overrides=overrides + [f"serve.batching={str(batching).lower()}"])
            preflight(run, cfg)
            serve.run(bind_app(str(run), cfg), name=app_name, route_prefix="/")
            asyncio.run(run_level(url, queries, 2, args.warmup, 60))
            if batching:
                front = asyncio.run(front_capacity(url, top, 10 * top))
                print(f"front door (GET /v1/info, c={top}): {front['req_per_s']} req/s", flush=True)
            for c in args.concurrency:
                before = asyncio.run(stage_stats(app_name))
                total = max(args.min_requests, c * args.requests_per_client)
                row = asyncio.run(run_level(url, queries, c, total, args.max_seconds))
                row["mean_batch_size"] = mean_batches(before, asyncio.run(stage_stats(app_name)))
                results[mode].append(row)
                batch_sizes[mode][c] = row["mean_batch_size"]
                print(f"{mode:13s} c={c:3d}  {row['ok']:4d} ok  {row['req_per_s']:7.2f} req/s  "
                      f"p50 {row['p50_ms']} ms  p95 {row['p95_ms']} ms  p99 {row['p99_ms']} ms  "
                      f"errors {row['errors']}  batch {row['mean_batch_size']}  server {row['server_mean_ms']}",
                      flush=True)
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
        }
    report = {
        "benchmark": "serve_load",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "params": {"run_dir": str(run), "concurrency": args.concurrency,
                   "requests_per_client": args.requests_per_client, "min_requests": args.min_requests,
                   "max_seconds": args.max_seconds, "max_batch_size_on": args.max_batch_size,
                   "batch_wait_s": args.batch_wait_s, "overrides": overrides, "endpoint": "POST /v1/answer",
                   "loopback": True},
        "results": results,
        "ratios": ratios,
        "front_door": front,
        "seconds": round(time.time() - t_start, 1),
        "notes": [
            "closed loop: each client waits for its answer before the next request",
            "batching off = max_batch_size 1 in every deployment (same replicas, live user_config change)",
            "mean_batch_size: requests per computed batch in each deployment during the level",
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
