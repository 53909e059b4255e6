"""The model of stages 2 and 4: :class:`Re2GModel` (bi-encoder, generator and, in stage 4, the
reranker as one module for one DeepSpeed engine) and how it is loaded and saved.

The context encoder never trains (a shared bi-encoder gets its own frozen copy), so the saved
bi-encoder still matches the dense index's fingerprint. Saved as ``biencoder/``, ``generator/`` (or
the generator's files at the root: stage 2's output loads as a plain generator directory) and
``reranker/``.

The generator is either kind (seq2seq ``Generator`` or ``CausalGenerator``): it is loaded through
the one dispatch (:func:`re2g.models.causal.load_any_generator`, ``models.generator_kind``) and may
carry LoRA adapters (:mod:`re2g.models.lora`), saved merged or kept as an adapter directory
(``lora_merge``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from re2g.config import GenerationConfig, ModelsConfig


class Re2GModel(torch.nn.Module):
    """The bi-encoder, the generator and (stage 4) the reranker as one module for one DeepSpeed
    engine. The context encoder never trains; ``frozen_query_encoder`` keeps the query encoder out
    of training too (no gradient, eval mode)."""

    def __init__(self, biencoder: torch.nn.Module, generator: torch.nn.Module, reranker: torch.nn.Module | None = None,
                 *, frozen_query_encoder: bool = False, lora_merge: bool = True):
        super().__init__()
        self.biencoder = biencoder
        self.generator = generator
        if reranker is not None:
            self.reranker = reranker
        self.frozen_query_encoder = frozen_query_encoder
        self.lora_merge = lora_merge      # a LoRA generator saves merged (True) or as its adapter (False)
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
        ``directory`` itself, so it loads as a plain generator directory) and ``reranker/``. A
        generator with LoRA adapters is saved merged or as its adapter (``lora_merge``)."""
        from re2g.models.lora import save_generator

        d = Path(directory)
        save_generator(self.generator, d if generator_at_root else d / "generator", merge=self.lora_merge)
        self.biencoder.save_pretrained(d / "biencoder")
        if self.has_reranker:
            self.reranker.save_pretrained(d / "reranker")
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, frozen_query_encoder: bool = False,
                        generation: GenerationConfig | None = None,
                        models: ModelsConfig | None = None) -> "Re2GModel":
        """The models of :meth:`save_pretrained` (``generator/`` or the generator at the root; a kept
        LoRA adapter comes back merged into its base), the generator read as ``models`` says."""
        from re2g.models.encoders import BiEncoder
        from re2g.models.reranker import CrossEncoder

        d = Path(directory)
        rr = CrossEncoder.from_pretrained(d / "reranker") if (d / "reranker").is_dir() else None
        gen = d / "generator" if (d / "generator").is_dir() else d
        return cls(BiEncoder.from_pretrained(d / "biencoder"), load_generator_dir(gen, generation, models), rr,
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


def load_generator_dir(path: str | Path, generation: GenerationConfig | None = None,
                       models: ModelsConfig | None = None):
    """The generator saved at ``path``, either kind, through :func:`re2g.models.causal.load_any_generator`:
    ``models.generator_kind`` (auto: the checkpoint's own), a causal LM's prompt settings from
    ``models.generator_prompt_template`` / ``generator_chat_template`` when set, a seq2seq one's
    separators from ``generation``."""
    from re2g.models.causal import load_any_generator

    g = generation or GenerationConfig()
    m = models or ModelsConfig()
    return load_any_generator(path, kind=m.generator_kind, title_sep=g.title_sep, query_sep=g.query_sep,
                              prompt_template=m.generator_prompt_template, chat_template=m.generator_chat_template)
