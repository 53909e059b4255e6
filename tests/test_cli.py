"""The `re2g` command line from the venv: help texts, and commands on the tiny sample."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

RE2G = str(Path(sys.executable).parent / "re2g")


def run(*args, check=True):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([RE2G, *args], capture_output=True, text=True, env=env, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"re2g {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def test_help():
    """The console script from the venv answers ``--help`` (one process start); each command's help text
    from the same Typer app in process (a process start per command only repeated the script's start-up)."""
    from typer.testing import CliRunner

    from re2g.cli import app

    p = run("--help")
    assert "Usage" in p.stdout
    for sub in ("sample", "passages", "embed", "index", "demo"):
        assert sub in p.stdout
    for cmd in (["sample"], ["passages"], ["embed"], ["index"], ["init-models"], ["retrieval-report"],
                ["config", "show"]):
        res = CliRunner().invoke(app, [*cmd, "--help"])
        assert res.exit_code == 0 and "Usage" in res.output, (cmd, res.output)


def test_config_show_and_bad_override():
    p = run("config", "show", "--preset", "paper", "--set", "index.num_shards=4")
    assert "num_shards: 4" in p.stdout and "facebook/bart-large" in p.stdout
    bad = run("config", "show", "--set", "index.num_shards=zero", check=False)
    assert bad.returncode == 2
    assert "index.num_shards" in bad.stderr and "zero" in bad.stderr


def test_sample_and_passages_commands(tmp_path):
    p = run("sample", str(tmp_path / "s"), "--size", "tiny")
    assert "slot_filling" in p.stdout or "slot_filling" in p.stderr
    assert (tmp_path / "s" / "knowledge_source.jsonl").exists()
    again = run("sample", str(tmp_path / "s"), "--size", "tiny", check=False)
    assert again.returncode == 2 and "overwrite" in again.stderr
    run("sample", str(tmp_path / "s"), "--size", "tiny", "--overwrite")
    run("passages", str(tmp_path / "s" / "knowledge_source.jsonl"), str(tmp_path / "p"))
    assert list((tmp_path / "p").glob("*.parquet"))


def test_demo_asks_one_question_per_relation():
    from re2g.cli import _sample_questions
    from re2g.data.kilt import KiltExample

    exs = [KiltExample(id=str(i), input=f"P{i // 3} [SEP] {r}") for i, r in enumerate(["a", "a", "b", "a", "c", "d"])]
    assert [e.id for e in _sample_questions(exs)] == ["0", "2", "4"]
    plain = [KiltExample(id=str(i), input=f"question {i}?") for i in range(5)]
    assert [e.id for e in _sample_questions(plain)] == ["0", "1", "2"]
