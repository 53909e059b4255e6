"""The Serve app's Generator deployment over a run whose reader is a causal LM (issue 15), in process:
the deployment's class as a replica builds it (load + health probe), then its batched ``generate``.

No Serve deployment here (each costs tens of seconds on 2 cores and would displace the session's
deployed apps, see tests/conftest.py): ``re2g serve`` on such a run failed exactly in this constructor
(the probe asked a causal LM for encoder states), which this test covers; the HTTP path is the same
as BART's (tests/test_serve.py)."""

from __future__ import annotations

import asyncio
import shutil

import pytest


@pytest.fixture(scope="module")
def causal_run(tiny_sample, tiny_run_dir, tmp_path_factory):
    """A copy of the session's tiny run with models/generator replaced by an untrained tiny Llama reader
    (``re2g init-models --set models.tiny.generator_arch=llama``)."""
    from re2g.config import load_config
    from re2g.models.init import init_models

    run = tmp_path_factory.mktemp("serve-causal") / "run"
    shutil.copytree(tiny_run_dir, run, ignore=shutil.ignore_patterns("generator"))
    cfg = load_config(preset="tiny", overrides=["models.tiny.generator_arch=llama"])
    init_models(cfg.models, run / "models", tokenizers_dir=tiny_sample / "tokenizers", which=("generator",))
    return run


def test_generator_deployment_builds_probes_and_answers_with_a_causal_reader(causal_run):
    from re2g.config import load_config
    from re2g.models.causal import CausalGenerator
    from re2g.pipeline import Re2GPipeline
    from serve.app import Generator

    cfg = load_config(causal_run / "config.yaml", overrides=["serve.generator.num_cpus=1"])
    gen = Generator.func_or_class(str(causal_run), cfg.model_dump(mode="json"))   # loads, then _probe()
    assert isinstance(gen.stage.model, CausalGenerator)
    assert asyncio.run(gen.health())["ok"]
    pipe = Re2GPipeline.from_run_dir(causal_run)
    q = "Where was Palgo Drainne born?"
    reranked = pipe.rerank([q], pipe.retrieve([q]))
    (served,) = asyncio.run(gen.generate_many([q], reranked))
    want = pipe.answer(q)                     # the in-process pipeline's answer over the same passages
    assert served.candidates and served.answer == served.candidates[0].text
    assert [c.text for c in served.candidates] == [c.text for c in want.candidates]
    assert [p.pid for p in served.provenance] == [p.pid for p in want.provenance]
