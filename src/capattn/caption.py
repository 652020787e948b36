"""``capattn caption``: caption image files with a checkpoint, and draw where the model looked for each word.

Everything comes from the checkpoint: the model's classes and sizes (its ``hyper_parameters``), the
weights, the vocabulary and the image preprocessing. Neither the training data nor the config is needed.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capattn.errors import CapattnError, DataError

logger = logging.getLogger("capattn.caption")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_FIT_HELP = "give a .ckpt that `capattn fit` wrote (runs/…/checkpoints/last.ckpt)"


@dataclass(frozen=True)
class Caption:
    """One image's caption.

    Args:
        image: the image file.
        caption: the generated caption.
        score: its beam-search score (summed log-probability, length-normalised if configured).
        figure: the attention figure written for it, if any.
    """

    image: Path
    caption: str
    score: float
    figure: Path | None = None


class Captioner:
    """A checkpoint's encoder, decoder, vocabulary and preprocessing, ready to caption images on the CPU.

    Args:
        checkpoint: a ``.ckpt`` written by ``capattn fit``.
        beam_size: beams of the search (1 = greedy).
        max_len: most words per caption; default: the checkpoint's ``max_len``.

    Raises:
        CheckpointError: the file is missing, unsafe, corrupt, or not capattn's.
    """

    def __init__(self, *, checkpoint: str | Path, beam_size: int = 5, max_len: int | None = None) -> None:
        import torch

        # Nothing here imports Lightning (3–4 s of a one-image caption's 5): the checkpoint is read by
        # capattn.io, the preprocessing and the models are plain torch and torchvision.
        from capattn.io import DATA_KEY, VOCAB_KEY, CheckpointError, load_checkpoint
        from capattn.models.decoders import CaptionDecoder
        from capattn.models.encoder import ImageEncoder, image_transform
        from capattn.vocab import Vocabulary

        if beam_size < 1:
            raise CapattnError(f"--beam-size must be ≥ 1 (1 = greedy), got {beam_size}")
        self.path = Path(checkpoint)
        ckpt = load_checkpoint(self.path)
        hparams = ckpt.get("hyper_parameters") or {}
        if not isinstance(hparams.get("encoder"), dict) or not isinstance(hparams.get("decoder"), dict):
            raise CheckpointError(f"{self.path} does not say which encoder and decoder it holds: {_FIT_HELP}")
        # The weights come from the checkpoint: never download pretrained ones only to overwrite them.
        self.encoder = _build(hparams["encoder"], ImageEncoder, self.path, overrides={"weights": None})
        self.decoder = _build(hparams["decoder"], CaptionDecoder, self.path)
        state = ckpt["state_dict"]
        for prefix, module in (("encoder.", self.encoder), ("decoder.", self.decoder)):
            weights = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
            try:
                module.load_state_dict(weights)
            except RuntimeError as err:
                first = str(err).strip().splitlines()[0]
                raise CheckpointError(f"{self.path}: its weights do not fit its own model ({first})") from None
        self.encoder.eval()
        self.decoder.eval()
        if getattr(self.decoder, "compile_step", False):
            # Trained with compile_step (a GPU switch): captioning runs on the CPU, where compiling
            # the step costs minutes and makes greedy search slower, not faster.
            self.decoder.compile_step = False
        self.vocab = Vocabulary.from_dict(ckpt[VOCAB_KEY])
        if len(self.vocab) != self.decoder.vocab_size:
            raise CheckpointError(
                f"{self.path}: its vocabulary has {len(self.vocab)} words but its decoder {self.decoder.vocab_size}"
            )
        data = ckpt.get(DATA_KEY)
        if isinstance(data, dict):
            self.image_size = data.get("image_size")
        else:  # written before checkpoints recorded it: what the backbone was made for
            self.image_size = None if self.encoder.backbone == "small_cnn" else 224
            logger.info("%s does not record its image size; using %s", self.path, self.image_size or "the image's own")
        self.transform = image_transform(self.image_size)
        self.beam_size = beam_size
        self.max_len = int(max_len if max_len is not None else hparams.get("max_len", 20))
        self.length_alpha = float(hparams.get("length_alpha", 0.0))
        self.model_name = type(self.decoder).__name__
        self._torch = torch

    @property
    def has_attention(self) -> bool:
        """Whether the decoder attends (Show, Attend and Tell) and so has maps to draw."""
        return bool(getattr(self.decoder, "has_attention", None) or hasattr(self.decoder, "attention"))

    def load(self, path: Path) -> Any:
        """The preprocessed (3, H, W) image.

        Raises:
            DataError: Pillow cannot open or decode the file.
        """
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise DataError(f"cannot read image {path}: {_first_line(err)}") from None
        return self.transform(rgb)

    def caption(self, images: Sequence[Any]) -> list[tuple[str, float, list[str], Any]]:
        """Captions a batch of preprocessed images of one size.

        Returns:
            Per image: caption, score, its words (up to ``<eos>``), and (T, L) attention weights or None.
        """
        from capattn.decoding import beam_search
        from capattn.vocab import words_of

        torch = self._torch
        with torch.inference_mode():
            enc = self.encoder(torch.stack(list(images)))  # (B, 3, H, W) → grid (B, L, D)
            best = beam_search(
                self.decoder,
                enc,
                bos=self.vocab.bos,
                eos=self.vocab.eos,
                pad=self.vocab.pad,
                beam_size=self.beam_size,
                max_len=self.max_len,
                length_alpha=self.length_alpha,
            ).best()
        out = []
        for i in range(len(images)):
            tokens = best.tokens[i, 0]  # (T,)
            words = words_of(tokens, self.vocab.itos, eos=self.vocab.eos, pad=self.vocab.pad)
            alphas = None if best.alphas is None else best.alphas[i, 0]  # (T, L)
            out.append((self.vocab.decode(tokens.tolist()), float(best.scores[i, 0]), words, alphas))
        return out


def _build(spec: dict[str, Any], base: type, path: Path, overrides: dict[str, Any] | None = None) -> Any:
    """Instantiates ``{"class_path", "init_args"}`` from a checkpoint's hyper-parameters, checking its type."""
    import importlib

    from capattn.io import CheckpointError

    class_path = spec.get("class_path")
    if not isinstance(class_path, str) or "." not in class_path:
        raise CheckpointError(f"{path}: no class_path for its {base.__name__}: {_FIT_HELP}")
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        raise CheckpointError(
            f"{path} was trained with {class_path}, which cannot be imported here — install the code that defines it"
        ) from None
    if not isinstance(cls, type) or not issubclass(cls, base):
        raise CheckpointError(f"{path}: {class_path} is not a {base.__name__}: {_FIT_HELP}")
    init_args = {**dict(spec.get("init_args") or {}), **(overrides or {})}
    try:
        return cls(**init_args)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot rebuild {class_path} from its saved arguments ({err})") from None


def find_images(paths: Sequence[str | Path]) -> list[Path]:
    """Image files named or inside the named folders (recursively, sorted), each once.

    Raises:
        DataError: a path does not exist, or nothing to caption was found.
    """
    found: dict[Path, None] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                logger.warning("no image files (%s) in %s", ", ".join(IMAGE_SUFFIXES), path)
            found.update(dict.fromkeys(files))
        elif path.is_file():
            found[path] = None
        else:
            raise DataError(f"no such image or folder: {path}")
    if not found:
        raise DataError(f"no image to caption in {', '.join(map(str, paths))}")
    return list(found)


def _batches(items: list[tuple[Path, Any]], size: int) -> Iterator[list[tuple[Path, Any]]]:
    """Batches of at most ``size`` images of one shape (a checkpoint without an image size keeps each's own)."""
    by_shape: dict[tuple[int, ...], list[tuple[Path, Any]]] = {}
    for item in items:
        by_shape.setdefault(tuple(item[1].shape), []).append(item)
    for group in by_shape.values():
        for start in range(0, len(group), size):
            yield group[start : start + size]


def _figure_path(folder: Path, image: Path, used: set[Path]) -> Path:
    path = folder / f"{image.stem}.png"
    n = 2
    while path in used:  # photos/a.jpg and other/a.jpg both exist
        path = folder / f"{image.stem}-{n}.png"
        n += 1
    used.add(path)
    return path


def caption_images(
    captioner: Captioner, images: Sequence[Path], *, batch_size: int = 16, attention_dir: Path | None = None
) -> list[Caption]:
    """Captions image files in batches; unreadable ones are skipped with a warning.

    Args:
        captioner: the loaded checkpoint.
        images: image files.
        batch_size: images decoded at once.
        attention_dir: if given and the model attends, one attention figure per image goes here.

    Returns:
        One ``Caption`` per readable image, in the order given.

    Raises:
        DataError: no image could be read.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    draw = attention_dir is not None and captioner.has_attention
    if draw:  # matplotlib only for figures
        from capattn.viz import caption_figure
    results: dict[Path, Caption] = {}
    used: set[Path] = set()
    failed = 0
    console = Console(stderr=True)
    columns = (TextColumn("captioning"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=len(images) <= batch_size) as progress:
        task = progress.add_task("captioning", total=len(images))
        for start in range(0, len(images), batch_size):
            loaded = []
            for path in images[start : start + batch_size]:
                try:
                    loaded.append((path, captioner.load(path)))
                except DataError as err:
                    logger.warning("%s — skipped", err)
                    failed += 1
            for batch in _batches(loaded, batch_size):
                for (path, image), (text, score, words, alphas) in zip(
                    batch, captioner.caption([image for _, image in batch]), strict=True
                ):
                    figure = None
                    if draw:
                        figure = caption_figure(
                            image,
                            words,
                            alphas,
                            _figure_path(attention_dir, path, used),
                            title=path.name,
                        )
                    results[path] = Caption(path, text, score, figure)
            progress.advance(task, len(images[start : start + batch_size]))
    if not results:
        raise DataError(f"none of the {len(images)} images could be read — check the files (see the warnings above)")
    if failed:
        logger.warning("%d of %d images could not be read and have no caption", failed, len(images))
    return [results[path] for path in images if path in results]


def main(argv: list[str]) -> int:
    """``capattn caption IMAGES_OR_FOLDERS… --ckpt CKPT [--beam-size 5] [--attention DIR] [--json]``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="capattn caption",
        description="Caption image files (or every image in folders) with a checkpoint, on the CPU; with "
        "--attention, one figure per image showing where the model looked for each word.",
    )
    parser.add_argument("images", type=str, nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--ckpt", type=str, required=True, help="a .ckpt written by `capattn fit`")
    parser.add_argument("--beam-size", type=int, default=5, help="beams of the search (1 = greedy)")
    parser.add_argument("--max-len", type=int | None, default=None, help="most words (default: the checkpoint's)")
    parser.add_argument("--attention", type=str | None, default=None, help="folder for per-word attention figures")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of one line per image")
    parser.add_argument("--batch-size", type=int, default=16, help="images decoded at once")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise CapattnError(f"--batch-size must be ≥ 1, got {args.batch_size}")

    images = find_images(args.images)
    import capattn  # noqa: F401  (its torchvision guard runs before the models import torchvision)

    captioner = Captioner(checkpoint=args.ckpt, beam_size=args.beam_size, max_len=args.max_len)
    attention_dir = None if args.attention is None else Path(args.attention)
    if attention_dir is not None and not captioner.has_attention:
        logger.info("%s has no attention (%s): writing captions only, no figures", args.ckpt, captioner.model_name)
    captions = caption_images(captioner, images, batch_size=args.batch_size, attention_dir=attention_dir)
    if args.json:
        rows = [
            {
                "image": str(c.image),
                "caption": c.caption,
                "score": round(c.score, 4),
                "attention": None if c.figure is None else str(c.figure),
            }
            for c in captions
        ]
        print(json.dumps(rows, indent=1, ensure_ascii=False))
    else:
        for c in captions:
            print(f"{c.image}\t{c.caption}")
    sys.stdout.flush()
    if attention_dir is not None and captioner.has_attention:
        logger.info("wrote %d attention figures to %s", sum(c.figure is not None for c in captions), attention_dir)
    return 0


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
