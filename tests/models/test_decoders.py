"""Every decoder, tested the same way at tiny sizes (STYLE.md §9)."""

from __future__ import annotations

import pytest
import torch

from capattn.models.decoders import CaptionDecoder, ShowAttendTellDecoder, ShowTellDecoder
from capattn.models.encoder import EncoderOutput, ImageEncoder

V, D, L, B = 13, 8, 9, 3
DECODERS = {
    "show_tell": lambda: ShowTellDecoder(vocab_size=V, feature_dim=D, embed_dim=6, hidden_dim=10, dropout=0.3),
    "show_tell_2layers": lambda: ShowTellDecoder(
        vocab_size=V, feature_dim=D, embed_dim=6, hidden_dim=10, num_layers=2, dropout=0.3
    ),
    "show_attend_tell": lambda: ShowAttendTellDecoder(
        vocab_size=V, feature_dim=D, embed_dim=6, hidden_dim=10, attention_dim=7, dropout=0.3
    ),
    "show_attend_tell_plain": lambda: ShowAttendTellDecoder(
        vocab_size=V, feature_dim=D, embed_dim=6, hidden_dim=10, attention_dim=7, gate=False, deep_output=False
    ),
}


@pytest.fixture(params=sorted(DECODERS))
def decoder(request) -> CaptionDecoder:
    torch.manual_seed(0)
    return DECODERS[request.param]()


def encoder_output(batch: int = B) -> EncoderOutput:
    grid = torch.randn(batch, L, D)
    return EncoderOutput(grid=grid, pooled=grid.mean(1))


def captions() -> tuple[torch.Tensor, torch.Tensor]:
    """Three captions of lengths 6, 4 and 3 (with <bos>=1, <eos>=2, padded with 0)."""
    tokens = torch.tensor([[1, 5, 6, 7, 8, 2], [1, 9, 10, 2, 0, 0], [1, 11, 2, 0, 0, 0]])
    return tokens, torch.tensor([6, 4, 3])


def test_forward_shapes_and_attention_rows_sum_to_one(decoder):
    tokens, lengths = captions()
    out = decoder(encoder_output(), tokens, lengths)
    assert out.logits.shape == (B, tokens.shape[1] - 1, V)
    assert out.aux_loss.shape == ()
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.aux_loss)
    if out.alphas is not None:
        assert out.alphas.shape == (B, tokens.shape[1] - 1, L)
        torch.testing.assert_close(out.alphas.sum(-1), torch.ones(B, tokens.shape[1] - 1))


def test_padding_never_changes_predictions_of_real_tokens(decoder):
    """Right-padding with more pads leaves the logits of real positions unchanged."""
    decoder.eval()
    tokens, lengths = captions()
    enc = encoder_output()
    short = decoder(enc, tokens, lengths)
    longer = decoder(enc, torch.cat([tokens, torch.zeros(B, 4, dtype=torch.long)], 1), lengths)
    for row, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(short.logits[row, : n - 1], longer.logits[row, : n - 1])
    torch.testing.assert_close(short.aux_loss, longer.aux_loss)


def test_every_parameter_gets_a_gradient(decoder):
    tokens, lengths = captions()
    enc = encoder_output()
    out = decoder(enc, tokens, lengths)
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=0)
    (loss + out.aux_loss).backward()
    for name, p in decoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"


def test_step_loop_equals_teacher_forcing(decoder):
    decoder.eval()
    tokens, lengths = captions()
    enc = encoder_output()
    forced = decoder(enc, tokens, lengths)
    mem = decoder.prepare(enc)
    state = decoder.init_state(mem)
    for t in range(tokens.shape[1] - 1):
        out = decoder.step(tokens[:, t], state, mem)
        state = out.state
        torch.testing.assert_close(out.logprobs, forced.logits[:, t].log_softmax(-1), atol=1e-5, rtol=1e-5)
        if forced.alphas is not None:
            torch.testing.assert_close(out.alpha, forced.alphas[:, t], atol=1e-6, rtol=1e-5)
        else:
            assert out.alpha is None


def test_doubly_stochastic_term_follows_eq_14():
    """λ Σ_i (1 − Σ_t α_ti)² over real steps only, per predicted token; λ=0 switches it off."""
    torch.manual_seed(0)
    tokens, lengths = captions()
    enc = encoder_output()
    kwargs = dict(vocab_size=V, feature_dim=D, embed_dim=6, hidden_dim=10, attention_dim=7, dropout=0.0)
    dec = ShowAttendTellDecoder(alpha_c=2.0, **kwargs)
    out = dec(enc, tokens, lengths)
    mask = torch.arange(tokens.shape[1] - 1)[None] < (lengths - 1)[:, None]
    expected = 2.0 * ((1 - (out.alphas * mask[..., None]).sum(1)) ** 2).sum() / mask.sum()
    torch.testing.assert_close(out.aux_loss, expected)
    off = ShowAttendTellDecoder(alpha_c=0.0, **kwargs)
    assert off(enc, tokens, lengths).aux_loss == 0


def test_attention_keys_are_projected_once_per_image():
    """prepare() projects the keys; step() must not project the grid again."""
    dec = DECODERS["show_attend_tell"]()
    calls = []
    dec.attention.key_proj.register_forward_hook(lambda *_: calls.append(1))
    mem = dec.prepare(encoder_output())
    state = dec.init_state(mem)
    for _ in range(4):
        state = dec.step(torch.ones(B, dtype=torch.long), state, mem).state
    assert len(calls) == 1


def test_decoder_rejects_a_vocabulary_without_words():
    with pytest.raises(ValueError, match="vocab_size"):
        ShowTellDecoder(vocab_size=4, feature_dim=D)


@pytest.mark.parametrize("name", ["show_tell", "show_attend_tell"])
def test_encoder_and_decoder_train_together(name):
    """Gradients reach the image encoder through either decoder."""
    torch.manual_seed(0)
    enc = ImageEncoder(backbone="small_cnn", small_cnn_channels=(4, 8))
    dec = {"show_tell": ShowTellDecoder, "show_attend_tell": ShowAttendTellDecoder}[name](
        vocab_size=V, feature_dim=8, embed_dim=6, hidden_dim=10
    )
    tokens, lengths = captions()
    out = dec(enc(torch.rand(B, 3, 24, 24)), tokens, lengths)
    out.logits.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())
