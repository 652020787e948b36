"""Shared test set-up: offline mode, the shared real-data folder, small fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import capattn  # noqa: F401  (its torchvision guard must run before any test imports lightning)
from capattn.data.readers import CaptionReader
from capattn.data.records import CaptionRecord

# Tests never touch the network: hub datasets, the wandb server and weight downloads are offline.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CAPATTN_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
# The shapes world at its smallest, with quick Java-free scoring: for runs through the real `capattn` CLI.
TINY_SHAPES = [
    "--data.reader.init_args.num_train=24",
    "--data.reader.init_args.num_val=6",
    "--data.reader.init_args.num_test=6",
    "--data.batch_size=8",
    "--data.num_workers=0",
    "--model.val_scorers=[bleu,cider]",
    "--model.test_scorers=[bleu,cider]",
    "--model.tokenizer=simple",
]

# A smaller Show and Tell on 16/4/4 shapes images, for tests that run it many times.
TINY_SHOW_TELL = [
    "--data.reader.init_args.num_train=16",
    "--data.reader.init_args.num_val=4",
    "--data.reader.init_args.num_test=4",
    "--data.batch_size=8",
    "--model.encoder.init_args.small_cnn_channels=[8,8,16]",
    "--model.decoder.init_args.feature_dim=16",
    "--model.decoder.init_args.embed_dim=16",
    "--model.decoder.init_args.hidden_dim=32",
    "--model.val_scorers=[bleu,cider]",
    "--model.test_scorers=[bleu,cider]",
    "--model.tokenizer=simple",
]


class ListReader(CaptionReader):
    """Records given directly, for inputs no real file format would produce; images load through
    the base class's loader."""

    def __init__(self, records: list[CaptionRecord]) -> None:
        self.records = records

    def read(self) -> list[CaptionRecord]:
        return self.records


def random_captions(batch: int, max_len: int, *, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B, max_len) ``<bos> words… <eos> <pad>…`` and lengths (B,) in 2…max_len, one at max_len,
    unsorted (special tokens as capattn's vocabulary numbers them: <pad> 0, <bos> 1, <eos> 2)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, max_len + 1, (batch,), generator=g)
    lengths[torch.randint(batch, (1,), generator=g)] = max_len
    tokens = torch.randint(4, vocab, (batch, max_len), generator=g)
    tokens[:, 0] = 1
    for i, n in enumerate(lengths.tolist()):
        tokens[i, n - 1], tokens[i, n:] = 2, 0
    return tokens, lengths


@pytest.fixture(scope="session", autouse=True)
def kernel_cache(tmp_path_factory) -> Path:
    """The fused attention kernels are built once per test session, in its own temporary folder,
    never in the user's ~/.cache (subprocesses of the tests inherit the folder)."""
    from capattn.models import native

    if "CAPATTN_CACHE_DIR" not in os.environ:
        os.environ["CAPATTN_CACHE_DIR"] = str(tmp_path_factory.mktemp("capattn-cache"))
    native.kernels.cache_clear()
    return Path(os.environ["CAPATTN_CACHE_DIR"])


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-format data beside the repo (../shared/data); skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (set CAPATTN_SHARED_DATA to its folder)")
    return SHARED_DATA
