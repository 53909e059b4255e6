"""`re2g predict` (in process and through Ray Data) -> `re2g evaluate kilt`, on the untrained tiny run."""

from __future__ import annotations

import json

from re2g.eval.kilt import evaluate_kilt_files


def test_predict_in_process_and_ray_data_agree_and_score(tiny_run_dir, ray_local, tmp_path):
    from re2g.predict import predict_file

    task = str(tiny_run_dir / "sample" / "tasks" / "slot_filling-dev-kilt.jsonl")
    local = predict_file(tiny_run_dir, task, str(tmp_path / "local.jsonl"), limit=6, batch_size=4, progress=False)
    distributed = predict_file(tiny_run_dir, task, str(tmp_path / "ray.jsonl"), limit=6, batch_size=4,
                               use_ray=True, actors=1)
    assert local.examples == distributed.examples == 6
    a = [json.loads(line) for line in (tmp_path / "local.jsonl").open()]
    b = [json.loads(line) for line in (tmp_path / "ray.jsonl").open()]
    assert [r["id"] for r in a] == [r["id"] for r in b]  # input order kept
    assert [r["output"][0]["answer"] for r in a] == [r["output"][0]["answer"] for r in b]
    for r in a:
        prov = r["output"][0]["provenance"]
        assert 1 <= len(prov) <= 5 and all(p["wikipedia_id"] for p in prov)

    # the predictions are valid input for KILT's scorer on the same ids
    gold = tmp_path / "gold.jsonl"
    with open(task) as f:
        gold.write_text("".join(next(f) for _ in range(6)))
    scores = evaluate_kilt_files(str(gold), str(tmp_path / "local.jsonl"))
    assert set(scores) >= {"kilt", "downstream", "retrieval"}
    assert set(scores["downstream"]) >= {"accuracy", "em", "f1", "rougel"}
    assert 0.0 <= scores["retrieval"]["Rprec"] <= 1.0
