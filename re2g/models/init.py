"""Save the starting models of a run (``re2g init-models``): what stage 1 and the index start from."""

from __future__ import annotations

from pathlib import Path

from re2g.config import ModelsConfig


def init_models(models_cfg: ModelsConfig, out: str | Path, *, tokenizers_dir: str | Path | None = None,
                seed: int = 0, which: tuple[str, ...] = ("biencoder", "reranker", "generator")) -> dict[str, Path]:
    """Write ``out/biencoder``, ``out/reranker`` and ``out/generator`` as ``save_pretrained`` directories.

    Models the config leaves as None are built tiny from config over the sample task's tokenizers
    (``tokenizers_dir/wordpiece`` and ``tokenizers_dir/bpe``), deterministically from ``seed``;
    named models are loaded (hub name or local path) and saved as they are.
    """
    import torch

    from re2g.models.factory import load_biencoder, load_generator, load_reranker

    out = Path(out)
    tok = Path(tokenizers_dir) if tokenizers_dir is not None else None
    wordpiece = tok / "wordpiece" if tok is not None else None
    bpe = tok / "bpe" if tok is not None else None
    loaders = {
        "biencoder": lambda: load_biencoder(models_cfg, wordpiece),
        "reranker": lambda: load_reranker(models_cfg, wordpiece),
        "generator": lambda: load_generator(models_cfg, bpe),
    }
    written = {}
    for i, name in enumerate(which):
        torch.manual_seed(seed + i)
        model = loaders[name]()
        written[name] = Path(model.save_pretrained(out / name) or (out / name))
    return written
