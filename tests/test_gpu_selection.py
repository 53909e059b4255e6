"""Which device a Ray actor's models go to (re2g.runtime.pick_device: Serve replicas, ``re2g predict``'s
actors): ``cuda`` only where Ray gave the actor a GPU. Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for an
actor with no GPU, so on a GPU node a CPU replica saw the GPU and put its model there. The CPU half runs
everywhere; the GPU half is marked ``gpu``."""

from __future__ import annotations

import pytest


def _in_actor(ray, num_gpus: float, devices: list[str]) -> list[str]:
    """``pick_device`` of each name, inside one actor that reserved ``num_gpus``."""
    @ray.remote(num_cpus=0.01, num_gpus=num_gpus)
    class Probe:
        def devices(self, names: list[str]) -> list[str]:
            from re2g.runtime import pick_device

            return [pick_device(n) for n in names]

    actor = Probe.remote()
    try:
        return ray.get(actor.devices.remote(devices), timeout=120)
    finally:
        ray.kill(actor)


def test_replica_without_a_gpu_stays_on_the_cpu(ray_local):
    from re2g.runtime import has_cuda, pick_device

    assert _in_actor(ray_local, 0, ["auto", "cuda", "cpu"]) == ["cpu", "cuda", "cpu"]   # named: honoured
    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") == ("cuda" if has_cuda() else "cpu")  # in the driver (deployment classes built in tests)


@pytest.mark.gpu
def test_replica_with_a_gpu_uses_it_and_one_without_does_not(ray_local):
    assert _in_actor(ray_local, 0.5, ["auto"]) == ["cuda"]
    assert _in_actor(ray_local, 0, ["auto"]) == ["cpu"]       # the GPU is visible but not Ray's gift


def test_gpu_share_per_actor():
    from re2g.devices import gpu_share

    assert gpu_share(0, 2) == 0.0 and gpu_share(4, 2, "cpu") == 0.0
    assert gpu_share(4, 2) == 1.0 and gpu_share(1, 1) == 1.0
    assert gpu_share(1, 4) == 0.25 and gpu_share(2, 3) == pytest.approx(2 / 3)
