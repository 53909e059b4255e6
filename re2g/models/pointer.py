"""A pointer-generator BART (See et al., 2017, "Get To The Point"): a reader that can copy.

The answers of knowledge-intensive tasks are mostly spans of the passage (a name, a year, a place).
A large pretrained BART copies them through its attention; a tiny BART trained from scratch on a few
hundred questions does not learn to: it memorizes the training answers instead (on the sample task,
a 64-d BART read the gold passage and reached dev EM 0.16 after 400 steps while its training loss fell
to 1.3; the same model with this copy head reached 0.62 — ``docs/training.md``).

At decoder step t, with decoder state h_t (d), encoder states e_1..e_S and source token ids x_1..x_S:

    a_t     = softmax_i( (W_q h_t) . (W_k e_i) / sqrt(d) )        over the source's non-padding positions
    c_t     = sum_i a_t,i e_i
    g_t     = sigmoid(w_g . [h_t; c_t] + b_g)                      (probability of generating)
    p(y=v)  = g_t softmax(lm_head(h_t))_v + (1 - g_t) sum_{i: x_i = v} a_t,i

The model's ``logits`` are ``log p`` (a normalized distribution), so everything built on logits —
``log_softmax``, RAG-Sequence/RAG-Token marginalization, beam search in ``generate`` — works on it
unchanged (``log_softmax(log p) = log p``).

The source ids reach the decoder steps as ``input_ids`` next to ``encoder_outputs`` (BART ignores
``input_ids`` once ``encoder_outputs`` is given) or as ``source_ids``; ``generate`` keeps them itself.
Saved with ``model_type`` ``re2g_pointer_bart``: importing this module registers it with
``AutoConfig``/``AutoModelForSeq2SeqLM``, so ``AutoModelForSeq2SeqLM.from_pretrained`` loads it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSeq2SeqLM, BartConfig, BartForConditionalGeneration
from transformers.modeling_outputs import Seq2SeqLMOutput

MODEL_TYPE = "re2g_pointer_bart"
_TINY = 1e-12  # floor under p before the log: a token neither generated nor in the source


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or wider if it is (half-precision logits are summed in float32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class PointerBartConfig(BartConfig):
    """``BartConfig`` of a :class:`PointerBartForConditionalGeneration` (nothing else added)."""

    model_type = MODEL_TYPE


def copy_distribution(attn: torch.Tensor, source_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """sum_{i: x_i = v} a_t,i: attention (N, T, S) over source ids (N, S) scattered onto the vocabulary
    (N, T, V). Pure function."""
    index = source_ids[:, None, :].expand(-1, attn.shape[1], -1)
    return attn.new_zeros(attn.shape[0], attn.shape[1], vocab_size).scatter_add_(-1, index, attn)


def pointer_mixture(p_vocab: torch.Tensor, attn: torch.Tensor, gate: torch.Tensor,
                    source_ids: torch.Tensor) -> torch.Tensor:
    """g p_vocab + (1 - g) copy: (N, T, V) from p_vocab (N, T, V), attention (N, T, S), gate (N, T, 1)
    and source ids (N, S). Sums to 1 over V where p_vocab and every attention row do. Pure function."""
    return gate * p_vocab + (1 - gate) * copy_distribution(attn, source_ids, p_vocab.shape[-1])


class PointerBartForConditionalGeneration(BartForConditionalGeneration):
    """``BartForConditionalGeneration`` whose output distribution mixes generating and copying (module
    docstring). ``logits`` are log-probabilities; ``loss`` (with ``labels``) is their mean NLL."""

    config_class = PointerBartConfig

    def __init__(self, config: BartConfig):
        super().__init__(config)
        d = config.d_model
        self.copy_query = nn.Linear(d, d)
        self.copy_key = nn.Linear(d, d)
        self.copy_gate = nn.Linear(2 * d, 1)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                encoder_outputs=None, past_key_values=None, inputs_embeds=None, decoder_inputs_embeds=None,
                labels=None, use_cache=None, source_ids=None, **kwargs) -> Seq2SeqLMOutput:
        source = source_ids if source_ids is not None else input_ids
        if source is None:
            raise ValueError("a pointer-generator needs the source token ids: pass input_ids (also next to "
                             "encoder_outputs) or source_ids")
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            from transformers.models.bart.modeling_bart import shift_tokens_right

            decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)
            use_cache = False
        out = self.model(input_ids if encoder_outputs is None else None, attention_mask=attention_mask,
                         decoder_input_ids=decoder_input_ids, encoder_outputs=encoder_outputs,
                         decoder_attention_mask=decoder_attention_mask, past_key_values=past_key_values,
                         inputs_embeds=inputs_embeds, decoder_inputs_embeds=decoder_inputs_embeds,
                         use_cache=use_cache, **kwargs)
        h, enc = out.last_hidden_state, out.encoder_last_hidden_state        # (N, T, d), (N, S, d)
        logits = self.lm_head(h) + self.final_logits_bias.to(h.device)
        scores = _wide(self.copy_query(h) @ self.copy_key(enc).transpose(1, 2)) / math.sqrt(h.shape[-1])
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask.bool()[:, None, :], float("-inf"))
        attn = torch.softmax(scores, -1)                                      # (N, T, S)
        context = (attn.to(enc.dtype) @ enc)                                  # (N, T, d)
        gate = torch.sigmoid(_wide(self.copy_gate(torch.cat([h, context], -1))))
        p = pointer_mixture(torch.softmax(_wide(logits), -1), attn, gate, source.to(h.device))
        log_p = torch.log(p.clamp_min(_TINY))
        loss = None
        if labels is not None:
            loss = nn.functional.nll_loss(log_p.view(-1, log_p.shape[-1]), labels.view(-1).to(h.device),
                                          ignore_index=-100)
        return Seq2SeqLMOutput(loss=loss, logits=log_p, past_key_values=out.past_key_values,
                               encoder_last_hidden_state=enc)

    def _prepare_text_encoder_decoder_kwargs_for_generation(self, inputs_tensor, model_kwargs, model_input_name,
                                                            generation_config):
        """``generate``: keep the source ids for the decoder steps (beam search expands them with the
        encoder outputs)."""
        model_kwargs = super()._prepare_text_encoder_decoder_kwargs_for_generation(
            inputs_tensor, model_kwargs, model_input_name, generation_config)
        model_kwargs["source_ids"] = inputs_tensor
        return model_kwargs


AutoConfig.register(MODEL_TYPE, PointerBartConfig, exist_ok=True)
AutoModelForSeq2SeqLM.register(PointerBartConfig, PointerBartForConditionalGeneration, exist_ok=True)


def is_pointer(model: nn.Module) -> bool:
    """Whether ``model`` needs the source ids at every decoder step."""
    return isinstance(model, PointerBartForConditionalGeneration)
