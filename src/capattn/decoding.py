"""Greedy decoding, sampling and beam search for any ``CaptionDecoder``.

All three are batched: B images (× K beams) advance together, one ``decoder.step`` per word,
with no Python loop over images. They only use ``prepare``/``init_state``/``step``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

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
    """Log-probabilities with ``tokens`` (``<bos>``, ``<pad>``) ruled out: they are never words of a caption."""
    logprobs = logprobs.clone()
    logprobs[..., list(tokens)] = float("-inf")
    return logprobs


def _one_token_at_a_time(
    decoder: CaptionDecoder,
    enc: EncoderOutput,
    *,
    bos: int,
    eos: int,
    pad: int,
    max_len: int,
    pick: Callable[[Tensor], Tensor],
) -> Captions:
    """Greedy decoding and sampling: ``pick`` chooses each next token from (B, V) log-probs."""
    mem = decoder.prepare(enc)
    state = decoder.init_state(mem)
    batch = enc.pooled.shape[0]
    device = enc.pooled.device
    tokens = torch.full((batch,), bos, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    scores = torch.zeros(batch, device=device, dtype=enc.pooled.dtype)
    out_tokens, out_alphas = [], []
    for _ in range(max_len):
        out = decoder.step(tokens, state, mem)
        state = out.state
        logprobs = _forbid(out.logprobs, bos, pad)
        chosen = pick(logprobs)  # (B,)
        chosen = torch.where(done, torch.full_like(chosen, pad), chosen)
        step_score = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
        scores = scores + torch.where(done, torch.zeros_like(step_score), step_score)
        out_tokens.append(chosen)
        if out.alpha is not None:
            out_alphas.append(out.alpha * (~done).unsqueeze(1))
        done = done | (chosen == eos)
        tokens = chosen
        if bool(done.all()):
            break
    seq = torch.stack(out_tokens, dim=1).unsqueeze(1)  # (B, 1, T)
    alphas = torch.stack(out_alphas, dim=1).unsqueeze(1) if out_alphas else None  # (B, 1, T, L)
    return Captions(tokens=seq, scores=scores.unsqueeze(1), alphas=alphas)


@torch.no_grad()
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
    return _one_token_at_a_time(decoder, enc, bos=bos, eos=eos, pad=pad, max_len=max_len, pick=lambda lp: lp.argmax(-1))


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

    return _one_token_at_a_time(decoder, enc, bos=bos, eos=eos, pad=pad, max_len=max_len, pick=pick)


def length_penalty(lengths: Tensor, alpha: float) -> Tensor:
    """GNMT length penalty ((5 + |Y|) / 6)^α (Wu et al., 2016); α = 0 leaves scores as they are."""
    return ((5.0 + lengths) / 6.0) ** alpha


@torch.no_grad()
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
    ranked by score / length_penalty(length, ``length_alpha``).

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
    device = enc.pooled.device
    mem = decoder.prepare(tree_map(lambda x: x.repeat_interleave(k, dim=0), enc))  # (B*K, …)
    state = decoder.init_state(mem)
    tokens = torch.full((batch * k,), bos, dtype=torch.long, device=device)
    # Only beam 0 is live at the start, so the first step does not pick K copies of one word.
    scores = torch.full((batch, k), float("-inf"), device=device, dtype=enc.pooled.dtype)
    scores[:, 0] = 0.0
    done = torch.zeros(batch, k, dtype=torch.bool, device=device)
    history = torch.empty(batch, k, 0, dtype=torch.long, device=device)  # (B, K, t)
    alpha_history: Tensor | None = None  # (B, K, t, L)
    lengths = torch.zeros(batch, k, device=device)
    offsets = (torch.arange(batch, device=device) * k).unsqueeze(1)  # (B, 1)
    for _ in range(max_len):
        out = decoder.step(tokens, state, mem)
        vocab = out.logprobs.shape[-1]
        logprobs = _forbid(out.logprobs, bos, pad).view(batch, k, vocab)  # (B, K, V)
        # An ended beam may only emit <pad>, at no cost: its score stays as it was.
        ended = torch.full_like(logprobs, float("-inf"))
        ended[..., pad] = 0.0
        logprobs = torch.where(done.unsqueeze(-1), ended, logprobs)
        candidates = (scores.unsqueeze(-1) + logprobs).view(batch, k * vocab)  # (B, K*V)
        scores, flat = candidates.topk(k, dim=-1)  # (B, K)
        parent = torch.div(flat, vocab, rounding_mode="floor")  # (B, K)
        word = flat % vocab  # (B, K)
        rows = (offsets + parent).view(-1)  # (B*K,) rows of the flattened beams to keep
        state = tree_map(lambda x, rows=rows: x.index_select(0, rows), out.state)
        history = torch.cat([history.gather(1, parent.unsqueeze(-1).expand_as(history)), word.unsqueeze(-1)], dim=-1)
        if out.alpha is not None:
            alpha = out.alpha.view(batch, k, -1).gather(1, parent.unsqueeze(-1).expand(-1, -1, out.alpha.shape[-1]))
            was_done = done.gather(1, parent)
            alpha = alpha * (~was_done).unsqueeze(-1)  # (B, K, L); zero after the caption ended
            if alpha_history is None:
                alpha_history = alpha.unsqueeze(2)
            else:
                kept = alpha_history.gather(
                    1, parent[:, :, None, None].expand(-1, -1, *alpha_history.shape[2:])
                )  # (B, K, t, L)
                alpha_history = torch.cat([kept, alpha.unsqueeze(2)], dim=2)
        was_done = done.gather(1, parent)
        lengths = lengths.gather(1, parent) + (~was_done).float()
        done = was_done | (word == eos)
        tokens = word.view(-1)
        if bool(done.all()):
            break
    final = scores / length_penalty(lengths, length_alpha)
    final, order = final.sort(dim=-1, descending=True)  # (B, K)
    history = history.gather(1, order.unsqueeze(-1).expand_as(history))
    if alpha_history is not None:
        alpha_history = alpha_history.gather(1, order[:, :, None, None].expand_as(alpha_history))
    return Captions(tokens=history, scores=final, alphas=alpha_history)
