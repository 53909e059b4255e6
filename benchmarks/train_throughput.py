"""Training throughput (examples/s) of stage 1 (DPR) with 1 and 2 Ray Train workers, in one run.

    python -m benchmarks.train_throughput [--steps 40] [--batch-size 16] [--zero 2] [--run-dir runs/bench_train]

Same data, model and DeepSpeed config for both; the global batch grows with the workers (data
parallel). examples/s is the mean of the loop's logged rates after the first log (start-up and the
first steps excluded). Writes bench_out/train_throughput.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path


def measure(cfg, inputs, workers: int, steps: int, log_every: int) -> dict:
    from re2g.train.data import plan_dpr, read_records, to_dataset
    from re2g.train.evaluate import DevSet
    from re2g.train.loop import LoopSpec, run_loop
    from re2g.train.stages import DPRStage, passage_lookup

    c = cfg.train.dpr
    lookup = passage_lookup(inputs.passages)
    records = read_records(inputs.negatives)
    epochs = max(1, math.ceil(steps * c.batch_size * workers / max(1, len(records))) + 1)
    plan = plan_dpr(records, lookup, batch_size=c.batch_size, epochs=epochs, hard_negatives=c.hard_negatives,
                    sample_from_top=c.sample_from_top, world=workers, grad_accum=1, max_steps=steps, seed=0)
    dev = DevSet([r.query for r in records[:4]], [r.positives for r in records[:4]], [r.pages for r in records[:4]])
    stage = DPRStage(cfg.models, inputs.tokenizer, inputs.passages, dev, c.lr)
    out = Path(inputs.work_dir) / "bench" / f"w{workers}-{int(time.time())}"
    out.mkdir(parents=True, exist_ok=True)
    spec = LoopSpec(stage=stage, steps=plan.steps, micro_batch=c.batch_size, grad_accum=1, warmup_steps=0,
                    deepspeed=cfg.train.deepspeed, use_gpu=bool(cfg.train.use_gpu), log_every=log_every,
                    checkpoint_every=10 ** 9, threads=max(1, int(cfg.train.cpus_per_worker)),
                    metrics_path=str(out / "metrics.jsonl"))
    run = run_loop(spec, to_dataset(plan), num_workers=workers, use_gpu=bool(cfg.train.use_gpu),
                   cpus_per_worker=cfg.train.cpus_per_worker, max_failures=0, storage=str(out / "ray"),
                   name=f"bench-w{workers}")
    logs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rates = [x["examples_per_s"] for x in logs[1:] if "examples_per_s" in x] or \
            [x["examples_per_s"] for x in logs if "examples_per_s" in x]
    return {"workers": workers, "steps": plan.steps, "global_batch": c.batch_size * workers,
            "examples_per_s": round(sum(rates) / max(1, len(rates)), 2), "wall_s": round(run.seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML config (default: the tiny preset on the tiny sample)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--run-dir", default="runs/bench_train")
    p.add_argument("--out", default="bench_out/train_throughput.json")
    args = p.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from re2g.config import load_config
    from re2g.runtime import connect_ray
    from re2g.train import api

    cfg = load_config(args.config, preset=None if args.config else "tiny", overrides=[
        f"run_dir={args.run_dir}", "data.sample.size=tiny", f"train.dpr.batch_size={args.batch_size}",
        f"train.deepspeed.zero_stage={args.zero}", *args.overrides])
    connect_ray(cfg.ray)
    inputs = api.prepare_inputs(cfg)
    api.mine(cfg, inputs)
    rows = [measure(cfg, inputs, w, args.steps, max(2, args.steps // 8)) for w in (1, 2)]
    ratio = rows[1]["examples_per_s"] / rows[0]["examples_per_s"] if rows[0]["examples_per_s"] else float("nan")
    import os

    result = {"benchmark": "train_throughput", "stage": "dpr", "zero_stage": args.zero,
              "cpus": os.cpu_count(), "cpus_per_worker": cfg.train.cpus_per_worker, "runs": rows,
              "speedup_2_over_1": round(ratio, 3)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    t = Table(title=f"DPR training throughput (ZeRO-{args.zero})")
    for col in ("workers", "steps", "global batch", "examples/s", "wall s"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["workers"]), str(r["steps"]), str(r["global_batch"]), f"{r['examples_per_s']:.1f}",
                  f"{r['wall_s']:.1f}")
    Console().print(t)
    Console().print(f"2 workers / 1 worker: {ratio:.2f}x  -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
