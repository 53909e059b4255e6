"""The GPU paths of benchmarks/gpu_check.py under pytest, on the session's Ray (marked ``gpu``: skipped
without a CUDA device, see tests/conftest.py). Each test runs one path with ``gpu=True`` over the
session's tiny sample, passages and untrained models; the last runs scripts/gpu_check.sh end to end.

Never run by us yet: written on machines without a GPU (their CPU counterparts: ``--cpu`` of the script,
tests/test_gpu_check.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def inputs(tiny_sample, tiny_passages, tiny_models, ray_local, tmp_path_factory):
    work = tmp_path_factory.mktemp("gpu-check")
    return gpu_check.Inputs(work, gpu_check.tiny_config(work), Path(tiny_sample), Path(tiny_passages),
                            {k: Path(v) for k, v in tiny_models.items()},
                            str(Path(tiny_sample) / "tokenizers" / "wordpiece"))


def test_ray_sees_the_gpu(ray_local):
    assert ray_local.cluster_resources().get("GPU", 0) >= 1


def test_faiss_on_the_gpu():
    _, facts = gpu_check.check_faiss(gpu=True)
    assert facts["flat"] == "GpuIndexFlatIP" and facts["flat_agreement"] >= gpu_check.MIN_FLAT_AGREEMENT, facts
    if facts["support"]["cagra"]:
        assert facts["graph_recall_at_k"] >= gpu_check.MIN_GRAPH_RECALL, facts


def test_embedding_one_gpu_per_actor(inputs):
    _, facts = gpu_check.check_embed(inputs, gpu=True)
    assert facts["device"] == "cuda" and facts["min_cosine_vs_cpu_fp32"] >= gpu_check.MIN_COSINE, facts


def test_bf16_training_step(inputs):
    _, facts = gpu_check.check_train(inputs, gpu=True)
    assert facts["precision"] == "bf16" and facts["use_gpu"] and facts["saved_dtype"] == "float32", facts
    assert facts["max_weight_change"] > 0


def test_serve_replicas_with_num_gpus(inputs):
    _, facts = gpu_check.check_serve(inputs, gpu=True)
    assert all(d.endswith("on cuda") for d in facts["components"].values()), facts
    assert facts["num_gpus"]["generator"] > 0 and isinstance(facts["answer"], str)


def test_script_end_to_end(tmp_path):
    """The script itself in a process of its own (its own Ray), within its 8-minute budget."""
    out = tmp_path / "gc.json"
    env = {**os.environ, "PYTHON": sys.executable}
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(out), "--work",
                        str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    report = json.loads(out.read_text())
    assert p.returncode == gpu_check.EXIT_OK, p.stdout[-3000:] + p.stderr[-3000:]
    assert all(r["status"] == "ok" for r in report["paths"].values()) and report["seconds"] < 480, report
