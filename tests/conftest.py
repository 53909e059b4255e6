"""Shared fixtures: one local Ray for the whole session, tiny sample task, tiny models."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")          # tests never download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    _serve_apps_in_deploy_order(items)
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# tests/test_one_path.py's served tests deploy the plain app last (its other two apps before it); run
# right after tests/test_serve.py's (its own app), the plain app then stays up for tests/test_serve_resilience.py
# and tests/test_web_page.py: 4 deployments a session instead of 5 (~30 s each on 2 cores)
_SERVED_LATE = "test_one_path.py::test_served_app_"
_SERVE_MODULE = "test_serve.py::"


def _serve_apps_in_deploy_order(items: list) -> None:
    """Move the tests named by ``_SERVED_LATE`` to just after the last test of tests/test_serve.py (when both
    were collected); every other test keeps its place."""
    late = [it for it in items if _SERVED_LATE in it.nodeid]
    rest = [it for it in items if _SERVED_LATE not in it.nodeid]
    last = max((i for i, it in enumerate(rest) if _SERVE_MODULE in it.nodeid), default=None)
    if not late or last is None:
        return
    items[:] = rest[:last + 1] + late + rest[last + 1:]


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs, started once for the whole test session."""
    import ray

    from re2g.runtime import init_ray

    if not ray.is_initialized():   # init_ray: keeps the JVM's signal handlers when a test started Lucene first
        init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, namespace="re2g-tests")
    yield ray
    ray.shutdown()


# --------------------------------------------------------------------------- the tiny sample run
# Built once per session and shared (read-only) by the tests that need real artifacts.


@pytest.fixture(scope="session")
def tiny_sample(tmp_path_factory):
    """The sample task at the ``tiny`` size: a directory with knowledge_source.jsonl, tasks/, tokenizers/."""
    from re2g.config import SampleConfig
    from re2g.data.sample import generate_sample

    out = tmp_path_factory.mktemp("tiny") / "sample"
    generate_sample(out, SampleConfig(size="tiny"), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_passages(tiny_sample, ray_local):
    """The tiny sample's passages Parquet directory (split with Ray Data)."""
    from re2g.config import PassageConfig
    from re2g.data.passages import split_knowledge_source

    out = tiny_sample.parent / "passages"
    split_knowledge_source(str(tiny_sample / "knowledge_source.jsonl"), str(out), PassageConfig())
    return out


@pytest.fixture(scope="session")
def tiny_models(tiny_sample):
    """Untrained tiny models saved as save_pretrained directories: biencoder/, reranker/, generator/."""
    from re2g.config import load_config
    from re2g.models.init import init_models

    out = tiny_sample.parent / "models"
    return init_models(load_config(preset="tiny").models, out, tokenizers_dir=tiny_sample / "tokenizers")


@pytest.fixture(scope="session")
def tiny_run_dir(tiny_sample, tiny_passages, tiny_models, tmp_path_factory):
    """An untrained run directory: config.yaml, sample/, passages/, models/{biencoder,reranker,generator},
    embeddings/, index/{dense (exact), bm25}. Read-only for tests (copy it to change it)."""
    import shutil

    from re2g.config import load_config, save_config
    from re2g.index.embed import embed_corpus_local
    from re2g.index.retrievers import build_indexes

    run = tmp_path_factory.mktemp("run") / "run"
    shutil.copytree(tiny_sample, run / "sample")
    shutil.copytree(tiny_passages, run / "passages")
    for name in ("biencoder", "reranker", "generator"):
        shutil.copytree(tiny_models[name], run / "models" / name)
    cfg = load_config(preset="tiny", overrides=[f"run_dir={run}", "index.exact=true", "generation.num_beams=2",
                                                "generation.max_new_tokens=8"])
    save_config(cfg, run)
    embed_corpus_local(str(run / "passages"), str(run / "models" / "biencoder"), str(run / "embeddings"),
                       batch_size=64, progress=False)
    build_indexes(cfg, passages=str(run / "passages"), embeddings=str(run / "embeddings"),
                  dense_dir=str(run / "index" / "dense"), bm25_dir=str(run / "index" / "bm25"), use_ray=False)
    return run


# --------------------------------------------------------------------------- Serve, once per session
# Serve's controller and HTTP proxy start once per pytest process (each start and shutdown cost tens of
# seconds on 2 cores); the Serve tests' applications are deployed on that one instance, one at a time
# (``ServeInstance.app``): tests/test_serve.py's (API key, CORS, a tight front door) and the plain one that
# tests/test_serve_resilience.py and tests/test_web_page.py share. The helpers live in tests/test_serve.py.


@pytest.fixture(scope="session")
def serve_run_dir(tiny_passages, tiny_models, tmp_path_factory):
    """The Serve tests' run directory (read-only): the session's tiny passages and untrained models,
    embeddings, 2 exact dense shards + BM25 (``test_serve.RUN_OVERRIDES``)."""
    from test_serve import make_run_dir

    run = tmp_path_factory.mktemp("serve-run") / "run"
    run.mkdir()
    return make_run_dir(run, tiny_passages, tiny_models)


@pytest.fixture(scope="session")
def serve_instance(ray_local):
    """Serve on the session's local Ray, started once (in the background) and shut down at the end of the
    session; request it before ``serve_run_dir`` so the two overlap."""
    from ray import serve

    from test_serve import ServeInstance

    instance = ServeInstance()
    yield instance
    instance.thread.join()
    serve.shutdown()
