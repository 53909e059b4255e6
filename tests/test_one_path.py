"""One path: the same run directory and the same dev queries give the same answers, provenance (pids,
order) and scores through the in-process ``Re2GPipeline``, ``re2g predict`` (in process and over Ray
Data) and the running Serve app over HTTP (real Serve on loopback) -- for a hybrid run, a DPR-only and
a BM25-only run (views of the session's tiny run with one index each).

It also pins the drift this seam removed: how many candidates a query gets is decided in one place
(``re2g.index.fusion.retrieve_k``): a BM25-only or DPR-only run reranks ``bm25_top_k`` / ``dpr_top_k``
candidates everywhere (``re2g predict`` asked the lone retriever for ``dpr_top_k + bm25_top_k``, Serve
for its own top-k).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from test_serve import PLAIN_APP, PLAIN_OVERRIDES

KINDS = ("hybrid", "dpr", "bm25")
# served in this order: the plain app (the hybrid run) last, so that it stays deployed for the Serve tests that
# share it (tests/conftest.py runs these tests right after tests/test_serve.py's)
SERVED_KINDS = ("dpr", "bm25", "hybrid")
N_QUERIES = 4
TOL = 1e-4          # scores: the stages batch differently (one request, a predict batch, Serve's batches)
LOGPROB_TOL = 1e-3


@pytest.fixture(scope="session")     # session: the served tests run later, after tests/test_serve.py's
def runs(serve_run_dir, tmp_path_factory) -> dict[str, Path]:
    """The Serve tests' tiny run (dense + BM25), and two views of it with one index each (symlinks: the
    same config, passages and models). Serve is started later (tests/test_serve.py), after Ray Data's."""
    out = {"hybrid": serve_run_dir}
    for kind, index in (("dpr", "dense"), ("bm25", "bm25")):
        run = tmp_path_factory.mktemp(f"one-path-{kind}") / "run"
        (run / "index").mkdir(parents=True)
        for name in ("config.yaml", "passages", "models"):
            (run / name).symlink_to(serve_run_dir / name)
        (run / "index" / index).symlink_to(serve_run_dir / "index" / index)
        out[kind] = run
    return out


@pytest.fixture(scope="session")
def task(tiny_sample) -> str:
    return str(tiny_sample / "tasks" / "slot_filling-dev-kilt.jsonl")


@pytest.fixture(scope="session")
def examples(task) -> list[tuple[str, str]]:
    with open(task) as f:
        rows = [json.loads(next(f)) for _ in range(N_QUERIES)]
    return [(r["id"], r["input"]) for r in rows]


@pytest.fixture(scope="session")
def reference(runs, examples) -> dict:
    """Per run kind: the in-process pipeline, its candidates and its answers for the dev queries (one batch)."""
    from re2g.pipeline import Re2GPipeline

    queries = [q for _, q in examples]
    out = {}
    for kind, run in runs.items():
        pipe = Re2GPipeline.from_run_dir(run)
        out[kind] = {"pipe": pipe, "candidates": pipe.retrieve(queries), "answers": pipe.answer_batch(queries)}
    return out


def assert_same(got, want, path: str = "") -> None:
    """Equal JSON-like values: dicts with the same keys, lists of the same length (order matters),
    floats within ``TOL`` (log-probabilities: ``LOGPROB_TOL``), anything else equal."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (path, got, want)
        for k in want:
            assert_same(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (path, got, want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert got == pytest.approx(want, abs=LOGPROB_TOL if path.endswith("logprob") else TOL), path
    else:
        assert got == want, (path, got, want)


def test_one_place_decides_how_many_candidates(reference):
    from re2g.index.fusion import retrieve_k

    for kind, ref in reference.items():
        r = ref["pipe"].retriever
        cfg = ref["pipe"].cfg.retrieval
        assert r.k == retrieve_k(cfg, dense=kind != "bm25", bm25=kind != "dpr")
        assert r.k == {"hybrid": cfg.dpr_top_k + cfg.bm25_top_k, "dpr": cfg.dpr_top_k, "bm25": cfg.bm25_top_k}[kind]
        for cands in ref["candidates"]:
            assert 0 < len(cands) <= r.k and len({c.pid for c in cands}) == len(cands)
            assert {c.source for c in cands} == {"hybrid": {"dpr", "bm25"}, "dpr": {"dpr"}, "bm25": {"bm25"}}[kind]
            assert [c.rank for c in cands] == list(range(len(cands)))
    # a lone retriever's list is its own top-k: the hybrid's DPR part (concat fusion) is the DPR-only list
    for hybrid, dpr in zip(reference["hybrid"]["candidates"], reference["dpr"]["candidates"]):
        assert [c.pid for c in hybrid if c.source == "dpr"] == [c.pid for c in dpr]


@pytest.mark.parametrize("kind", KINDS)
def test_predict_in_process_and_over_ray_data_give_the_pipelines_answers(kind, runs, task, examples, reference,
                                                                           ray_local, tmp_path):
    from re2g.pipeline import kilt_prediction
    from re2g.predict import predict_file

    want = [kilt_prediction(i, a, input=q) for (i, q), a in zip(examples, reference[kind]["answers"])]
    for use_ray, batch_size in ((False, 3), (True, 2)):         # other batches than the pipeline's one
        out = tmp_path / f"{kind}-{use_ray}.jsonl"
        stats = predict_file(runs[kind], task, str(out), limit=N_QUERIES, batch_size=batch_size, use_ray=use_ray,
                             actors=1, progress=False)
        assert stats.examples == N_QUERIES
        got = [json.loads(line) for line in out.open()]
        assert_same(got, want, f"{kind} ray={use_ray}")
    assert all(len(r["output"][0]["provenance"]) == reference[kind]["pipe"].reranker.top_k for r in want)


@pytest.mark.parametrize("kind", SERVED_KINDS)
def test_served_app_gives_the_pipelines_candidates_and_answers(kind, serve_instance, runs, examples, reference):
    """Each run served in turn on the session's Serve instance (the hybrid one is the Serve tests' plain
    app): its candidates (/v1/retrieve) and answers (/v1/answer) are the pipeline's."""
    ref = reference[kind]
    name = PLAIN_APP if kind == "hybrid" else f"re2g-one-path-{kind}"
    # the one-index views with one ingress replica (the plain app's default is 2): one process fewer to start
    one_ingress = [] if kind == "hybrid" else ["serve.ingress.min_replicas=1", "serve.ingress.max_replicas=1"]
    url = serve_instance.app(name, runs[kind], PLAIN_OVERRIDES + one_ingress)
    with httpx.Client(base_url=url, timeout=120) as served:
        _check_served(served, ref, examples)


def _check_served(served: httpx.Client, ref: dict, examples) -> None:
    from serve.api import answer_out
    from serve.schemas import HitOut, Timings

    info = served.get("/v1/info").json()
    assert info["retrieve_k"] == ref["pipe"].retriever.k and info["default_n_docs"] == ref["pipe"].reranker.top_k
    for (_, q), cands, ans in zip(examples, ref["candidates"], ref["answers"]):
        r = served.post("/v1/retrieve", json={"query": q})
        assert r.status_code == 200, r.text
        assert_same(r.json()["hits"], [HitOut.from_candidate(c).model_dump() for c in cands], "hits")
        r = served.post("/v1/answer", json={"query": q})
        assert r.status_code == 200, r.text
        got = {k: v for k, v in r.json().items() if k != "timings"}
        want = answer_out(ans, Timings(total=0.0)).model_dump(exclude={"timings"})
        assert_same(got, want, "answer")
