"""The model of stages 2 and 4: :class:`Re2GModel` (bi-encoder, generator and, in stage 4, the
reranker as one module for one DeepSpeed engine) and how it is loaded and saved.

The context encoder never trains (a shared bi-encoder gets its own frozen copy), so the saved
bi-encoder still matches the dense index's fingerprint. Saved as ``biencoder/``, ``generator/`` (or
the generator's files at the root: stage 2's output loads as a plain generator directory) and
``reranker/``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from re2g.config import GenerationConfig


class Re2GModel(torch.nn.Module):
    """The bi-encoder, the generator and (stage 4) the reranker as one module for one DeepSpeed
    engine. The context encoder never trains; ``frozen_query_encoder`` keeps the query encoder out
    of training too (no gradient, eval mode)."""

    def __init__(self, biencoder: torch.nn.Module, generator: torch.nn.Module, reranker: torch.nn.Module | None = None,
                 *, frozen_query_encoder: bool = False):
        super().__init__()
        self.biencoder = biencoder
        self.generator = generator
        if reranker is not None:
            self.reranker = reranker
        self.frozen_query_encoder = frozen_query_encoder
        untie_and_freeze_ctx(biencoder)
        if frozen_query_encoder:
            biencoder.query_encoder.requires_grad_(False)

    @property
    def has_reranker(self) -> bool:
        return hasattr(self, "reranker")

    def train(self, mode: bool = True):
        super().train(mode)
        self.biencoder.ctx_encoder.eval()
        if self.frozen_query_encoder:
            self.biencoder.query_encoder.eval()
        return self

    def save_pretrained(self, directory: str | Path, *, generator_at_root: bool = False) -> Path:
        """``biencoder/``, ``generator/`` (or, ``generator_at_root``, the generator's files in
        ``directory`` itself, so it loads as a plain generator directory) and ``reranker/``."""
        d = Path(directory)
        self.generator.save_pretrained(d if generator_at_root else d / "generator")
        self.biencoder.save_pretrained(d / "biencoder")
        if self.has_reranker:
            self.reranker.save_pretrained(d / "reranker")
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, frozen_query_encoder: bool = False,
                        generation: GenerationConfig | None = None) -> "Re2GModel":
        from re2g.models.encoders import BiEncoder
        from re2g.models.reranker import CrossEncoder

        d = Path(directory)
        rr = CrossEncoder.from_pretrained(d / "reranker") if (d / "reranker").is_dir() else None
        gen = d / "generator" if (d / "generator").is_dir() else d
        return cls(BiEncoder.from_pretrained(d / "biencoder"), load_generator_dir(gen, generation), rr,
                   frozen_query_encoder=frozen_query_encoder)


def untie_and_freeze_ctx(biencoder) -> None:
    """A shared bi-encoder gets its own (frozen) copy of the encoder as context encoder, so training
    the query side leaves the passage side -- and the index's fingerprint -- as they were."""
    if biencoder.shared:
        biencoder.ctx_encoder = copy.deepcopy(biencoder.query_encoder)
    biencoder.ctx_encoder.requires_grad_(False)


def reinit_weights(module: torch.nn.Module, std: float) -> None:
    """Every Linear and Embedding weight redrawn from N(0, std), biases and padding rows 0 (BART's own
    initialization scheme, with another std; uses torch's global RNG)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                m.weight.normal_(0.0, std)
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.zero_()
            if isinstance(m, torch.nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()


def load_generator_dir(path: str | Path, generation: GenerationConfig | None = None):
    from re2g.models.generator import Generator

    g = generation or GenerationConfig()
    return Generator.from_pretrained(path, title_sep=g.title_sep, query_sep=g.query_sep)
