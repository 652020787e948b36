"""A tutorial-style Show, Attend and Tell, written from the paper's equations, as the speed baseline.

This is how the implementations people usually start from are organised (Xu et al., 2015 read
literally): at every word the attention keys W_a a_i are projected again, the batch is sorted
by length and shrinks as captions end, the deep output layer and L_o run inside the time loop,
and beam search decodes one image at a time with autograd left on. It shares the parameters of
a ``ShowAttendTellDecoder`` so both compute the same function, and the benchmarks can check that
the losses and captions agree before they compare the times.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from capattn.models.decoders import ShowAttendTellDecoder


def _attend(dec: ShowAttendTellDecoder, grid: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 4–6 with the keys projected afresh: e = wᵀ tanh(W_a a + W_h h), α = softmax(e), ẑ = Σ α a."""
    att = dec.attention
    keys = att.key_proj(grid)  # (b, L, A), recomputed at every step
    energy = att.score(torch.tanh(keys + att.query_proj(h).unsqueeze(1))).squeeze(-1)  # (b, L)
    alpha = energy.softmax(dim=-1)
    return (alpha.unsqueeze(-1) * grid).sum(dim=1), alpha  # (b, D), (b, L)


def _step(dec: ShowAttendTellDecoder, emb: Tensor, h: Tensor, c: Tensor, grid: Tensor):
    """One word: attention, β gate, LSTMCell, deep output (eq. 7). Returns logits, h, c, alpha."""
    context, alpha = _attend(dec, grid, h)
    if dec.f_beta is not None:
        context = torch.sigmoid(dec.f_beta(h)) * context
    h, c = dec.cell(torch.cat([emb, context], dim=1), (h, c))
    if dec.L_h is not None:
        logits = dec.L_o(dec.dropout(emb + dec.L_h(h) + dec.L_z(context)))
    else:
        logits = dec.L_o(dec.dropout(h))
    return logits, h, c, alpha


def tutorial_loss(dec: ShowAttendTellDecoder, grid: Tensor, captions: Tensor, lengths: Tensor) -> Tensor:
    """Cross-entropy over real tokens + λ Σ_i (1 − Σ_t α_ti)², normalised per predicted token.

    The same loss as ``CaptioningModule``'s (so the two can be checked against each other).
    """
    lengths, order = lengths.sort(descending=True)
    grid, captions = grid[order], captions[order]
    decode_lengths = (lengths - 1).tolist()
    batch, steps = captions.shape[0], max(decode_lengths)
    mean = grid.mean(dim=1)
    h, c = torch.tanh(dec.init_h(mean)), torch.tanh(dec.init_c(mean))
    emb = dec.embed(captions)  # (B, T, E)
    logits = torch.zeros(batch, steps, dec.vocab_size)
    alphas = torch.zeros(batch, steps, grid.shape[1])
    for t in range(steps):
        b = sum(n > t for n in decode_lengths)  # rows whose caption is still running
        step_logits, h, c, alpha = _step(dec, emb[:b, t], h[:b], c[:b], grid[:b])
        logits[:b, t] = step_logits
        alphas[:b, t] = alpha
    mask = torch.arange(steps)[None] < (lengths - 1)[:, None]  # (B, T−1)
    ce = F.cross_entropy(logits[mask], captions[:, 1 : steps + 1][mask])
    penalty = ((1.0 - alphas.sum(dim=1)) ** 2).sum() / mask.sum()
    return ce + dec.alpha_c * penalty


def tutorial_beam_search(
    dec: ShowAttendTellDecoder, grid: Tensor, *, bos: int, eos: int, pad: int, beam_size: int, max_len: int
) -> list[list[int]]:
    """One image at a time, K beams, autograd on; finished hypotheses leave the beam (k shrinks).

    Returns the best caption of each image (token ids, ``<eos>`` included when it was emitted).
    """
    best = []
    for image in grid:
        k = beam_size
        feats = image.unsqueeze(0).expand(k, -1, -1)  # (k, L, D)
        mean = feats.mean(dim=1)
        h, c = torch.tanh(dec.init_h(mean)), torch.tanh(dec.init_c(mean))
        prev = torch.full((k,), bos, dtype=torch.long)
        seqs = torch.empty(k, 0, dtype=torch.long)
        scores = torch.zeros(k)
        finished: list[tuple[float, list[int]]] = []
        for t in range(max_len):
            logits, h, c, _ = _step(dec, dec.embed(prev), h, c, feats)
            logprobs = logits.log_softmax(dim=-1)
            logprobs[:, [bos, pad]] = float("-inf")
            cand = (scores.unsqueeze(1) + logprobs).view(-1) if t else logprobs[0]
            top, flat = cand.topk(k)
            parent, word = flat // dec.vocab_size, flat % dec.vocab_size
            seqs = torch.cat([seqs[parent], word.unsqueeze(1)], dim=1)
            ended = word == eos
            finished += list(zip(top[ended].tolist(), seqs[ended].tolist(), strict=True))
            keep = ~ended
            k = int(keep.sum())
            if k == 0:
                break
            seqs, scores, prev = seqs[keep], top[keep], word[keep]
            h, c, feats = h[parent[keep]], c[parent[keep]], feats[:k]
        if not finished:
            finished = list(zip(scores.tolist(), seqs.tolist(), strict=True))
        best.append(max(finished, key=lambda x: x[0])[1])
    return best
