"""Every decoder, tested the same way at tiny sizes (STYLE.md §9)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from capattn.models import attention as attention_module
from capattn.models.decoders import CaptionDecoder, ShowAttendTellDecoder, ShowTellDecoder
from capattn.models.encoder import EncoderOutput, ImageEncoder

from ..conftest import random_captions

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
    mask = torch.arange(tokens.shape[1] - 1)[None] < (lengths - 1)[:, None]
    assert torch.equal(out.mask, mask)
    assert out.logits.shape == (int(mask.sum()), V)  # real positions only, never padding
    assert torch.equal(out.targets, tokens[:, 1:][mask]) and (out.targets != 0).all()
    assert out.padded_logits().shape == (B, tokens.shape[1] - 1, V)
    assert out.aux_loss.shape == ()
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.aux_loss)
    if out.alphas is not None:
        assert out.alphas.shape == (B, tokens.shape[1] - 1, L)
        torch.testing.assert_close(out.alphas.sum(-1), mask.float())  # one over real steps, zero after


def test_padding_never_changes_predictions_of_real_tokens(decoder):
    """Right-padding with more pads leaves the logits of real positions unchanged."""
    decoder.eval()
    tokens, lengths = captions()
    enc = encoder_output()
    short = decoder(enc, tokens, lengths)
    longer = decoder(enc, torch.cat([tokens, torch.zeros(B, 4, dtype=torch.long)], 1), lengths)
    torch.testing.assert_close(short.logits, longer.logits)
    torch.testing.assert_close(short.aux_loss, longer.aux_loss)


def test_every_parameter_gets_a_gradient(decoder):
    tokens, lengths = captions()
    enc = encoder_output()
    out = decoder(enc, tokens, lengths)
    loss = torch.nn.functional.cross_entropy(out.logits, out.targets)
    (loss + out.aux_loss).backward()
    for name, p in decoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name == "attention.score.bias":
            # It adds the same number to every energy of a row, which softmax ignores: its gradient
            # is zero, exactly from the hand-written loop (autograd gives rounding noise).
            assert p.grad.abs().max() == 0, name
            continue
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"


def test_step_loop_equals_teacher_forcing(decoder):
    decoder.eval()
    tokens, lengths = captions()
    enc = encoder_output()
    forced = decoder(enc, tokens, lengths)
    logits = forced.padded_logits()
    mem = decoder.prepare(enc)
    state = decoder.init_state(mem)
    for t in range(tokens.shape[1] - 1):
        out = decoder.step(tokens[:, t], state, mem)
        state = out.state
        real = forced.mask[:, t]  # forward computes nothing for captions that have ended
        torch.testing.assert_close(out.logprobs[real], logits[real, t].log_softmax(-1), atol=1e-5, rtol=1e-5)
        if forced.alphas is not None:
            torch.testing.assert_close(out.alpha[real], forced.alphas[real, t], atol=1e-6, rtol=1e-5)
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
    expected = 2.0 * ((1 - out.alphas.sum(1)) ** 2).sum() / mask.sum()
    torch.testing.assert_close(out.aux_loss, expected)
    off = ShowAttendTellDecoder(alpha_c=0.0, **kwargs)
    assert off(enc, tokens, lengths).aux_loss == 0


@pytest.mark.parametrize("grid_grad", [False, True], ids=["cached_features", "encoder_trains"])
def test_grouped_captions_give_the_loss_and_gradients_of_a_row_per_caption(decoder, grid_grad):
    """``image_index`` (several captions per image, ``data.group_captions``): the same outputs,
    loss and gradients as the batch with each image's features repeated for every caption, and
    Show, Attend and Tell projects the keys once per image."""
    decoder.to(torch.float64)
    decoder.dropout.p = 0.0
    tokens, lengths = random_captions(8, 9, vocab=V, seed=4)
    image_index = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2])  # image 1 has one caption
    grid = torch.randn(3, L, D, dtype=torch.float64, requires_grad=grid_grad)
    params = list(decoder.parameters()) + ([grid] if grid_grad else [])
    projected = []
    if isinstance(decoder, ShowAttendTellDecoder):
        decoder.attention.key_proj.register_forward_hook(lambda m, args, out: projected.append(args[0].shape[0]))

    def loss_and_grads(enc: EncoderOutput, **kwargs):
        out = decoder(enc, tokens, lengths, **kwargs)
        loss = torch.nn.functional.cross_entropy(out.logits, out.targets) + out.aux_loss
        return out, loss, torch.autograd.grad(loss, params)

    grouped, loss, grads = loss_and_grads(EncoderOutput(grid=grid, pooled=grid.mean(1)), image_index=image_index)
    rows = grid.index_select(0, image_index)
    expected, expected_loss, expected_grads = loss_and_grads(EncoderOutput(grid=rows, pooled=rows.mean(1)))
    assert projected in ([], [3, 8])  # once per image, then once per caption for the reference
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grouped.logits, expected.logits)
    assert torch.equal(grouped.targets, expected.targets) and torch.equal(grouped.mask, expected.mask)
    if expected.alphas is not None:
        torch.testing.assert_close(grouped.alphas, expected.alphas)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)
    with torch.no_grad():  # validation's loss: no autograd, the plain loop
        enc = EncoderOutput(grid=grid.detach(), pooled=grid.detach().mean(1))
        got = decoder(enc, tokens, lengths, image_index=image_index).logits
        torch.testing.assert_close(got, expected.logits)


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
    (out.logits.sum() + out.aux_loss).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


# --- the fast teacher-forced path against a straightforward one --------------------------------


def reference_forward(
    dec: ShowAttendTellDecoder,
    enc: EncoderOutput,
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    *,
    autocast: str | None = None,
):
    """Show, Attend and Tell as it was written before the speed work: every step in the loop, the
    output layer at every (padded) position, nn.LSTMCell, keys projected once. Returns the loss
    (cross-entropy with ignore_index=<pad> + the doubly stochastic term) and the alphas.

    ``autocast``: under CPU bf16 autocast, with the recurrence (attention, β, the LSTM) in the
    parameters' dtype with autocast off (``"loop_fp32"``), or everything under it (``"all"``)."""
    dtype = dec.cell.weight_ih.dtype
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def recurrence():
        return torch.autocast("cpu", enabled=False) if autocast == "loop_fp32" else contextlib.nullcontext()

    def to_loop(x):
        return x.to(dtype) if autocast == "loop_fp32" else x

    with amp:
        keys = to_loop(dec.attention.project_keys(enc.grid))
        mean = enc.grid.mean(dim=1)
        h, c = to_loop(torch.tanh(dec.init_h(mean))), to_loop(torch.tanh(dec.init_c(mean)))
        words = dec.embed(tokens[:, :-1])
        logits, alphas = [], []
        for t in range(words.shape[1]):
            emb = words[:, t]
            with recurrence():
                context, alpha = dec.attention(keys, enc.grid, h)
                if dec.f_beta is not None:
                    context = torch.sigmoid(dec.f_beta(h)) * context
                h, c = dec.cell(torch.cat([emb, context], dim=-1), (h, c))
            if dec.L_h is not None:
                logits.append(dec.L_o(dec.dropout(emb + dec.L_h(h) + dec.L_z(context))))
            else:
                logits.append(dec.L_o(dec.dropout(h)))
            alphas.append(alpha)
        logits_t, alphas_t = torch.stack(logits, 1), torch.stack(alphas, 1)  # (B, T−1, V), (B, T−1, L)
        mask = torch.arange(words.shape[1])[None] < (lengths - 1)[:, None]
        ce = torch.nn.functional.cross_entropy(logits_t.flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=0)
        penalty = ((1.0 - (alphas_t * mask[..., None]).sum(1)) ** 2).sum() / mask.sum()
    return ce + dec.alpha_c * penalty, alphas_t * mask[..., None]


@pytest.mark.parametrize("kwargs", [{}, {"gate": False, "deep_output": False}], ids=["paper", "plain"])
@pytest.mark.parametrize("grid_grad", [False, True], ids=["cached_features", "encoder_trains"])
@pytest.mark.parametrize("path", ["pytorch", "pytorch_gpu_branches", "native_kernels"])
def test_fast_forward_has_the_loss_and_gradients_of_the_straightforward_loop(kwargs, grid_grad, path, monkeypatch):
    """Hoisted matmuls, a shrinking sorted batch and the time loop's hand-written backward change
    nothing. float64 runs attention in PyTorch, with a CPU's branches or a GPU's (whole batches,
    batched matmuls); float32 the fused CPU attention kernels where they are built."""
    dtype = torch.float32 if path == "native_kernels" else torch.float64
    if path == "pytorch_gpu_branches":
        monkeypatch.setattr(attention_module, "_whole_batch", lambda x: True)
    torch.manual_seed(0)
    dec = ShowAttendTellDecoder(
        vocab_size=V, feature_dim=D, embed_dim=6, hidden_dim=10, attention_dim=7, dropout=0.0, **kwargs
    ).to(dtype)
    tokens, lengths = random_captions(7, 9, vocab=V, seed=3)  # unsorted lengths, some of them equal
    grid = torch.randn(7, L, D, dtype=dtype, requires_grad=grid_grad)
    enc = EncoderOutput(grid=grid, pooled=grid.mean(1))
    params = [p for p in dec.parameters()] + ([grid] if grid_grad else [])

    expected_loss, expected_alphas = reference_forward(dec, enc, tokens, lengths)
    expected = torch.autograd.grad(expected_loss, params)
    out = dec(enc, tokens, lengths)
    loss = torch.nn.functional.cross_entropy(out.logits, out.targets) + out.aux_loss
    got = torch.autograd.grad(loss, params)
    tol = {} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, expected_loss, **tol)
    torch.testing.assert_close(out.alphas, expected_alphas, **tol)
    for g_got, g_expected in zip(got, expected, strict=True):
        torch.testing.assert_close(g_got, g_expected, **tol)


@pytest.mark.parametrize("path", ["cpu_branches", "pytorch_gpu_branches"])
def test_under_bf16_autocast_the_loop_trains_in_fp32_and_the_rest_in_bf16(path, monkeypatch):
    """``--trainer.precision=bf16-mixed``: the hand-written loop's recurrence runs with autocast off, in
    fp32 (its α are the fp32 recurrence's on the bf16-projected keys, to fp32 rounding; a bf16 loop's
    are not), while the keys' projection, the output layer and the loop's two weight gradients over
    all positions are bf16 matmuls; backward may run inside the autocast region, as in a plain
    training loop; every gradient is fp32 and close to the reference's."""
    if path == "pytorch_gpu_branches":
        monkeypatch.setattr(attention_module, "_whole_batch", lambda x: True)
    torch.manual_seed(0)
    dec = ShowAttendTellDecoder(vocab_size=V, feature_dim=D, embed_dim=6, hidden_dim=10, attention_dim=7, dropout=0.0)
    tokens, lengths = random_captions(7, 9, vocab=V, seed=3)
    grid = torch.randn(7, L, D)
    enc = EncoderOutput(grid=grid, pooled=grid.mean(1))
    names, params = zip(*dec.named_parameters(), strict=True)
    expected_loss, expected_alphas = reference_forward(dec, enc, tokens, lengths, autocast="loop_fp32")
    expected = dict(zip(names, torch.autograd.grad(expected_loss, params), strict=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dec(enc, tokens, lengths)
        loss = torch.nn.functional.cross_entropy(out.logits, out.targets) + out.aux_loss
        got = dict(zip(names, torch.autograd.grad(loss, params), strict=True))
    assert out.logits.dtype == torch.bfloat16 and out.alphas.dtype == torch.float32
    fp32 = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.alphas, expected_alphas, **fp32)
    _, bf16_loop_alphas = reference_forward(dec, enc, tokens, lengths, autocast="all")
    assert not torch.allclose(bf16_loop_alphas.float(), expected_alphas, **fp32)  # the check can tell
    torch.testing.assert_close(loss, expected_loss, rtol=1e-3, atol=1e-3)
    assert all(g.dtype == torch.float32 for g in got.values())
    assert torch.equal(got.pop("attention.score.bias"), torch.zeros(1))  # see test_every_parameter_gets_a_gradient
    # Matmuls in bf16 round differently over N stacked rows than per step (measured 1.6e-3 to 7e-3): the
    # deep output layer's weights, and the loop's two weight gradients summed over all positions,
    # which it computes in autocast's dtype as autocast does every other layer's. Everything else the
    # loop's fp32 recurrence gives (its biases, the embedding, the score, the keys' projection and the
    # initial state through the keys' and h_0's gradients) agrees to fp32 rounding (measured ≤ 1.2e-6;
    # a bf16 loop's are off by 1e-3 to 3e-2).
    bf16_matmuls = ("L_h.weight", "L_z.weight", "L_o.weight", "L_h.bias", "L_z.bias", "L_o.bias")
    bf16_matmuls += ("cell.weight_ih", "cell.weight_hh", "attention.query_proj.weight", "f_beta.weight")
    for name, g in got.items():
        error = float((g - expected[name]).norm() / expected[name].norm())
        assert error < (2e-2 if name in bf16_matmuls else 1e-5), (name, error)


def test_backward_twice_through_a_retained_graph_doubles_the_gradients():
    """The per-step gradient buffers of the fast loop are reset after each backward."""
    torch.manual_seed(0)
    dec = DECODERS["show_attend_tell"]().double()
    tokens, lengths = captions()
    grid = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    out = dec(EncoderOutput(grid=grid, pooled=grid.mean(1)), tokens, lengths)
    loss = torch.nn.functional.cross_entropy(out.logits, out.targets) + out.aux_loss
    loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in dec.parameters()] + [grid.grad.clone()]
    loss.backward()
    for g_once, g_twice in zip(once, [p.grad for p in dec.parameters()] + [grid.grad], strict=True):
        torch.testing.assert_close(g_twice, 2 * g_once)


def reference_step(dec: ShowAttendTellDecoder, tokens, state, keys, grid):
    """One step as it was written before the speed work (nn.LSTMCell, one row per image)."""
    h, c = state
    emb = dec.embed(tokens)
    context, alpha = dec.attention(keys, grid, h)
    context = torch.sigmoid(dec.f_beta(h)) * context
    h, c = dec.cell(torch.cat([emb, context], dim=-1), (h, c))
    logits = dec.L_o(emb + dec.L_h(h) + dec.L_z(context))
    return logits.log_softmax(-1), (h, c), alpha


@pytest.mark.parametrize("grad", [False, True], ids=["decoding", "autograd"])
def test_hypotheses_of_one_image_share_its_memory(grad):
    """step() with K hypotheses per image of an unexpanded memory == the old step on K copies of it."""
    torch.manual_seed(0)
    dec = DECODERS["show_attend_tell"]().double().eval()
    enc = EncoderOutput(grid=torch.randn(B, L, D, dtype=torch.float64), pooled=torch.zeros(B, D))
    with torch.set_grad_enabled(grad):
        mem = dec.prepare(enc)
        assert dec.expand_memory(mem, 4) is mem  # no copy of the grid per beam
        state = tuple(
            x.repeat_interleave(4, 0) + 0.1 * torch.randn(B * 4, 10, dtype=torch.float64) for x in dec.init_state(mem)
        )
        tokens = torch.randint(4, V, (B * 4,))
        shared = dec.step(tokens, state, mem)
        copied = CaptionDecoder.expand_memory(dec, mem, 4)  # the default: K copies
        logprobs, (h, c), alpha = reference_step(dec, tokens, state, copied.keys, copied.grid)
    torch.testing.assert_close(shared.logprobs, logprobs)
    torch.testing.assert_close(shared.alpha, alpha)
    torch.testing.assert_close(shared.state[0], h)
    torch.testing.assert_close(shared.state[1], c)


@pytest.mark.slow
def test_compiled_step_gives_the_same_step():
    """``compile_step=True`` (the GPU switch) changes how step runs, not what it computes."""
    torch.manual_seed(0)
    kwargs = dict(vocab_size=V, feature_dim=D, embed_dim=6, hidden_dim=10, attention_dim=7)
    plain_dec = ShowAttendTellDecoder(**kwargs).eval()
    compiled = ShowAttendTellDecoder(compile_step=True, **kwargs).eval()
    compiled.load_state_dict(plain_dec.state_dict())
    enc = encoder_output()
    outs = []
    with torch.no_grad():
        for dec in (plain_dec, compiled):
            mem = dec.prepare(enc)
            state = dec.init_state(mem)
            for t in range(3):
                state = dec.step(torch.full((B,), t + 4), state, mem).state
            outs.append(dec.step(torch.full((B,), 5), state, mem))
    torch.testing.assert_close(outs[0].logprobs, outs[1].logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0].alpha, outs[1].alpha, atol=1e-5, rtol=1e-5)


def test_decoding_step_computes_the_output_layer_of_the_autograd_step(decoder):
    """Without autograd the output layer's bias rides in its matmul (``_FoldedLinear``): same logprobs
    as the autograd step, and after the weights change the next search uses the new ones."""
    decoder.eval()
    enc = encoder_output()
    tokens = torch.tensor([4, 5, 6])
    layer = decoder.fc if isinstance(decoder, ShowTellDecoder) else decoder.L_o

    def step(grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            mem = decoder.prepare(enc)
            return decoder.step(tokens, decoder.init_state(mem), mem).logprobs.detach()

    torch.testing.assert_close(step(False), step(True))
    before = step(False)
    with torch.no_grad():
        layer.bias[5] += 3.0  # as an optimizer step between two validation searches would
    after = step(False)
    torch.testing.assert_close(after, step(True))
    shift = (after[:, 5] - after[:, 4]) - (before[:, 5] - before[:, 4])  # word 5's logit, against word 4's
    torch.testing.assert_close(shift, torch.full_like(shift, 3.0))


@pytest.mark.parametrize("name", ["show_attend_tell", "show_attend_tell_plain"])
def test_decoding_steps_look_up_the_word_part_of_the_gates_as_the_autograd_step_computes_it(name):
    """Without autograd each word's E y W_eᵀ is computed once per search and looked up after that
    (``_WordGates``): steps that feed new words, repeated words and both agree with the autograd
    step; a weight changed where torch counts no version (fused Adam) is seen by the next search."""
    torch.manual_seed(0)
    decoder = DECODERS[name]().eval()
    enc = encoder_output()
    words = [torch.tensor([4, 5, 6]), torch.tensor([5, 5, 7]), torch.tensor([7, 4, 8])]

    def search(grad: bool) -> list[torch.Tensor]:
        with torch.set_grad_enabled(grad):
            mem = decoder.prepare(enc)
            state, out = decoder.init_state(mem), []
            for tokens in words:
                step = decoder.step(tokens, state, mem)
                state = step.state
                out.append(step.logprobs.detach())
            return out

    torch.testing.assert_close(search(False), search(True))
    with torch.no_grad():
        decoder.embed.weight.data[5] += 1.0  # .data: no version bump, as torch's fused Adam
    torch.testing.assert_close(search(False), search(True))


def test_under_autocast_the_grid_is_cast_once_as_bf16_features_would_be():
    """Under bf16 autocast, decoding and a loss without autograd cast fp32 features once per batch
    (each word's bmm(α, grid) would otherwise cast the whole grid again): the logits are exactly
    those of the same features handed over in bf16. (Training's loop reads the grid in fp32.)"""
    torch.manual_seed(0)
    decoder = DECODERS["show_attend_tell"]().eval()
    tokens, lengths = captions()
    grid = torch.randn(B, L, D)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        mem = decoder.prepare(EncoderOutput(grid=grid, pooled=grid.mean(1)))
        assert mem.grid.dtype == torch.bfloat16
        from_fp32 = decoder(EncoderOutput(grid=grid, pooled=grid.mean(1)), tokens, lengths)
        low = grid.bfloat16()
        from_bf16 = decoder(EncoderOutput(grid=low, pooled=low.mean(1)), tokens, lengths)
    assert torch.equal(from_fp32.logits, from_bf16.logits)
    assert torch.isfinite(from_fp32.logits).all()


def decode_with_compiled_step(device: str) -> int:
    """Greedy and beam 3 over batches of 8 down to 1 image (one as wide as the grid's features),
    under no_grad (fit's validation) and inference_mode (test, predict), with ``compile_step`` and
    without. Asserts that the compiled step gives the eager captions and scores and that torch never
    reaches its recompile limit; returns how many times the step was traced."""
    from torch._dynamo.utils import counters

    from capattn.decoding import beam_search, greedy

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    kwargs = dict(vocab_size=V, feature_dim=D, embed_dim=6, hidden_dim=10, attention_dim=7)
    eager = ShowAttendTellDecoder(**kwargs).eval().to(device)
    compiled = ShowAttendTellDecoder(compile_step=True, **kwargs).eval().to(device)
    compiled.load_state_dict(eager.state_dict())
    special = dict(bos=1, eos=2, pad=0, max_len=7)
    for mode in (torch.no_grad, torch.inference_mode):
        for batch in (D, 7, 6, 5, 4, 3, 2, 1):
            cpu = encoder_output(batch)
            enc = EncoderOutput(grid=cpu.grid.to(device), pooled=cpu.pooled.to(device))
            with mode(), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                for beam in (1, 3):
                    want, got = (
                        greedy(d, enc, **special) if beam == 1 else beam_search(d, enc, beam_size=beam, **special)
                        for d in (eager, compiled)
                    )
                    assert torch.equal(got.tokens, want.tokens)
                    torch.testing.assert_close(got.scores, want.scores, rtol=1e-4, atol=1e-4)
    return counters["stats"]["unique_graphs"]


def test_compiled_step_is_traced_per_kind_of_call_not_per_batch(monkeypatch):
    """``compile_step``: a Lightning run decodes batches of many sizes, greedy and beam, with images
    leaving the batch as they finish, under no_grad and inference_mode. The step must be traced a few
    times, not once per batch size or per view (torch gives up compiling after 8 and runs eagerly: an
    H100 demo run got there), and must give the eager captions. torch's tracer and guards run for
    real; only code generation is skipped (backend "eager"). tests/models/test_cuda.py runs the same
    with the real compiler on a GPU."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": "eager"}))
    traces = decode_with_compiled_step("cpu")
    # Per mode: one row per image, K rows per image, one image left, a single row (torch specializes
    # sizes of 1); then the same for inference tensors, which torch tells apart from no_grad ones.
    assert 0 < traces <= 8, f"the compiled step was traced {traces} times"
