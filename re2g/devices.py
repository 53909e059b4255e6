"""The torch device of a process that may be a Ray actor (Serve replicas, Ray Data actors of ``re2g predict``).

Ray 2.60 no longer hides a node's GPUs from an actor that reserved none (``CUDA_VISIBLE_DEVICES`` is left as
it is unless ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1``), so ``torch.cuda.is_available()`` is true in a CPU
actor on a GPU node: choosing by it alone puts that actor's model on a GPU Ray never gave it.
"""

from __future__ import annotations


def ray_device(device: str = "auto") -> str:
    """``device`` when it names one (``cpu``, ``cuda``); ``auto`` inside a Ray actor: ``cuda`` only when Ray
    gave the actor a GPU (``num_gpus`` > 0 in its options, however they were set) and one is visible, else
    ``cpu``; outside an actor (a driver, a test building a deployment class in process): ``cuda`` when one
    is visible (:func:`re2g.runtime.pick_device`)."""
    from re2g.runtime import pick_device

    if device != "auto":
        return device
    try:
        import ray
    except ImportError:  # no Ray: a plain process
        return pick_device("auto")
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return pick_device("auto")
    return pick_device("auto") if ray.get_runtime_context().get_accelerator_ids().get("GPU") else "cpu"


def gpu_share(cluster_gpus: float, actors: int, device: str = "auto") -> float:
    """GPUs each of ``actors`` model actors asks Ray for: one each while the cluster has that many, an equal
    fraction of them when there are more actors than GPUs (every actor still starts), none when the
    cluster has no GPU or ``device`` is ``cpu``."""
    if device == "cpu" or cluster_gpus < 1 or actors < 1:
        return 0.0
    return min(1.0, float(cluster_gpus) / actors)
