"""Save the starting models of a run (``re2g init-models``): what stage 1 and the index start from.

A pretrained model the config names can be *referenced* instead of copied (``reference=``): the
quickstart does so for the generator, which every reader of a run finds through ``models.generator``
when ``RUN_DIR/models/generator`` does not exist (stage 2 starts from ``models.generator`` too,
:func:`re2g.train.rag_driver.start_generator`), so a copy of a 1 GB reader in every run would never
be read. The run records what it references in ``references.json`` beside the saved models: the name as
configured and, for a local directory, its absolute path and a fingerprint of its files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from re2g.artifacts import sha256_file, write_json_atomic
from re2g.config import ModelsConfig

REFERENCES_FILE = "references.json"
REFERENCE_CHARS = 16


def checkpoint_files_fingerprint(directory: str | Path) -> str:
    """Fingerprint of a checkpoint directory as it lies on disk: sha256 over every regular file's
    relative path and its own sha256, in path order (hidden files skipped); the first 16 hex digits.
    Equal files give equal fingerprints wherever the directory is; any changed byte changes it."""
    root = Path(directory)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a checkpoint directory")
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        h.update(rel.encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()[:REFERENCE_CHARS]


def model_reference(name_or_path: str) -> dict:
    """What a run records for a pretrained model it uses in place: ``{"model": name_or_path}``, plus
    ``path`` (absolute) and ``fingerprint`` (:func:`checkpoint_files_fingerprint`) when it is a local
    directory (a hub name has neither: the hub's cache is not the run's to pin)."""
    ref: dict = {"model": str(name_or_path)}
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        ref.update(path=str(p.resolve()), fingerprint=checkpoint_files_fingerprint(p))
    return ref


def init_models(models_cfg: ModelsConfig, out: str | Path, *, tokenizers_dir: str | Path | None = None,
                seed: int = 0, which: tuple[str, ...] = ("biencoder", "reranker", "generator"),
                reference: tuple[str, ...] = ()) -> dict[str, Path]:
    """Write ``out/biencoder``, ``out/reranker`` and ``out/generator`` as ``save_pretrained`` directories.

    Models the config leaves as None are built tiny from config over the sample task's tokenizers
    (``tokenizers_dir/wordpiece`` and ``tokenizers_dir/bpe``), deterministically from ``seed``;
    named models are loaded (hub name or local path) and saved as they are, except the names in
    ``reference`` (``"generator"`` only: the run's other readers take ``out/biencoder`` and
    ``out/reranker`` by path): a named one of those is neither loaded nor saved but recorded in
    ``out/references.json`` (:func:`model_reference`), and its value in the result is the configured
    name or path. Returns each model's directory (or reference).
    """
    import torch

    from re2g.models.factory import load_biencoder, load_generator, load_reranker

    unknown = set(reference) - {"generator"}
    if unknown:
        raise ValueError(f"init_models(reference=...): only 'generator' can be referenced, not {sorted(unknown)}")
    out = Path(out)
    tok = Path(tokenizers_dir) if tokenizers_dir is not None else None
    wordpiece = tok / "wordpiece" if tok is not None else None
    bpe = tok / "bpe" if tok is not None else None
    loaders = {
        "biencoder": lambda: load_biencoder(models_cfg, wordpiece),
        "reranker": lambda: load_reranker(models_cfg, wordpiece),
        "generator": lambda: load_generator(models_cfg, bpe),
    }
    written: dict[str, Path] = {}
    references: dict[str, dict] = {}
    for i, name in enumerate(which):
        named = getattr(models_cfg, name, None) if name in reference else None
        if named is not None:
            references[name] = model_reference(named)
            written[name] = Path(named)
            continue
        torch.manual_seed(seed + i)
        model = loaders[name]()
        written[name] = Path(model.save_pretrained(out / name) or (out / name))
    if references:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / REFERENCES_FILE, references)
    return written
