"""The GPU check's parts that run without a GPU (benchmarks/gpu_check.py, scripts/gpu_check.sh).

Without a CUDA device the script reports every path ``skipped: no CUDA device`` and exits 3, in
seconds and without starting Ray; the faiss path's comparison code runs on the CPU (its plumbing
mode); checkpoints of bf16 training are rewritten in float32 (re2g.train.saved_dtype). The GPU runs
of the same paths are tests/test_gpu_paths.py (marked ``gpu``).
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

from benchmarks.gpu_check import (  # noqa: E402
    EXIT_FAILED,
    EXIT_NO_CUDA,
    EXIT_OK,
    PATHS,
    PathResult,
    check_faiss,
    exit_code,
    parse_args,
    top_k_agreement,
)


def test_script_without_cuda_says_skipped_for_every_path(tmp_path):
    out = tmp_path / "gc.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == EXIT_NO_CUDA, p.stdout + p.stderr
    lines = [x for x in p.stdout.splitlines() if x.strip() and not x.startswith("->")]
    assert len(lines) == len(PATHS) and {x.split()[0] for x in lines} == set(PATHS), p.stdout
    assert all(" skipped: no CUDA device" in x for x in lines), p.stdout
    assert "Traceback" not in p.stdout + p.stderr and "Ray" not in p.stdout   # nothing started
    report = json.loads(out.read_text())
    assert report["exit_code"] == EXIT_NO_CUDA and report["cuda_devices"] == [] and report["mode"] == "gpu"
    assert set(report["paths"]) == set(PATHS)
    assert all(r["status"] == "skipped" and r["detail"].startswith("no CUDA device") for r in report["paths"].values())
    assert not (tmp_path / "gpu_check_work").exists()   # no scratch inputs were built


def test_exit_codes_and_lines():
    skipped = [PathResult(p, "skipped", "no CUDA device (x)") for p in PATHS]
    assert exit_code(skipped) == EXIT_NO_CUDA
    assert exit_code([PathResult(p, "ok", "fine", 1.0) for p in PATHS]) == EXIT_OK
    mixed = [PathResult("faiss", "ok", "fine", 1.0), PathResult("serve", "failed", "no answer", 2.5)]
    assert exit_code(mixed) == EXIT_FAILED
    assert exit_code([PathResult("train", "running")]) == EXIT_FAILED   # killed half-way: not ok
    assert mixed[1].line() == "serve  failed (2.5 s): no answer"
    assert skipped[0].line() == "train  skipped: no CUDA device (x)"


def test_only_names_known_paths():
    _, only = parse_args(["--only", "faiss, serve"])
    assert only == ["faiss", "serve"]
    with pytest.raises(SystemExit):
        parse_args(["--only", "faiss,warp"])


def test_faiss_path_cpu_plumbing():
    """The faiss path on the CPU: a second flat index agrees with the exact one, faiss's HNSW (the
    stand-in for the CAGRA-built graph) reaches the recall bar."""
    detail, facts = check_faiss(gpu=False, n=3000, nq=50, dim=32)
    assert facts["flat_agreement"] == 1.0 and facts["graph_recall_at_k"] >= 0.9, facts
    assert facts["graph_ntotal"] == 3000 and "cpu plumbing" in detail


def test_top_k_agreement():
    assert top_k_agreement([[1, 2], [3, 4]], [[2, 1], [3, 9]]) == 0.75


def test_bf16_checkpoint_saved_as_float32(tmp_path):
    """What the training loop does after saving a bf16 module: every weight file and config in float32,
    values unchanged (bf16 -> float32 is exact), loaded back as float32; a second pass changes nothing."""
    import torch
    from transformers import BertConfig, BertModel

    from re2g.train.saved_dtype import upcast_saved_weights

    torch.manual_seed(0)
    m = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=37)).to(torch.bfloat16)
    m.save_pretrained(tmp_path / "model" / "encoder")
    assert BertModel.from_pretrained(tmp_path / "model" / "encoder").dtype == torch.bfloat16   # the problem
    changed = upcast_saved_weights(tmp_path / "model")
    assert sorted(changed) == ["encoder/config.json", "encoder/model.safetensors"]
    back = BertModel.from_pretrained(tmp_path / "model" / "encoder")
    assert back.dtype == torch.float32
    for (n, a), (_, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a.float(), b), n
    assert upcast_saved_weights(tmp_path / "model") == []
