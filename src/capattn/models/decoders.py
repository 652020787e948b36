"""Caption decoders behind one interface: Show and Tell, and Show, Attend and Tell.

Decoding (greedy, beam search, sampling), attention figures and the LightningModule use only
``prepare``/``init_state``/``step`` and ``forward``; none of them asks which decoder it holds.
Memory and State are batch-first tensors or tuples of them, so beam search can expand and
reorder them without knowing what they are.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from capattn.models.attention import SoftAttention
from capattn.models.encoder import EncoderOutput

Memory = Any  # per-image tensors computed once by ``prepare`` (batch-first)
State = Any  # recurrent state carried between steps (batch-first)


@dataclass(frozen=True)
class StepOutput:
    """One decoding step.

    Args:
        logprobs: (B, V) log-probabilities of the next token.
        state: the new recurrent state.
        alpha: (B, L) attention weights, or None for decoders without attention.
    """

    logprobs: Tensor
    state: State
    alpha: Tensor | None


@dataclass(frozen=True)
class DecoderOutput:
    """Teacher-forced decoding of a whole caption.

    Args:
        logits: (B, T−1, V) scores of tokens 1…T−1 given the tokens before them.
        alphas: (B, T−1, L) attention weights, or None.
        aux_loss: scalar the decoder adds to the cross-entropy (e.g. doubly stochastic attention),
            already normalised per predicted token like the cross-entropy.
    """

    logits: Tensor
    alphas: Tensor | None
    aux_loss: Tensor


class CaptionDecoder(nn.Module, ABC):
    """The interface every caption decoder implements.

    Args:
        vocab_size: V; linked from the datamodule's vocabulary by the CLI.
    """

    def __init__(self, *, vocab_size: int) -> None:
        super().__init__()
        if vocab_size < 5:
            raise ValueError(f"vocab_size={vocab_size}: a vocabulary needs the 4 special tokens and at least one word")
        self.vocab_size = vocab_size

    @abstractmethod
    def prepare(self, enc: EncoderOutput) -> Memory:
        """Computes once per image what every step needs (projected attention keys, image embedding)."""

    @abstractmethod
    def init_state(self, mem: Memory) -> State:
        """The state before the first word."""

    @abstractmethod
    def step(self, tokens: Tensor, state: State, mem: Memory) -> StepOutput:
        """Advances one word.

        Args:
            tokens: (B,) the previous token ids (``<bos>`` at the first step).
            state: the state returned by ``init_state`` or the previous ``step``.
            mem: the memory returned by ``prepare``.
        """

    @abstractmethod
    def forward(self, enc: EncoderOutput, captions: Tensor, lengths: Tensor) -> DecoderOutput:
        """Teacher forcing over whole captions.

        Args:
            enc: encoder output for B images.
            captions: (B, T) ``<bos> … <eos> <pad>…`` token ids.
            lengths: (B,) lengths including ``<bos>`` and ``<eos>``.
        """


def _target_mask(lengths: Tensor, steps: int) -> Tensor:
    """(B, T−1) True where position t predicts a real token (t < length − 1)."""
    return torch.arange(steps, device=lengths.device).unsqueeze(0) < (lengths - 1).unsqueeze(1)


class ShowTellDecoder(CaptionDecoder):
    """Show and Tell (Vinyals et al., 2015): the image is fed once, before ``<bos>``, into an LSTM.

    Args:
        vocab_size: V.
        feature_dim: D of the encoder's pooled vector.
        embed_dim: size of word and image embeddings (512 in the paper).
        hidden_dim: LSTM size (512 in the paper).
        num_layers: stacked LSTM layers.
        dropout: dropout on embeddings and LSTM outputs.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        feature_dim: int,
        embed_dim: int = 512,
        hidden_dim: int = 512,
        num_layers: int = 1,
        dropout: float = 0.5,
    ) -> None:
        super().__init__(vocab_size=vocab_size)
        self.feature_dim = feature_dim
        self.image_proj = nn.Linear(feature_dim, embed_dim)
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers=num_layers, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_dim, vocab_size)

    def prepare(self, enc: EncoderOutput) -> Tensor:
        return self.dropout(self.image_proj(enc.pooled))  # (B, E)

    def _run(self, inputs: Tensor, state: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        # nn.LSTM wants (N, B, H) states; ours are batch-first (B, N, H) so beams can reorder them.
        hc = None if state is None else (state[0].transpose(0, 1).contiguous(), state[1].transpose(0, 1).contiguous())
        out, (h, c) = self.lstm(inputs, hc)  # out (B, T, H)
        return out, (h.transpose(0, 1), c.transpose(0, 1))  # (B, N, H) each

    def init_state(self, mem: Tensor) -> tuple[Tensor, Tensor]:
        _, state = self._run(mem.unsqueeze(1), None)  # x_{-1} = CNN(I): the image is seen once
        return state

    def step(self, tokens: Tensor, state: tuple[Tensor, Tensor], mem: Tensor) -> StepOutput:
        out, state = self._run(self.dropout(self.embed(tokens)).unsqueeze(1), state)  # (B, 1, H)
        logits = self.fc(self.dropout(out.squeeze(1)))  # (B, V)
        return StepOutput(logprobs=logits.log_softmax(dim=-1), state=state, alpha=None)

    def forward(self, enc: EncoderOutput, captions: Tensor, lengths: Tensor) -> DecoderOutput:
        words = self.dropout(self.embed(captions[:, :-1]))  # (B, T−1, E)
        inputs = torch.cat([self.prepare(enc).unsqueeze(1), words], dim=1)  # (B, T, E)
        out, _ = self._run(inputs, None)  # (B, T, H)
        logits = self.fc(self.dropout(out[:, 1:]))  # output after the image predicts nothing: (B, T−1, V)
        return DecoderOutput(logits=logits, alphas=None, aux_loss=logits.new_zeros(()))


@dataclass(frozen=True)
class AttentionMemory:
    """Per-image memory of Show, Attend and Tell: annotation vectors and their projected keys."""

    grid: Tensor  # (B, L, D)
    keys: Tensor  # (B, L, A)


class ShowAttendTellDecoder(CaptionDecoder):
    """Show, Attend and Tell (Xu et al., 2015) with soft attention.

    At each word the LSTM attends over the L×D annotation grid; the initial state comes from the
    mean annotation (§3.1.2); a scalar gate β_t = σ(f_β(h_{t−1})) scales the context (§4.2.1);
    the deep output layer is p(y_t) ∝ exp(L_o(E y_{t−1} + L_h h_t + L_z ẑ_t)) (eq. 7); and the
    doubly stochastic term λ Σ_i (1 − Σ_t α_ti)² (eq. 14) pushes every location to be seen.

    Args:
        vocab_size: V.
        feature_dim: D of each annotation vector.
        embed_dim: m, word embedding size.
        hidden_dim: n, LSTM size.
        attention_dim: size of the attention space.
        dropout: dropout before the output layer.
        alpha_c: λ of the doubly stochastic regularisation (0 disables it).
        gate: use the scalar β gate.
        deep_output: use the deep output layer (else a linear layer on h_t).
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        feature_dim: int,
        embed_dim: int = 512,
        hidden_dim: int = 512,
        attention_dim: int = 512,
        dropout: float = 0.5,
        alpha_c: float = 1.0,
        gate: bool = True,
        deep_output: bool = True,
    ) -> None:
        super().__init__(vocab_size=vocab_size)
        self.feature_dim = feature_dim
        self.alpha_c = alpha_c
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.attention = SoftAttention(feature_dim=feature_dim, hidden_dim=hidden_dim, attention_dim=attention_dim)
        self.init_h = nn.Linear(feature_dim, hidden_dim)
        self.init_c = nn.Linear(feature_dim, hidden_dim)
        self.f_beta = nn.Linear(hidden_dim, 1) if gate else None
        self.cell = nn.LSTMCell(embed_dim + feature_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        if deep_output:
            self.L_h = nn.Linear(hidden_dim, embed_dim)
            self.L_z = nn.Linear(feature_dim, embed_dim)
            self.L_o = nn.Linear(embed_dim, vocab_size)
        else:
            self.L_h = self.L_z = None
            self.L_o = nn.Linear(hidden_dim, vocab_size)

    def prepare(self, enc: EncoderOutput) -> AttentionMemory:
        return AttentionMemory(grid=enc.grid, keys=self.attention.project_keys(enc.grid))

    def init_state(self, mem: AttentionMemory) -> tuple[Tensor, Tensor]:
        mean = mem.grid.mean(dim=1)  # (B, D)
        return torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))  # (B, H) each

    def _advance(
        self, emb: Tensor, state: tuple[Tensor, Tensor], mem: AttentionMemory
    ) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor]:
        """One step from an embedded word: logits (B, V), new state, alpha (B, L)."""
        h, c = state
        context, alpha = self.attention(mem.keys, mem.grid, h)  # (B, D), (B, L)
        if self.f_beta is not None:
            context = torch.sigmoid(self.f_beta(h)) * context  # β_t: (B, 1) scalar gate per image
        h, c = self.cell(torch.cat([emb, context], dim=-1), (h, c))
        if self.L_h is not None:
            logits = self.L_o(self.dropout(emb + self.L_h(h) + self.L_z(context)))  # eq. 7
        else:
            logits = self.L_o(self.dropout(h))
        return logits, (h, c), alpha

    def step(self, tokens: Tensor, state: tuple[Tensor, Tensor], mem: AttentionMemory) -> StepOutput:
        logits, state, alpha = self._advance(self.embed(tokens), state, mem)
        return StepOutput(logprobs=logits.log_softmax(dim=-1), state=state, alpha=alpha)

    def forward(self, enc: EncoderOutput, captions: Tensor, lengths: Tensor) -> DecoderOutput:
        mem = self.prepare(enc)
        state = self.init_state(mem)
        words = self.embed(captions[:, :-1])  # (B, T−1, E)
        logits, alphas = [], []
        for t in range(words.shape[1]):
            step_logits, state, alpha = self._advance(words[:, t], state, mem)
            logits.append(step_logits)
            alphas.append(alpha)
        logits_t = torch.stack(logits, dim=1)  # (B, T−1, V)
        alphas_t = torch.stack(alphas, dim=1)  # (B, T−1, L)
        mask = _target_mask(lengths, alphas_t.shape[1])  # (B, T−1)
        # Eq. 14 per image, summed over the batch and divided by the number of predicted tokens:
        # the same normalisation as the masked-mean cross-entropy, so λ keeps the paper's weight.
        coverage = (alphas_t * mask.unsqueeze(-1)).sum(dim=1)  # (B, L)
        penalty = ((1.0 - coverage) ** 2).sum() / mask.sum().clamp(min=1)
        return DecoderOutput(logits=logits_t, alphas=alphas_t, aux_loss=self.alpha_c * penalty)
