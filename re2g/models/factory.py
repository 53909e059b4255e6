"""Building and loading the models from a :class:`re2g.config.ModelsConfig`.

A name or path in the config goes to the model's ``from_pretrained``; ``None`` builds a tiny model
from ``ModelsConfig.tiny`` (DPRConfig / BertConfig / BartConfig, or LlamaConfig for a causal-LM reader)
around a locally trained tokenizer: WordPiece for the bi-encoder and reranker, byte-level BPE for the
generator. The vocabulary size and the special token ids come from the tokenizer. Initialization draws from torch's global RNG, so
``torch.manual_seed(s)`` before a build gives the same weights every time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from re2g.config import ModelsConfig, TinyModelConfig
from re2g.errors import ConfigError
from re2g.models.causal import CausalGenerator, load_any_generator
from re2g.models.encoders import (DEFAULT_PASSAGE_MAX_LENGTH, DEFAULT_QUERY_MAX_LENGTH, BiEncoder, load_tokenizer,
                                  looks_local)
from re2g.models.fingerprint import read_model_meta
from re2g.models.generator import DEFAULT_SOURCE_MAX_LENGTH, DEFAULT_TARGET_MAX_LENGTH, Generator
from re2g.models.reranker import DEFAULT_RERANKER_MAX_LENGTH, CrossEncoder


def _bert_sizes(tok, tiny: TinyModelConfig) -> dict:
    return dict(vocab_size=len(tok), hidden_size=tiny.hidden_size, num_hidden_layers=tiny.num_layers,
                num_attention_heads=tiny.num_heads, intermediate_size=tiny.intermediate_size,
                max_position_embeddings=tiny.max_position_embeddings, type_vocab_size=2,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
                hidden_dropout_prob=tiny.dropout, attention_probs_dropout_prob=tiny.dropout)


# --------------------------------------------------------------------------- tiny models from config


def build_tiny_biencoder(tokenizer_dir: Any, tiny_cfg: TinyModelConfig, shared: bool = False, *,
                         query_max_length: int = DEFAULT_QUERY_MAX_LENGTH,
                         passage_max_length: int = DEFAULT_PASSAGE_MAX_LENGTH) -> BiEncoder:
    """A DPR bi-encoder of ``tiny_cfg`` sizes over the WordPiece tokenizer at ``tokenizer_dir``
    (a path, or a tokenizer object). ``shared``: one encoder for queries and passages."""
    from transformers import DPRConfig, DPRContextEncoder, DPRQuestionEncoder

    tok = load_tokenizer(tokenizer_dir, "WordPiece tokenizer")
    config = DPRConfig(projection_dim=0, **_bert_sizes(tok, tiny_cfg))
    query = DPRQuestionEncoder(config)
    ctx = None if shared else DPRContextEncoder(config)
    return BiEncoder(query, ctx, tok, query_max_length=query_max_length, passage_max_length=passage_max_length)


def build_tiny_reranker(tokenizer_dir: Any, tiny_cfg: TinyModelConfig, *,
                        max_length: int = DEFAULT_RERANKER_MAX_LENGTH) -> CrossEncoder:
    """A 1-label ``BertForSequenceClassification`` of ``tiny_cfg`` sizes over the WordPiece tokenizer;
    with ``tiny_cfg.reranker_exact_match`` a third token type marks passage tokens found in the query
    (see :class:`CrossEncoder`)."""
    from transformers import BertConfig, BertForSequenceClassification

    tok = load_tokenizer(tokenizer_dir, "WordPiece tokenizer")
    sizes = _bert_sizes(tok, tiny_cfg)
    if tiny_cfg.reranker_exact_match:
        sizes["type_vocab_size"] = 3
    model = BertForSequenceClassification(BertConfig(num_labels=1, **sizes))
    return CrossEncoder(model, tok, max_length=max_length)


def build_tiny_generator(bpe_tokenizer_dir: Any, tiny_cfg: TinyModelConfig, *,
                         source_max_length: int = DEFAULT_SOURCE_MAX_LENGTH,
                         target_max_length: int = DEFAULT_TARGET_MAX_LENGTH, **source_format) -> Generator:
    """A ``BartForConditionalGeneration`` of ``tiny_cfg`` sizes (layers each side) over the byte-level
    BPE tokenizer; pad/bos/eos from the tokenizer, decoder start = eos as in BART. With
    ``tiny_cfg.generator_copy`` a pointer-generator BART (:mod:`re2g.models.pointer`). Targets are
    tokenized with a leading space (``target_prefix``), as the answer's words occur inside passages.
    ``source_format``: ``title_sep`` / ``query_sep`` for :class:`Generator`.

    ``tiny_cfg.generator_arch == "llama"``: a decoder-only LM instead (:func:`build_tiny_causal_generator`;
    ``source_format`` then takes its ``prompt_template`` / ``chat_template``, seq2seq separators are dropped)."""
    from transformers import BartConfig, BartForConditionalGeneration, GenerationConfig

    from re2g.models.pointer import PointerBartConfig, PointerBartForConditionalGeneration

    if tiny_cfg.generator_arch == "llama":
        keep = {k: v for k, v in source_format.items() if k in ("prompt_template", "chat_template")}
        return build_tiny_causal_generator(bpe_tokenizer_dir, tiny_cfg, source_max_length=source_max_length,
                                           target_max_length=target_max_length, **keep)
    source_format = {k: v for k, v in source_format.items() if k in ("title_sep", "query_sep")}
    tok = load_tokenizer(bpe_tokenizer_dir, "BPE tokenizer")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(tok, name) is None:
            raise ConfigError(f"the generator's tokenizer has no {name[:-9]} token (expected BART's <s> <pad> </s>)")
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               decoder_start_token_id=tok.eos_token_id)
    dropout = tiny_cfg.dropout
    config_cls, model_cls = ((PointerBartConfig, PointerBartForConditionalGeneration) if tiny_cfg.generator_copy
                             else (BartConfig, BartForConditionalGeneration))
    config = config_cls(vocab_size=len(tok), d_model=tiny_cfg.hidden_size,
                        encoder_layers=tiny_cfg.num_layers, decoder_layers=tiny_cfg.num_layers,
                        encoder_attention_heads=tiny_cfg.num_heads, decoder_attention_heads=tiny_cfg.num_heads,
                        encoder_ffn_dim=tiny_cfg.intermediate_size, decoder_ffn_dim=tiny_cfg.intermediate_size,
                        max_position_embeddings=tiny_cfg.max_position_embeddings, dropout=dropout,
                        attention_dropout=dropout, activation_dropout=dropout, **ids)
    model = model_cls(config)
    model.generation_config = GenerationConfig(forced_eos_token_id=tok.eos_token_id, **ids)
    return Generator(model, tok, source_max_length=source_max_length, target_max_length=target_max_length,
                     target_prefix=" ", **source_format)


def build_tiny_causal_generator(bpe_tokenizer_dir: Any, tiny_cfg: TinyModelConfig, *,
                                source_max_length: int = DEFAULT_SOURCE_MAX_LENGTH,
                                target_max_length: int = DEFAULT_TARGET_MAX_LENGTH, prompt_template: str | None = None,
                                chat_template: bool | None = None) -> CausalGenerator:
    """A Llama-style decoder-only LM (``LlamaForCausalLM``: RoPE, RMSNorm, SwiGLU; input and output
    embeddings tied) of ``tiny_cfg`` sizes over the byte-level BPE tokenizer, as a
    :class:`CausalGenerator` (targets with a leading space, prompts from ``prompt_template``). With the
    default sizes and a 4,000-token vocabulary: about 340k parameters."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(bpe_tokenizer_dir, "BPE tokenizer")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(tok, name) is None:
            raise ConfigError(f"the generator's tokenizer has no {name[:-9]} token (expected <s> <pad> </s>)")
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=tiny_cfg.hidden_size,
                         intermediate_size=tiny_cfg.intermediate_size, num_hidden_layers=tiny_cfg.num_layers,
                         num_attention_heads=tiny_cfg.num_heads, num_key_value_heads=tiny_cfg.num_heads,
                         max_position_embeddings=tiny_cfg.max_position_embeddings,
                         attention_dropout=tiny_cfg.dropout, tie_word_embeddings=True, **ids)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**ids)
    return CausalGenerator(model, tok, prompt_template=prompt_template, chat_template=bool(chat_template),
                           source_max_length=source_max_length, target_max_length=target_max_length,
                           target_prefix=" ")


# --------------------------------------------------------------------------- from a ModelsConfig


def _is_saved_biencoder(name_or_path: str) -> bool:
    p = Path(name_or_path).expanduser()
    if not (looks_local(name_or_path) and p.is_dir()):
        return False
    meta = read_model_meta(p)
    return meta is not None and meta.get("kind") == "biencoder"


def load_biencoder(models_cfg: ModelsConfig, tokenizer_dir: Any = None) -> BiEncoder:
    """The bi-encoder a config names; lengths from the config.

    * ``query_encoder`` and ``ctx_encoder`` both None: a tiny one over ``tokenizer_dir`` (required);
    * ``query_encoder`` a directory saved by ``BiEncoder.save_pretrained``: that (``ctx_encoder``
      None or the same path; shared or not as it was saved);
    * otherwise two encoder checkpoints (names or paths: DPR or any Hugging Face encoder), or one
      (``shared_encoder``, or ``ctx_encoder`` unset with a non-DPR checkpoint).
    ``models.pooling`` / ``normalize`` / ``*_prefix`` / ``title_separator`` override the encoder
    settings the checkpoint implies. ``tokenizer_dir`` is used for tiny builds only; checkpoints
    bring their tokenizers.
    """
    q, c = models_cfg.query_encoder, models_cfg.ctx_encoder
    lengths = dict(query_max_length=models_cfg.query_max_length, passage_max_length=models_cfg.passage_max_length,
                   **models_cfg.encoder_overrides())
    if q is None and c is None:
        if tokenizer_dir is None:
            raise ConfigError("models.query_encoder and models.ctx_encoder are not set: building a tiny "
                              "bi-encoder needs a WordPiece tokenizer directory")
        enc = build_tiny_biencoder(tokenizer_dir, models_cfg.tiny, shared=models_cfg.shared_encoder,
                                   query_max_length=models_cfg.query_max_length,
                                   passage_max_length=models_cfg.passage_max_length)
        enc.settings = enc.settings.override(**models_cfg.encoder_overrides())
        return enc
    if q is None:
        raise ConfigError(f"models.ctx_encoder is {c!r} but models.query_encoder is not set")
    if _is_saved_biencoder(q):
        if c is not None and c != q:
            raise ConfigError(f"models.query_encoder {q!r} is a saved bi-encoder with its own context encoder; "
                              f"models.ctx_encoder ({c!r}) must be unset or the same path")
        return BiEncoder.from_pretrained(q, **lengths)
    if models_cfg.shared_encoder:
        if c is not None and c != q:
            raise ConfigError(f"models.shared_encoder is true but models.query_encoder ({q!r}) and "
                              f"models.ctx_encoder ({c!r}) differ")
        return BiEncoder.from_pretrained(q, shared=True, **lengths)
    if c is None:
        if _is_dpr_checkpoint(q):
            raise ConfigError(f"models.query_encoder is the DPR question encoder {q!r} but models.ctx_encoder is "
                              "not set (set it, or set models.shared_encoder: true)")
        return BiEncoder.from_pretrained(q, **lengths)
    return BiEncoder.from_pretrained(q, c, **lengths)


def _is_dpr_checkpoint(name_or_path: str) -> bool:
    """True when a local checkpoint's config says ``model_type: dpr`` (hub names: assumed DPR only
    when the name says so, as the paper's ``facebook/dpr-*``)."""
    import json

    p = Path(name_or_path).expanduser() / "config.json"
    if p.is_file():
        try:
            return json.loads(p.read_text()).get("model_type") == "dpr"
        except (OSError, ValueError):
            return False
    return "dpr" in str(name_or_path).lower()


def load_reranker(models_cfg: ModelsConfig, tokenizer_dir: Any = None) -> CrossEncoder:
    """``models.reranker`` loaded, or (None) a tiny one over the WordPiece ``tokenizer_dir``."""
    if models_cfg.reranker is None:
        if tokenizer_dir is None:
            raise ConfigError("models.reranker is not set: building a tiny reranker needs a WordPiece "
                              "tokenizer directory")
        return build_tiny_reranker(tokenizer_dir, models_cfg.tiny, max_length=models_cfg.reranker_max_length)
    return CrossEncoder.from_pretrained(models_cfg.reranker, max_length=models_cfg.reranker_max_length)


def load_generator(models_cfg: ModelsConfig, bpe_tokenizer_dir: Any = None) -> Generator | CausalGenerator:
    """``models.generator`` loaded, or (None) a tiny one over the byte-level BPE ``bpe_tokenizer_dir``
    (BART, or a causal LM with ``models.tiny.generator_arch: llama``). The class follows
    ``models.generator_kind`` (auto: the checkpoint's, :func:`re2g.models.causal.load_any_generator`);
    a causal generator gets ``models.generator_prompt_template`` / ``generator_chat_template`` when set."""
    lengths = dict(source_max_length=models_cfg.generator_source_max_length,
                   target_max_length=models_cfg.generator_target_max_length)
    prompt = dict(prompt_template=models_cfg.generator_prompt_template,
                  chat_template=models_cfg.generator_chat_template)
    if models_cfg.generator is None:
        if bpe_tokenizer_dir is None:
            raise ConfigError("models.generator is not set: building a tiny generator needs a byte-level "
                              "BPE tokenizer directory")
        built = "causal" if models_cfg.tiny.generator_arch == "llama" else "seq2seq"
        if models_cfg.generator_kind not in ("auto", built):
            raise ConfigError(f"models.generator_kind is {models_cfg.generator_kind} but models.tiny.generator_arch "
                              f"{models_cfg.tiny.generator_arch} builds a {built} generator")
        return build_tiny_generator(bpe_tokenizer_dir, models_cfg.tiny, **lengths, **prompt)
    return load_any_generator(models_cfg.generator, kind=models_cfg.generator_kind, **lengths, **prompt)
