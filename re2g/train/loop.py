"""The one training loop of every stage: Ray Train ``TorchTrainer`` + ``deepspeed.initialize``.

Each worker builds the stage's model(s) (same seed everywhere; DeepSpeed also broadcasts rank 0's
weights), wraps them with DeepSpeed (ZeRO stage, precision, accumulation and clipping from our
config; AdamW + warmup/linear-decay ``LambdaLR``), and reads its own part of the planned
micro-batches from its Ray Data shard. Every ``log_every`` steps it reports loss, learning rate and
examples/s (rank 0 also prints a progress line, which Ray's log keeps, and appends to
``metrics.jsonl`` / TensorBoard when installed; the driver shows the stage's progress from
``metrics.jsonl``, ``re2g.progress.track_training``); at ``checkpoint_every`` steps and at the end every
rank writes its DeepSpeed state and rank 0 the models as ``save_pretrained`` directories, reported
together as one checkpoint. On a restart (``FailureConfig``) the workers load the latest checkpoint:
step counter, optimizer, scheduler and data position (micro-batches consumed) are restored.

Checkpoint layout::

    checkpoint_xxxxxx/
      model/          the stage's save_pretrained directory (or directories)
      deepspeed/      DeepSpeed engine state (tag "state"), one optimizer partition per rank
      state.json      step, micro-batches consumed, examples, metrics
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from re2g.config import DeepSpeedConfig

DS_TAG = "state"


@dataclass
class LoopSpec:
    """Everything a worker needs (shipped to every worker in ``train_loop_config``)."""

    stage: Any
    steps: int
    micro_batch: int
    grad_accum: int
    warmup_steps: int
    deepspeed: DeepSpeedConfig
    use_gpu: bool = False
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int | None = None
    eval_every: int | None = None
    threads: int | None = None
    metrics_path: str | None = None
    tensorboard_dir: str | None = None
    fail_once_at_step: int | None = None  # testing: raise once (rank 0) at this step
    fail_marker: str | None = None
    extra: dict = field(default_factory=dict)


class MetricsLog:
    """Appends metrics to a jsonl file and, when ``tensorboard`` is installed, to TensorBoard."""

    def __init__(self, path: str | None, tb_dir: str | None):
        self.path = path
        self.tb = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        if tb_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(tb_dir)
            except Exception:  # tensorboard not installed: the jsonl log is the record
                self.tb = None

    def write(self, step: int, metrics: dict) -> None:
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()


def _gathered(module, zero_stage: int):
    """All parameters materialized on every rank (ZeRO-3 partitions them); collective."""
    if zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    return nullcontext()


def _mean_across(value: float, device) -> float:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def train_loop(config: dict) -> None:
    """The Ray Train worker function (``TorchTrainer(train_loop, train_loop_config={"spec": ...})``)."""
    from re2g.runtime import quiet_env

    quiet_env()
    # DeepSpeed's accelerator follows the run, not what the process sees: Ray 2.60 leaves a node's GPUs
    # visible to a worker that reserved none, and a GPU worker may inherit DS_ACCELERATOR=cpu from a CPU driver
    os.environ["DS_ACCELERATOR"] = "cuda" if config["spec"].use_gpu else "cpu"
    import deepspeed
    import ray.train
    import torch

    from re2g.train.deepspeed_config import WarmupLinearDecay, build_deepspeed_config, resolve_precision
    from re2g.train.saved_dtype import upcast_saved_weights

    spec: LoopSpec = config["spec"]
    stage = spec.stage
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if spec.use_gpu:
        from ray.train.torch import get_device

        device = get_device()
    else:
        device = torch.device("cpu")

    torch.manual_seed(spec.seed)
    module = stage.build().to(device)
    optimizer = torch.optim.AdamW(stage.param_groups(module))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupLinearDecay(spec.warmup_steps, spec.steps))
    ds_config = build_deepspeed_config(spec.deepspeed, micro_batch=spec.micro_batch, grad_accum=spec.grad_accum,
                                       world_size=world, use_gpu=spec.use_gpu)
    engine, _, _, scheduler = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    model = engine.module
    zero = spec.deepspeed.zero_stage

    state = {"rows_done": 0, "examples": 0, "restarts": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(os.path.join(d, "deepspeed"), tag=DS_TAG)
            state.update(json.loads(Path(d, "state.json").read_text())["state"])
        state["restarts"] += 1
        if rank == 0:
            print(f"[{stage.name}] resumed from step {engine.global_steps} "
                  f"({state['rows_done']} micro-batches consumed)", flush=True)

    log = MetricsLog(spec.metrics_path, spec.tensorboard_dir) if rank == 0 else MetricsLog(None, None)
    shard = ray.train.get_dataset_shard("train")
    ckpt_every = spec.checkpoint_every
    rows_seen = 0
    losses: list[float] = []
    t_last, ex_last = time.time(), state["examples"]
    last_reported = -1
    from re2g.train.plans import decode_batch

    def checkpoint_and_report(step: int, metrics: dict, with_ckpt: bool) -> None:
        nonlocal last_reported
        last_reported = step
        if not with_ckpt:
            ray.train.report(metrics)
            return
        tmp = tempfile.mkdtemp(prefix=f"re2g-{stage.name}-ckpt-")
        try:
            engine.save_checkpoint(os.path.join(tmp, "deepspeed"), tag=DS_TAG)
            with _gathered(model, zero):
                if rank == 0:
                    stage.save(model, os.path.join(tmp, "model"))
                    if resolve_precision(spec.deepspeed, spec.use_gpu) != "fp32":  # bf16 module: saved float32
                        upcast_saved_weights(os.path.join(tmp, "model"))
            if rank == 0:
                Path(tmp, "state.json").write_text(json.dumps({"step": step, "state": state, "metrics": metrics}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def evaluate(final: bool) -> dict:
        out: dict = {}
        # ZeRO-3: every rank runs the same evaluation (same dev data, same weights) in lockstep, as each
        # forward gathers its partitioned parameters collectively; rank 0 alone waited forever in the
        # first all-gather (seen with a causal reader's generate). Other stages: rank 0, parameters gathered.
        lockstep = zero == 3
        with nullcontext() if lockstep else _gathered(model, zero):
            if rank == 0 or lockstep:
                was = model.training
                model.eval()
                try:
                    metrics = stage.evaluate(model)
                    probe = stage.probe(model) if final else None
                finally:
                    model.train(was)
                if rank == 0:
                    out.update(metrics)
                    if probe is not None:
                        out["probe"] = probe
        return out

    model.train()
    for row in shard.iter_rows():
        if rows_seen < state["rows_done"]:  # data position restored: skip what was consumed
            rows_seen += 1
            continue
        if engine.global_steps >= spec.steps:
            break
        batch = decode_batch(row)
        loss, n = stage.loss(model, batch)
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        rows_seen += 1
        state["rows_done"] = rows_seen
        state["examples"] += n
        losses.append(float(loss.detach()))
        if not boundary:
            continue
        step = engine.global_steps
        if (spec.fail_once_at_step == step and rank == 0 and spec.fail_marker
                and not os.path.exists(spec.fail_marker)):
            Path(spec.fail_marker).write_text(str(step))
            raise RuntimeError(f"injected failure at step {step} (testing resume)")
        final = step >= spec.steps
        do_eval = final or bool(spec.eval_every and step % spec.eval_every == 0)
        do_ckpt = final or bool(ckpt_every and step % ckpt_every == 0)
        if not (do_eval or do_ckpt or step % spec.log_every == 0):
            continue
        now = time.time()
        ex_s = (state["examples"] - ex_last) * world / max(now - t_last, 1e-9)
        metrics = {"step": step, "epoch_fraction": round(step / spec.steps, 4),
                   "loss": round(_mean_across(sum(losses) / max(len(losses), 1), device), 6),
                   "lr": float(scheduler.get_last_lr()[0]), "examples_per_s": round(ex_s, 2),
                   "examples": state["examples"] * world, "restarts": state["restarts"]}
        losses.clear()
        if do_eval:
            metrics.update(evaluate(final))
        if rank == 0:
            shown = {k: v for k, v in metrics.items() if k != "probe"}
            print(f"[{stage.name}] step {step}/{spec.steps} " + " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items() if k != "step"),
                flush=True)
            log.write(step, shown)
        checkpoint_and_report(step, metrics, do_ckpt)
        t_last, ex_last = time.time(), state["examples"]
    if last_reported < 0:  # resumed at the end (nothing left to do): report the final state again
        step = engine.global_steps
        metrics = {"step": step, "restarts": state["restarts"], **evaluate(True)}
        checkpoint_and_report(step, metrics, True)


# --------------------------------------------------------------------------- driver side


@dataclass
class StageRun:
    """What a finished Ray Train run left: the final checkpoint and its metrics."""

    checkpoint_dir: str | None
    metrics: dict
    steps: int
    seconds: float
    storage: str

    def to_dict(self) -> dict:
        return {"checkpoint_dir": self.checkpoint_dir, "metrics": self.metrics, "steps": self.steps,
                "seconds": round(self.seconds, 2), "storage": self.storage}


def run_loop(spec: LoopSpec, dataset, *, num_workers: int, use_gpu: bool, cpus_per_worker: float,
             max_failures: int, storage: str, name: str, keep_checkpoints: int = 2) -> StageRun:
    """Run :func:`train_loop` on ``num_workers`` Ray Train workers over ``dataset`` (rows are
    micro-batches; each worker gets an equal share). The caller has connected to Ray."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=str(Path(storage).absolute()),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints)),
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    from re2g.progress import track_training

    t0 = time.time()
    with track_training(spec.stage.name, spec.steps, spec.metrics_path):  # the driver's bar from metrics.jsonl
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    seconds = time.time() - t0
    ckpt = result.checkpoint
    metrics = dict(result.metrics or {})  # Ray Train V2: None when the last report had no checkpoint
    ckpt_dir = None
    if ckpt is not None:
        ckpt_dir = ckpt.path
        state_file = Path(ckpt_dir, "state.json")
        if state_file.exists():
            saved = json.loads(state_file.read_text())
            metrics = {**saved.get("metrics", {}), **metrics}
    return StageRun(ckpt_dir, metrics, int(metrics.get("step", 0)), seconds, str(Path(storage, name)))
