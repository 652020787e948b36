"""A short real training run on the shapes world: the loss falls and decoded BLEU-4 rises."""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from capattn.cli import main
from capattn.data.datamodule import CaptionDataModule
from capattn.data.synthetic import ShapesReader
from capattn.models.decoders import ShowAttendTellDecoder, ShowTellDecoder
from capattn.models.encoder import ImageEncoder
from capattn.models.native import bf16_in_hardware
from capattn.module import CaptioningModule, with_fused_cpu_kernel

from .conftest import REPO_ROOT


def train_briefly(decoder_cls, tmp_path) -> tuple[list[float], dict, dict]:
    L.seed_everything(0)
    dm = CaptionDataModule(
        reader=ShapesReader(num_train=400, num_val=40, num_test=8, seed=5),
        batch_size=32,
        prepared_dir=str(tmp_path / "prepared"),
    )
    extra = {"attention_dim": 64} if decoder_cls is ShowAttendTellDecoder else {}
    model = CaptioningModule(
        encoder=ImageEncoder(backbone="small_cnn", small_cnn_channels=(16, 32, 64)),
        decoder=decoder_cls(
            vocab_size=dm.vocab_size, feature_dim=64, embed_dim=64, hidden_dim=128, dropout=0.1, **extra
        ),
        optimizer=functools.partial(torch.optim.Adam, lr=3e-3),
        beam_size=2,
        val_scorers=("bleu",),
        tokenizer="simple",
    )
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # The cross-entropy alone: Show, Attend and Tell's doubly stochastic term has a floor above 0.
            losses.append(float(trainer.callback_metrics["train/ce"]))

    trainer = L.Trainer(
        max_epochs=2,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[Record()],
    )
    before = trainer.validate(model, datamodule=dm, verbose=False)[0]
    trainer.fit(model, datamodule=dm)
    after = trainer.validate(model, datamodule=dm, verbose=False)[0]
    return losses, before, after


@pytest.mark.parametrize("decoder_cls", [ShowTellDecoder, ShowAttendTellDecoder], ids=["show_tell", "show_attend_tell"])
def test_loss_falls_and_bleu_rises(decoder_cls, tmp_path):
    losses, before, after = train_briefly(decoder_cls, tmp_path)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, f"loss {first:.2f} → {last:.2f}"
    assert after["val/loss"] < before["val/loss"]
    assert after["val/BLEU-4"] > before["val/BLEU-4"] + 0.1, (before["val/BLEU-4"], after["val/BLEU-4"])


# A demo config on 16/4/4 shapes images, one validation batch, no test: the CLI runs below.
SMALL_DEMO_RUN = [
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--data.reader.init_args.num_train=16",
    "--data.reader.init_args.num_val=4",
    "--data.reader.init_args.num_test=4",
    "--data.batch_size=8",
    "--model.val_scorers=[bleu,cider]",
    "--model.tokenizer=simple",
    "--test_after_fit=false",
]


def test_two_cpu_runs_with_the_same_seed_give_identical_weights_and_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [
        "fit",
        "--config",
        str(REPO_ROOT / "experiments" / "demo_show_attend_tell.yaml"),
        "--seed_everything=3",
        "--trainer.accelerator=cpu",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=3",
        *SMALL_DEMO_RUN,
    ]
    main([*args, "--run_name=a"])
    main([*args, "--run_name=b"])
    runs = Path("runs/demo/show_attend_tell")
    a, b = (torch.load(runs / r / "checkpoints/last.ckpt", weights_only=True) for r in ("a", "b"))
    assert a["global_step"] == b["global_step"] == 6
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    # Every logged number is the same, bar the speed (wall-clock time: TrainingSpeed's speed/*).
    logged = _logged_without_speed(runs / "a/metrics.csv")
    assert logged and logged == _logged_without_speed(runs / "b/metrics.csv")


def _logged_without_speed(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        rows = [{k: v for k, v in row.items() if not k.startswith("speed/")} for row in csv.DictReader(f)]
    return [row for row in rows if any(v for k, v in row.items() if k not in ("epoch", "step"))]


def test_bf16_mixed_precision_trains_validates_and_tests(tmp_path, monkeypatch):
    """``--trainer.precision=bf16-mixed`` (the GPU switch; CPU autocast here) runs fit, validation
    decoding and test end to end, and the decoded captions are scored."""
    monkeypatch.chdir(tmp_path)
    small = [a for a in SMALL_DEMO_RUN if not a.startswith("--test_after_fit")]
    main(
        [
            "fit",
            "--config",
            str(REPO_ROOT / "experiments" / "demo_show_attend_tell.yaml"),
            "--trainer.accelerator=cpu",
            "--trainer.precision=bf16-mixed",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--model.test_scorers=[bleu,cider]",
            *small,
            "--run_name=bf16",
        ]
    )
    run = Path("runs/demo/show_attend_tell/bf16")
    assert (run / "checkpoints/last.ckpt").exists()
    metrics = json.loads((run / "metrics_test.json").read_text())["metrics"]
    assert set(metrics) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D"}


def _cached_features_run(
    tmp_path,
    *,
    decoder_cls=ShowTellDecoder,
    nonfinite_loss: str = "stop",
    nan_batch: int | None = None,
    batches: int = 3,
    **trainer_kwargs,
):
    """Trains on a few batches of cached features, batch ``nan_batch`` holding NaN (a corrupt feature
    file). ``model.grads_at_step`` holds the gradients each optimizer step read."""
    from capattn.data.records import CaptionBatch
    from capattn.models.encoder import EncoderOutput
    from capattn.vocab import Vocabulary

    L.seed_everything(0)
    vocab = Vocabulary.build(["a red circle", "a blue square"])
    extra = {"attention_dim": 8} if decoder_cls is ShowAttendTellDecoder else {}
    model = CaptioningModule(
        encoder=ImageEncoder(backbone="small_cnn", small_cnn_channels=(8, 8, 16)),
        decoder=decoder_cls(vocab_size=len(vocab), feature_dim=16, embed_dim=8, hidden_dim=16, dropout=0.0, **extra),
        nonfinite_loss=nonfinite_loss,
    )
    model.vocab = vocab
    data = []
    for i in range(batches):
        grid = torch.randn(2, 4, 16)  # (B, L, D)
        if i == nan_batch:
            grid[0, 0, 0] = float("nan")
        tokens = torch.tensor([vocab.encode("a red circle"), vocab.encode("a blue square")])
        data.append(
            CaptionBatch(
                images=None,
                features=EncoderOutput(grid=grid, pooled=grid.mean(1)),
                tokens=tokens,
                lengths=torch.tensor([5, 5]),
                image_ids=["x", "y"],
                references=[["a red circle"], ["a blue square"]],
            )
        )
    model.grads_at_step = []

    class RecordGradients(L.Callback):
        def on_train_start(self, trainer, pl_module):
            def record(optimizer, args, kwargs):  # after the step: the gradients it read, clipped
                pl_module.grads_at_step.append([p.grad.clone() for p in pl_module.parameters() if p.grad is not None])

            trainer.optimizers[0].register_step_post_hook(record)

    trainer = L.Trainer(
        max_epochs=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RecordGradients()],
        **trainer_kwargs,
    )
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return model, trainer


def _nan_run(nonfinite_loss: str, tmp_path):
    """Trains on 3 batches of cached features; the second holds NaN (a corrupt feature file)."""
    return _cached_features_run(tmp_path, nonfinite_loss=nonfinite_loss, nan_batch=1)


def test_nan_loss_stops_the_run_naming_the_step(tmp_path):
    from capattn.errors import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at step 1 \(epoch 0, batch 1\); stopped"):
        _nan_run("stop", tmp_path)


def test_nan_loss_can_be_skipped_and_counted(tmp_path):
    model, _ = _nan_run("skip", tmp_path)
    assert model.skipped_batches == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_in_a_resumed_checkpoint_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """NaN injected into a run's last.ckpt: resuming it stops at once, one line, naming the step and checkpoint."""
    monkeypatch.chdir(tmp_path)
    args = [
        "fit",
        "--config",
        str(REPO_ROOT / "experiments" / "demo_show_tell.yaml"),
        "--trainer.limit_train_batches=2",
        *SMALL_DEMO_RUN,
        "--run_name=r",
    ]
    main([*args, "--trainer.max_epochs=1"])
    last = Path("runs/demo/show_tell/r/checkpoints/last.ckpt")
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["state_dict"]["decoder.embed.weight"][:] = float("nan")
    torch.save(checkpoint, last)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--trainer.max_epochs=2", "--ckpt_path=last"])
    assert exit_.value.code == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("capattn: error:")]
    assert "training loss is nan at step 2 (epoch 1, batch 0); stopped — the last good checkpoint is" in line
    assert str(last) in line and "--model.nonfinite_loss=skip" in line


# --- the optimizer's CPU kernel ------------------------------------------------------------------


def _adam_steps(optimizer_cls, wrap, steps=5, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Linear(12, 7)
    optimizer = wrap(optimizer_cls(model.parameters(), lr=1e-2, weight_decay=0.1, **kwargs))
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 12)).pow(2).sum().backward()
        optimizer.step()
    return model.weight.detach(), optimizer


@pytest.mark.parametrize("optimizer_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_cpu_adam_gets_the_fused_kernel_and_the_same_updates(optimizer_cls):
    """``with_fused_cpu_kernel``: torch's fused CPU Adam, same settings, same weights after training."""
    plain, _ = _adam_steps(optimizer_cls, lambda o: o)
    fused, optimizer = _adam_steps(optimizer_cls, functools.partial(with_fused_cpu_kernel, precision="32-true"))
    assert type(optimizer) is optimizer_cls and optimizer.defaults["fused"] is True
    assert all(g["fused"] is True and g["lr"] == 1e-2 and g["weight_decay"] == 0.1 for g in optimizer.param_groups)
    torch.testing.assert_close(fused, plain)


@pytest.mark.parametrize(
    ("kwargs", "precision"),
    [({"foreach": False}, "32-true"), ({"fused": False}, "32-true"), ({}, "16-mixed")],
    ids=["user_chose_foreach", "user_chose_fused", "fp16_loss_scaling"],
)
def test_fused_kernel_is_not_forced_on_a_choice_or_under_fp16(kwargs, precision):
    """An implementation set in init_args is kept; under fp16 the fused kernel would unscale the
    loss scaler's gradients itself, and Lightning then refuses gradient clipping."""
    _, optimizer = _adam_steps(
        torch.optim.Adam, functools.partial(with_fused_cpu_kernel, precision=precision), steps=1, **kwargs
    )
    assert not optimizer.defaults["fused"]


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_bf16_mixed_clips_the_gradients_the_fused_adam_steps_with(algorithm, tmp_path):
    """Under bf16-mixed the CPU Adam is the fused kernel (a Python loop over parameters otherwise: 70
    against 17 ms a step at the paper's sizes) and gradient clipping, which Lightning refuses for it
    (meant for fp16's loss scaler; bf16 has none), still clips what the optimizer reads. Show,
    Attend and Tell's hand-written loop runs under Lightning's autocast."""
    model, trainer = _cached_features_run(
        tmp_path,
        decoder_cls=ShowAttendTellDecoder,
        batches=2,
        precision="bf16-mixed",
        gradient_clip_val=1e-3,
        gradient_clip_algorithm=algorithm,
    )
    optimizer = trainer.optimizers[0]
    assert optimizer.defaults["fused"] is True
    seen = model.grads_at_step
    assert len(seen) == 2
    for grads in seen:  # clipped exactly to the bound (unclipped, they are far above it)
        if algorithm == "norm":
            assert float(torch.stack([g.norm() for g in grads]).norm()) == pytest.approx(1e-3, rel=1e-4)
        else:
            assert max(float(g.abs().max()) for g in grads) == pytest.approx(1e-3, rel=1e-6)


_EMULATED_BF16 = "torch emulates bf16 there"
_BF16_RUN = (
    "import warnings; warnings.simplefilter('always')\n"
    "import capattn  # before lightning: its torchvision hook (capattn._compat)\n"
    "from tests.test_training import _cached_features_run\n"
    "from capattn.models.decoders import ShowAttendTellDecoder, ShowTellDecoder\n"
    "import sys\n"
    "for i, decoder_cls in enumerate([ShowTellDecoder, ShowAttendTellDecoder]):\n"
    "    _cached_features_run(f'{sys.argv[1]}/{i}', decoder_cls=decoder_cls, batches=1, precision='bf16-mixed')\n"
)


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available(),
    reason="ONEDNN_MAX_CPU_ISA, which makes this CPU pass for one without bf16, is oneDNN's x86 switch",
)
def test_bf16_mixed_on_a_cpu_without_bf16_instructions_trains_and_warns_naming_the_fix(tmp_path):
    """``experiments/trainer/ddp.yaml`` asks for bf16-mixed; on an AVX2 CPU torch emulates bf16 and
    a step (196×512 grid) takes 15–18× the fp32 one. Real runs of both decoders on this CPU with
    oneDNN held to AVX2 (as on such a laptop) train, each warning once with the override to use.
    Show and Tell's nn.LSTM failed there inside oneDNN, which CPU autocast asked for a bf16 LSTM.
    The same run as this CPU is warns only where it lacks bf16 instructions itself."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONWARNINGS": "always"}
    done = subprocess.run(
        [sys.executable, "-c", _BF16_RUN, str(tmp_path / "avx2")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if _EMULATED_BF16 in line]
    assert len(lines) == 2, done.stderr[-2000:]  # one per run
    for line in lines:
        assert "trainer.precision=bf16-mixed" in line and "no bf16 instructions" in line
        assert "--trainer.precision=32" in line

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _cached_features_run(tmp_path / "native", decoder_cls=ShowAttendTellDecoder, batches=1, precision="bf16-mixed")
    emulated = [w for w in seen if _EMULATED_BF16 in str(w.message)]
    assert len(emulated) == (0 if bf16_in_hardware(torch.device("cpu")) else 1)


class _DecoderWithoutImageIndex(ShowTellDecoder):
    """A decoder of one's own whose ``forward`` predates ``image_index``."""

    def forward(self, enc, captions, lengths):
        return super().forward(enc, captions, lengths)


@pytest.mark.parametrize(
    "decoder_cls", [ShowAttendTellDecoder, _DecoderWithoutImageIndex], ids=["show_attend_tell", "without_image_index"]
)
def test_grouped_captions_run_the_encoder_once_per_image_and_keep_the_loss(decoder_cls, tmp_path):
    """``data.group_captions``: the encoder sees each image of a batch once and the loss is the one
    of the same captions with one image row each (a decoder without ``image_index`` gets those rows)."""
    L.seed_everything(0)
    dm = CaptionDataModule(
        reader=ShapesReader(num_train=12, num_val=4, num_test=4, seed=5),
        batch_size=3,
        group_captions=True,
        prepared_dir=str(tmp_path / "prepared"),
    )
    extra = {"attention_dim": 8} if decoder_cls is ShowAttendTellDecoder else {}
    model = CaptioningModule(
        encoder=ImageEncoder(backbone="small_cnn", small_cnn_channels=(8, 8, 16)),
        decoder=decoder_cls(vocab_size=dm.vocab_size, feature_dim=16, embed_dim=8, hidden_dim=16, dropout=0.0, **extra),
        val_scorers=("bleu",),
        tokenizer="simple",
    )
    seen: list[int] = []
    model.encoder.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    batch = next(iter(dm.train_dataloader()))
    assert len(batch.image_ids) == 3 and len(batch) == 15  # 5 captions per shapes image
    model.train()
    enc = model.encode(batch)
    grouped = model._losses(batch, enc)["loss"]
    rows = batch.image_index
    flat = dataclasses.replace(
        batch, images=batch.images[rows], image_ids=[batch.image_ids[i] for i in rows.tolist()], image_index=None
    )
    torch.testing.assert_close(grouped, model._losses(flat, model.encode(flat))["loss"])
    assert seen == [3, 15]
    seen.clear()
    trainer = L.Trainer(fast_dev_run=2, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert seen[:2] == [3, 3]  # two training batches of 3 images (15 captions), then validation
    assert all(torch.isfinite(v) for v in trainer.callback_metrics.values())
