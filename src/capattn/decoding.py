"""Greedy decoding, sampling and beam search for any ``CaptionDecoder``.

All three are batched: B images (× K beams) advance together, one ``decoder.step`` per word,
with no Python loop over images. They only use ``prepare``/``init_state``/``step`` (and
``expand_memory``, which lets a decoder share one image's memory between its K beams). Greedy
decoding and beam search drop images whose captions have all ended from the batch, so a long
caption does not make the short ones keep costing work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from capattn.models import native
from capattn.models.decoders import CaptionDecoder
from capattn.models.encoder import EncoderOutput


@dataclass(frozen=True)
class Captions:
    """Decoded captions, best first.

    Args:
        tokens: (B, K, T) token ids without ``<bos>``; ``<eos>`` then ``<pad>`` after a caption ends.
        scores: (B, K) summed log-probabilities (divided by the length penalty, if any).
        alphas: (B, K, T, L) attention weights of each emitted token, or None.
    """

    tokens: Tensor
    scores: Tensor
    alphas: Tensor | None

    def best(self) -> Captions:
        """The top caption of each image, K = 1."""
        return Captions(self.tokens[:, :1], self.scores[:, :1], None if self.alphas is None else self.alphas[:, :1])


def tree_map(fn: Callable[[Tensor], Tensor], tree: Any) -> Any:
    """Applies ``fn`` to every tensor in a nest of tuples, lists, dicts and dataclasses.

    Decoders keep their Memory and State in such nests; beam search must expand and reorder
    them along the batch dimension without knowing their layout. (torch's pytree is private.)
    """
    if isinstance(tree, Tensor):
        return fn(tree)
    if tree is None:
        return None
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return dataclasses.replace(
            tree, **{f.name: tree_map(fn, getattr(tree, f.name)) for f in dataclasses.fields(tree)}
        )
    if isinstance(tree, tuple):
        return (
            type(tree)(*(tree_map(fn, x) for x in tree))
            if hasattr(tree, "_fields")
            else tuple(tree_map(fn, x) for x in tree)
        )
    if isinstance(tree, list):
        return [tree_map(fn, x) for x in tree]
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    raise TypeError(f"decoder state holds a {type(tree).__name__}; use tensors in tuples, dicts or dataclasses")


def _forbid(logprobs: Tensor, *tokens: int) -> Tensor:
    """Log-probabilities with ``tokens`` (``<bos>``, ``<pad>``) ruled out: they are never words of a caption.

    Without autograd the step's fresh (B, V) tensor is changed in place (``StepOutput.logprobs`` is
    the caller's); with it (sampling for policy gradients), a copy keeps log_softmax's backward valid.
    """
    if logprobs.requires_grad:
        logprobs = logprobs.clone()
    logprobs[..., list(tokens)] = float("-inf")
    return logprobs


@contextlib.contextmanager
def _denormals_flushed() -> Iterator[None]:
    """Flushes float denormals to zero on the CPU while decoding, then restores what was set before.

    A trained model's log-softmax over V words takes exp of very negative logits, whose results are
    denormal numbers; x86 computes those in microcode, and log_softmax over 500 × 10,000 logits
    took 11 ms instead of 3.2 (measured). Values below 1e-38 change no decoded word.
    """
    was_on = bool((torch.tensor([1e-30]) * 1e-9).item() == 0.0)  # 1e-39 is denormal: 0 when flushed
    if was_on or not torch.set_flush_denormal(True):  # False: this CPU cannot flush
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


# A batch is compacted (finished images dropped from the state and memory) once at least this
# fraction of its rows has finished: finished rows stop costing work, and the memory (an image's
# grid and keys) is copied O(log B) times rather than at every step.
_COMPACT_FRACTION = 0.1
# Where the decoder takes a varying number of rows per image (``CaptionDecoder.ragged_memory``),
# beam search leaves ended beams out of its steps, and greedy's compaction copies no memory (off:
# tests and benchmarks compare the two; the captions are the same).
_RAGGED_MEMORY = True


def _needs_compaction(finished: int, rows: int) -> bool:
    return finished > 0 and (finished == rows or finished >= _COMPACT_FRACTION * rows)


def _topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``x.topk(k, dim=-1)`` of a (R, V) matrix; at fp32 on a CPU by ``native.topk``, one pass per row
    (500 × 10,000 at k = 5: 0.7 ms against torch.topk's 3.1 ms). Ties keep the lower index first."""
    if not x.requires_grad and native.usable(x):
        return native.topk(x, k)
    return x.topk(k, dim=-1)


def _argmax(logprobs: Tensor) -> Tensor:
    """The most likely word of each row, the first of ties (as ``max``); at fp32 on a CPU by
    ``native.topk`` (100 × 10,000: 0.10 ms against ``max``'s 0.77, 4% of a greedy step at the
    paper's sizes; seventeenth session)."""
    if not logprobs.requires_grad and native.usable(logprobs):
        return native.topk(logprobs, 1)[1].squeeze(1)
    return logprobs.max(-1).indices


def _fp32_detour(enc: EncoderOutput) -> bool:
    """Whether a search steps out of autocast: on a CPU, where bf16 decoding is slower than fp32.

    The CPU's decoding fast paths (the fused C kernels, in-place steps, the folded output layer) are
    fp32-only, and autocast casts weights at every word: at the paper's sizes over 100 images,
    greedy ran 1.5× and beam 5 2.2× slower under bf16 autocast than in fp32, on a CPU with bf16
    matrix units (AMX). So ``--trainer.precision=bf16-mixed`` validates and tests on a CPU in fp32, which
    is also exact. A GPU decodes faster in bf16 (RESULTS.md) and keeps autocast. A function, so that
    the tests run the GPU's way on a CPU.
    """
    return enc.pooled.device.type == "cpu" and torch.is_autocast_enabled("cpu")


def _in_fp32(decoder: CaptionDecoder, enc: EncoderOutput) -> EncoderOutput:
    """``enc`` in the decoder's dtype: under autocast the encoder's features may arrive in bf16. (Its
    ``cached_grid`` stays float16: it holds the same values as the grid.)"""
    dtype = next((p.dtype for p in decoder.parameters() if p.is_floating_point()), torch.float32)
    return dataclasses.replace(enc, grid=enc.grid.to(dtype), pooled=enc.pooled.to(dtype))


def _fp32_on_cpu(search: Callable[..., Captions]) -> Callable[..., Captions]:
    """``search(decoder, enc, **settings)``, run with autocast off and ``enc`` in the decoder's dtype
    where ``_fp32_detour`` says so."""

    @functools.wraps(search)
    def run(decoder: CaptionDecoder, enc: EncoderOutput, **settings: Any) -> Captions:
        if not _fp32_detour(enc):
            return search(decoder, enc, **settings)
        with torch.autocast("cpu", enabled=False):
            return search(decoder, _in_fp32(decoder, enc), **settings)

    return run


def _score_dtype(enc: EncoderOutput) -> torch.dtype:
    """Captions' summed log-probabilities: float32 at least. Under mixed precision the encoder's
    features are bf16/fp16 while log-softmax runs in float32; summing 20 words in bf16 (8 bits of
    mantissa) would also tie beams that differ."""
    return torch.promote_types(enc.pooled.dtype, torch.float32)


def _select(tree: Any, index: Tensor) -> Any:
    return tree_map(lambda x: x.index_select(0, index), tree)


def _one_token_at_a_time(
    decoder: CaptionDecoder,
    enc: EncoderOutput,
    *,
    bos: int,
    eos: int,
    pad: int,
    max_len: int,
    pick: Callable[[Tensor], Tensor],
    compact: bool,
) -> Captions:
    """Greedy decoding and sampling: ``pick`` chooses each next token from (B, V) log-probs.

    With ``compact``, captions that have ended leave the batch (see ``_COMPACT_FRACTION``), their
    memory too: without a copy where the decoder takes row offsets (``ragged_memory``). Sampling
    keeps every row so a seeded generator draws the same numbers whatever the lengths.
    """
    mem = decoder.prepare(enc)
    state = decoder.init_state(mem)
    step_mem, ragged = mem, _RAGGED_MEMORY  # ``mem`` stays the whole batch's
    batch = enc.pooled.shape[0]
    device = enc.pooled.device
    active = torch.arange(batch, device=device)  # (b,) original rows still in the batch
    tokens = torch.full((batch,), bos, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    dtype = _score_dtype(enc)
    scores = torch.zeros(batch, device=device, dtype=dtype)
    final_scores = torch.zeros(batch, device=device, dtype=dtype)
    out_tokens, out_alphas = [], []
    for _ in range(max_len):
        out = decoder.step(tokens, state, step_mem)
        state = out.state
        logprobs = _forbid(out.logprobs, bos, pad)
        chosen = pick(logprobs)  # (b,)
        chosen = torch.where(done, torch.full_like(chosen, pad), chosen)
        step_score = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
        scores = scores + torch.where(done, torch.zeros_like(step_score), step_score)
        out_tokens.append(chosen.new_full((batch,), pad).index_copy(0, active, chosen))
        if out.alpha is not None:
            alpha = out.alpha * (~done).unsqueeze(1)  # (b, L)
            out_alphas.append(alpha.new_zeros(batch, alpha.shape[1]).index_copy(0, active, alpha))
        done = done | (chosen == eos)
        tokens = chosen
        finished = int(done.sum())
        if finished == done.shape[0]:
            break
        if compact and _needs_compaction(finished, done.shape[0]):
            final_scores = final_scores.index_copy(0, active[done], scores[done])
            keep = (~done).nonzero().squeeze(1)  # (b',)
            active, tokens, scores, done = active[keep], tokens[keep], scores[keep], done[keep]
            state = _select(state, keep)
            # The memory of the images left: all of it with row offsets, one row for each image left,
            # where the decoder takes them (no copy of the grids), else a copy of their part.
            step_mem = None
            if ragged:
                counts = torch.zeros(batch, dtype=torch.long, device=device).index_fill_(0, active, 1)
                step_mem = decoder.ragged_memory(mem, counts)
                ragged = step_mem is not None
            if step_mem is None:
                step_mem = _select(mem, active)
    final_scores = final_scores.index_copy(0, active, scores)
    seq = torch.stack(out_tokens, dim=1).unsqueeze(1)  # (B, 1, T)
    alphas = torch.stack(out_alphas, dim=1).unsqueeze(1) if out_alphas else None  # (B, 1, T, L)
    return Captions(tokens=seq, scores=final_scores.unsqueeze(1), alphas=alphas)


@torch.no_grad()
@_denormals_flushed()
@_fp32_on_cpu
def greedy(decoder: CaptionDecoder, enc: EncoderOutput, *, bos: int, eos: int, pad: int, max_len: int = 20) -> Captions:
    """The most likely word at every step.

    Args:
        decoder: any caption decoder.
        enc: encoder output for B images.
        bos, eos, pad: special token ids of the vocabulary.
        max_len: most tokens emitted per caption, ``<eos>`` included.

    Returns:
        Captions with K = 1.
    """
    return _one_token_at_a_time(decoder, enc, bos=bos, eos=eos, pad=pad, max_len=max_len, pick=_argmax, compact=True)


def sample(
    decoder: CaptionDecoder,
    enc: EncoderOutput,
    *,
    bos: int,
    eos: int,
    pad: int,
    max_len: int = 20,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Captions:
    """Samples each word from the (tempered) model distribution; differentiable scores for SCST/REINFORCE.

    Returns:
        Captions with K = 1; ``scores`` keeps its graph so a policy gradient can flow through it.
    """

    def pick(logprobs: Tensor) -> Tensor:
        probs = (logprobs.detach() / temperature).softmax(dim=-1)  # ruled-out tokens get probability 0
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return _one_token_at_a_time(decoder, enc, bos=bos, eos=eos, pad=pad, max_len=max_len, pick=pick, compact=False)


def length_penalty(lengths: Tensor, alpha: float) -> Tensor:
    """GNMT length penalty ((5 + |Y|) / 6)^α (Wu et al., 2016); α = 0 leaves scores as they are."""
    return ((5.0 + lengths) / 6.0) ** alpha


@torch.no_grad()
@_denormals_flushed()
@_fp32_on_cpu
def beam_search(
    decoder: CaptionDecoder,
    enc: EncoderOutput,
    *,
    bos: int,
    eos: int,
    pad: int,
    beam_size: int = 3,
    max_len: int = 20,
    length_alpha: float = 0.0,
) -> Captions:
    """Beam search over B images × K beams at once.

    A beam that has emitted ``<eos>`` stays in the beam with its score frozen and emits ``<pad>``;
    the search stops when every beam of every image has ended or after ``max_len`` tokens, in
    which case unfinished beams are returned as they are (no ``<eos>``). Final hypotheses are
    ranked by score / length_penalty(length, ``length_alpha``). An image whose K beams have all
    ended leaves the batch (see ``_COMPACT_FRACTION``), and so, where the decoder allows it
    (``CaptionDecoder.ragged_memory``), does every ended beam of the images still searched: steps
    run only the beams that have not ended (with a trained model, half the rows of a beam-5 search
    at COCO's caption lengths). Each step records only parents and words, and the captions are read
    back from the final beams at the end.

    Args:
        decoder: any caption decoder.
        enc: encoder output for B images.
        bos, eos, pad: special token ids of the vocabulary.
        beam_size: K.
        max_len: most tokens emitted per caption, ``<eos>`` included.
        length_alpha: α of the GNMT length penalty; 0 ranks by summed log-probability.

    Returns:
        Captions with K = ``beam_size``, best first.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be ≥ 1, got {beam_size}")
    batch, k = enc.pooled.shape[0], beam_size
    device, dtype = enc.pooled.device, _score_dtype(enc)
    mem = decoder.prepare(enc)  # (B, …): computed once per image
    # Every beam of an image starts as the same empty caption, so the first step runs one hypothesis
    # per image (``live`` = 1) and its K best words become the K beams. (With fewer words than
    # beams, all K start, beams 1…K−1 at −inf, so the first step does not pick K copies of one word.)
    live = 1 if k <= decoder.vocab_size else k
    state = decoder.init_state(mem)  # (B*live, …)
    if live > 1:
        state = tree_map(lambda x: x.repeat_interleave(live, dim=0), state)
    step_mem = decoder.expand_memory(mem, live)  # what step wants for ``live`` hypotheses per image
    active = torch.arange(batch, device=device)  # (b,) original images still being searched
    tokens = torch.full((batch * live,), bos, dtype=torch.long, device=device)
    scores = torch.full((batch, live), float("-inf"), device=device, dtype=dtype)
    scores[:, 0] = 0.0
    done = torch.zeros(batch, live, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, live, device=device)
    final_scores = torch.zeros(batch, k, device=device, dtype=dtype)
    final_lengths = torch.zeros(batch, k, device=device)
    # Per step, in whole-batch coordinates, for backtracking at the end: which beam each new beam
    # extends, its word, its attention. An image no longer searched keeps its beams (parent = k).
    identity = torch.arange(k, device=device).expand(batch, k)
    parents: list[Tensor] = []
    words: list[Tensor] = []
    alphas: list[Tensor] = []
    # Whether the decoder takes a varying number of hypotheses per image (``ragged_memory``), asked
    # when first needed; if it does, ``mem`` stays the whole batch's, and images that leave are
    # left out by row offsets instead of copying the memory of the rest.
    ragged: bool | None = None if _RAGGED_MEMORY else False
    compacted = False  # some image has left the batch

    def counts_per_image(active: Tensor, done: Tensor) -> Tensor:  # (B,) live beams of each image of the whole batch
        return torch.zeros(batch, dtype=torch.long, device=device).index_copy_(0, active, (~done).sum(dim=1))

    for _ in range(max_len):
        b = active.shape[0]
        # Ended beams leave the step once they are a tenth of its rows (and for good once an image
        # has left, if the decoder allows): only the live rows' log-probs, states and attention are
        # computed, and the ended ones are filled in below with values that are never read.
        live_rows = ragged_mem = None
        if ragged is not False and live == k and (compacted or _needs_compaction(int(done.sum()), b * k)):
            ragged_mem = decoder.ragged_memory(mem, counts_per_image(active, done))
            if ragged_mem is None and ragged and compacted:  # a decoder that changed its answer: copy after all
                mem = _select(mem, active)
                step_mem = decoder.expand_memory(mem, k)
            ragged = ragged_mem is not None
        if ragged_mem is not None:
            live_rows = (~done).view(-1).nonzero().squeeze(1)  # (n,) in 0 … b*K−1
            out = decoder.step(tokens.index_select(0, live_rows), _select(state, live_rows), ragged_mem)
        else:
            out = decoder.step(tokens, state, step_mem)
        # An image's K best continuations are among the K best words of each of its beams (a beam's
        # score adds the same amount to all its words), so top-k runs per beam over V and then over
        # the K×k' survivors, never over a (b, K·V) sum: that sum, its masking and a top-k over
        # K·V per image were a fifth of a beam-5 step.
        logprobs = _forbid(out.logprobs, bos, pad)  # (b*live, V); never words of a caption
        kk = min(k, logprobs.shape[-1])
        best_lp, best_word = _topk(logprobs, kk)  # (b*live, k'), or (n, k') for the live rows
        step_state, step_alpha = out.state, out.alpha
        if live_rows is not None:  # back to b*K rows; an ended row's words and states are never used
            best_lp = best_lp.new_zeros(b * k, kk).index_copy_(0, live_rows, best_lp)
            best_word = best_word.new_zeros(b * k, kk).index_copy_(0, live_rows, best_word)
            if step_alpha is not None:
                step_alpha = step_alpha.new_zeros(b * k, step_alpha.shape[-1]).index_copy_(0, live_rows, step_alpha)
            position = torch.zeros(b * k, dtype=torch.long, device=device)  # each row's place among the live
            position[live_rows] = torch.arange(live_rows.shape[0], device=device)
        candidates = scores.unsqueeze(-1) + best_lp.view(b, live, kk)  # (b, live, k')
        cand_words = best_word.view(b, live, kk)
        # An ended beam may only emit <pad>, at no cost: its score stays as it was.
        candidates.masked_fill_(done.unsqueeze(-1), float("-inf"))
        candidates[..., 0] = torch.where(done, scores, candidates[..., 0])
        cand_words[..., 0] = torch.where(done, torch.full_like(cand_words[..., 0], pad), cand_words[..., 0])
        scores, flat = _topk(candidates.view(b, live * kk), k)  # (b, K)
        parent = torch.div(flat, kk, rounding_mode="floor")  # (b, K), in 0…live−1
        word = cand_words.view(b, live * kk).gather(1, flat)  # (b, K)
        # With fewer allowed words than beams, some of the K kept are at −inf: a forbidden word
        # (<bos>/<pad>) or an extension of such a beam. They hold no caption: <pad>, ended.
        empty = torch.isneginf(scores)  # (b, K)
        word.masked_fill_(empty, pad)
        rows = (torch.arange(b, device=device).unsqueeze(1) * live + parent).view(-1)  # (b*K,) beams kept
        state = _select(step_state, rows if live_rows is None else position[rows])
        was_done = done.gather(1, parent)
        parents.append(identity.index_copy(0, active, parent))
        words.append(torch.full_like(identity, pad).index_copy(0, active, word))
        if step_alpha is not None:
            alpha = step_alpha.view(b, live, -1).gather(1, parent.unsqueeze(-1).expand(-1, -1, step_alpha.shape[-1]))
            alpha = alpha * (~was_done).unsqueeze(-1)  # (b, K, L); zero after the caption ended
            alphas.append(alpha.new_zeros(batch, k, alpha.shape[-1]).index_copy(0, active, alpha))
        lengths = lengths.gather(1, parent) + (~was_done).float()
        done = was_done | (word == eos) | empty
        tokens = word.view(-1)
        if live < k:  # after the first step every image has K beams
            live, step_mem = k, decoder.expand_memory(mem, k)
        finished = done.all(dim=1)  # (b,) images whose K beams have all ended
        n_finished = int(finished.sum())
        if n_finished == b:
            break
        if _needs_compaction(n_finished, b):
            final_scores = final_scores.index_copy(0, active[finished], scores[finished])
            final_lengths = final_lengths.index_copy(0, active[finished], lengths[finished])
            keep = (~finished).nonzero().squeeze(1)  # (b',)
            active, scores, lengths, done = active[keep], scores[keep], lengths[keep], done[keep]
            tokens = tokens.view(b, k)[keep].view(-1)
            state = _select(state, (keep.unsqueeze(1) * k + torch.arange(k, device=device)).view(-1))
            if ragged is None:
                ragged = decoder.ragged_memory(mem, counts_per_image(active, done)) is not None
            if not ragged:
                mem = _select(mem, keep)
                step_mem = decoder.expand_memory(mem, k)
            compacted = True
    final_scores = final_scores.index_copy(0, active, scores)
    final_lengths = final_lengths.index_copy(0, active, lengths)
    final = final_scores / length_penalty(final_lengths, length_alpha)
    final, beam = final.sort(dim=-1, descending=True)  # (B, K)
    # Backtrack from the ranked final beams through the parents.
    steps = len(words)
    history = torch.empty(batch, k, steps, dtype=torch.long, device=device)
    alpha_history = alphas[0].new_empty(batch, k, steps, alphas[0].shape[-1]) if alphas else None
    for t in range(steps - 1, -1, -1):
        history[:, :, t] = words[t].gather(1, beam)
        if alpha_history is not None:
            alpha_history[:, :, t] = alphas[t].gather(1, beam.unsqueeze(-1).expand(-1, -1, alphas[t].shape[-1]))
        beam = parents[t].gather(1, beam)
    return Captions(tokens=history, scores=final, alphas=alpha_history)
