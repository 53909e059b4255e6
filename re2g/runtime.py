"""Process set-up that entry points (CLI, jobs, Serve) call: connecting to Ray, picking a device.

Library functions never call these on their own; they take what they need as arguments.
"""

from __future__ import annotations

import os

from re2g.config import RayConfig


def quiet_env() -> None:
    """Environment defaults for every re2g entry point (no telemetry, no hub downloads by surprise)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not has_cuda():
        # DeepSpeed picks its accelerator at import; on a machine without CUDA it must be the CPU one.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # torch missing or broken CUDA install
        return False


def pick_device(name: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    if name == "auto":
        return "cuda" if has_cuda() else "cpu"
    return name


def connect_ray(cfg: RayConfig | None = None):
    """Connect to the Ray cluster named by ``cfg.address`` (or ``RAY_ADDRESS``), or start a local
    Ray in-process when there is none. Returns the ``ray`` module. Safe to call twice."""
    import ray

    quiet_env()
    if ray.is_initialized():
        return ray
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"configure_logging": True, "logging_level": "WARNING"}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=False, **kwargs)
    return ray
