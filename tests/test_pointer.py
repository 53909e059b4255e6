"""The pointer-generator BART (re2g.models.pointer): its distribution by hand, generation with the
cache, saving, and that it copies answers it never saw as targets where plain BART cannot."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, BartConfig, BartForConditionalGeneration, GenerationConfig

from re2g.models.pointer import PointerBartConfig, PointerBartForConditionalGeneration, copy_distribution

PAD, BOS, EOS = 1, 0, 2
STEPS = 80
IDS = dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=EOS)


def _model(cls=PointerBartForConditionalGeneration, config_cls=PointerBartConfig, vocab=40, d=32, seed=0):
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=vocab, d_model=d, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=2 * d, decoder_ffn_dim=2 * d,
                     max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, **IDS)
    m = cls(cfg)
    m.generation_config = GenerationConfig(**IDS)
    return m


SRC = torch.tensor([[5, 6, 7, 6, 8, EOS], [9, 10, EOS, PAD, PAD, PAD]])
MASK = (SRC != PAD).long()
DEC = torch.tensor([[EOS, BOS, 6, 7], [EOS, BOS, 9, 10]])


def test_copy_distribution_sums_repeated_tokens():
    attn = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]])                 # (1, 1, 4)
    src = torch.tensor([[3, 5, 3, 0]])
    p = copy_distribution(attn, src, 6)
    assert p[0, 0].tolist() == pytest.approx([0.4, 0, 0, 0.4, 0, 0.2])


def test_distribution_equals_hand_computation():
    m = _model().double().eval()
    with torch.no_grad():
        log_p = m(input_ids=SRC, attention_mask=MASK, decoder_input_ids=DEC).logits    # (2, 4, V)
        out = m.model(input_ids=SRC, attention_mask=MASK, decoder_input_ids=DEC)
        h, enc = out.last_hidden_state, out.encoder_last_hidden_state
        for n in range(2):
            for t in range(DEC.shape[1]):
                p_vocab = torch.softmax(m.lm_head(h[n, t]) + m.final_logits_bias[0], -1)
                keep = [i for i in range(SRC.shape[1]) if MASK[n, i]]
                q = m.copy_query(h[n, t])
                s = torch.stack([q @ m.copy_key(enc[n, i]) for i in keep]) / math.sqrt(h.shape[-1])
                a = torch.softmax(s, -1)
                c = sum(a[j] * enc[n, i] for j, i in enumerate(keep))
                g = torch.sigmoid(m.copy_gate(torch.cat([h[n, t], c])))
                p = g * p_vocab
                for j, i in enumerate(keep):
                    p[SRC[n, i]] += (1 - g[0]) * a[j]
                assert torch.allclose(log_p[n, t], torch.log(p), atol=1e-9)
                assert float(p.sum()) == pytest.approx(1.0, abs=1e-9)


def test_generate_with_cache_equals_greedy_without_and_needs_source():
    m = _model().eval()
    with torch.no_grad():
        dec = torch.full((2, 1), EOS)
        done = torch.zeros(2, dtype=torch.bool)
        for _ in range(5):
            nxt = m(input_ids=SRC, attention_mask=MASK, decoder_input_ids=dec, use_cache=False).logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
            done |= nxt == EOS
            dec = torch.cat([dec, nxt[:, None]], 1)
        out = m.generate(input_ids=SRC, attention_mask=MASK, num_beams=1, do_sample=False, max_new_tokens=5)
        assert out.tolist() == dec[:, :out.shape[1]].tolist()
        enc = m.get_encoder()(input_ids=SRC, attention_mask=MASK)
        with pytest.raises(ValueError, match="source token ids"):
            m(encoder_outputs=enc, attention_mask=MASK, decoder_input_ids=DEC)
        same = m(encoder_outputs=(enc.last_hidden_state,), attention_mask=MASK, decoder_input_ids=DEC, source_ids=SRC)
        assert torch.allclose(same.logits, m(input_ids=SRC, attention_mask=MASK, decoder_input_ids=DEC).logits)


def test_saves_and_loads_through_auto_class(tmp_path):
    m = _model().eval()
    m.save_pretrained(tmp_path)
    back = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert isinstance(back, PointerBartForConditionalGeneration)
    with torch.no_grad():
        a = m(input_ids=SRC, attention_mask=MASK, decoder_input_ids=DEC).logits
        b = back(input_ids=SRC, attention_mask=MASK, decoder_input_ids=DEC).logits
    assert torch.equal(a, b)


def _copy_task(rng: random.Random, answers: list[int], n: int):
    """Sources of random filler tokens with MARK followed by the answer somewhere; target = the answer."""
    mark, filler = 3, list(range(4, 12))
    src, tgt = [], []
    for _ in range(n):
        toks = [rng.choice(filler) for _ in range(8)]
        pos = rng.randrange(0, 7)
        ans = rng.choice(answers)
        toks[pos:pos + 2] = [mark, ans]
        src.append(toks + [EOS])
        tgt.append([BOS, ans, EOS])
    return torch.tensor(src), torch.tensor(tgt)


@pytest.mark.parametrize("copy", [True, False], ids=["pointer", "plain"])
def test_copies_answers_never_seen_as_targets(copy):
    """Answers 12..29 in training, 30..39 only at test: the pointer-generator copies them after STEPS
    steps (plain BART cannot produce a token it was only ever shown in its input)."""
    rng = random.Random(0)
    m = _model() if copy else _model(BartForConditionalGeneration, BartConfig)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(STEPS):
        src, tgt = _copy_task(rng, list(range(12, 30)), 32)
        loss = -m(input_ids=src, attention_mask=torch.ones_like(src), labels=tgt).logits.log_softmax(-1) \
            .gather(-1, tgt[..., None]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    src, tgt = _copy_task(random.Random(1), list(range(30, 40)), 64)
    with torch.no_grad():
        out = m.generate(input_ids=src, attention_mask=torch.ones_like(src), num_beams=1, do_sample=False,
                         max_new_tokens=3)
    acc = float((out[:, 2] == tgt[:, 1]).float().mean())     # out: [EOS(start), BOS, answer, ...]
    if copy:
        assert acc >= 0.9, acc
    else:
        assert acc <= 0.1, acc
