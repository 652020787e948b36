"""The GPU paths against the CPU ones: same loss, gradients and captions; bf16 and compile_step.

Skipped without CUDA. On the CPU, training and decoding run attention in capattn's C kernels; on
a GPU the same hand-written teacher-forced loop (``_TeacherForcedLoop``) and decoding steps run
it in PyTorch ops, so these tests check that both give the same numbers (TF32 off, fp32
throughout).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from capattn.decoding import beam_search, greedy
from capattn.models.decoders import CaptionDecoder, ShowAttendTellDecoder, ShowTellDecoder
from capattn.models.encoder import EncoderOutput

from ..conftest import random_captions

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

V, D, L, B, T = 60, 32, 49, 12, 14
SPECIAL = dict(bos=1, eos=2, pad=0)
DECODERS = {
    "show_tell": lambda: ShowTellDecoder(vocab_size=V, feature_dim=D, embed_dim=16, hidden_dim=32, dropout=0.0),
    "show_attend_tell": lambda: ShowAttendTellDecoder(
        vocab_size=V, feature_dim=D, embed_dim=16, hidden_dim=32, attention_dim=24, dropout=0.0
    ),
}


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 matmuls would differ from the CPU's fp32 by ~1e-3; these tests compare in full fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(params=sorted(DECODERS))
def decoders(request) -> tuple[CaptionDecoder, CaptionDecoder]:
    """The same weights on the CPU and on the GPU, in training mode without dropout (cuDNN's LSTM
    backward needs training mode)."""
    torch.manual_seed(0)
    cpu = DECODERS[request.param]().train()
    return cpu, copy.deepcopy(cpu).cuda()


def encoder_output(batch: int, device: str | torch.device, seed: int = 1) -> EncoderOutput:
    grid = torch.randn(batch, L, D, generator=torch.Generator().manual_seed(seed)).to(device)
    return EncoderOutput(grid=grid, pooled=grid.mean(1))


def loss_and_grads(
    decoder: CaptionDecoder, *, bf16: bool = False, grouped: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    device = next(decoder.parameters()).device
    tokens, lengths = random_captions(B, T, vocab=V, seed=2)
    decoder.zero_grad(set_to_none=True)
    # grouped: the B captions come 5 per image (data.group_captions), the last image fewer
    kwargs = {"image_index": (torch.arange(B) // 5).to(device)} if grouped else {}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = decoder(
            encoder_output((B + 4) // 5 if grouped else B, device), tokens.to(device), lengths.to(device), **kwargs
        )
        loss = F.cross_entropy(out.logits.float(), out.targets) + out.aux_loss.float()
    loss.backward()
    return loss.detach().cpu(), [p.grad.detach().float().cpu() for p in decoder.parameters()]


@pytest.mark.parametrize("grouped", [False, True], ids=["caption_per_image", "grouped_captions"])
def test_training_loss_and_gradients_match_the_cpu(decoders, grouped):
    cpu, gpu = decoders
    loss_cpu, grads_cpu = loss_and_grads(cpu, grouped=grouped)
    loss_gpu, grads_gpu = loss_and_grads(gpu, grouped=grouped)
    torch.testing.assert_close(loss_gpu, loss_cpu, rtol=1e-5, atol=1e-6)
    for g_gpu, g_cpu in zip(grads_gpu, grads_cpu, strict=True):
        torch.testing.assert_close(g_gpu, g_cpu, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_step_stays_close_to_fp32(decoders):
    _, gpu = decoders
    loss32, grads32 = loss_and_grads(gpu)
    loss16, grads16 = loss_and_grads(gpu, bf16=True)
    assert abs(loss16.item() - loss32.item()) < 0.02 * loss32.item()
    flat32, flat16 = torch.cat([g.flatten() for g in grads32]), torch.cat([g.flatten() for g in grads16])
    assert torch.isfinite(flat16).all()
    assert F.cosine_similarity(flat16, flat32, dim=0) > 0.99


@pytest.mark.parametrize("beam", [1, 3])
def test_decoding_matches_the_cpu(decoders, beam):
    cpu, gpu = (d.eval() for d in decoders)

    def decode(decoder: CaptionDecoder, device: str) -> object:
        with torch.no_grad():
            enc = encoder_output(40, device, seed=3)
            if beam == 1:
                return greedy(decoder, enc, max_len=16, **SPECIAL)
            return beam_search(decoder, enc, beam_size=beam, max_len=16, **SPECIAL)

    on_cpu, on_gpu = decode(cpu, "cpu"), decode(gpu, "cuda")
    assert torch.equal(on_gpu.tokens.cpu(), on_cpu.tokens)
    torch.testing.assert_close(on_gpu.scores.cpu(), on_cpu.scores, rtol=1e-4, atol=1e-4)


def test_compiled_step_gives_the_eager_captions():
    torch.manual_seed(0)
    decoder = DECODERS["show_attend_tell"]().eval().cuda()
    enc = encoder_output(40, "cuda", seed=4)
    with torch.no_grad():
        eager = beam_search(decoder, enc, beam_size=3, max_len=16, **SPECIAL)
        decoder.compile_step = True
        compiled = beam_search(decoder, enc, beam_size=3, max_len=16, **SPECIAL)
    assert torch.equal(compiled.tokens, eager.tokens)
    torch.testing.assert_close(compiled.scores, eager.scores, rtol=1e-4, atol=1e-4)


def test_compiled_step_is_traced_per_kind_of_call_with_the_real_compiler():
    """As the CPU test with torch's tracer alone, here with inductor's kernels: batches of 8 down to
    1 image, greedy and beam, no_grad and inference_mode; the eager captions, and a few traces."""
    from .test_decoders import decode_with_compiled_step

    traces = decode_with_compiled_step("cuda")
    assert 0 < traces <= 8, f"the compiled step was traced {traces} times"


def test_a_pinned_batch_reaches_the_gpu_whole():
    """The DataLoader's pin thread pins a ``CaptionBatch`` (its ``pin_memory``); ``to`` then copies it
    asynchronously, grouped captions' ``image_index`` included."""
    from capattn.data.records import CaptionBatch

    grid = torch.randn(2, L, D)
    batch = CaptionBatch(
        images=None,
        features=EncoderOutput(grid=grid, pooled=grid.mean(1)),
        tokens=torch.ones(3, 4, dtype=torch.long),
        lengths=torch.tensor([4, 3, 2]),
        image_ids=["a", "b"],
        references=[["x"], ["y"]],
        image_index=torch.tensor([0, 0, 1]),
    ).pin_memory()
    assert batch.features.grid.is_pinned() and batch.tokens.is_pinned() and batch.image_index.is_pinned()
    on_gpu = batch.to(torch.device("cuda"))
    torch.cuda.synchronize()
    assert on_gpu.features.grid.is_cuda and on_gpu.image_index.is_cuda
    assert torch.equal(on_gpu.features.grid.cpu(), grid) and on_gpu.image_index.tolist() == [0, 0, 1]


def test_bf16_in_hardware_follows_the_cards_generation():
    """bf16-mixed warns on a GPU before Ampere (compute capability 8), where torch emulates bf16."""
    from capattn.models.native import bf16_in_hardware

    assert bf16_in_hardware(torch.device("cuda")) == (torch.cuda.get_device_capability()[0] >= 8)
