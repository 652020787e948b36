"""Caption decoders behind one interface: Show and Tell, and Show, Attend and Tell.

Decoding (greedy, beam search, sampling), attention figures and the LightningModule use only
``prepare``/``init_state``/``step`` and ``forward``; none of them asks which decoder it holds.
Memory and State are batch-first tensors or tuples of them, so beam search can expand and
reorder them without knowing what they are.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from capattn.models import native
from capattn.models.attention import LoopAttention, SoftAttention
from capattn.models.encoder import EncoderOutput

Memory = Any  # per-image tensors computed once by ``prepare`` (batch-first)
State = Any  # recurrent state carried between steps (batch-first)


@dataclass(frozen=True)
class StepOutput:
    """One decoding step.

    Args:
        logprobs: (B, V) log-probabilities of the next token, a new tensor the caller owns (decoding
            rules out ``<bos>``/``<pad>`` in it in place).
        state: the new recurrent state.
        alpha: (B, L) attention weights, or None for decoders without attention.
    """

    logprobs: Tensor
    state: State
    alpha: Tensor | None


@dataclass(frozen=True)
class DecoderOutput:
    """Teacher-forced decoding of whole captions, scored only where a real token is predicted.

    The output layer (a V-wide matmul) is the largest cost of a training step, so decoders apply it
    to the N real positions only, never to padding; the cross-entropy over them equals the padded
    one with ``ignore_index=<pad>``.

    Args:
        logits: (N, V) scores of the N real target tokens, in the row-major order of ``mask``'s
            True entries: ``logits[n]`` predicts ``targets[n]``.
        targets: (N,) the tokens those logits predict, ``captions[:, 1:][mask]``.
        mask: (B, T−1) True where step t predicts a real token (t < length − 1).
        alphas: (B, T−1, L) attention weights, zero at padded steps, or None.
        aux_loss: scalar the decoder adds to the cross-entropy (e.g. doubly stochastic attention),
            already normalised per predicted token like the cross-entropy.
    """

    logits: Tensor
    targets: Tensor
    mask: Tensor
    alphas: Tensor | None
    aux_loss: Tensor

    def padded_logits(self, fill: float = 0.0) -> Tensor:
        """(B, T−1, V) logits laid out by position, ``fill`` where the caption has ended."""
        out = self.logits.new_full((*self.mask.shape, self.logits.shape[-1]), fill)
        out[self.mask] = self.logits
        return out


def _cpu_decoding(x: Tensor) -> bool:
    """Whether ``x`` takes the CPU decoding fast paths: no autograd, autocast or compile, on a CPU
    (a GPU's matmul adds a bias in its epilogue, and its kernels are not known to allow aliasing)."""
    return not (
        torch.is_grad_enabled()
        or x.device.type != "cpu"
        or torch.is_autocast_enabled("cpu")
        or torch.compiler.is_compiling()
    )


def _versions(tensors) -> tuple[Any, ...]:
    """What identifies the values of ``tensors`` for a cache built from them: storage, in-place
    version, dtype and device. (Not every in-place update counts: torch's fused Adam does not bump
    ``_version``, so the caches are also dropped at the start of every search.)"""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)


class _FoldedLinear:
    """``layer(x)`` for decoding on a CPU, with the bias as one more column of the weight.

    ``nn.Linear`` on a CPU first writes its bias into every row of the output and then adds the
    matmul to it: for the (B·K, V) logits of a decoding step that is one more pass over 20 MB
    (500 × 10,000) at every word. Here the bias rides in the matmul, x·Wᵀ + b = [x, 1]·[W, b]ᵀ,
    computed once per search. Measured: beam 5 and greedy over 100 images 3.5% faster. The sums
    differ from ``layer(x)`` only in rounding (the bias is added inside the matmul's accumulation).
    Used only without autograd or autocast, on a CPU (a GPU's matmul adds the bias in its epilogue);
    ``clear`` at the start of every search, like ``ShowAttendTellDecoder._recurrent_weights``. Where
    capattn's matmul kernel takes the product (``native.addmm``), it adds the bias itself.
    """

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._weight: Tensor | None = None

    def clear(self) -> None:
        self._key = self._weight = None

    def __call__(self, layer: nn.Linear, x: Tensor) -> Tensor:
        if layer.bias is None or not _cpu_decoding(x):
            return native.linear(layer, x)  # training: the forward in capattn's kernel where it pays
        w, b = layer.weight, layer.bias
        out = native.addmm(x, w, b)  # the bias inside capattn's kernel, where it pays
        if out is not None:
            return out
        key = _versions((w, b))
        if self._weight is None or self._key != key:
            self._key, self._weight = key, torch.cat([w, b.unsqueeze(1)], dim=1)  # (V, E + 1)
        ones = x.new_ones(x.shape[:-1] + (1,))
        return torch.cat([x, ones], dim=-1) @ self._weight.t()


class _WordGates:
    """The word part of the LSTM's gates, E y W_eᵀ, for decoding on a CPU: a row per word of the
    vocabulary, each computed the first time a search feeds that word and looked up after that.

    A step of beam search over 100 images × 5 beams otherwise multiplies 500 embeddings by W_e
    (512 × 2048 at the paper's sizes, a 14th of the step's arithmetic) at every word, though the
    captions of a search use far fewer words than that: each row is one matmul row, once per search.
    A step's new words are computed together, so a row may differ from the per-step matmul's in
    rounding (about 1e-7). ``clear`` at the start of every search, like ``_FoldedLinear``.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._rows: Tensor | None = None  # (V, 4H); only the rows marked in ``_known`` are filled
        self._known: Tensor | None = None  # (V,) bool

    def add_to(self, gates: Tensor, embedding: Tensor, w_e: Tensor, tokens: Tensor) -> None:
        """``gates += embedding[tokens] @ w_eᵀ``, the rows looked up: gates (n, 4H), w_e (4H, E)."""
        key = _versions((embedding, w_e))
        if self._rows is None or self._key != key:
            self._key = key
            self._rows = w_e.new_empty(embedding.shape[0], w_e.shape[0])
            self._known = torch.zeros(embedding.shape[0], dtype=torch.bool)
        new = tokens[~self._known[tokens]]
        if new.numel():
            new = new.unique()
            x = embedding[new]
            rows = x.new_empty(x.shape[0], w_e.shape[0])
            if not (native.small_matmuls(x, w_e) and native.matmul_nt(x, w_e, rows)):  # capattn's kernel where it pays
                torch.mm(x, w_e.t(), out=rows)
            self._rows[new] = rows
            self._known[new] = True
        gates.add_(self._rows.index_select(0, tokens))


def _step_log_softmax(logits: Tensor) -> Tensor:
    """log-softmax over V of a step's fresh logits; in place without autograd on a CPU.

    In place, a decoding step allocates one (B·K, V) tensor less (20 MB at 500 × 10,000), whose
    pages would be faulted in again at every word. Bit-identical: the kernel reads each row before
    writing it. (Autograd, autocast, compile and GPUs take the out-of-place op.)
    """
    if not _cpu_decoding(logits):
        return logits.log_softmax(dim=-1)
    return torch.log_softmax(logits, dim=-1, out=logits)


class CaptionDecoder(nn.Module, ABC):
    """The interface every caption decoder implements.

    Args:
        vocab_size: V; linked from the datamodule's vocabulary by the CLI.

    Attributes:
        reads_grid: whether the decoder reads ``enc.grid``, the L×D annotation grid (True, the
            default). A decoder that sees only ``enc.pooled`` sets it False: batches from the feature
            cache then carry no grid read from disk, only a one-location grid that is the pooled
            vector itself, (B, 1, D) (at 196 × 2048, a 196th of the bytes a batch reads and sends).
    """

    reads_grid: bool = True

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
            mem: the memory returned by ``prepare`` (or ``expand_memory``).
        """

    @abstractmethod
    def forward(
        self, enc: EncoderOutput, captions: Tensor, lengths: Tensor, image_index: Tensor | None = None
    ) -> DecoderOutput:
        """Teacher forcing over whole captions.

        Args:
            enc: encoder output for B images.
            captions: (C, T) ``<bos> … <eos> <pad>…`` token ids.
            lengths: (C,) lengths including ``<bos>`` and ``<eos>``.
            image_index: (C,) int64, the image (row of ``enc``) of each caption, where images have
                several captions in the batch (``data.group_captions``): what depends only on
                the image is computed once per image. None: C = B, caption c is image c's. (A
                decoder whose ``forward`` does not take it is given ``enc`` with a row per caption.)
        """

    def expand_memory(self, mem: Memory, beams: int) -> Memory:
        """The memory ``step`` wants for ``beams`` hypotheses per image (state rows image-major, B*K).

        The default repeats every tensor K times. A decoder whose ``step`` lets the K hypotheses of an
        image share its memory (``ShowAttendTellDecoder``) returns it as it is, so beam search never
        copies an image's grid K times.
        """
        if beams == 1:
            return mem
        from capattn.decoding import tree_map  # decoding imports this module

        return tree_map(lambda x: x.repeat_interleave(beams, dim=0), mem)

    def ragged_memory(self, mem: Memory, counts: Tensor) -> Memory | None:
        """The memory ``step`` wants for ``counts[b]`` hypotheses of image b (rows image-major), or None.

        Beam search uses it to leave beams that have ended out of a step (an image's K beams end at
        different words), and beam search and greedy to leave finished images out (count 0) without
        copying the memory of the others. None, the default, says this decoder runs K hypotheses for
        every image of ``mem``; the searches then keep ended beams in their steps and copy the memory
        of the images left, as with ``expand_memory``. A decoder should give the same answer, None or
        not, to every call of a search.

        Args:
            mem: the memory returned by ``prepare`` for the B images of the search.
            counts: (B,) int64 hypotheses per image, 0 … K; their sum is the rows of ``step``'s state.
        """
        return None


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

    reads_grid = False  # the pooled vector only: cached batches carry no grid

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
        self._fc_folded = _FoldedLinear()

    def prepare(self, enc: EncoderOutput) -> Tensor:
        self._fc_folded.clear()  # a new search: the weights may have changed since the last
        return self.dropout(self.image_proj(enc.pooled))  # (B, E)

    def _run(self, inputs: Tensor, state: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        # nn.LSTM wants (N, B, H) states; ours are batch-first (B, N, H) so beams can reorder them.
        hc = None if state is None else (state[0].transpose(0, 1).contiguous(), state[1].transpose(0, 1).contiguous())
        if _emulated_bf16_autocast(inputs):
            # CPU autocast casts nn.LSTM's oneDNN layer (aten::mkldnn_rnn_layer) to bf16 without
            # torch's own bf16 check. Where oneDNN has no bf16 (AVX2), it then fails: "could not
            # create a primitive descriptor for the LSTM forward propagation primitive" (measured
            # with ONEDNN_MAX_CPU_ISA=AVX2). There the LSTM runs in fp32, which emulated bf16
            # would only slow down; bf16-mixed warns about such a CPU at setup.
            with torch.autocast("cpu", enabled=False):
                out, (h, c) = self.lstm(inputs.float(), None if hc is None else (hc[0].float(), hc[1].float()))
        else:
            out, (h, c) = self.lstm(inputs, hc)  # out (B, T, H)
        return out, (h.transpose(0, 1), c.transpose(0, 1))  # (B, N, H) each

    def init_state(self, mem: Tensor) -> tuple[Tensor, Tensor]:
        _, state = self._run(mem.unsqueeze(1), None)  # x_{-1} = CNN(I): the image is seen once
        return state

    def ragged_memory(self, mem: Tensor, counts: Tensor) -> Tensor:
        return mem.repeat_interleave(counts, dim=0)  # (N, E), small; ``step`` does not read it

    def step(self, tokens: Tensor, state: tuple[Tensor, Tensor], mem: Tensor) -> StepOutput:
        out, state = self._run(self.dropout(self.embed(tokens)).unsqueeze(1), state)  # (B, 1, H)
        logits = self._fc_folded(self.fc, self.dropout(out.squeeze(1)))  # (B, V)
        return StepOutput(logprobs=_step_log_softmax(logits), state=state, alpha=None)

    def forward(
        self, enc: EncoderOutput, captions: Tensor, lengths: Tensor, image_index: Tensor | None = None
    ) -> DecoderOutput:
        words = self.dropout(self.embed(captions[:, :-1]))  # (B, T−1, E)
        if image_index is None:
            image = self.prepare(enc)  # (B, E)
        else:  # projected once per image; dropout per caption, as without grouping
            self._fc_folded.clear()
            image = self.dropout(self.image_proj(enc.pooled).index_select(0, image_index))
        inputs = torch.cat([image.unsqueeze(1), words], dim=1)  # (B, T, E)
        out, _ = self._run(inputs, None)  # (B, T, H); the output after the image predicts nothing
        mask = _target_mask(lengths, captions.shape[1] - 1)  # (B, T−1)
        logits = self.fc(self.dropout(out[:, 1:][mask]))  # (N, V): the output layer at real positions only
        return DecoderOutput(
            logits=logits, targets=captions[:, 1:][mask], mask=mask, alphas=None, aux_loss=logits.new_zeros(())
        )


def _emulated_bf16_autocast(x: Tensor) -> bool:
    """Whether ``x`` is on a CPU under bf16 autocast that the CPU would emulate (no AVX-512 BF16 or AMX)."""
    return (
        x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and not native.bf16_in_hardware(x.device)
    )


_COMPILED_STEP_GRAPHS = 32  # how many traces of the compiled decoding step torch may make (``compile_step``)


def _cached_grid(enc: EncoderOutput) -> Tensor | None:
    """``enc.cached_grid`` where it stands for ``enc.grid`` (same shape, same device), else None."""
    half = enc.cached_grid
    if half is None or half.shape != enc.grid.shape or half.device != enc.grid.device:
        return None
    return half


def _owning(t: Tensor) -> Tensor:
    """``t`` itself if it is contiguous and owns its memory, else a contiguous copy (not a view)."""
    return t if t.is_contiguous() and not t._is_view() else t.clone(memory_format=torch.contiguous_format)


def _lstm_inplace(
    gates: Tensor,
    c: Tensor,
    *,
    c_out: Tensor | None = None,
    tanh_out: Tensor | None = None,
    h_out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The LSTM's pointwise update without autograd, its activations written over ``gates`` (B, 4H),
    in nn.LSTMCell's (i, f, g, o) order: 7 passes over (B, H). Returns h and c, written into the
    ``*_out`` buffers where given (the teacher-forced loop keeps c, tanh c and h for its backward)."""
    hidden = gates.shape[1] // 4
    gates[:, : 2 * hidden].sigmoid_()  # i, f
    i, f, g, o = gates.chunk(4, dim=1)
    g.tanh_(), o.sigmoid_()
    c = torch.mul(f, c, out=c_out).addcmul_(i, g)
    return torch.mul(o, torch.tanh(c, out=tanh_out), out=h_out), c


@dataclass(frozen=True)
class _LoopPlan:
    """What ``_TeacherForcedLoop`` needs besides tensors: rows per step and the stacked layout."""

    running: list[int]  # b_t: rows still running at step t (non-increasing, all > 0)
    embed_dim: int  # E: the first E columns of the LSTM's input weight multiply the word embedding
    att_dim: int  # A: the first A columns of the recurrent matmul's output are the attention query
    gate: bool  # whether column A is f_β's (the β gate)
    # Under autocast, its dtype (bf16): the two weight gradients summed over all N positions (W_ih's,
    # W_r's) are matmuls in it, as autocast computes every other layer's; the recurrence stays fp32.
    weight_grad_dtype: torch.dtype | None = None


class _TeacherForcedLoop(torch.autograd.Function):
    """Show, Attend and Tell's time loop, forward and backward written out: no autograd inside it.

    Rows are sorted longest first and packed time-major: the b_t rows of step t follow the
    b_{t−1} of step t − 1 (see ``ShowAttendTellDecoder.forward``). Per step, forward is
    [q; β; W_hh h] = W_r h_{t−1} + b_r (one matmul), attention (``LoopAttention``), the gates
    E y W_e + β ẑ W_z + W_hh h + biases, and the LSTM's update in place in the gates' buffer, whose
    activations backward reuses. Backward runs the steps in reverse with the same formulas
    differentiated by hand; each weight's gradient is one matmul over all N positions after the
    loop instead of one per step. Autograd's own bookkeeping (a node per op, a zero-filled gradient
    for every slice and chunk) is gone from the loop: at the paper's sizes on the 2-core CPU a
    training step took about 4% less time (RESULTS.md, ninth session).

    Few ops per step, because a GPU step at B=256 is bound by kernel launches: everything a step's
    backward multiplies that does not depend on the incoming gradient (the gates' σ′ and tanh′
    factors, β's, the previous h and c, the queries) is computed for all N positions before the
    loop, and results are written into the time-major buffers instead of copied there. On the
    GPU's branches a word now dispatches about 45 ops that launch kernels, forward and backward,
    where it dispatched 81 (counted on a CPU: ``benchmarks/bench_launches.py``). On a CPU with
    AVX-512 or AVX2, the per-word matmuls of the captions still running (by weights of 2 MB or more) run
    in capattn's own kernels (``native.matmul_nt``, ``matmul_nn``), where MKL runs far below its
    peak: a training step at the paper's sizes 16% faster (RESULTS.md, sixteenth session).

    Inputs: h0, c0 (B, H); emb (N, E) word embeddings, time-major; keys (B, L, A); grid (B, L, D);
    w_ih (4H, E + D) and b_ih (4H,) of the LSTM's input; w_rec (A [+1] + 4H, H) and b_rec, the
    stacked query projection, f_β and W_hh (``_recurrent_weights``); score_w (1, A), score_b (1,);
    half_grid: the grid in float16 (the feature cache's) or None, see ``LoopAttention``.
    Outputs, time-major: h_t (N, H), the gated context β ẑ_t (N, D), α_t (N, L).
    """

    @staticmethod
    def forward(ctx, h0, c0, emb, keys, grid, w_ih, b_ih, w_rec, b_rec, score_w, score_b, plan, half_grid):  # type: ignore[override]
        running, e, a = plan.running, plan.embed_dim, plan.att_dim
        n, hid = sum(running), h0.shape[1]
        g0 = a + int(plan.gate)  # the gates' first column in the recurrent matmul's output
        # The score's bias is never read (see LoopAttention): it is an input only to get its gradient, zero.
        att = LoopAttention(keys, grid, score_w.squeeze(0), half_grid=half_grid)
        w_z = w_ih[:, e:]  # (4H, D)
        acts = native.addmm(emb, w_ih[:, :e], b_ih)  # (N, 4H): the word part; then the gates' activations
        if acts is None:  # (the kernel: 4.2 against MKL's 5.1 ms at 368 × 512 by 512 × 2048)
            acts = torch.addmm(b_ih, emb, w_ih[:, :e].t())
        c_all, tanh_c, h_all = (h0.new_empty(n, hid) for _ in range(3))
        z_all = grid.new_empty(n, grid.shape[2])  # ẑ_t before the gate
        ctx_all = z_all if not plan.gate else grid.new_empty(n, grid.shape[2])  # β ẑ_t
        alpha_all = keys.new_empty(n, keys.shape[1])
        beta_all = h0.new_empty(n, 1) if plan.gate else None
        # On a CPU with AVX-512 or AVX2, the per-word matmuls of these few rows run in capattn's kernels
        # (native.matmul_nt, _nn), faster than MKL's (native.takes); elsewhere, torch's.
        small = native.small_matmuls(h0, w_ih, w_rec, b_rec)
        fused_buf = h0.new_empty(running[0], w_rec.shape[0]) if small else None
        h, c, off = h0, c0, 0
        for b in running:
            rows = slice(off, off + b)
            fused = fused_buf[:b] if small else None  # (b, A [+1] + 4H)
            if not (small and native.matmul_nt(h[:b], w_rec, fused, bias=b_rec)):
                fused = torch.addmm(b_rec, h[:b], w_rec.t())
            att.forward(fused[:, :a], b, alpha_all[rows], z_all[rows])  # (backward recomputes the queries)
            if plan.gate:
                beta = torch.sigmoid(fused[:, a:g0], out=beta_all[rows])  # (b, 1)
                torch.mul(z_all[rows], beta, out=ctx_all[rows])
            gates = acts[rows]  # (b, 4H), a view: filled in place, then holds the activations
            gates.add_(fused[:, g0:])
            if not (small and native.matmul_nt(ctx_all[rows], w_z, gates, accumulate=True)):
                gates.addmm_(ctx_all[rows], w_z.t())
            h, c = _lstm_inplace(gates, c[:b], c_out=c_all[rows], tanh_out=tanh_c[rows], h_out=h_all[rows])
            off += b
        # outputs go through save_for_backward (kept on ctx, they would hold their own graph in a cycle)
        ctx.save_for_backward(
            h0, c0, emb, keys, grid, w_ih, w_rec, b_rec, score_w, acts, h_all, c_all, tanh_c, ctx_all, alpha_all
        )  # fmt: skip
        ctx.saved = (z_all if plan.gate else None, beta_all, half_grid)
        ctx.plan = plan
        return h_all, ctx_all, alpha_all

    @staticmethod
    def _previous(first: Tensor, per_step: Tensor, running: list[int]) -> Tensor:
        """(N, ·): each position's value from the step before (``first``'s rows at step 0).

        Time-major, position p of step t ≥ 1 continues position p − b_{t−1} of step t − 1.
        """
        steps = torch.tensor(running, dtype=torch.long)
        shift = torch.repeat_interleave(steps[:-1], steps[1:])
        index = (torch.arange(running[0], per_step.shape[0]) - shift).to(per_step.device, non_blocking=True)
        return torch.cat([first[: running[0]], per_step.index_select(0, index)])

    @staticmethod
    def backward(ctx, d_h_all, d_ctx_all, d_alpha_all):  # type: ignore[override]
        # Autocast stays off, as in the forward: a backward may run inside the forward's autocast region.
        with torch.autocast(d_h_all.device.type, enabled=False):
            return _TeacherForcedLoop._backward(ctx, d_h_all, d_ctx_all, d_alpha_all)

    @staticmethod
    def _backward(ctx, d_h_all, d_ctx_all, d_alpha_all):
        h0, c0, emb, keys, grid, w_ih, w_rec, b_rec, score_w, acts, h_all, c_all, tanh_c, ctx_all, alpha_all = (
            ctx.saved_tensors
        )
        z_all, beta_all, half_grid = ctx.saved
        plan = ctx.plan
        running, e, a = plan.running, plan.embed_dim, plan.att_dim
        n, hid = h_all.shape
        g0 = a + int(plan.gate)
        needs = ctx.needs_input_grad
        att = LoopAttention(keys, grid, score_w.squeeze(0), grid_grad=needs[4], half_grid=half_grid)
        w_z = w_ih[:, e:]  # (4H, D)
        # What the steps' derivatives multiply, for all N positions at once (a few ops in all, not
        # ~20 per step). h = o tanh(c) and c = f c_{t−1} + i g with σ' = σ(1 − σ), tanh' = 1 − tanh²:
        #   d_i = dc · g σ'(i), d_f = dc · c_{t−1} σ'(f), d_g = dc · i (1 − g²), d_o = dh · tanh(c) σ'(o),
        #   and dc gains dh · o (1 − tanh² c).
        i, f, g, o = acts.chunk(4, dim=1)
        sig_d = acts - acts * acts  # σ' of the i, f and o columns
        coef = torch.empty_like(acts).view(n, 4, hid)  # (N, 4, H): the four gates' factors above
        torch.mul(g, sig_d[:, :hid], out=coef[:, 0])
        torch.mul(_TeacherForcedLoop._previous(c0, c_all, running), sig_d[:, hid : 2 * hid], out=coef[:, 1])
        torch.mul(i, torch.rsub(g * g, 1), out=coef[:, 2])
        torch.mul(tanh_c, sig_d[:, 3 * hid :], out=coef[:, 3])
        dc_from_h = o * torch.rsub(tanh_c * tanh_c, 1)  # (N, H)
        del sig_d
        if plan.gate:  # ẑ σ'(β's pre-activation): β's gradient is dẑ · that
            z_beta = z_all * beta_all * torch.rsub(beta_all, 1)  # (N, D)
        h_prev = _TeacherForcedLoop._previous(h0, h_all, running)  # (N, H): h_{t−1} of each position
        query_all = torch.addmm(b_rec[:a], h_prev, w_rec[:a].t())  # the forward's queries, in one matmul

        d_fused_all = h0.new_empty(n, w_rec.shape[0])  # (N, A [+1] + 4H)
        d_gates_all = d_fused_all[:, g0:]  # (N, 4H)
        dh, dc = torch.zeros_like(h0), torch.zeros_like(c0)  # rows :b_t: the gradient reaching step t
        small = native.small_matmuls(h0, w_ih, w_rec)  # as in the forward
        d_ctx_buf = h0.new_empty(running[0], w_z.shape[1]) if small else None
        starts = [0]
        for b in running[:-1]:
            starts.append(starts[-1] + b)
        for t in reversed(range(len(running))):
            b, off = running[t], starts[t]
            rows = slice(off, off + b)
            dh_t, dc_t = dh[:b], dc[:b]
            dh_t += d_h_all[rows]
            dc_t.addcmul_(dh_t, dc_from_h[rows])
            d_gates = d_gates_all[rows].view(b, 4, hid)
            torch.mul(coef[rows, :3], dc_t.unsqueeze(1), out=d_gates[:, :3])
            torch.mul(coef[rows, 3], dh_t, out=d_gates[:, 3])
            dc_t.mul_(f[rows])  # now the gradient reaching c_{t−1}
            d_ctx = d_ctx_buf[:b].copy_(d_ctx_all[rows]) if small else None  # (b, D), of β ẑ_t
            if not (small and native.matmul_nn(d_gates_all[rows], w_z, d_ctx, accumulate=True)):
                d_ctx = torch.addmm(d_ctx_all[rows], d_gates_all[rows], w_z)
            if plan.gate:
                torch.linalg.vecdot(d_ctx, z_beta[rows], out=d_fused_all[rows, a])  # (a CPU's bmm: 30× slower)
                d_ctx = d_ctx.mul_(beta_all[rows])  # of ẑ_t
            att.backward(query_all[rows], alpha_all[rows], d_alpha_all[rows], d_ctx, b, d_fused_all[rows, :a])
            if not (small and native.matmul_nn(d_fused_all[rows], w_rec, dh_t)):  # the gradient reaching h_{t−1}
                torch.mm(d_fused_all[rows], w_rec, out=dh_t)
        d_keys, d_grid, d_w = att.gradients()
        d_w_ih = d_b_ih = d_emb = d_w_rec = d_b_rec = None

        def weight_grad(d_out: Tensor, inputs: Tensor) -> Tensor:  # d_outᵀ inputs, one matmul over N
            low = plan.weight_grad_dtype
            if low is None:
                return d_out.t() @ inputs
            return (d_out.t().to(low) @ inputs.to(low)).to(d_out.dtype)

        if needs[5]:
            d_w_ih = weight_grad(d_gates_all, torch.cat([emb, ctx_all], dim=1))  # (4H, E + D)
        if needs[6]:
            d_b_ih = d_gates_all.sum(dim=0)
        if needs[2]:
            d_emb = d_gates_all @ w_ih[:, :e]
        if needs[7]:
            d_w_rec = weight_grad(d_fused_all, h_prev)
        if needs[8]:
            d_b_rec = d_fused_all.sum(dim=0)
        return (
            dh, dc, d_emb, d_keys if needs[3] else None, d_grid, d_w_ih, d_b_ih, d_w_rec, d_b_rec,
            d_w.unsqueeze(0) if needs[9] else None, score_w.new_zeros(1) if needs[10] else None, None, None,
        )  # fmt: skip


@dataclass(frozen=True)
class AttentionMemory:
    """Per-image memory of Show, Attend and Tell: annotation vectors and their projected keys."""

    grid: Tensor  # (B, L, D)
    keys: Tensor  # (B, L, A)
    # (B + 1,) int64 row offsets where images have different numbers of hypotheses (``ragged_memory``):
    # image b's are the state's rows starts[b] … starts[b+1]−1. None: the same number K for every image.
    starts: Tensor | None = None
    # (B, L, D) float16 with the grid's values (``EncoderOutput.cached_grid``): what the context reads
    # when decoding on a CPU, at half the memory traffic (``native.context``). None: it reads ``grid``.
    half_grid: Tensor | None = None


class ShowAttendTellDecoder(CaptionDecoder):
    """Show, Attend and Tell (Xu et al., 2015) with soft attention.

    At each word the LSTM attends over the L×D annotation grid; the initial state comes from the
    mean annotation (§3.1.2); a scalar gate β_t = σ(f_β(h_{t−1})) scales the context (§4.2.1);
    the deep output layer is p(y_t) ∝ exp(L_o(E y_{t−1} + L_h h_t + L_z ẑ_t)) (eq. 7); and the
    doubly stochastic term λ Σ_i (1 − Σ_t α_ti)² (eq. 14) pushes every location to be seen.

    Teacher forcing keeps only what depends on h_{t−1} inside the time loop: the word part of the
    LSTM input projection is one matmul for all steps before it, and the deep output layer one
    matmul over the stacked real positions after it (see ``forward``). ``step`` lets the K beams
    of an image share its grid and keys (``expand_memory``).

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
        compile_step: run ``step`` (greedy, beam search, sampling) through ``torch.compile``; meant
            for a GPU, where one step is many small kernels. The first call compiles; a run traces
            the step a few more times (one row per image against K, one image left, fit's no_grad
            validation against test's inference tensors), never once per batch size: a Lightning
            demo fit with its test traced it 6 times on an H100. A run-time switch: a checkpoint
            trained with it takes the command line's value (test, predict, resume), and
            ``capattn caption`` never compiles. Leave it off on a CPU: there,
            greedy over 100 images at paper sizes took 1.19 s compiled against 0.57 s eager (after a
            57 s compile), and beam search was still compiling after 15 min.
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
        compile_step: bool = False,
    ) -> None:
        super().__init__(vocab_size=vocab_size)
        self.feature_dim = feature_dim
        self.embed_dim = embed_dim
        self.compile_step = compile_step
        self._compiled_step: Callable[..., StepOutput] | None = None
        self._stacked: tuple[Any, Tensor, Tensor] | None = None  # see _recurrent_weights
        self._L_o_folded = _FoldedLinear()
        self._word_gates = _WordGates()
        self.alpha_c = alpha_c
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.attention = SoftAttention(feature_dim=feature_dim, hidden_dim=hidden_dim, attention_dim=attention_dim)
        self.init_h = nn.Linear(feature_dim, hidden_dim)
        self.init_c = nn.Linear(feature_dim, hidden_dim)
        self.f_beta = nn.Linear(hidden_dim, 1) if gate else None
        self.cell = nn.LSTMCell(embed_dim + feature_dim, hidden_dim)  # input [E y_{t−1}; ẑ_t]
        self.dropout = nn.Dropout(dropout)
        if deep_output:
            self.L_h = nn.Linear(hidden_dim, embed_dim)
            self.L_z = nn.Linear(feature_dim, embed_dim)
            self.L_o = nn.Linear(embed_dim, vocab_size)
        else:
            self.L_h = self.L_z = None
            self.L_o = nn.Linear(hidden_dim, vocab_size)

    def prepare(self, enc: EncoderOutput) -> AttentionMemory:
        self._stacked = None  # a new search: weights may have changed since the last (see _recurrent_weights)
        self._L_o_folded.clear()
        self._word_gates.clear()
        grid = enc.grid
        if torch.is_autocast_enabled(grid.device.type) and grid.dtype == torch.float32:
            # Cast once, not at every word: under autocast each step's bmm(α, grid) would cast the
            # whole (b, L, D) grid again (at B=1024, 196×2048 on an H200, more traffic than the bmm).
            grid = grid.to(torch.get_autocast_dtype(grid.device.type))
        keys = self.attention.project_keys(grid)
        if self.compile_step:  # inputs of one kind, so the compiled step is not traced again for views
            grid, keys = _owning(grid), _owning(keys)
        # A step reads the whole grid for its context, at the speed of memory (greedy over 100
        # images at 196×2048: 5.1 ms a word from the float32 grid, 2.6-3.0 from the float16 one; the
        # same sums to the bit). On a GPU the context is a batched matmul, and autocast casts the grid.
        half = None if self.compile_step or not _cpu_decoding(grid) else _cached_grid(enc)
        if half is not None and not native.context_reads(half):
            half = None
        return AttentionMemory(grid=grid, keys=keys, half_grid=half)

    def init_state(self, mem: AttentionMemory) -> tuple[Tensor, Tensor]:
        mean = mem.grid.mean(dim=1, dtype=torch.promote_types(mem.grid.dtype, torch.float32))  # (B, D)
        return torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))  # (B, H) each

    def expand_memory(self, mem: AttentionMemory, beams: int) -> AttentionMemory:
        return mem  # ``step`` broadcasts each image's grid and keys over its hypotheses

    def ragged_memory(self, mem: AttentionMemory, counts: Tensor) -> AttentionMemory | None:
        """The grid and keys as they are, with row offsets: no copy (only the fused CPU kernels take
        offsets, so elsewhere None: a GPU, autocast, ``CAPATTN_NATIVE=0`` or a compiled step keep K
        rows per image)."""
        if self.compile_step or not (_cpu_decoding(mem.grid) and native.usable(mem.grid, mem.keys)):
            return None
        starts = torch.zeros(counts.shape[0] + 1, dtype=torch.long)
        torch.cumsum(counts.to(device="cpu", dtype=torch.long), dim=0, out=starts[1:])
        return dataclasses.replace(mem, starts=starts)

    # --- the pieces of one step, shared by ``step`` and the teacher-forced loop ---------------------

    def _recurrent_weights(self, *, input_bias: bool = False) -> tuple[Tensor, Tensor]:
        """W_h of the attention query, f_β and the LSTM's W_hh stacked: one matmul on h_{t−1} per step.

        With ``input_bias`` the gates' part of the bias also holds the LSTM's b_ih. Without autograd
        (decoding) the stacked copy is kept from one word to the next instead of concatenating 5 MB
        at every word; ``prepare``, which every search calls first, drops it, so a search never sees
        the weights of an earlier one. (Parameters' ``_version`` cannot tell: torch's fused Adam
        updates them in place without counting.)
        """
        att = self.attention.query_proj
        parts = [att, self.f_beta] if self.f_beta is not None else [att]
        sources = [t for p in parts for t in (p.weight, p.bias)] + [
            self.cell.weight_hh,
            self.cell.bias_hh,
            self.cell.bias_ih,
        ]
        cacheable = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        key = (input_bias, *_versions(sources)) if cacheable else None
        if key is not None and self._stacked is not None and self._stacked[0] == key:
            return self._stacked[1], self._stacked[2]
        weight = torch.cat([p.weight for p in parts] + [self.cell.weight_hh])  # (A [+1] + 4H, H)
        gates_bias = self.cell.bias_hh + self.cell.bias_ih if input_bias else self.cell.bias_hh
        bias = torch.cat([p.bias for p in parts] + [gates_bias])
        if key is not None:
            self._stacked = (key, weight, bias)
        return weight, bias

    def _attend(
        self, fused: Tensor, attend: Callable[[Tensor], tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Context ẑ_t (β-gated), alpha and the W_hh h_{t−1} + b_hh part of the gates.

        ``fused`` is h_{t−1} times ``_recurrent_weights`` plus their bias: (B*K, A [+1] + 4H).
        """
        att_dim = self.attention.query_proj.out_features
        context, alpha = attend(fused[:, :att_dim])  # (B*K, D), (B*K, L)
        if self.f_beta is not None:
            context = torch.sigmoid(fused[:, att_dim : att_dim + 1]) * context  # β_t: (B*K, 1) scalar gate
        return context, alpha, fused[:, -4 * self.cell.hidden_size :]

    @staticmethod
    def _lstm(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """LSTM pointwise update from pre-activations (B, 4H) in nn.LSTMCell's (i, f, g, o) order."""
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def _output(self, emb: Tensor, h: Tensor, context: Tensor) -> Tensor:
        """Eq. 7's deep output L_o(E y_{t−1} + L_h h_t + L_z ẑ_t) for any number of rows: (N, V)."""
        if self.L_h is None:
            return self._L_o_folded(self.L_o, self.dropout(h))
        return self._L_o_folded(self.L_o, self.dropout(emb + self.L_h(h) + native.linear(self.L_z, context)))

    def step(self, tokens: Tensor, state: tuple[Tensor, Tensor], mem: AttentionMemory) -> StepOutput:
        if not self.compile_step:
            return self._step(tokens, state, mem)
        if self._compiled_step is None:
            self._compiled_step = torch.compile(self._step)
        # Inputs of one kind, so that the step is traced as few times as it can be: torch.compile
        # guards on whether each input is a view (beam search passes views at some words and fresh
        # tensors at others; these are small, B*K rows), and rows are dynamic from the first call
        # (batch sizes vary, and finished images leave the batch). The feature sizes stay static: with
        # every size dynamic, a batch of 64 beside a 64-wide grid made torch treat them as one size.
        tokens, state = _owning(tokens), (_owning(state[0]), _owning(state[1]))
        for t in (tokens, *state, mem.grid, mem.keys):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        # Still traced once per kind of call: greedy and beam search's first word (one row per image)
        # against beam search's later words, a few rows against many, and no_grad (fit's validation)
        # against inference tensors (test, predict). torch stops compiling a function after 8 and
        # runs it eagerly from then on; a Lightning fit with test reached that (H100, thirteenth session).
        limit = max(_COMPILED_STEP_GRAPHS, torch._dynamo.config.recompile_limit)
        with torch._dynamo.config.patch(recompile_limit=limit):
            return self._compiled_step(tokens, state, mem)

    def _step(self, tokens: Tensor, state: tuple[Tensor, Tensor], mem: AttentionMemory) -> StepOutput:
        h, c = state  # (B*K, H): K hypotheses per image of ``mem`` (K = 1 outside beam search)
        weight, bias = self._recurrent_weights(input_bias=True)
        fused = native.addmm(h, weight, bias)
        context, alpha, gates_h = self._attend(
            torch.addmm(bias, h, weight.t()) if fused is None else fused,
            lambda query: self.attention.attend(
                mem.keys, mem.grid if mem.half_grid is None else mem.half_grid, query, mem.starts
            ),
        )
        emb = self.embed(tokens)  # (B*K, E)
        w_ih = self.cell.weight_ih  # (4H, E + D): input [E y_{t−1}; ẑ_t]
        if torch.is_grad_enabled() or torch.is_autocast_enabled(h.device.type) or torch.compiler.is_compiling():
            # (in-place ops skip autocast; compiled, inductor fuses the out-of-place ops itself)
            gates = torch.addmm(gates_h, emb, w_ih[:, : self.embed_dim].t())  # (B*K, 4H), biases included
            gates = torch.addmm(gates, context, w_ih[:, self.embed_dim :].t())
            h, c = self._lstm(gates, c)
        else:  # decoding: the same arithmetic, in place in the fused matmul's output (fewer passes per word)
            self._word_gates.add_to(gates_h, self.embed.weight, w_ih[:, : self.embed_dim], tokens)
            w_z = w_ih[:, self.embed_dim :]
            if not (native.small_matmuls(context, w_z) and native.matmul_nt(context, w_z, gates_h, accumulate=True)):
                gates_h.addmm_(context, w_z.t())
            h, c = _lstm_inplace(gates_h, c)
        logits = self._output(emb, h, context)  # (B*K, V)
        return StepOutput(logprobs=_step_log_softmax(logits), state=(h, c), alpha=alpha)

    def forward(
        self, enc: EncoderOutput, captions: Tensor, lengths: Tensor, image_index: Tensor | None = None
    ) -> DecoderOutput:
        """Teacher forcing with only the recurrence in the time loop.

        With ``image_index`` (several captions per image) the keys are projected once per image and
        gathered for its captions: at the paper's sizes the keys' projection and its gradient are
        about half a step's matmul work with one caption per image.

        Rows are sorted by length so the rows still running at step t are the first b_t (a shrinking
        batch, as in a PackedSequence); nothing is computed for padded steps. Real positions are
        packed time-major while the loop runs, then put back in ``mask`` order for the output layer.

        Under autocast (``--trainer.precision=bf16-mixed``) the time loop runs with autocast off, in
        the parameters' dtype: the recurrence and the attention, forward and backward, stay in fp32,
        as numerically safest. Autocast's dtype applies to the work outside the loop, which at the
        paper's sizes is most of the step's matmul work: the keys' projection, the initial state,
        the deep output layer, and their gradients; and to the loop's two weight gradients summed
        over all positions (W_ih's and W_r's), as autocast computes every other layer's. On a CPU
        with bf16 matrix units (AMX), at the paper's sizes, a step takes 0.74× the fp32 step this
        way (0.80–0.81× with those two weight gradients in fp32); with autograd through the loop
        under autocast, as before, it took 1.4× (RESULTS.md, eleventh session). With AVX-512 BF16
        (AMD Zen 4, no AMX): 0.74–0.76× (0.68–0.75× with a 196×512 grid; twelfth session).
        """
        batch, steps = captions.shape[0], captions.shape[1] - 1
        mask = _target_mask(lengths, steps)  # (B, T−1)
        order = torch.argsort(lengths, descending=True, stable=True)  # (B,) longest first
        sorted_mask = mask[order]  # (B, T−1), rows sorted
        running = sorted_mask.sum(dim=0).tolist()  # b_t: rows still running at step t, non-increasing
        steps_run = sum(1 for b in running if b > 0)
        t_idx, r_idx = sorted_mask.t().nonzero(as_tuple=True)  # (N,) each: real positions, time-major
        rows = order[r_idx]  # (N,) original row of each time-major position
        # position in the time-major packing of every real (row, t), read in mask order
        packed_at = torch.empty_like(captions[:, 1:])
        packed_at[rows, t_idx] = torch.arange(rows.shape[0], device=captions.device)
        to_mask_order = packed_at[mask]  # (N,)

        training = torch.is_grad_enabled()  # the hand-written loop; without autograd, ``_plain_loop``
        if training:  # the grid as given, even under autocast (``prepare`` casts it for decoding's words)
            half = _cached_grid(enc)  # the loop's attention reads it where the kernels do (LoopAttention)
            mem = AttentionMemory(grid=enc.grid, keys=self.attention.project_keys(enc.grid), half_grid=half)
        else:
            mem = self.prepare(enc)
        if image_index is not None:  # several captions per image: a row of grid and keys per caption
            image_of_row = image_index.index_select(0, order)  # (B,) the image of each sorted row
        elif bool((order == torch.arange(batch, device=order.device)).all()):
            image_of_row = None  # already longest first (the training sampler's batches): nothing to copy
        else:
            image_of_row = order
        if image_of_row is not None:  # (B, L, ·) sorted
            half = mem.half_grid if training else None  # (``_plain_loop`` reads the float32 grid)
            mem = AttentionMemory(
                grid=mem.grid.index_select(0, image_of_row),
                keys=mem.keys.index_select(0, image_of_row),
                half_grid=None if half is None else half.index_select(0, image_of_row),
            )
        h, c = self.init_state(mem)  # (B, H) each

        emb = self.embed(captions[rows, t_idx])  # (N, E) E y_{t−1} of every real position, time-major
        if training:
            h_tm, z_tm, alpha_tm = self._fast_loop(h, c, emb, mem, running[:steps_run])
        else:
            h_tm, z_tm, alpha_tm = self._plain_loop(h, c, emb, mem, running[:steps_run])

        h_all = h_tm.index_select(0, to_mask_order)  # (N, H), mask order
        z_all = z_tm.index_select(0, to_mask_order)  # (N, D)
        # The deep output layer and L_o once, on the N real positions stacked: (N, E) @ (E, V).
        logits = self._output(emb.index_select(0, to_mask_order), h_all, z_all)  # (N, V)

        alpha_all = alpha_tm.index_select(0, to_mask_order)  # (N, L)
        alphas_t = alpha_all.new_zeros(batch, steps, alpha_all.shape[-1]).index_put((mask,), alpha_all)
        # Eq. 14 per image, summed over the batch and divided by the number of predicted tokens:
        # the same normalisation as the masked-mean cross-entropy, so λ keeps the paper's weight.
        coverage = alphas_t.sum(dim=1)  # (B, L); padded steps are zero
        penalty = ((1.0 - coverage) ** 2).sum() / mask.sum().clamp(min=1)
        return DecoderOutput(
            logits=logits, targets=captions[:, 1:][mask], mask=mask, alphas=alphas_t, aux_loss=self.alpha_c * penalty
        )

    def _fast_loop(
        self, h: Tensor, c: Tensor, emb: Tensor, mem: AttentionMemory, running: list[int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``_TeacherForcedLoop``: h_t, β ẑ_t and α_t of every real position, time-major, in the
        parameters' dtype with autocast off (under autocast the loop's inputs arrive in its dtype;
        its two weight gradients over all positions are matmuls in autocast's, see ``_LoopPlan``)."""
        dtype, device = self.cell.weight_ih.dtype, emb.device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        with torch.autocast(device, enabled=False):
            weight, bias = self._recurrent_weights()
            plan = _LoopPlan(
                running=running,
                embed_dim=self.embed_dim,
                att_dim=self.attention.query_proj.out_features,
                gate=self.f_beta is not None,
                weight_grad_dtype=autocast if dtype == torch.float32 else None,
            )
            score = self.attention.score
            return _TeacherForcedLoop.apply(
                h.to(dtype), c.to(dtype), emb.to(dtype), mem.keys.to(dtype), mem.grid.to(dtype),
                self.cell.weight_ih, self.cell.bias_ih, weight, bias, score.weight, score.bias, plan, mem.half_grid,
            )  # fmt: skip

    def _plain_loop(
        self, h: Tensor, c: Tensor, emb: Tensor, mem: AttentionMemory, running: list[int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``_TeacherForcedLoop``'s outputs, h_t, β ẑ_t and α_t of every real position, time-major,
        without autograd (e.g. a loss computed under ``torch.no_grad``), where its saved activations
        would be wasted."""
        w_ih = self.cell.weight_ih  # (4H, E + D): input [E y_{t−1}; ẑ_t]
        gates_word = torch.addmm(self.cell.bias_ih, emb, w_ih[:, : self.embed_dim].t())  # (N, 4H)
        weight, bias = self._recurrent_weights()
        hs, contexts, alphas = [], [], []
        for t, gates_t in enumerate(gates_word.split(running)):
            b = running[t]
            h, c = h[:b], c[:b]  # rows whose caption has ended drop out (sorted, so they are the last)
            context, alpha, gates_h = self._attend(
                torch.addmm(bias, h, weight.t()),
                lambda query, b=b: self.attention.attend(mem.keys[:b], mem.grid[:b], query),
            )
            h, c = self._lstm(gates_t + gates_h + context @ w_ih[:, self.embed_dim :].t(), c)
            hs.append(h)
            contexts.append(context)
            alphas.append(alpha)
        return torch.cat(hs), torch.cat(contexts), torch.cat(alphas)
