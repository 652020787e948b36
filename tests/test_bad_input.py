"""Every bad input a user can give `capattn`: one line naming the thing and the fix, exit code 2, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from capattn.cli import main

from .conftest import REPO_ROOT, TINY_SHOW_TELL

SHOW_TELL = str(REPO_ROOT / "experiments" / "demo_show_tell.yaml")
TINY = [
    *TINY_SHOW_TELL,
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder with one finished tiny run (its last.ckpt) and some broken checkpoint files."""
    root = tmp_path_factory.mktemp("bad_input")
    import os

    cwd = os.getcwd()
    os.chdir(root)
    try:
        main(["fit", "--config", SHOW_TELL, *TINY, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
              "--trainer.limit_val_batches=1", "--test_after_fit=false"])  # fmt: skip
    finally:
        os.chdir(cwd)
    (ckpt,) = root.glob("runs/**/last.ckpt")
    (root / "good.ckpt").write_bytes(ckpt.read_bytes())
    (root / "text.ckpt").write_text("epoch: 3\n")
    data = ckpt.read_bytes()
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 3])
    torch.save({"state_dict": {}, "capattn_vocabulary": {}, "x": _RunsCode(str(root / "pwned"))}, root / "evil.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, root / "foreign.ckpt")
    (root / "empty_dir").mkdir()
    return root


# (arguments after the subcommand, what the one line must contain)
CASES = {
    "negative lr": (["fit", "--model.optimizer.init_args.lr=-1"], "model.optimizer: Invalid learning rate: -1.0"),
    "beam size 0": (["fit", "--model.beam_size=0"], "model.beam_size must be ≥ 1"),
    "max_len 0": (["fit", "--model.max_len=0"], "model.max_len must be ≥ 1"),
    "label smoothing 1.5": (["fit", "--model.label_smoothing=1.5"], "model.label_smoothing must be in [0, 1)"),
    "batch size 0": (["fit", "--data.batch_size=0"], "data.batch_size must be ≥ 1"),
    "batch size > data": (["fit", "--data.batch_size=100000"], "is larger than the training split"),
    "negative workers": (["fit", "--data.num_workers=-1"], "data.num_workers must be ≥ 0"),
    "wrong type": (["fit", "--data.batch_size=many"], 'Parser key "data.batch_size"'),
    "unknown key": (["fit", "--model.no_such_key=1"], "unrecognized arguments: --model.no_such_key=1"),
    "negative checkpoint interval": (["fit", "--checkpoint_every_n_steps=-1"], "checkpoint_every_n_steps must be ≥ 0"),
    "missing config": (["fit", "--config=no/such.yaml"], "no/such.yaml"),
    "missing checkpoint": (["test", "--ckpt_path=no/such.ckpt"], "checkpoint not found: no/such.ckpt"),
    "checkpoint is a folder": (["test", "--ckpt_path=empty_dir"], "checkpoint not found: empty_dir"),
    "text checkpoint": (["test", "--ckpt_path=text.ckpt"], "text.ckpt is not a PyTorch checkpoint"),
    "truncated checkpoint": (["test", "--ckpt_path=truncated.ckpt"], "truncated.ckpt is truncated"),
    "code-running checkpoint": (["test", "--ckpt_path=evil.ckpt"], "refusing evil.ckpt: its pickle would"),
    "foreign checkpoint": (["test", "--ckpt_path=foreign.ckpt"], "foreign.ckpt carries no capattn vocabulary"),
    "resume from a text file": (["fit", "--ckpt_path=text.ckpt"], "text.ckpt is not a PyTorch checkpoint"),
    "test without checkpoint": (["test"], "`capattn test` needs --ckpt_path"),
    "predict without checkpoint": (["predict"], "`capattn predict` needs --ckpt_path"),
    "vocabulary differs": (["test", "--ckpt_path=good.ckpt", "--data.max_vocab_size=20"], "vocabulary differs"),
}


@pytest.mark.parametrize(("args", "message"), CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_and_exit_code_2(args, message, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and "data" not in p.parts}
    subcommand, *rest = args
    config = [] if any(a.startswith("--config") for a in rest) else ["--config", SHOW_TELL]
    with pytest.raises(SystemExit) as exit_:
        main([subcommand, *config, *TINY, "--trainer.max_epochs=1", *rest])
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("capattn: error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert "Traceback" not in errors[0]
    assert not (workdir / "pwned").exists()  # the pickle's code never ran
    after = {p: p.read_bytes() for p in before if p.is_file()}
    assert after == before  # outputs already written stay intact


def test_vocabulary_from_other_word_counts_names_what_differs(workdir, monkeypatch, capsys):
    """Same words, other counts (another shapes seed): the message says so instead of "40 tokens but 40"."""
    monkeypatch.chdir(workdir)
    with pytest.raises(SystemExit):
        main(["test", "--config", SHOW_TELL, *TINY, "--ckpt_path=good.ckpt", "--data.reader.init_args.seed=3"])
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("capattn: error:")]
    assert "vocabulary differs" in line
    assert ("with other ids" in line and "word counts differ" in line) or "only in" in line, line


def test_untrained_results_never_look_trained(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    main(["test", "--config", SHOW_TELL, *TINY, "--allow_untrained=true", "--run_name=untrained"])
    folder = workdir / "runs/demo/show_tell/untrained"
    assert not (folder / "metrics_test.json").exists()
    metrics = json.loads((folder / "metrics_test_untrained.json").read_text())
    assert metrics["untrained"] is True and metrics["checkpoint"] is None
