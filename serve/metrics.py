"""re2g's own Prometheus metrics, next to Serve's (``ray_serve_*``): per-stage latency, batch sizes,
compute time per batch, and requests by route and status.

Exported by Ray's metrics agent like every ``ray.util.metrics`` metric (``ray_`` prefix added), with
the ``deployment``/``replica``/``application`` tags Serve adds inside a replica:

* ``ray_re2g_stage_latency_seconds{stage}`` (histogram) -- seen by the ingress per request: ``retrieve``,
  ``rerank``, ``generate``, ``total`` (queueing and batching waits included);
* ``ray_re2g_batch_size{stage}`` (histogram) -- requests per dynamic batch in a deployment;
* ``ray_re2g_compute_seconds{stage}`` (histogram) -- model/index time per batch in a deployment;
* ``ray_re2g_requests_total{route, status}`` (counter) -- HTTP requests answered by the ingress.

Outside a Ray worker (unit tests with a fake backend) the metrics are no-ops.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]


class _Noop:
    def observe(self, value: float, tags: dict | None = None) -> None:
        pass

    def inc(self, value: float = 1.0, tags: dict | None = None) -> None:
        pass


def _metric(kind: str, name: str, description: str, tag_keys: tuple[str, ...], boundaries=None):
    try:
        import ray
        from ray.serve import metrics as serve_metrics

        if not ray.is_initialized():
            return _Noop()
        cls = getattr(serve_metrics, kind)
        kwargs = {"description": description, "tag_keys": tag_keys}
        if boundaries is not None:
            kwargs["boundaries"] = boundaries
        return cls(name, **kwargs)
    except Exception as e:  # metrics must never take the app down
        log.warning("metric %s disabled: %s", name, e)
        return _Noop()


class IngressMetrics:
    """Per-stage latency and request counts, recorded by the ingress."""

    def __init__(self) -> None:
        self.latency = _metric("Histogram", "re2g_stage_latency_seconds",
                               "re2g: seconds per pipeline stage as seen by the ingress", ("stage",),
                               LATENCY_BOUNDARIES)
        self.requests = _metric("Counter", "re2g_requests_total", "re2g: HTTP requests by route and status",
                                ("route", "status"))

    def stage(self, stage: str, seconds: float) -> None:
        self.latency.observe(float(seconds), tags={"stage": stage})

    def request(self, route: str, status: int) -> None:
        self.requests.inc(1.0, tags={"route": route, "status": str(status)})


class ComponentMetrics:
    """Batch sizes and compute seconds of one deployment (``stage``: retrieve, rerank, generate)."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.batch = _metric("Histogram", "re2g_batch_size", "re2g: requests per dynamic batch", ("stage",),
                             BATCH_BOUNDARIES)
        self.compute = _metric("Histogram", "re2g_compute_seconds", "re2g: model/index seconds per batch",
                               ("stage",), LATENCY_BOUNDARIES)

    def observe(self, batch_size: int, seconds: float) -> None:
        tags = {"stage": self.stage}
        self.batch.observe(float(batch_size), tags=tags)
        self.compute.observe(float(seconds), tags=tags)
