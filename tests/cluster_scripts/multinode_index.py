"""Multi-node behaviour on one machine, run in its own process by tests/test_multinode.py.

    python tests/cluster_scripts/multinode_index.py WORK_DIR REPORT_JSON

A ``ray.cluster_utils.Cluster`` of four nodes, with the custom resources of the cluster configs
(cluster/aws.yaml, cluster/kuberay/):

    head      1 CPU, the driver (this script) and the Serve controller
    index-a   1 CPU, {"index_node": 4}
    index-b   1 CPU, {"index_node": 4}
    serve     1 CPU, {"serve_node": 1}

1. A small HNSW index (random vectors, 4 shards) is held by one ``ShardActor`` per shard
   (``ActorShardedIndex.start(resources={"index_node": 1}, spread=True)``) with
   ``max_restarts=-1, max_task_retries=-1``: where do the shards land?
2. A two-deployment Serve app (Ingress -> Retriever -> shard actors) whose replicas ask for the
   ``serve_node`` resource exactly as the RayService's deployments do (cluster/kuberay/rayservice.yaml),
   CPUs scaled down to the 1-CPU nodes: where do the replicas land?
3. Queries flow through the Serve handle continuously while ``index-a`` is removed; the shard
   actors it held are restarted on ``index-b``; every answer is compared with the answer before.

Writes a JSON report; the test asserts on it. Exit code 0 unless the script itself broke.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

N, D, SHARDS, K = 600, 16, 4, 10
NAMESPACE = "re2g-multinode"
PREFIX = "mn-shard-"


def build_index(work: Path) -> tuple[Path, np.ndarray]:
    """Random passage vectors -> embeddings Parquet -> 4-shard HNSW index (in process, no Ray)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from re2g.config import IndexConfig
    from re2g.index.dense import build_dense_index

    rng = np.random.default_rng(7)
    X = rng.standard_normal((N, D)).astype(np.float32)
    emb = work / "embeddings"
    emb.mkdir(parents=True)
    flat = pa.array(X.reshape(-1))
    vectors = pa.ListArray.from_arrays(pa.array(np.arange(0, (N + 1) * D, D, dtype=np.int32)), flat)
    pq.write_table(pa.table({"pid": [f"p{i}::[1,1]" for i in range(N)], "vector": vectors}),
                   emb / "part-0.parquet")
    index_dir = work / "index"
    build_dense_index(str(emb), str(index_dir), IndexConfig(num_shards=SHARDS, hnsw_m=16, ef_construction=64,
                                                             ef_search=64), encoder_fingerprint="multinode-test",
                      use_ray=False)
    Q = rng.standard_normal((3, D)).astype(np.float32)
    return index_dir, Q


def serve_requests() -> dict[str, dict]:
    """The RayService deployments' custom-resource requests (what decides their node type)."""
    import yaml

    doc = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    return {d["name"]: d["ray_actor_options"]["resources"] for d in serve_cfg["applications"][0]["deployments"]}


def node_roles(ray) -> dict[str, str]:
    roles = {}
    for n in ray.nodes():
        if not n["Alive"]:
            continue
        res = n["Resources"]
        roles[n["NodeID"]] = ("index" if "index_node" in res else "serve" if "serve_node" in res
                              else "head" if "node:__internal_head__" in res else "other")
    return roles


def actor_node(ray, actor) -> str:
    return ray.get(actor.__ray_call__.remote(lambda self: __import__("ray").get_runtime_context().get_node_id()),
                   timeout=120)


def as_plain(hits) -> list[list[tuple[str, float]]]:
    return [[(h.pid, round(float(h.score), 4)) for h in row] for row in hits]


def main(work: Path, report_path: Path) -> int:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from re2g.index.dense import DenseIndex
    from re2g.index.shards import ActorShardedIndex

    report: dict = {"ok": False, "timings": {}}
    t0 = time.time()
    index_dir, Q = build_index(work)
    expected = as_plain(DenseIndex.load(index_dir).search_vectors(Q, K))
    report["timings"]["index_built"] = round(time.time() - t0, 1)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        index_a = cluster.add_node(num_cpus=1, resources={"index_node": 4})
        cluster.add_node(num_cpus=1, resources={"index_node": 4})
        cluster.add_node(num_cpus=1, resources={"serve_node": 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        report["timings"]["cluster_up"] = round(time.time() - t0, 1)
        roles = node_roles(ray)
        report["roles"] = roles

        # 1. shard actors: one index_node each, SPREAD, restartable, retried calls
        idx = ActorShardedIndex.start(str(index_dir), resources={"index_node": 1}, num_cpus=0.1, spread=True,
                                      name_prefix=PREFIX, namespace=NAMESPACE,
                                      actor_options={"max_restarts": -1, "max_task_retries": -1})
        report["shards_before"] = [roles.get(actor_node(ray, a), "?") + ":" + actor_node(ray, a)
                                   for a in idx.actors]
        report["actors_match_in_process"] = as_plain(idx.search_vectors(Q, K)) == expected
        report["timings"]["shards_up"] = round(time.time() - t0, 1)

        # 2. Serve: the RayService's custom-resource requests, 0.1 CPU per replica
        requests = serve_requests()
        report["serve_requests"] = requests

        @serve.deployment(ray_actor_options={"num_cpus": 0.1, "resources": requests["Retriever"]},
                          max_ongoing_requests=8)
        class Retriever:
            def __init__(self, prefix: str, num_shards: int, namespace: str, index_dir: str):
                self.index = ActorShardedIndex.attach(prefix, num_shards, namespace=namespace, index_dir=index_dir)

            def node(self) -> str:
                return ray.get_runtime_context().get_node_id()

            def __call__(self, queries: list) -> list:
                return as_plain(self.index.search_vectors(np.asarray(queries, np.float32), K))

        @serve.deployment(ray_actor_options={"num_cpus": 0.1, "resources": requests["Ingress"]},
                          max_ongoing_requests=8)
        class Ingress:
            def __init__(self, retriever):
                self.retriever = retriever

            def node(self) -> str:
                return ray.get_runtime_context().get_node_id()

            async def __call__(self, queries: list) -> list:
                return await self.retriever.remote(queries)

        serve.start(proxy_location="Disabled")
        handle = serve.run(Ingress.bind(Retriever.bind(PREFIX, SHARDS, NAMESPACE, str(index_dir))),
                           name="re2g", route_prefix=None)
        retriever = serve.get_deployment_handle("Retriever", app_name="re2g")
        report["serve_nodes"] = {"Ingress": roles.get(handle.node.remote().result(timeout_s=120), "?"),
                                 "Retriever": roles.get(retriever.node.remote().result(timeout_s=120), "?")}
        report["serve_before"] = handle.remote(Q.tolist()).result(timeout_s=120) == expected
        report["timings"]["serve_up"] = round(time.time() - t0, 1)

        # 3. remove index-a while queries flow through Serve
        answers: list[dict] = []
        stop = threading.Event()

        def client():
            while not stop.is_set():
                t = time.time()
                try:
                    got = handle.remote(Q.tolist()).result(timeout_s=120)
                    answers.append({"t": t, "s": round(time.time() - t, 2), "same": got == expected})
                except Exception as e:  # noqa: BLE001 - recorded, the test fails on it
                    answers.append({"t": t, "s": round(time.time() - t, 2), "error": repr(e)[:500]})

        th = threading.Thread(target=client, daemon=True)
        th.start()
        time.sleep(2.0)
        removed_id = index_a.node_id
        t_remove = time.time()
        cluster.remove_node(index_a)
        report["removed"] = roles.get(removed_id, "?") + ":" + removed_id
        # keep serving until a few answers have come back after the restart (or give up)
        deadline = time.time() + 150
        while time.time() < deadline and sum(1 for a in answers if a["t"] > t_remove + 1 and "same" in a) < 3:
            time.sleep(0.5)
        stop.set()
        th.join(timeout=150)
        report["answers_before"] = sum(1 for a in answers if a["t"] < t_remove)
        report["answers_after"] = sum(1 for a in answers if a["t"] >= t_remove)
        report["all_same"] = all(a.get("same") for a in answers)
        report["errors"] = [a["error"] for a in answers if "error" in a]
        report["max_latency_s"] = max((a["s"] for a in answers), default=None)
        roles_after = node_roles(ray)
        report["shards_after"] = [roles_after.get(actor_node(ray, a), "?") + ":" + actor_node(ray, a)
                                  for a in idx.actors]
        report["search_after_same"] = as_plain(idx.search_vectors(Q, K)) == expected
        report["timings"]["node_removed_and_recovered"] = round(time.time() - t_remove, 1)
        report["ok"] = True
    except Exception:  # noqa: BLE001 - the report carries the traceback
        report["traceback"] = traceback.format_exc()
    finally:
        report_path.write_text(json.dumps(report, indent=2))
        try:
            serve.shutdown()
        except Exception:  # noqa: BLE001
            pass
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
