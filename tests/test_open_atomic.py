"""re2g.artifacts.open_atomic: a streamed file appears whole or not at all (local and object-store URIs)."""

from __future__ import annotations

import gzip

import fsspec
import pytest

from re2g.artifacts import open_atomic
from re2g.config import Re2GConfig, load_saved_config, save_config
import json

from re2g.data.kilt import write_jsonl


def test_streamed_file_is_renamed_into_place_and_compressed_by_suffix(tmp_path):
    out = tmp_path / "sub" / "rows.jsonl.gz"
    with open_atomic(out) as f:
        f.write(b'{"a": 1}\n')
        assert not out.exists()                                    # not there until the block ends
        assert [p.name for p in out.parent.iterdir()][0].startswith(".rows.jsonl.gz.tmp-")
    assert gzip.decompress(out.read_bytes()) == b'{"a": 1}\n'
    assert [p.name for p in out.parent.iterdir()] == ["rows.jsonl.gz"]


def test_an_error_mid_write_leaves_the_old_file_and_no_temporary(tmp_path):
    out = tmp_path / "rows.jsonl"
    write_jsonl(str(out), [{"id": "old"}])
    with pytest.raises(RuntimeError, match="boom"):
        with open_atomic(out) as f:
            f.write(b'{"id": "new"}\n')
            raise RuntimeError("boom")
    assert [json.loads(line) for line in out.read_text().splitlines()] == [{"id": "old"}]
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_object_store_uri():
    uri = "memory://re2g-open-atomic/x/rows.jsonl"
    with pytest.raises(ValueError):
        with open_atomic(uri) as f:
            f.write(b"half")
            raise ValueError
    fs = fsspec.filesystem("memory")
    assert not fs.exists("/re2g-open-atomic/x/rows.jsonl")
    with open_atomic(uri) as f:
        f.write(b"whole\n")
    assert fs.cat_file("/re2g-open-atomic/x/rows.jsonl") == b"whole\n"
    assert fs.ls("/re2g-open-atomic/x", detail=False) == ["/re2g-open-atomic/x/rows.jsonl"]


def test_saved_config_round_trips_and_leaves_no_temporary(tmp_path):
    cfg = Re2GConfig()
    path = save_config(cfg, tmp_path / "run")
    assert load_saved_config(tmp_path / "run") == cfg
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]
