"""Multi-node behaviour on one machine: a 4-node ``ray.cluster_utils.Cluster`` (head, two index
nodes with ``index_node`` resources, one serving node with ``serve_node``).

The cluster runs in a child process (tests/cluster_scripts/multinode_index.py): a ``Cluster`` cannot
share a process with the session's ``ray_local``. The child gets its own ``RAY_TMPDIR`` (so the
``ray_current_cluster`` address file that ``Cluster`` writes never points other people's
``ray.init()`` at it) and its own auth token; whatever of it is left afterwards is found by that
directory on the command line and killed (only our processes).

What is checked (see the script's docstring for the set-up):
* HNSW shard actors asking for ``index_node`` spread over both index nodes and nowhere else;
* Serve replicas asking for ``serve_node`` (the RayService's requests) run on the serving node;
* while queries flow through Serve, an index node is removed: its shard actors restart on the
  surviving index node, no query fails, and every answer equals the answer before.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "cluster_scripts" / "multinode_index.py"


def _kill_leftovers(marker: str) -> int:
    import psutil

    left = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                left.append(p)
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(left, timeout=10)
    return len(left)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    work = tmp_path_factory.mktemp("multinode")
    ray_tmp = tempfile.mkdtemp(prefix="r2gm", dir="/tmp")   # short: unix socket paths live below it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    out = work / "report.json"
    try:
        proc = subprocess.run([sys.executable, str(SCRIPT), str(work), str(out)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=420)
    finally:
        leftovers = _kill_leftovers(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.exists(), f"no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    rep = json.loads(out.read_text())
    assert rep["ok"], rep.get("traceback", "") + "\n" + proc.stderr[-3000:]
    rep["_leftover_processes"] = leftovers
    assert not (Path("/tmp/ray/ray_current_cluster").exists()
                and ray_tmp in Path("/tmp/ray/ray_current_cluster").read_text())
    return rep


def _node(entry: str) -> tuple[str, str]:
    role, _, node_id = entry.partition(":")
    return role, node_id


def test_index_shards_spread_over_the_index_nodes(report):
    placed = [_node(e) for e in report["shards_before"]]
    assert len(placed) == 4
    assert {role for role, _ in placed} == {"index"}, placed
    index_nodes = {n for n, role in report["roles"].items() if role == "index"}
    assert {n for _, n in placed} == index_nodes, "SPREAD: both index nodes hold shards"
    assert report["actors_match_in_process"], "actor scatter-gather == in-process search"


def test_serve_replicas_land_on_the_serving_node(report):
    assert all("serve_node" in r for r in report["serve_requests"].values()), report["serve_requests"]
    assert report["serve_nodes"] == {"Ingress": "serve", "Retriever": "serve"}
    assert report["serve_before"]


def test_serving_survives_losing_an_index_node(report):
    removed_role, removed = _node(report["removed"])
    assert removed_role == "index"
    assert report["answers_before"] > 0 and report["answers_after"] > 0
    assert report["errors"] == [], report["errors"][:3]
    assert report["all_same"], "an answer changed while the node was removed"
    after = [_node(e) for e in report["shards_after"]]
    assert len(after) == 4 and {role for role, _ in after} == {"index"}
    assert removed not in {n for _, n in after}, "shards restarted on the surviving index node"
    assert report["search_after_same"]
