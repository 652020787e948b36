"""Decoding invariants for every decoder: greedy, sampling and batched beam search."""

from __future__ import annotations

import pytest
import torch

from capattn.decoding import beam_search, greedy, length_penalty, sample
from capattn.models.decoders import CaptionDecoder, ShowAttendTellDecoder, ShowTellDecoder, StepOutput
from capattn.models.encoder import EncoderOutput

PAD, BOS, EOS = 0, 1, 2
V, D, L = 11, 6, 4
SPECIAL = dict(bos=BOS, eos=EOS, pad=PAD)


def make(kind: str) -> CaptionDecoder:
    torch.manual_seed(1)
    if kind == "show_tell":
        dec = ShowTellDecoder(vocab_size=V, feature_dim=D, embed_dim=5, hidden_dim=7)
    else:
        dec = ShowAttendTellDecoder(vocab_size=V, feature_dim=D, embed_dim=5, hidden_dim=7, attention_dim=5)
    return dec.double().eval()  # float64: batched and one-by-one runs must not differ by rounding


def encoded(batch: int, seed: int = 0) -> EncoderOutput:
    g = torch.Generator().manual_seed(seed)
    grid = torch.randn(batch, L, D, generator=g, dtype=torch.float64)
    return EncoderOutput(grid=grid, pooled=grid.mean(1))


@pytest.fixture(params=["show_tell", "show_attend_tell"])
def decoder(request) -> CaptionDecoder:
    return make(request.param)


def ended_cleanly(tokens: torch.Tensor) -> bool:
    """After the first <eos> only <pad>; before it no <pad>, <bos> or <eos>."""
    for row in tokens.reshape(-1, tokens.shape[-1]).tolist():
        if EOS in row:
            cut = row.index(EOS)
            if any(t != PAD for t in row[cut + 1 :]):
                return False
            row = row[:cut]
        if any(t in (PAD, BOS, EOS) for t in row):
            return False
    return True


def test_beam_of_one_is_greedy(decoder):
    enc = encoded(5)
    g = greedy(decoder, enc, max_len=12, **SPECIAL)
    b = beam_search(decoder, enc, beam_size=1, max_len=12, **SPECIAL)
    t = min(g.tokens.shape[-1], b.tokens.shape[-1])
    assert torch.equal(g.tokens[..., :t], b.tokens[..., :t])
    torch.testing.assert_close(g.scores, b.scores)
    if g.alphas is not None:
        torch.testing.assert_close(g.alphas[..., :t, :], b.alphas[..., :t, :])


@pytest.mark.parametrize("length_alpha", [0.0, 0.7])
def test_batched_beam_search_equals_one_image_at_a_time(decoder, length_alpha):
    enc = encoded(4)
    batched = beam_search(decoder, enc, beam_size=3, max_len=10, length_alpha=length_alpha, **SPECIAL)
    for i in range(4):
        one = beam_search(
            decoder,
            EncoderOutput(enc.grid[i : i + 1], enc.pooled[i : i + 1]),
            beam_size=3,
            max_len=10,
            length_alpha=length_alpha,
            **SPECIAL,
        )
        t = one.tokens.shape[-1]
        assert torch.equal(batched.tokens[i, :, :t], one.tokens[0])
        assert (batched.tokens[i, :, t:] == PAD).all()
        torch.testing.assert_close(batched.scores[i], one.scores[0])


@torch.no_grad()
def test_beams_are_sorted_end_cleanly_and_scores_match_the_tokens(decoder):
    enc = encoded(3)
    out = beam_search(decoder, enc, beam_size=4, max_len=15, **SPECIAL)
    assert out.tokens.shape[:2] == (3, 4)
    assert (out.scores[:, :-1] >= out.scores[:, 1:]).all()
    assert ended_cleanly(out.tokens)
    # The score of each hypothesis is the sum of the log-probabilities of its tokens.
    for i in range(3):
        for k in range(4):
            mem = decoder.prepare(EncoderOutput(enc.grid[i : i + 1], enc.pooled[i : i + 1]))
            state, prev, total = decoder.init_state(mem), torch.tensor([BOS]), 0.0
            for tok in out.tokens[i, k].tolist():
                if tok == PAD:
                    break
                step = decoder.step(prev, state, mem)
                total += float(step.logprobs[0, tok])
                state, prev = step.state, torch.tensor([tok])
            assert total == pytest.approx(float(out.scores[i, k]), abs=1e-9)


def test_no_eos_before_max_len_returns_full_length_hypotheses():
    """A model that never says <eos> still gets K captions of max_len tokens, with finite scores."""

    class Chatty(CaptionDecoder):
        def __init__(self):
            super().__init__(vocab_size=V)
            self.logits = torch.nn.Parameter(torch.linspace(0, 1, V))

        def prepare(self, enc):
            return enc.pooled

        def init_state(self, mem):
            return torch.zeros(mem.shape[0], 1)

        def step(self, tokens, state, mem):
            logits = self.logits.expand(tokens.shape[0], -1).clone()
            logits[:, EOS] = -1e9
            return StepOutput(logprobs=logits.log_softmax(-1), state=state + 1, alpha=None)

        def forward(self, enc, captions, lengths):
            raise NotImplementedError

    enc = encoded(2)
    out = beam_search(Chatty().double(), enc, beam_size=3, max_len=7, **SPECIAL)
    assert out.tokens.shape == (2, 3, 7)
    assert (out.tokens != PAD).all() and (out.tokens != EOS).all()
    assert torch.isfinite(out.scores).all()
    assert len({tuple(r) for r in out.tokens[0].tolist()}) == 3  # three distinct hypotheses
    g = greedy(Chatty().double(), enc, max_len=7, **SPECIAL)
    assert g.tokens.shape == (2, 1, 7)


def test_greedy_and_sampling_stop_at_eos(decoder):
    enc = encoded(6)
    assert ended_cleanly(greedy(decoder, enc, max_len=20, **SPECIAL).tokens)
    s = sample(decoder, enc, max_len=20, generator=torch.Generator().manual_seed(0), **SPECIAL)
    assert ended_cleanly(s.tokens)


def test_attention_of_the_chosen_beam_is_returned():
    dec = make("show_attend_tell")
    out = beam_search(dec, encoded(2), beam_size=3, max_len=9, **SPECIAL)
    assert out.alphas.shape == (*out.tokens.shape, L)
    emitted = (out.tokens != PAD).double()
    torch.testing.assert_close(out.alphas.sum(-1), emitted)  # rows sum to 1 while the caption runs, then 0
    assert beam_search(make("show_tell"), encoded(2), beam_size=2, max_len=9, **SPECIAL).alphas is None


def test_sampling_keeps_the_graph_for_policy_gradients():
    dec = make("show_attend_tell").train()
    out = sample(dec, encoded(2), max_len=5, **SPECIAL)
    out.scores.sum().backward()
    assert dec.embed.weight.grad is not None


def test_length_penalty():
    assert float(length_penalty(torch.tensor(7.0), 0.0)) == 1.0
    assert float(length_penalty(torch.tensor(7.0), 1.0)) == pytest.approx(2.0)


def test_beam_size_must_be_positive(decoder):
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(decoder, encoded(1), beam_size=0, **SPECIAL)
