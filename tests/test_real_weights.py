"""Real pretrained weights on real text: stage 1 fine-tunes all-MiniLM-L6-v2 on the vital-articles task
(Wikidata descriptions -> the article's lead paragraph) through Ray Train + DeepSpeed, and beats the
zero-shot MiniLM it starts from on the dev articles (never seen in training).

Needs the ``minilm`` and ``vital-articles`` assets (``re2g assets fetch``; ``make setup`` fetches
them); skipped with the reason when they are missing. It takes minutes on 2 cores, so it is opt-in
like the other slow tests: ``RE2G_SLOW_TESTS=1 make test`` (it passed in a full run of the suite
here, which then took 17.8 min of pytest: over the suite's budget with it always on). In every run, real weights are
still checked by tests/test_encoders.py (MiniLM's vectors against sentence-transformers, a MiniLM
reranker that learns).

Measured here (1,000 articles, 146 dev queries, 24 steps of 2 x 16 queries, passages cut to 64 tokens):
dev Recall@5 0.966 (zero-shot MiniLM) -> 0.973, Recall@1 0.815 -> 0.849 (BM25: 0.925 / 0.822); 5 min on
the 2-core machine while it ran two other jobs. At 2,000 articles and 128 tokens (the ``small``
preset's quickstart): Recall@5 0.934 -> 0.960, Recall@1 0.700 -> 0.780 (BM25 0.883 / 0.718).
"""

from __future__ import annotations

import json
import os

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    os.environ.get("RE2G_SLOW_TESTS") != "1",
    reason="set RE2G_SLOW_TESTS=1 to fine-tune the real MiniLM on real text (minutes on 2 cores)")]

N_ARTICLES = 1000
SMALL = [f"data.sample.n_entities={N_ARTICLES}", "models.passage_max_length=64", "models.query_max_length=24",
         "train.dpr.epochs=1", "train.dpr.max_steps=24", "train.dpr.batch_size=16", "train.dpr.lr=3e-5",
         "train.dpr.log_every=8",
         "models.generator=null", "models.generator_kind=auto"]   # the retrieval side: no opt-in Gemma needed


@pytest.fixture(scope="module")
def assets():
    from re2g.assets import AssetMissingError, asset_path

    try:
        return {name: asset_path(name) for name in ("minilm", "vital-articles")}
    except AssetMissingError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def quickstart_small(assets, tmp_path_factory, ray_local):
    """The ``small`` preset's quickstart up to stage 1 on a 1,000-article sample of the vital-articles
    task: zero-shot BM25 / MiniLM / hybrid, then stage 1 from MiniLM (Ray Train + DeepSpeed)."""
    from rich.console import Console

    from re2g.config import load_config
    from re2g.quickstart import run_quickstart

    run = tmp_path_factory.mktemp("small") / "run"
    cfg = load_config(preset="small", overrides=[f"run_dir={run}", *SMALL])
    steps = ["sample", "passages", "bm25", "init_models", "zeroshot", "mine", "dpr"]
    return run_quickstart(cfg, console=Console(quiet=True), only=steps), run


def test_zero_shot_step_scores_the_pretrained_encoder(quickstart_small):
    summary, run = quickstart_small
    dev = summary["retrieval"]["dev"]
    assert set(dev) == {"bm25", "dpr zero-shot", "hybrid zero-shot"}
    assert dev["dpr zero-shot"]["recall@5"] > 0.5 and dev["bm25"]["recall@5"] > 0.5
    assert (run / "index" / "dense-zeroshot" / "manifest.json").exists()


def test_stage1_fine_tunes_minilm_above_zero_shot(quickstart_small):
    summary, run = quickstart_small
    dpr = json.loads((run / ".quickstart" / "dpr.json").read_text())["result"]["eval"]  # the stage's StageResult
    before, after, bm25 = dpr["before"]["dpr"], dpr["after"]["dpr"], dpr["before"]["bm25"]
    zero = summary["retrieval"]["dev"]["dpr zero-shot"]
    print(f"dev recall@5 zero-shot {before['recall@5']:.3f} -> {after['recall@5']:.3f} (BM25 {bm25['recall@5']:.3f}); "
          f"recall@1 {before['recall@1']:.3f} -> {after['recall@1']:.3f} (BM25 {bm25['recall@1']:.3f})")
    assert abs(before["recall@5"] - zero["recall@5"]) < 0.02  # the stage's own "before" is the zero-shot MiniLM
    assert after["recall@5"] > before["recall@5"]
    assert after["recall@1"] > before["recall@1"]
    assert after["mrr@10"] > before["mrr@10"]
