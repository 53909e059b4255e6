"""LoRA adapters on a causal-LM generator through ``peft`` (``train.generator.lora`` / ``train.e2e.lora``).

:func:`apply_lora` wraps ``generator.model`` in a ``peft`` ``PeftModel``: every base weight is frozen
and each targeted Linear W gets a trainable low-rank update, W x + (alpha / r) * B A x (B starts at 0,
so the wrapped model starts equal to the base). :func:`lora_parameter_names` names the trainable ones.

Saving (:func:`save_generator`) is one of two layouts, by ``merge_on_save``:

* **merged** (default): a plain Hugging Face directory, each targeted weight W + (alpha / r) * B A
  (:func:`merged_model` builds it aside: the training model is never modified, so the base weights
  stay bit-identical through checkpoints);
* **adapter kept**: ``adapter_config.json`` + ``adapter_model.safetensors``, the tokenizer, and
  ``re2g_model.json`` with ``lora_base``: the absolute location of the base generator (itself a plain
  directory, a hub name or another kept-adapter directory).

Loading: :func:`load_adapter_model` is the hook the causal generator's loader
(``CausalGenerator.from_pretrained``) calls first: for a kept-adapter directory it loads the base
(recursively, through the generator loader) and returns the base with the adapter merged in (a plain
model: it serves and trains like any other); for any other directory it returns None.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from re2g.errors import ArtifactError, ConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_NAME = "default"


def is_lora(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a ``peft`` model (has LoRA layers to train)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def apply_lora(generator, cfg, *, base: str | Path | None = None):
    """Wrap ``generator.model`` (a causal LM) in LoRA adapters from ``cfg`` (``LoraTrainConfig``); only
    the adapters have ``requires_grad``. ``base``: where the generator was loaded from (recorded for the
    adapter-kept save). Returns ``generator`` (modified in place)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("train.*.lora.enabled needs the peft package (pip install 're2g[train]')") from None
    if getattr(generator, "kind", "seq2seq") != "causal":
        raise ConfigError("train.generator.lora / train.e2e.lora: LoRA adapters are for a causal-LM generator "
                          f"(models.tiny.generator_arch: llama, or a causal checkpoint); this one is "
                          f"{getattr(generator, 'kind', 'seq2seq')}")
    if is_lora(generator.model):
        raise ConfigError("the generator already has LoRA adapters")
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=list(cfg.target_modules) if cfg.target_modules else None,
                        bias="none", task_type="CAUSAL_LM")
    try:
        generator.model = get_peft_model(generator.model, config)
    except ValueError as e:
        raise ConfigError(f"train.*.lora: {e}") from None
    if base is not None:
        loc = Path(base)
        where = str(loc.resolve()) if loc.exists() else str(base)
        generator.model.peft_config[ADAPTER_NAME].base_model_name_or_path = where
    return generator


def lora_parameter_names(module: torch.nn.Module) -> set[str]:
    """Names (as in ``module.named_parameters()``) of the LoRA adapter weights."""
    return {n for n, _ in module.named_parameters() if ".lora_" in n}


def _lora_layers(model) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def merged_model(peft_model) -> torch.nn.Module:
    """A new plain model (the base's class and config) whose targeted weights are W + delta, with
    delta = (alpha / r) * B A of the active adapter; ``peft_model`` is left as it was."""
    base = peft_model.get_base_model()
    layers = _lora_layers(base)
    state = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value.detach().clone()
    for name, layer in layers.items():
        for adapter in layer.active_adapters:
            state[f"{name}.weight"] += layer.get_delta_weight(adapter).to(state[f"{name}.weight"].dtype)
    plain = type(base)(base.config)
    plain.generation_config = base.generation_config
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied]:
        raise RuntimeError(f"merging LoRA: missing {missing}, unexpected {unexpected}")
    if missing:
        plain.tie_weights()
    return plain.to(next(base.parameters()).device)


def save_generator(generator, directory: str | Path, *, merge: bool = True) -> Path:
    """Save a generator whose model may carry LoRA adapters: merged into a plain directory, or the
    adapter kept (module docstring). A generator without adapters saves as it always does."""
    d = Path(directory)
    if not is_lora(generator.model):
        return Path(generator.save_pretrained(d) or d)
    if merge:
        wrapped = generator.model
        generator.model = merged_model(wrapped)
        try:
            generator.save_pretrained(d)
        finally:
            generator.model = wrapped
        return d
    from re2g.models.fingerprint import read_model_meta, write_model_meta

    base = generator.model.peft_config[ADAPTER_NAME].base_model_name_or_path
    if not base:
        raise ArtifactError(f"{d}: the LoRA generator has no recorded base model (apply_lora(base=...)) to keep the "
                            "adapter apart from")
    generator.save_pretrained(d)             # PeftModel.save_pretrained: adapter_config.json + adapter weights
    meta = read_model_meta(d) or {"kind": "generator", "generator_kind": "causal"}
    meta.pop("version", None)
    write_model_meta(d, {**{k: v for k, v in meta.items() if k not in ("fingerprints", "counts", "checksums",
                                                                        "config")},
                         "lora_base": str(base)})
    return d


def is_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` is a kept LoRA adapter directory (``adapter_config.json``)."""
    return Path(path, ADAPTER_CONFIG).is_file()


def load_adapter_model(src: str | Path, *, dtype: Any = None) -> torch.nn.Module | None:
    """For a kept-adapter directory: its base (``re2g_model.json`` ``lora_base``, else the adapter
    config's ``base_model_name_or_path``; loaded through the causal generator's loader, so a chain of
    adapters works) with the adapter merged in, a plain model. For any other directory: None."""
    if not is_adapter_dir(src):
        return None
    try:
        from peft import PeftModel
    except ImportError:
        raise ArtifactError(f"{src}: a LoRA adapter directory; loading it needs the peft package "
                            "(pip install 're2g[train]')") from None
    from re2g.models.causal import CausalGenerator
    from re2g.models.fingerprint import read_model_meta

    meta = read_model_meta(src) or {}
    try:
        adapter_cfg = json.loads(Path(src, ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{src}/{ADAPTER_CONFIG}: unreadable ({e})") from None
    base = meta.get("lora_base") or adapter_cfg.get("base_model_name_or_path")
    if not base:
        raise ArtifactError(f"{src}: a LoRA adapter directory without its base model (expected lora_base in "
                            f"re2g_model.json or base_model_name_or_path in {ADAPTER_CONFIG})")
    if Path(base).resolve() == Path(src).resolve():
        raise ArtifactError(f"{src}: the LoRA adapter names itself as its base model")
    try:
        base_model = CausalGenerator.from_pretrained(base, dtype=dtype).model
    except ArtifactError as e:
        raise ArtifactError(f"{src}: cannot load the LoRA adapter's base model {base}: {e}") from None
    try:
        model = PeftModel.from_pretrained(base_model, str(src))
    except (OSError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{src}: cannot apply the LoRA adapter to {base}: {e}") from None
    return model.merge_and_unload()
