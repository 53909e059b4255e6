"""Our training config -> a DeepSpeed JSON config, and the learning-rate schedule (pure functions)."""

from __future__ import annotations

from re2g.config import DeepSpeedConfig


def resolve_precision(cfg: DeepSpeedConfig, use_gpu: bool) -> str:
    """``auto`` -> ``bf16`` on GPU, ``fp32`` on CPU; bf16 on CPU is honoured when asked for."""
    if cfg.precision == "auto":
        return "bf16" if use_gpu else "fp32"
    return cfg.precision


def build_deepspeed_config(cfg: DeepSpeedConfig, *, micro_batch: int, grad_accum: int, world_size: int,
                           use_gpu: bool) -> dict:
    """The DeepSpeed config dict for ``deepspeed.initialize``.

    The optimizer (AdamW) and the scheduler (:func:`warmup_linear_decay` in a ``LambdaLR``) are
    passed to ``deepspeed.initialize`` as objects, so they are not in this dict; DeepSpeed saves and
    restores their state in its checkpoints. ``train_batch_size = micro_batch * grad_accum * world``.
    """
    precision = resolve_precision(cfg, use_gpu)
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1:
        zero.update({"overlap_comm": bool(use_gpu), "contiguous_gradients": True,
                     "reduce_bucket_size": int(5e7), "allgather_bucket_size": int(5e7)})
        if cfg.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(use_gpu)}
    if cfg.zero_stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": False})
    return {
        "train_micro_batch_size_per_gpu": int(micro_batch),
        "gradient_accumulation_steps": int(grad_accum),
        "train_batch_size": int(micro_batch) * int(grad_accum) * int(world_size),
        "gradient_clipping": float(cfg.gradient_clipping),
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def warmup_linear_decay(step: int, warmup: int, total: int) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear 0 -> 1 over ``warmup`` steps, then
    linear 1 -> 0 at ``total``. For ``torch.optim.lr_scheduler.LambdaLR``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    return max(0.0, (total - step) / (total - warmup))


class WarmupLinearDecay:
    """A picklable ``lr_lambda`` for ``LambdaLR`` (see :func:`warmup_linear_decay`)."""

    def __init__(self, warmup: int, total: int):
        self.warmup = int(warmup)
        self.total = int(total)

    def __call__(self, step: int) -> float:
        return warmup_linear_decay(step, self.warmup, self.total)
