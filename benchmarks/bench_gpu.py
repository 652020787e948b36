"""GPU: training throughput at B=256, bf16 autocast and a compiled decoder step, one COCO epoch.

    .venv/bin/python benchmarks/bench_gpu.py             # on a CUDA machine (H100/H200, A100, …)
    .venv/bin/python benchmarks/bench_gpu.py --quick     # tiny sizes on whatever device there is (tests)

Show, Attend and Tell at the paper's sizes (196×2048 grid, V=10,000, 512 dims) on cached features:
1. Training step (forward, backward, Adam) in fp32 (TF32 matmuls) and under bf16 autocast:
   captions/s, achieved TFLOP/s against the card's measured matmul peak in the same precision,
   and one COCO epoch (113,287 images × 5 captions) projected from the step time.
2. Beam search 5 and greedy over 1,000 images, with and without ``compile_step`` (the decoder's
   torch.compile switch), in fp32 and bf16.
3. Show and Tell measured the same way (training step and decoding, no ``compile_step``: its
   decoder is cuDNN's LSTM), with its time as a ratio to Show, Attend and Tell's.
Prints tables and appends them to RESULTS.md. Without CUDA (and without --quick) it says so and stops.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from _common import (  # noqa: E402
    COCO_TRAIN_CAPTIONS,
    PAPER,
    RESULTS,
    append_results,
    caption_batch,
    features,
    interleaved,
    load_note,
    markdown_table,
    matmul_peak_gflops,
    median,
    results_title,
    sat_train_flops,
    show_tell_train_flops,
    sync,
)

from capattn.decoding import beam_search, greedy  # noqa: E402
from capattn.models.decoders import ShowAttendTellDecoder, ShowTellDecoder  # noqa: E402

SPECIAL = dict(bos=1, eos=2, pad=0)


def device_work(fn: Callable[[], object], device: torch.device, calls: int = 3) -> tuple[float, float]:
    """(launches, seconds of device work) per call of ``fn``, from torch.profiler: on a GPU the CUDA
    kernels and copies and their summed durations; on a CPU (``--quick``) the top-level aten ops and
    their CPU time. Against the call's wall time this says whether it waits on launches or on maths."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    if cuda:
        work = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        busy_us = sum(e.device_time for e in work)
    else:
        work = [e for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
        busy_us = sum(e.cpu_time_total for e in work)
    return len(work) / calls, busy_us / 1e6 / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--images", type=int, default=1000, help="images decoded at once")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled decoder step")
    parser.add_argument("--quick", action="store_true", help="tiny sizes on any device, for the test suite")
    parser.add_argument("--results", type=Path, default=RESULTS, help="Markdown file the results are appended to")
    args = parser.parse_args(argv)
    if args.quick and not torch.cuda.is_available():
        args.device = "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device here; run it on a GPU machine (or --quick to check it on the CPU)")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = True  # "fp32" training on a GPU means TF32 matmuls
    torch.backends.cudnn.allow_tf32 = True
    sizes = dict(embed_dim=16, hidden_dim=16, attention_dim=16, vocab=50) if args.quick else {}
    s = {**PAPER, **sizes}
    d = 32 if args.quick else 2048
    batch, images, repeats = (4, 4, 1) if args.quick else (args.batch, args.images, args.repeats)
    compile_too = not args.no_compile and not args.quick
    note = load_note()
    peaks = {
        "fp32": matmul_peak_gflops(device, torch.float32, n=256 if args.quick else 8192),
        "bf16": matmul_peak_gflops(device, torch.bfloat16, n=256 if args.quick else 8192),
    }

    torch.manual_seed(0)
    common = dict(vocab_size=s["vocab"], feature_dim=d, embed_dim=s["embed_dim"], hidden_dim=s["hidden_dim"])
    sat = ShowAttendTellDecoder(attention_dim=s["attention_dim"], **common).to(device)
    show_tell = ShowTellDecoder(**common).to(device)
    untrained = {m: {k: v.clone() for k, v in m.state_dict().items()} for m in (sat, show_tell)}
    enc = features(batch, d, device=device)
    tokens, lengths = caption_batch(batch, s["vocab"], device=device, longest_first=True)
    optimizers = {m: torch.optim.Adam(m.parameters(), fused=device.type == "cuda") for m in (sat, show_tell)}
    flops = sat_train_flops(lengths.cpu(), d, **sizes)

    def train(precision: str, decoder: torch.nn.Module = sat):
        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = decoder(enc, tokens, lengths)
                loss = F.cross_entropy(out.logits.float(), out.targets) + out.aux_loss.float()
            optimizers[decoder].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[decoder].step()

        return step

    sat.train(), show_tell.train()
    timed = {**{p: train(p) for p in peaks}, **{f"st {p}": train(p, show_tell) for p in peaks}}
    t = {name: median(xs) for name, xs in interleaved(timed, repeats, device).items()}
    t_st = {p: t.pop(f"st {p}") for p in peaks}

    def step_row(precision: str, seconds: float, step_flops: float) -> list[str]:
        tflops = step_flops / seconds / 1e12
        return [
            precision,
            f"{1000 * seconds:.1f}",
            f"{batch / seconds:,.0f}",
            f"{tflops:.1f} ({100 * tflops * 1e3 / peaks[precision]:.0f}% of {peaks[precision] / 1e3:.0f})",
            f"{COCO_TRAIN_CAPTIONS / batch * seconds:.0f} s",
        ]

    rows = [step_row(precision, seconds, flops) for precision, seconds in t.items()]
    for (precision, seconds), row in zip(t.items(), rows, strict=True):
        launches, busy = device_work(train(precision), device)
        row += [f"{launches:,.0f}", f"{1000 * busy:.1f} ({100 * busy / seconds:.0f}%)"]
    table1 = markdown_table(
        [
            "precision",
            f"ms/step (B={batch})",
            "captions/s",
            "TFLOP/s (% of matmul peak)",
            "COCO epoch",
            "kernels/step" if device.type == "cuda" else "ops/step",
            "device busy ms (% of step)",
        ],
        rows,
    )
    print(table1)
    st_flops = show_tell_train_flops(lengths.cpu(), d, **sizes)
    rows_st = [step_row(p, seconds, st_flops) + [f"{seconds / t[p]:.2f}×"] for p, seconds in t_st.items()]
    table_st = markdown_table(
        [
            "precision",
            f"ms/step (B={batch})",
            "captions/s",
            "TFLOP/s (% of matmul peak)",
            "COCO epoch",
            "time / Show, Attend and Tell's",
        ],
        rows_st,
    )
    print(table_st)

    # The timed steps above taught the decoder where random captions end; decode with the initial
    # weights, whose captions run to max_len, so every search does the same, known number of steps.
    for m in (sat, show_tell):
        m.load_state_dict(untrained[m])
        m.eval()
    grid = features(images, d, device=device)
    max_len = 5 if args.quick else 51
    rows2, sat_img_s = [], {}
    kinds = [(sat, False), (sat, True)] if compile_too else [(sat, False)]
    for decoder, compiled in [*kinds, (show_tell, False)]:
        if decoder is sat:
            sat.compile_step = compiled
        for precision in peaks:
            for beam in (1, 5):

                def run(beam=beam, precision=precision, decoder=decoder):
                    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
                        if beam == 1:
                            return greedy(decoder, grid, max_len=max_len, **SPECIAL)
                        return beam_search(decoder, grid, beam_size=beam, max_len=max_len, **SPECIAL)

                seconds = median(interleaved({"run": run}, max(1, repeats // 3), device)["run"])
                words = (run().tokens[:, 0] != SPECIAL["pad"]).sum(-1).float().mean().item()
                name = "greedy" if beam == 1 else f"beam {beam}"
                if decoder is sat and not compiled:
                    sat_img_s[name, precision] = images / seconds
                    ratio = "1×"
                else:
                    ratio = f"{sat_img_s[name, precision] / (images / seconds):.2f}×"
                rows2.append(
                    [
                        "Show, Attend and Tell" if decoder is sat else "Show and Tell",
                        name,
                        precision,
                        "yes" if compiled else "no",
                        f"{words:.1f}",
                        f"{images / seconds:,.0f}",
                        ratio,
                    ]
                )
    table2 = markdown_table(
        [
            "decoder",
            "search",
            "precision",
            "compile_step",
            "tokens per caption",
            f"img/s ({images} images, ≤ {max_len} steps)",
            "time / Show, Attend and Tell's eager",
        ],
        rows2,
    )
    print(table2)
    title = results_title("bench_gpu.py", args.quick, device)
    body = (
        f"Show, Attend and Tell, 196×{d} grid, V={s['vocab']}, {s['embed_dim']} dims, cached features, "
        f"COCO-like lengths; {note}; matmul peak measured here: fp32/TF32 {peaks['fp32'] / 1e3:.1f}, "
        f"bf16 {peaks['bf16'] / 1e3:.1f} TFLOP/s. COCO epoch = {COCO_TRAIN_CAPTIONS:,} captions / B × step "
        f"(data loading not included).\n\n{table1}\n\nShow and Tell, the same batch and sizes (cuDNN's LSTM over "
        f"every input, the output layer on the real positions):\n\n{table_st}\n\nDecoding, untrained "
        f"weights:\n\n{table2}\n"
    )
    append_results(args.results, title, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
