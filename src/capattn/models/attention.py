"""Soft (deterministic) attention of Xu et al. §4.2, with keys projected once per image."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from capattn.models import native

_CHUNK_ELEMENTS = 3 << 17  # floats per chunk of tanh(keys + q) built in cache (1.5 MB in fp32, within one core's L2)


def _whole_batch(x: Tensor) -> bool:
    """Whether ``LoopAttention`` runs each step's rows at once, in batched kernels (a GPU), rather than
    in cache-sized chunks and per-image matrix-vector products (a CPU). A function, so that the
    tests run the GPU's branches on a CPU."""
    return x.device.type != "cpu"


class SoftAttention(nn.Module):
    """Additive attention: e_ti = wᵀ tanh(W_a a_i + W_h h_{t−1}), α_t = softmax(e_t), ẑ_t = Σ_i α_ti a_i.

    ``W_a a_i`` does not depend on t, so ``project_keys`` computes it once per image and every
    decoding step (and every beam) reuses it. ``attend`` takes an already projected query, so a
    decoder can fuse ``W_h h`` with its other matmuls on h; it also lets K hypotheses of one
    image (beams) share that image's keys and grid instead of K copies of them.

    Args:
        feature_dim: D, the size of each annotation vector a_i.
        hidden_dim: H, the decoder's LSTM size.
        attention_dim: A, the size of the joint attention space.
    """

    def __init__(self, *, feature_dim: int, hidden_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.key_proj = nn.Linear(feature_dim, attention_dim)
        self.query_proj = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def project_keys(self, grid: Tensor) -> Tensor:
        """(B, L, D) annotation vectors → (B, L, A) keys (on a CPU, in capattn's matmul kernel where it
        pays: ``native.linear``)."""
        return native.linear(self.key_proj, grid)

    def attend(self, keys: Tensor, grid: Tensor, query: Tensor, starts: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Attends with projected queries, K of them per image (image-major rows).

        Args:
            keys: (B, L, A) from ``project_keys``.
            grid: (B, L, D) annotation vectors; decoding on a CPU, also their float16 copy where the
                kernels read it (``native.context_reads``).
            query: (B*K, A) ``W_h h_{t−1}`` (bias included) of K hypotheses per image; K = 1 in training.
            starts: (B + 1,) int64 row offsets where images have different numbers of hypotheses
                (image b's are rows starts[b] … starts[b+1]−1; beam search without its ended beams).
                Only for CPU float32 decoding with the fused kernels (``native.usable``).

        Returns:
            context (B*K, D) and attention weights alpha (B*K, L), which sum to one over L.
        """
        if starts is not None:
            energy = native.energy(keys, query, self.score.weight.squeeze(0), float(self.score.bias), starts)
            alpha = energy.softmax(dim=-1)  # (N, L)
            return native.context(grid, alpha, starts), alpha
        batch, locations, _ = keys.shape
        k = query.shape[0] // batch
        q = query.view(batch, k, 1, -1)  # (B, K, 1, A)
        needs_graph = torch.is_grad_enabled() and any(t.requires_grad for t in (keys, q, self.score.weight))
        cpu_decoding = not (
            needs_graph
            or keys.device.type != "cpu"
            or torch.is_autocast_enabled("cpu")
            or torch.compiler.is_compiling()  # the chunk loop would fix the batch size in the graph
        )
        if cpu_decoding:
            energy = self._energy_in_chunks(keys, q)
        else:
            energy = self.score(torch.tanh(keys.unsqueeze(1) + q)).squeeze(-1)  # (B, K, L, A) → (B, K, L)
        alpha = energy.softmax(dim=-1)  # (B, K, L)
        # Per image, the grid is read once for all its K hypotheses: one (K × L) @ (L × D) product.
        # The fused kernel does it faster than MKL's bmm: 100 images × 196 × 2048 at K = 5, 7.7 ms
        # against 11.9; at K = 1 (greedy), 5.2-6.0 against 5.6-6.6 on the 2-core AMD EPYC (seventeenth
        # session; level on the Intel Xeon of the fifth, where bmm kept that case).
        if cpu_decoding and native.usable(alpha) and native.context_reads(grid):
            context = native.context(grid, alpha)  # (B, K, D)
        else:
            context = torch.bmm(alpha, grid)  # (B, K, D)
        return context.view(batch * k, -1), alpha.view(batch * k, locations)

    def _energy_in_chunks(self, keys: Tensor, q: Tensor) -> Tensor:
        """wᵀ tanh(k + q) without autograd, a few images at a time through one small buffer.

        The (B, K, L, A) sum is the largest tensor of a decoding step (200 MB for 100 images × 5
        beams at A = 512); built whole, it is written, re-read and re-faulted from memory at every
        step. In chunks of about 4 MB it stays in cache. (CPU only: a GPU streams it whole.) With the
        fused kernel (``native``) the sum is never stored at all.
        """
        if native.usable(keys, q):
            return native.energy(keys, q.squeeze(2), self.score.weight.squeeze(0), float(self.score.bias))
        batch, k, locations, width = keys.shape[0], q.shape[1], keys.shape[1], keys.shape[2]
        per_image = k * locations * width
        chunk = max(1, _CHUNK_ELEMENTS // per_image)
        buf = keys.new_empty(min(chunk, batch), k, locations, width)
        energy = keys.new_empty(batch, k, locations)
        w = self.score.weight.squeeze(0)  # (A,)
        for start in range(0, batch, chunk):
            stop = min(start + chunk, batch)
            part = buf[: stop - start]
            torch.add(keys[start:stop].unsqueeze(1), q[start:stop], out=part).tanh_()  # (c, K, L, A)
            torch.matmul(part, w, out=energy[start:stop])  # (c, K, L)
        return energy.add_(self.score.bias)

    def forward(self, keys: Tensor, grid: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """Attends over the grid.

        Args:
            keys: (B, L, A) from ``project_keys``.
            grid: (B, L, D) annotation vectors.
            hidden: (B*K, H) the previous hidden states h_{t−1}, K per image (K = 1: one per image).

        Returns:
            context (B*K, D) and attention weights alpha (B*K, L), which sum to one over L.
        """
        return self.attend(keys, grid, self.query_proj(hidden))


def _grid_times(grid: Tensor, vectors: Tensor) -> Tensor:
    """(b, L, D) @ (b, D) → (b, L) on a CPU without the fused kernels: each image's grid times its own vector.

    One matrix-vector product per image streams the grid at twice the speed of a batched matmul with
    one column (measured: 1.1 ms against 2.1 ms for 32 × 196 × 2048), and the fused kernel
    ``native.grid_times``, which shares all rows of a step out over the threads at once, faster
    still (0.98 ms). A GPU takes a batched matmul instead (``LoopAttention.backward``).
    """
    out = vectors.new_empty(grid.shape[:2])
    for i in range(grid.shape[0]):
        torch.mv(grid[i], vectors[i], out=out[i])
    return out


class LoopAttention:
    """Soft attention for a hand-written teacher-forced loop: rows ``:b`` of one batch's keys and
    grid at each step, forward and backward without autograd.

    The loop (``ShowAttendTellDecoder``'s ``_TeacherForcedLoop``) calls ``forward`` at each step,
    then in its backward calls ``backward`` at each step, last step first. Forward: s = tanh(keys +
    q), e = s w, α = softmax(e), ẑ = α grid (without the score's bias b: it adds the same number to
    every energy of a row, which softmax ignores, so its gradient is zero and the caller need not
    read it, which on a GPU is a sync). The (b, L, A) tensor s is never stored: forward and
    backward rebuild it, on a CPU in one fused pass per row (``native``), else a few rows at a time
    in one cache-sized buffer (a GPU streams it whole). The gradients of the keys, the grid and the
    score's w are summed over the steps in buffers (``gradients``), instead of autograd
    zero-padding each step's slice to (B, L, ·) and adding them up. ``forward`` and ``backward``
    write into the loop's buffers and use one op where PyTorch has one (softmax's backward, a
    batched matmul that adds), which matters where a step is bound by kernel launches (a GPU).

    Args:
        keys: (B, L, A) projected keys (detached).
        grid: (B, L, D) annotation vectors (detached).
        weight: (A,) the score vector w (detached).
        grid_grad: whether ``backward`` sums the grid's gradient (the encoder trains).
        half_grid: (B, L, D) float16 with the grid's values (``EncoderOutput.cached_grid``), or None.
            With the CPU kernels, the context and the attention weights' gradient read it instead
            of the grid: the same results, half the memory traffic (at 32 × 196 × 2048 a step's
            context 0.3 against 1.4 ms, the weights' gradient 0.4 against 1.2: the float16 grid
            stays in a 32 MB cache).
    """

    def __init__(
        self, keys: Tensor, grid: Tensor, weight: Tensor, *, grid_grad: bool = False, half_grid: Tensor | None = None
    ) -> None:
        self.keys, self.grid, self.w, self.grid_grad = keys, grid, weight, grid_grad
        self.native = native.usable(keys, grid, weight)
        # what the kernels read for the context and α's gradient
        use_half = self.native and half_grid is not None and native.context_reads(half_grid)
        self._read = half_grid if use_half else grid
        self._buf: Tensor | None = None
        self.d_keys: Tensor | None = None
        self.d_grid: Tensor | None = None
        self._d_energy_sum: Tensor | None = None  # PyTorch path: Σ_t dE, w is applied once at the end
        self.d_w = weight.new_zeros(weight.shape)

    def _chunk(self, rows: int) -> tuple[Tensor, int]:
        """A buffer for s and how many rows fit in it: a few rows in a CPU's cache; all of them on a GPU."""
        keys = self.keys
        if _whole_batch(keys):
            return keys.new_empty(rows, keys.shape[1], keys.shape[2]), rows
        chunk = max(1, min(keys.shape[0], _CHUNK_ELEMENTS // (keys.shape[1] * keys.shape[2])))
        if self._buf is None:
            self._buf = keys.new_empty(chunk, keys.shape[1], keys.shape[2])
        return self._buf, chunk

    def forward(self, query: Tensor, rows: int, alpha: Tensor, context: Tensor) -> None:
        """α (b, L) and the context ẑ (b, D) of rows :b for their queries (b, A), written into ``alpha``
        and ``context`` (the loop's time-major buffers: no copy)."""
        keys = self.keys
        if self.native:
            energy = native.energy(keys[:rows], query.unsqueeze(1), self.w, 0.0).squeeze(1)  # (b, L)
        else:
            buf, chunk = self._chunk(rows)
            energy = keys.new_empty(rows, keys.shape[1])
            for i in range(0, rows, chunk):
                j = min(i + chunk, rows)
                s = torch.add(keys[i:j], query[i:j].unsqueeze(1), out=buf[: j - i]).tanh_()  # (c, L, A)
                torch.matmul(s, self.w, out=energy[i:j])
        torch.softmax(energy, dim=-1, out=alpha)
        if self.native:
            native.context(self._read[:rows], alpha.unsqueeze(1), out=context.unsqueeze(1))  # (b, 1, D)
        else:
            torch.bmm(alpha.unsqueeze(1), self.grid[:rows], out=context.unsqueeze(1))

    def backward(
        self, query: Tensor, alpha: Tensor, d_alpha: Tensor, d_context: Tensor, rows: int, d_query: Tensor
    ) -> None:
        """The queries' gradient of one step, written into ``d_query`` (b, A); the keys', grid's and
        w's are added to the sums.

        ``d_alpha`` (b, L): the gradient of α itself (eq. 14's term); ``d_context`` (b, D): of ẑ.
        """
        keys, g = self.keys, self.grid[:rows]
        if self.native:
            d_alpha = native.grid_times(self._read[:rows], d_context).add_(d_alpha)  # (b, L)
        elif _whole_batch(g):  # one kernel: the batched matmul adds d_alpha in its epilogue
            d_alpha = torch.baddbmm(d_alpha.unsqueeze(2), g, d_context.unsqueeze(2)).squeeze(2)
        else:
            d_alpha = _grid_times(g, d_context).add_(d_alpha)
        d_energy = torch._softmax_backward_data(d_alpha, alpha, -1, alpha.dtype)  # α ⊙ (dα − Σ α dα)
        if self.d_keys is None:
            self.d_keys = keys.new_zeros(keys.shape)
        if self.native:  # one pass rebuilds s and adds dE ⊗ w ⊙ (1 − s²) into the keys' gradient in place
            d_q, d_w = native.energy_backward(keys, query, self.w, d_energy, self.d_keys)
            d_query.copy_(d_q)
            self.d_w += d_w
        else:
            self._energy_backward(query, d_energy, rows, d_query)
        if self.grid_grad:  # the encoder trains: α_iᵀ dẑ
            if self.d_grid is None:
                self.d_grid = g.new_zeros(self.grid.shape)
            self.d_grid[:rows].baddbmm_(alpha.unsqueeze(2), d_context.unsqueeze(1))  # (b, L, D)

    def gradients(self) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """The keys', grid's and w's gradients summed over the steps (call once, after the last)."""
        d_keys = self.d_keys
        if d_keys is not None and not self.native:  # (Σ dE − Σ dE s²) w, see _energy_backward
            d_keys = d_keys.neg_().add_(self._d_energy_sum.unsqueeze(-1)).mul_(self.w)
        return d_keys, self.d_grid, self.d_w

    def _energy_backward(self, query: Tensor, d_energy: Tensor, rows: int, d_query: Tensor) -> None:
        """PyTorch's backward of e = w · tanh(k + q) for rows :b: the query's gradient into ``d_query``,
        w's added to its sum.

        d(k + q) = dE ⊗ w ⊙ (1 − s²). w is the same at every step, so the keys' buffer sums dE ⊙ s²
        (B, L, A) and another sums dE (B, L); ``gradients`` applies w once.
        """
        keys = self.keys
        if self._d_energy_sum is None:
            self._d_energy_sum = keys.new_zeros(keys.shape[:2])
        buf, chunk = self._chunk(rows)
        for i in range(0, rows, chunk):
            j = min(i + chunk, rows)
            s = torch.add(keys[i:j], query[i:j].unsqueeze(1), out=buf[: j - i]).tanh_()  # (c, L, A), rebuilt
            de = d_energy[i:j]  # (c, L)
            self.d_w.addmv_(s.reshape(-1, s.shape[-1]).t(), de.reshape(-1))  # Σ dE s: (A,)
            s2 = s.mul_(s)  # s², in place
            # Σ_l dE_l (1 − s_l²), then times w: (c, A)
            total = torch.baddbmm(de.sum(dim=1, keepdim=True).unsqueeze(2), de.unsqueeze(1), s2, alpha=-1)
            torch.mul(total.squeeze(1), self.w, out=d_query[i:j])
            self.d_keys[i:j].addcmul_(s2, de.unsqueeze(-1))
        self._d_energy_sum[:rows].add_(d_energy)  # (not +=, which would copy the slice back)
