"""GPUs for Ray actors that hold models (``re2g predict``'s pipeline actors).

Which device an actor's models then use is :func:`re2g.runtime.pick_device`'s rule: Ray 2.60 no longer
hides a node's GPUs from an actor that reserved none (``CUDA_VISIBLE_DEVICES`` is left as it is unless
``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1``), so ``auto`` means cuda in an actor only when Ray gave it a GPU.
"""

from __future__ import annotations


def gpu_share(cluster_gpus: float, actors: int, device: str = "auto") -> float:
    """GPUs each of ``actors`` model actors asks Ray for: one each while the cluster has that many, an equal
    fraction of them when there are more actors than GPUs (every actor still starts), none when the
    cluster has no GPU or ``device`` is ``cpu``."""
    if device == "cpu" or cluster_gpus < 1 or actors < 1:
        return 0.0
    return min(1.0, float(cluster_gpus) / actors)
