"""``CaptionDataModule``: a reader's dataset, prepared once → memory-mapped splits → loaders of ``CaptionBatch``."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torch.utils.data._utils.fetch import _MapDatasetFetcher
from torch.utils.data._utils.pin_memory import pin_memory as pin_batch
from torchvision.transforms import v2

from capattn.data.features import FeatureCache, build_feature_cache, cache_folder, cache_key, check_frozen
from capattn.data.prepare import PreparedData, PreparedSplit, PrepareSettings, default_prepared_dir, prepare
from capattn.data.readers.base import CaptionReader
from capattn.data.records import SPLITS, CaptionBatch, CaptionRecord
from capattn.data.sampler import LengthBucketBatchSampler, LongestFirstBatchSampler
from capattn.errors import ConfigError, DataError
from capattn.models.encoder import EncoderOutput, image_transform
from capattn.vocab import Vocabulary

# One item: image (3, H, W) or None, cached grid (L, D) and pooled (D,) fp16 or None (rows of one tensor
# for the batch, see ``_gather``; the grid alone None where the decoder reads no grid), token ids (of one
# caption, or a list: all of the image's, ``group_captions``), image id, references.
Item = tuple[
    torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, np.ndarray | list[np.ndarray], str, list[str]
]


def _gather(array: np.ndarray, rows: np.ndarray, *, pinned: bool = False) -> torch.Tensor:
    """``array[rows]`` (a memory-mapped cache) as one tensor, in one copy, read in file order.

    In a DataLoader worker the tensor is allocated in shared memory, as torch's default collate
    does: the queue to the main process then passes it without copying it again. (Gathering with
    ``array[rows]`` and sending the result costs three copies of the batch in the worker instead of
    one; at a GPU's batch of 256 grids, 200 MB, the copies and their page faults were what bounded
    the loader.) With ``pinned`` (loader threads on a GPU machine) it is page-locked, from torch's
    caching allocator, which hands the same buffers out again once their copies to the GPU are done.
    Its rows go to the items as views, which ``collate`` gives back as this tensor.
    """
    shape = (len(rows), *array.shape[1:])
    dtype = torch.from_numpy(np.empty(0, array.dtype)).dtype
    if torch.utils.data.get_worker_info() is not None:
        proto = torch.empty(0, dtype=dtype)
        out = proto.new(proto._typed_storage()._new_shared(math.prod(shape))).resize_(shape)
    else:
        out = torch.empty(shape, dtype=dtype, pin_memory=pinned)
    dest = out.numpy()
    for k in np.argsort(rows, kind="stable"):  # memory maps read fastest in file order
        dest[k] = array[rows[k]]
    return out


class CaptionDataset(Dataset):
    """A prepared split: images (or cached features) with their captions, read from memory maps.

    In training each (image, caption) pair is one item, or with ``grouped`` each image with all of
    its captions; in evaluation each image is one item, carrying its first caption (for the
    validation loss) and all references (for the metrics).

    Args:
        split: the prepared split.
        reader: loads each image (unused with ``features``).
        transform: PIL image → tensor.
        pairs: one item per caption (training) rather than per image.
        grouped: one item per image carrying all of its captions (training; not with ``pairs``).
        max_caption_len: longer captions are cut to this many words, ``<eos>`` kept (None: never).
        features: the feature cache; items then carry cached features instead of images.
        pinned: gather cached features straight into page-locked memory (``ThreadedDataLoader`` on
            a GPU machine: the batch then needs no copy before its transfer).
        grid: read the cached grids (False where the decoder reads only the pooled vector,
            ``CaptionDecoder.reads_grid``: batches then carry the pooled vector as a one-location grid).
    """

    def __init__(
        self,
        split: PreparedSplit,
        *,
        reader: CaptionReader,
        transform: v2.Transform,
        pairs: bool,
        grouped: bool = False,
        max_caption_len: int | None = None,
        features: FeatureCache | None = None,
        pinned: bool = False,
        grid: bool = True,
    ) -> None:
        if pairs and grouped:
            raise ValueError("CaptionDataset: pairs and grouped exclude each other")
        self.split = split
        self.reader = reader
        self.transform = transform
        self.pairs = pairs
        self.grouped = grouped
        self.pinned = pinned  # gather cached features into page-locked memory (loader threads on a GPU machine)
        self._caption_ends: np.ndarray | None = None  # grouped: the row after each image's last caption
        self.max_caption_len = max_caption_len
        self.features = features
        self.grid = grid

    def __len__(self) -> int:
        return self.split.num_captions if self.pairs else self.split.num_images

    @property
    def lengths(self) -> np.ndarray:
        """(N,) caption length of every item (``<bos>``/``<eos>`` included; grouped: its longest
        caption's), for length bucketing."""
        if self.pairs:
            lengths = self.split.lengths
        elif self.grouped:
            lengths = np.zeros(self.split.num_images, dtype=self.split.lengths.dtype)
            np.maximum.at(lengths, self.split.caption_image, self.split.lengths)
        else:
            lengths = self.split.lengths[self.split.first_caption]
        return lengths if self.max_caption_len is None else np.minimum(lengths, self.max_caption_len + 2)

    def __getitem__(self, index: int) -> Item:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Item]:
        """Items for a whole batch in one read of each memory map (DataLoader calls this)."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"index out of range for a split of {len(self)} items")
        if self.pairs:
            caption_rows, image_rows = indices, self.split.caption_image[indices]
        else:
            caption_rows, image_rows = self.split.first_caption[indices], indices
        counts = None
        if self.grouped:  # every caption of each image: an image's captions are consecutive rows
            if self._caption_ends is None:
                self._caption_ends = np.append(self.split.first_caption[1:], len(self.split.caption_image))
            counts = self._caption_ends[indices] - caption_rows
            caption_rows = np.concatenate([np.arange(a, a + n) for a, n in zip(caption_rows, counts, strict=True)])
        tokens = self.split.tokens(caption_rows)
        images = self.split.image_rows(image_rows)
        grid = pooled = None
        if self.features is not None:
            if self.grid:
                grid = _gather(self.features.grid(self.split.name), image_rows, pinned=self.pinned)  # (n, L, D) fp16
            pooled = _gather(self.features.pooled(self.split.name), image_rows, pinned=self.pinned)  # (n, D)
        ids = [self._cut(np.asarray(t, dtype=np.int64)) for t in tokens]
        if counts is not None:  # the captions of item k: a list
            bounds = np.concatenate([[0], np.cumsum(counts)])
            ids = [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        items: list[Item] = []
        for k in range(len(indices)):
            references = images["references"][k]
            image = None
            if self.features is None:
                path = images["image_path"][k]
                record = CaptionRecord(
                    images["image_id"][k], None if path is None else Path(path), tuple(references), images["split"][k]
                )
                image = self.transform(self.reader.load_image(record))
            items.append(
                (
                    image,
                    None if grid is None else grid[k],
                    None if pooled is None else pooled[k],
                    ids[k],
                    images["image_id"][k],
                    references,
                )
            )
        return items

    def _cut(self, ids: np.ndarray) -> np.ndarray:
        """A caption's ids cut to ``max_caption_len`` words, ``<eos>`` kept."""
        if self.max_caption_len is not None and len(ids) > self.max_caption_len + 2:
            return np.concatenate([ids[: self.max_caption_len + 1], ids[-1:]])
        return ids


def collate(items: Sequence[Item], *, pad: int) -> CaptionBatch:
    """Stacks images (or cached fp16 features) and right-pads captions with ``pad`` into a ``CaptionBatch``.

    Items whose captions are a list (``group_captions``) give every caption a row and the batch an
    ``image_index`` (the image of each row)."""
    images, grids, pooled, captions, image_ids, references = zip(*items, strict=True)
    image_index = None
    if isinstance(captions[0], list):
        counts = torch.tensor([len(c) for c in captions])
        image_index = torch.repeat_interleave(torch.arange(len(captions)), counts)  # (C,)
        captions = [c for group in captions for c in group]
    lengths = torch.tensor([len(c) for c in captions])
    tokens = torch.full((len(captions), int(lengths.max())), pad, dtype=torch.long)  # (B, T)
    for row, caption in enumerate(captions):
        tokens[row, : len(caption)] = torch.from_numpy(caption)
    features = None
    if pooled[0] is not None:
        # fp16 as stored: half the host→device copy; on_after_batch_transfer makes it float32 on the device
        # (on a CPU keeping the fp16 grid beside it: EncoderOutput.cached_grid).
        vectors = _stacked(pooled)  # (B, D)
        # (B, L, D); where the decoder reads no grid, the pooled vectors as a one-location grid (a view)
        features = EncoderOutput(grid=vectors.unsqueeze(1) if grids[0] is None else _stacked(grids), pooled=vectors)
    return CaptionBatch(
        images=torch.stack(images) if images[0] is not None else None,  # (B, 3, H, W)
        features=features,
        tokens=tokens,
        lengths=lengths,
        image_ids=list(image_ids),
        references=[list(r) for r in references],
        image_index=image_index,
    )


def _stacked(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(rows)``, without copying when the rows are, in order, the rows of one batch tensor
    (``_gather``'s, in shared memory in a worker)."""
    base = rows[0]._base
    if (
        base is not None
        and base.shape[0] == len(rows)
        and base.is_contiguous()
        and all(r._base is base and r.data_ptr() == base[k].data_ptr() for k, r in enumerate(rows))
    ):
        return base
    return torch.stack(rows)


class ThreadedDataLoader(DataLoader):
    """A DataLoader whose batches are made by ``threads`` threads of the training process instead of
    worker processes (``data.loader_threads``).

    For the feature cache on a GPU: a batch of 256 cached grids is 200 MB, and from worker processes
    it travels through fresh shared memory that the main process's one pin thread copies out again,
    page by page (on an H100 machine that capped the loader at about 2 GB/s, a fifth of what the GPU
    trains). Threads gather from the memory map (its pages stay mapped) straight into page-locked
    buffers that torch reuses: one copy, no transport. numpy's copies and the pinning release the
    GIL. Images (Pillow decoding holds it much of the time) want worker processes.

    Everything else is DataLoader's: samplers, batch samplers, Lightning's DDP sampler injection.
    Batches come in the batch sampler's order; ``num_workers`` must be 0.
    """

    def __init__(self, *args: Any, threads: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.num_workers:
            raise ValueError("ThreadedDataLoader makes batches in threads: num_workers must be 0")
        if threads < 1:
            raise ValueError(f"ThreadedDataLoader needs at least one thread, got threads={threads}")
        self.threads = threads

    def _fetch(self, fetcher: _MapDatasetFetcher, indices: list[int]) -> Any:
        batch = fetcher.fetch(indices)  # the dataset's __getitems__ and collate, as a worker runs them
        return pin_batch(batch) if self.pin_memory else batch

    def __iter__(self) -> Iterator[Any]:
        if self.batch_sampler is None:  # batch_size=None: items are batches already
            return super().__iter__()
        return self._threaded()

    def _threaded(self) -> Iterator[Any]:
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="capattn-loader")
        pending: collections.deque[Future] = collections.deque()
        fetcher = _MapDatasetFetcher(self.dataset, True, self.collate_fn, self.drop_last)
        batches = iter(self.batch_sampler)
        # DataLoader's iterators draw a base seed for their workers first: drawing it too keeps the
        # random batches of a seed the same as with worker processes or none.
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        try:
            for indices in itertools.islice(batches, 2 * self.threads):  # two batches ahead per thread
                pending.append(pool.submit(self._fetch, fetcher, indices))
            while pending:
                batch = pending.popleft().result()
                indices = next(batches, None)
                if indices is not None:
                    pending.append(pool.submit(self._fetch, fetcher, indices))
                yield batch
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class _Collate:
    """Picklable collate (DataLoader workers may be spawned processes)."""

    def __init__(self, pad: int) -> None:
        self.pad = pad

    def __call__(self, items):
        return collate(items, pad=self.pad)


class CaptionDataModule(L.LightningDataModule):
    """A reader's dataset, prepared once (vocabulary, tokenized captions, optional feature cache), and its loaders.

    ``prepare_data()`` (Lightning runs it on one process per node) prepares what is missing;
    so does the first use of ``vocab`` (the CLI links ``vocab_size`` into the decoder before
    training starts). A prepared folder is reused while the reader's files and the settings
    below that shape it (``min_word_count``, ``max_vocab_size``, ``train_splits``,
    ``missing_images``) stay the same.

    Args:
        reader: where the records and images come from (``class_path``/``init_args`` in YAML).
        batch_size: items per device per step; under DDP every device gets this many.
        eval_batch_size: images per device in validation/test/predict (default: ``batch_size``).
        num_workers: DataLoader worker processes per device.
        loader_threads: make batches in this many threads of the training process instead of
            worker processes (``ThreadedDataLoader``; leave ``num_workers`` at 0). For the feature
            cache on a GPU, where worker processes pass every 200 MB batch through shared memory;
            not for images (Pillow holds the GIL).
        image_size: resize (shorter side) and centre-crop to this size; None keeps the size.
        min_word_count: words seen fewer times in the training captions become ``<unk>``.
        max_vocab_size: keep at most this many tokens (specials included).
        max_caption_len: cut longer training captions to this many words (None: never).
        train_splits: record splits that train (Karpathy's ``restval`` is usually added).
        predict_split: the split ``capattn predict`` captions.
        prepared_dir: the prepared folder; default ``data/prepared/<dataset>-<settings hash>``.
        missing_images: ``"error"`` (default) stops at a missing or unreadable image file;
            ``"skip"`` drops such images when preparing and reports how many.
        features: ``"images"`` (default) decodes images every step; ``"cache"`` trains and
            evaluates on the frozen encoder's cached outputs (the encoder never runs per batch).
        features_dir: where feature caches go (default: ``features/`` beside the prepared folder).
        bucket_by_length: training batches of similar caption length (shuffled batches). Off by
            default: capattn's decoders skip padded positions, so it saves little, and batches of
            one length hurt optimisation where length tells the caption's form (the shapes demo,
            3 epochs: Show, Attend and Tell's test CIDEr-D 139 with it, 235 without). Either way
            each batch comes longest caption first.
        bucket_batches: batches per length-sorting window.
        group_captions: training items are images, each with all of its captions (``batch_size``
            then counts images: a batch of 10 COCO or Flickr8k images holds about 50 captions).
            Each image is then read, encoded and its attention keys projected once for all of its
            captions instead of once per caption, and every caption is still trained on once per
            epoch; a batch holds fewer different images, and an image's augmentations are shared
            by its captions (as neuraltalk2's and self-critical.pytorch's ``seq_per_img``
            batches). Off by default: one (image, caption) pair per item, as in the papers.
        augmentations: torchvision v2 transforms for training images only, after resizing
            (``class_path``/``init_args`` each); none by default.
    """

    def __init__(
        self,
        *,
        reader: CaptionReader,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        loader_threads: int = 0,
        image_size: int | None = None,
        min_word_count: int = 1,
        max_vocab_size: int | None = None,
        max_caption_len: int | None = None,
        train_splits: Sequence[str] = ("train",),
        predict_split: str = "test",
        prepared_dir: str | None = None,
        missing_images: Literal["error", "skip"] = "error",
        features: Literal["images", "cache"] = "images",
        features_dir: str | None = None,
        bucket_by_length: bool = False,
        bucket_batches: int = 100,
        group_captions: bool = False,
        augmentations: list[v2.Transform] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be ≥ 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ConfigError(f"data.eval_batch_size must be ≥ 1, got {eval_batch_size}")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be ≥ 0, got {num_workers}")
        if loader_threads < 0:
            raise ConfigError(f"data.loader_threads must be ≥ 0, got {loader_threads}")
        if loader_threads and num_workers:
            raise ConfigError(
                f"data.loader_threads={loader_threads} and data.num_workers={num_workers}: batches come from "
                "threads or from worker processes — set one of them to 0"
            )
        if predict_split not in SPLITS:
            raise ConfigError(f"data.predict_split must be one of {list(SPLITS)}, got {predict_split!r}")
        if features not in ("images", "cache"):
            raise ConfigError(f"data.features must be 'images' or 'cache', got {features!r}")
        if features == "cache" and image_size is None:
            raise ConfigError("data.features=cache needs a fixed data.image_size (224 for ImageNet backbones)")
        if bucket_batches < 1:
            raise ConfigError(f"data.bucket_batches must be ≥ 1, got {bucket_batches}")
        self.reader = reader
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.loader_threads = loader_threads
        if loader_threads:  # Lightning counts worker processes only: its "not many workers" tip would mislead
            warnings.filterwarnings("ignore", message=r"The '\w+' does not have many workers")
        self.image_size = image_size
        self.max_caption_len = max_caption_len
        self.predict_split = predict_split
        self.settings = PrepareSettings(
            min_word_count=min_word_count,
            max_vocab_size=max_vocab_size,
            train_splits=tuple(train_splits),
            missing_images=missing_images,
        )
        self._prepared_dir = None if prepared_dir is None else Path(prepared_dir)
        self.features = features
        self.features_dir = None if features_dir is None else Path(features_dir)
        self.bucket_by_length = bucket_by_length
        self.bucket_batches = bucket_batches
        self.group_captions = group_captions
        self.augmentations = list(augmentations or [])
        self._checked = False  # prepare's up-to-date check ran in this process
        self._prepared: PreparedData | None = None
        self._cache: FeatureCache | None = None
        self._datasets: dict[str, CaptionDataset] = {}
        self._read_grid = True  # False where the model's decoder reads only the pooled vector (setup)

    # --- preparing -----------------------------------------------------------------------------

    @property
    def prepared_dir(self) -> Path:
        """The prepared folder (``data.prepared_dir``, or the default named from the dataset and settings)."""
        if self._prepared_dir is None:
            self._prepared_dir = default_prepared_dir(self.reader, self.settings)
        return self._prepared_dir

    def prepare_text(self, *, force: bool = False) -> Path:
        """Prepares vocabulary and tokenized captions unless up to date (checked once per process)."""
        if force or not self._checked:
            prepare(self.reader, settings=self.settings, prepared_dir=self.prepared_dir, force=force)
            self._checked = True
            self._prepared = None
        return self.prepared_dir

    @property
    def prepared(self) -> PreparedData:
        """The prepared dataset, prepared first if needed."""
        if self._prepared is None:
            self._prepared = PreparedData(self.prepare_text())
        return self._prepared

    def _features_root(self) -> Path:
        return self.features_dir if self.features_dir is not None else self.prepared_dir.parent / "features"

    def prepare_features(self, encoder: torch.nn.Module, *, device: str | torch.device | None = None) -> Path:
        """Builds (or resumes) the feature cache of ``encoder``, which must be frozen."""
        return build_feature_cache(
            prepared=self.prepared,
            reader=self.reader,
            encoder=encoder,
            image_size=self.image_size,
            root=self._features_root(),
            batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
            device=device,
        )

    def use_feature_cache(self, encoder: torch.nn.Module) -> FeatureCache:
        """Opens ``encoder``'s complete feature cache for the loaders."""
        check_frozen(encoder)
        key = cache_key(encoder, image_size=self.image_size, prepared=self.prepared)
        self._cache = FeatureCache(cache_folder(self._features_root(), key, self.prepared.manifest.get("name", "data")))
        self._datasets.clear()
        return self._cache

    def _model_encoder(self) -> torch.nn.Module:
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        encoder = getattr(module, "encoder", None)
        if encoder is None:
            raise DataError("data.features=cache needs the model's encoder: train with a model that has `.encoder`")
        return encoder

    def _model_reads_grid(self) -> bool:
        """Whether the trainer's model reads the cached grids (``CaptionDecoder.reads_grid``; True
        without a model, or for a decoder that does not say)."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        return bool(getattr(getattr(module, "decoder", None), "reads_grid", True))

    def prepare_data(self) -> None:
        """Prepares the dataset (and the feature cache) when missing or stale; one process per node."""
        self.prepare_text()
        if self.features == "cache":
            encoder = self._model_encoder()  # build_feature_cache refuses a trainable one
            device = self.trainer.strategy.root_device if self.trainer is not None else None
            self.prepare_features(encoder, device=device)

    def setup(self, stage: str) -> None:
        """Opens the prepared folder (and the feature cache); checks the batch size against the training split."""
        if self.features == "cache" and self._cache is None:
            self.use_feature_cache(self._model_encoder())
        read_grid = self.features != "cache" or self._model_reads_grid()
        if read_grid != self._read_grid:  # datasets built for the other answer (before a trainer had the model)
            self._read_grid = read_grid
            self._datasets.clear()
        if stage == "fit":
            split = self.prepared.split("train")
            n, items = (split.num_images, "images") if self.group_captions else (split.num_captions, "captions")
            if self.batch_size > n:
                raise ConfigError(
                    f"data.batch_size={self.batch_size} is larger than the training split ({n:,} {items} in "
                    f"{self.prepared_dir}) — lower data.batch_size"
                )

    # --- vocabulary ----------------------------------------------------------------------------

    @property
    def vocab(self) -> Vocabulary:
        """Vocabulary of the training captions (test words stay unknown)."""
        return self.prepared.vocab

    @property
    def vocab_size(self) -> int:
        """V, linked by the CLI into the decoder's ``vocab_size``."""
        return len(self.vocab)

    # --- loaders -------------------------------------------------------------------------------

    def dataset(self, split: str) -> CaptionDataset:
        """The dataset of ``split`` (``"train"``: one item per caption, or per image with all its
        captions with ``group_captions``; others: one per image).

        Raises:
            DataError: unknown split, or no images in it.
        """
        if split not in self._datasets:
            if self.features == "cache" and self._cache is None:
                raise DataError("data.features=cache: the feature cache opens in setup() (give a Trainer the model)")
            train = split == "train"
            self._datasets[split] = CaptionDataset(
                self.prepared.split(split),
                reader=self.reader,
                transform=image_transform(self.image_size, self.augmentations if train else ()),
                pairs=train and not self.group_captions,
                grouped=train and self.group_captions,
                max_caption_len=self.max_caption_len if train else None,
                features=self._cache,
                pinned=self.loader_threads > 0 and torch.cuda.is_available(),
                grid=self._read_grid,
            )
        return self._datasets[split]

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        if self.loader_threads:
            return ThreadedDataLoader(
                dataset,
                threads=self.loader_threads,
                collate_fn=_Collate(self.vocab.pad),
                pin_memory=torch.cuda.is_available(),
                **kwargs,
            )
        return DataLoader(
            dataset,
            num_workers=self.num_workers,
            collate_fn=_Collate(self.vocab.pad),
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        # Under DDP Lightning swaps the RandomSampler for a DistributedSampler inside the batch sampler.
        if not self.bucket_by_length:
            batch_sampler = LongestFirstBatchSampler(
                RandomSampler(dataset), self.batch_size, False, lengths=dataset.lengths
            )
            return self._loader(dataset, batch_sampler=batch_sampler)
        batch_sampler = LengthBucketBatchSampler(
            RandomSampler(dataset),
            self.batch_size,
            False,
            lengths=dataset.lengths,
            bucket_batches=self.bucket_batches,
            seed=int(torch.initial_seed() % 2**32),
        )
        return self._loader(dataset, batch_sampler=batch_sampler)

    def _eval_loader(self, split: str) -> DataLoader:
        return self._loader(self.dataset(split), batch_size=self.eval_batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.predict_split)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, CaptionBatch) and batch.features is not None and batch.features.grid.is_floating_point():
            grid = batch.features.grid  # (B, L, D) float16, as cached
            # On a CPU the float16 grid rides along: attention reads it, at half the traffic (EncoderOutput).
            cached = grid if grid.dtype == torch.float16 and grid.device.type == "cpu" else None
            features = EncoderOutput(grid=grid.float(), pooled=batch.features.pooled.float(), cached_grid=cached)
            batch = dataclasses.replace(batch, features=features)
        return batch
