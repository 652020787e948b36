"""``capattn evaluate``: score a COCO-format results file with the official COCO caption metrics.

The references may be COCO caption annotations, a Karpathy split JSON, a Flickr8k token file or
Kaggle ``captions.txt``, or a Hugging Face dataset folder; the format is told from the file. The
scores are pycocoevalcap's, computed as coco-caption's ``COCOEvalCap`` computes them (PTB tokenizer,
then BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, and SPICE with ``--spice``), so they equal published numbers.

Images are never opened: only the reference captions are read.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capattn.errors import CapattnError, DataError

logger = logging.getLogger("capattn.evaluate")

SPLIT_NAMES = {"train": "train", "val": "val", "dev": "val", "validation": "val", "test": "test"}
_RESULTS_HELP = 'a results file is a JSON list [{"image_id": 42, "caption": "a dog runs"}, …], one entry per image'
_FORMATS_HELP = (
    "give COCO caption annotations (captions_val2014.json), a Karpathy split JSON (dataset_coco.json), "
    "Flickr8k.token.txt or Kaggle's captions.txt, or a Hugging Face dataset folder (save_to_disk)"
)
# Column names the Hugging Face datasets on the hub use for captions and for the image's identity.
_HF_CAPTION_COLUMNS = ("captions", "caption", "sentences", "raw", "text")
_HF_ID_COLUMNS = ("image_id", "cocoid", "imgid", "img_id", "filename", "file_name", "image_name", "id")
_FLICKR8K_TOKEN_LINE = re.compile(r"^[^\t#]+#\d+\t")


class EvaluationError(CapattnError, ValueError):
    """Results and references cannot be scored together (they cover different images)."""


@dataclass(frozen=True)
class References:
    """The reference captions of one split of a dataset.

    Args:
        captions: image id → every reference caption of that image, raw text.
        path: the file or folder they were read from.
        kind: the format, in words (``"COCO caption annotations"``).
        split: the split chosen, or None for a COCO annotation file (one split already).
        other_splits: image id → split, for the dataset's images outside ``split`` (to explain errors).
    """

    captions: dict[str, list[str]]
    path: Path
    kind: str
    split: str | None
    other_splits: dict[str, str]

    def describe(self) -> str:
        """``split test of Flickr8k.token.txt (Flickr8k token file)``."""
        where = f"{self.path.name} ({self.kind})"
        return where if self.split is None else f"split {self.split} of {where}"


@dataclass(frozen=True)
class Evaluation:
    """What ``evaluate`` computed.

    Args:
        metrics: corpus scores keyed by metric name (``BLEU-1`` … ``CIDEr-D``, ``SPICE``).
        per_image: image id → its caption and its scores.
        references: the references scored against.
        images: how many images were scored.
        notes: what the user should know about these numbers (partial coverage, fallbacks).
    """

    metrics: dict[str, float]
    per_image: dict[str, dict[str, Any]]
    references: References
    images: int
    notes: list[str]


# --- results ---------------------------------------------------------------------------------


def read_results(path: str | Path) -> dict[str, str]:
    """Reads a COCO-format results file: ``[{"image_id": …, "caption": "…"}, …]``.

    Image ids may be numbers (COCO) or strings (Flickr8k names); they are returned as strings.
    Other keys of an entry (a score, say) are ignored.

    Args:
        path: the results JSON.

    Returns:
        image id → caption, in the file's order.

    Raises:
        DataError: missing file, not UTF-8, not JSON, wrong shape, an image twice, an empty caption.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"results file not found: {path} — give the results_test.json that `capattn test` wrote")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}) — save it as UTF-8"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path} is not JSON (line {err.lineno}, column {err.colno}: {err.msg}) — {_RESULTS_HELP}"
        ) from None
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}, not a list — {_RESULTS_HELP}")
    if not data:
        raise DataError(f"{path} holds no results (an empty list) — {_RESULTS_HELP}")
    captions: dict[str, str] = {}
    first_entry: dict[str, int] = {}
    for index, entry in enumerate(data):
        if not isinstance(entry, dict) or "image_id" not in entry or "caption" not in entry:
            shown = json.dumps(entry, ensure_ascii=False)[:60]
            raise DataError(f"{path}: entry {index} is {shown}, not {{'image_id', 'caption'}} — {_RESULTS_HELP}")
        image_id, caption = entry["image_id"], entry["caption"]
        if isinstance(image_id, bool) or not isinstance(image_id, (int, str)) or str(image_id).strip() == "":
            raise DataError(
                f"{path}: entry {index} has image_id {json.dumps(image_id)}; image ids are integers (COCO) "
                "or non-empty strings (Flickr8k file names)"
            )
        key = str(image_id).strip()
        if not isinstance(caption, str):
            raise DataError(
                f"{path}: entry {index} (image {key}) has a caption of type {type(caption).__name__}, not a string"
            )
        if not caption.strip():
            raise DataError(
                f"{path}: entry {index} (image {key}) has an empty caption — every image needs its generated caption"
            )
        if key in captions:
            raise DataError(
                f"{path}: image {key} appears twice (entries {first_entry[key]} and {index}) — "
                "a results file holds one caption per image"
            )
        captions[key] = caption
        first_entry[key] = index
    return captions


# --- references ------------------------------------------------------------------------------


def detect_format(path: str | Path) -> str:
    """The format of a references file or folder: ``coco``, ``karpathy``, ``flickr8k`` or ``hf``.

    Raises:
        DataError: the path does not exist or is in none of these formats.
    """
    path = Path(path)
    if path.is_dir():
        markers = ("dataset_dict.json", "state.json", "dataset_info.json")
        if any((path / marker).is_file() for marker in markers) or any(path.glob("*/state.json")):
            return "hf"
        raise DataError(f"{path} is a folder but not a Hugging Face dataset (no dataset_dict.json) — {_FORMATS_HELP}")
    if not path.is_file():
        raise DataError(f"references not found: {path} — {_FORMATS_HELP}")
    with path.open("rb") as f:
        head = f.read(1 << 16)
    try:
        start = head.decode("utf-8-sig", errors="strict" if len(head) < 1 << 16 else "ignore").lstrip()
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text, so not a references file — {_FORMATS_HELP}") from None
    if start.startswith("{"):
        # Karpathy's files list each image's "sentences" near the top; COCO's have none.
        return "karpathy" if '"sentences"' in start else "coco"
    first_line = start.split("\n", 1)[0].strip()
    if first_line.startswith("image,caption"):
        return "flickr8k"
    if _FLICKR8K_TOKEN_LINE.match(first_line):
        return "flickr8k"
    raise DataError(f"{path}: unknown references format (it starts {first_line[:40]!r}) — {_FORMATS_HELP}")


def read_references(
    path: str | Path,
    *,
    split: str | None = None,
    split_dir: str | Path | None = None,
    caption_column: str | None = None,
    image_id_column: str | None = None,
) -> References:
    """Reads the reference captions of one split; images are never opened.

    Args:
        path: COCO caption annotations, a Karpathy JSON, a Flickr8k token file or ``captions.txt``,
            or a Hugging Face dataset folder.
        split: ``train``, ``val`` (or ``dev``) or ``test``; required for all formats but COCO's, whose
            annotation file is one split already.
        split_dir: Flickr8k only: the folder of ``Flickr_8k.{train,dev,test}Images.txt``; default: beside
            the captions file, or in its ``text/`` or ``Flickr8k_text/`` subfolder.
        caption_column: Hugging Face only: the caption column (default: the first of ``captions``,
            ``caption``, ``sentences``, ``raw``, ``text`` the dataset has).
        image_id_column: Hugging Face only: the column naming each image (default: the first of
            ``image_id``, ``cocoid``, ``filename``, … the dataset has).

    Raises:
        DataError: unknown format, a malformed file, a missing or unknown split.
    """
    path = Path(path)
    kind = detect_format(path)
    wanted = _check_split(split, path, kind)
    if kind == "coco":
        return References(_read_coco(path), path, "COCO caption annotations", None, {})
    if kind == "karpathy":
        from capattn.data.readers import KarpathyReader

        reader: Any = KarpathyReader(split_json=path, image_dir=path.parent)
        description = "Karpathy split JSON"
    elif kind == "flickr8k":
        from capattn.data.readers import Flickr8kReader

        reader = Flickr8kReader(captions=path, image_dir=path.parent, split_dir=_flickr8k_split_dir(path, split_dir))
        description = (
            "Kaggle Flickr8k captions.txt" if path.suffix == ".txt" and _is_csv(path) else "Flickr8k token file"
        )
    else:
        reader = _hf_reader(path, caption_column=caption_column, image_id_column=image_id_column)
        description = "Hugging Face dataset"
    records = reader.read()
    captions = {r.image_id: list(r.captions) for r in records if r.split == wanted}
    others = {r.image_id: r.split for r in records if r.split != wanted}
    if not captions:
        present = sorted({r.split for r in records})
        raise DataError(f"{path} has no image in split {wanted} (it has {', '.join(present) or 'none'})")
    return References(captions, path, description, wanted, others)


def _check_split(split: str | None, path: Path, kind: str) -> str:
    if kind == "coco":
        if split is not None:
            raise DataError(
                f"{path} is a COCO annotation file, which is one split already: leave out --split "
                "(or give a Karpathy JSON to choose Karpathy's split)"
            )
        return ""
    if split is None:
        raise DataError(f"{path} holds train, val and test: choose the split the results are for with --split test")
    if split not in SPLIT_NAMES:
        raise DataError(f"unknown split {split!r}: choose train, val (or dev) or test")
    return SPLIT_NAMES[split]


def _read_coco(path: Path) -> dict[str, list[str]]:
    from pycocotools.coco import COCO

    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text — save it as UTF-8") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    schema = "expected COCO's caption format {'images': [{'id'}], 'annotations': [{'image_id', 'caption'}]}"
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: no 'annotations' list at the top — {schema}; {_FORMATS_HELP}")
    for index, annotation in enumerate(data["annotations"]):
        if (
            not isinstance(annotation, dict)
            or not isinstance(annotation.get("caption"), str)
            or "image_id" not in annotation
        ):
            raise DataError(f"{path}: annotations[{index}] lacks image_id or a caption string — {schema}")
    data.setdefault(
        "images", [{"id": image_id} for image_id in dict.fromkeys(a["image_id"] for a in data["annotations"])]
    )
    for index, annotation in enumerate(data["annotations"]):
        annotation.setdefault("id", index)  # pycocotools indexes annotations by id
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # "creating index... index created!"
        coco.createIndex()
    captions = {
        str(image_id): [a["caption"] for a in annotations]
        for image_id, annotations in coco.imgToAnns.items()
        if annotations
    }
    if not captions:
        raise DataError(f"{path} holds no caption annotations — {schema}")
    return captions


def _is_csv(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(32).decode("utf-8-sig", errors="ignore").startswith("image,caption")


def _flickr8k_split_dir(path: Path, split_dir: str | Path | None) -> Path:
    if split_dir is not None:
        return Path(split_dir)
    # The official zip has the lists beside the token file; Kaggle's captions.txt has none beside it.
    candidates = [path.parent, path.parent / "text", path.parent / "Flickr8k_text"]
    for folder in candidates:
        if (folder / "Flickr_8k.testImages.txt").is_file():
            return folder
    raise DataError(
        f"no Flickr_8k.testImages.txt beside {path} (nor in text/ or Flickr8k_text/): give the folder of the "
        "official split lists with --split-dir (they come in Flickr8k_text.zip; see data/README.md)"
    )


def _hf_reader(path: Path, *, caption_column: str | None, image_id_column: str | None) -> Any:
    from capattn.data.readers import HFReader

    probe = HFReader(path=str(path))
    columns = sorted({column for dataset in probe.datasets().values() for column in dataset.column_names})

    def pick(given: str | None, candidates: Sequence[str], what: str, option: str) -> str:
        if given is not None:
            if given not in columns:
                raise DataError(f"{path} has no column {given!r} (it has {', '.join(columns)}) — fix {option}")
            return given
        found = next((name for name in candidates if name in columns), None)
        if found is None:
            raise DataError(
                f"{path}: which column holds the {what}? It has {', '.join(columns)} — name it with {option}"
            )
        return found

    captions = pick(caption_column, _HF_CAPTION_COLUMNS, "captions", "--caption-column")
    image_id = pick(image_id_column, _HF_ID_COLUMNS, "image ids", "--image-id-column")
    # The reader wants an image column; without one, any column will do: read() never opens images.
    image = "image" if "image" in columns else image_id
    return HFReader(path=str(path), image_column=image, caption_column=captions, image_id_column=image_id)


# --- scoring ---------------------------------------------------------------------------------


def evaluate(
    results: dict[str, str],
    references: References,
    *,
    results_path: str | Path = "results",
    allow_partial: bool = False,
    spice: bool = False,
    scorers: Sequence[str] | None = None,
) -> Evaluation:
    """Scores results against references exactly as coco-caption does.

    Args:
        results: image id → generated caption (``read_results``).
        references: the split's references (``read_references``).
        results_path: the results file, for messages.
        allow_partial: score the images both cover instead of refusing when they differ.
        spice: also compute SPICE, when it can run (Java and the Stanford CoreNLP models).
        scorers: a subset of ``capattn.metrics.SCORERS``; default all.

    Raises:
        EvaluationError: results and references cover different images (without ``allow_partial``),
            or no image is in both.
    """
    from capattn.metrics import SCORERS, score_corpus

    refs = references.captions
    unknown = [image_id for image_id in results if image_id not in refs]
    missing = [image_id for image_id in refs if image_id not in results]
    notes: list[str] = []
    if (unknown or missing) and not allow_partial:
        raise EvaluationError(_coverage_message(results_path, references, unknown, missing, len(results)))
    if unknown:
        notes.append(
            f"{len(unknown):,} of the {len(results):,} results are not in {references.describe()} and are not scored "
            f"(e.g. {_examples(unknown)})"
        )
    scored = {image_id: caption for image_id, caption in results.items() if image_id in refs}
    if not scored:
        raise EvaluationError(_coverage_message(results_path, references, unknown, missing, len(results)))
    if len(scored) < len(refs):
        notes.append(
            f"{len(scored):,} of the {len(refs):,} images of {references.describe()} are scored: CIDEr-D's document "
            "frequencies come from the scored images' references (as in coco-caption), so its value depends on "
            "which images are scored"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            scores = score_corpus(scored, refs, scorers=SCORERS if scorers is None else scorers, spice=spice)
        except RuntimeError as err:
            raise CapattnError(f"scoring {results_path} failed: {err}") from None
    notes.extend(str(w.message) for w in caught)
    per_image = {image_id: {"caption": scored[image_id], **values} for image_id, values in scores.per_image.items()}
    return Evaluation(scores.corpus, per_image, references, len(scored), notes)


def _examples(ids: Sequence[str], count: int = 3) -> str:
    return ", ".join(map(repr, ids[:count])) + (", …" if len(ids) > count else "")


def _coverage_message(
    results_path: str | Path, references: References, unknown: list[str], missing: list[str], total: int
) -> str:
    parts = []
    if unknown:
        elsewhere = sorted({references.other_splits[i] for i in unknown if i in references.other_splits})
        where = f"; some are in split {', '.join(elsewhere)}" if elsewhere else ""
        sample = next(iter(references.captions))
        parts.append(
            f"{len(unknown):,} of its {total:,} image ids are not in {references.describe()} "
            f"(e.g. {_examples(unknown)}; the references' ids look like {sample!r}{where})"
        )
    if missing:
        parts.append(f"{len(missing):,} of the {len(references.captions):,} reference images have no caption")
    overlap = total - len(unknown)
    hint = (
        f"give results for exactly those images, or --allow-partial to score the {overlap:,} images both have"
        if overlap
        else "no image is in both: check --references and --split"
    )
    return f"{results_path}: {' and '.join(parts)} — {hint}"


# --- output ----------------------------------------------------------------------------------


def format_table(evaluation: Evaluation) -> str:
    """The corpus scores as an aligned text table: metric, score (4 decimals), ×100 (1 decimal)."""
    lines = [f"{'metric':<8}  {'score':>6}  {'x100':>5}"]
    for name, value in evaluation.metrics.items():
        lines.append(f"{name:<8}  {value:>6.4f}  {100 * value:>5.1f}")
    return "\n".join(lines)


def write_outputs(evaluation: Evaluation, out: str | Path, *, results_path: str | Path) -> list[Path]:
    """Writes ``scores.json`` (corpus + per image), ``scores.csv`` (per image) and ``corpus.csv`` into ``out``.

    Returns:
        The files written.
    """
    from capattn.io import write_json_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    refs = evaluation.references
    summary = {
        "results": str(results_path),
        "references": str(refs.path),
        "format": refs.kind,
        "split": refs.split,
        "images": evaluation.images,
        "reference_images": len(refs.captions),
        "tokenizer": "simple" if any("simple tokenizer" in note for note in evaluation.notes) else "ptb",
        "metrics": evaluation.metrics,
        "notes": evaluation.notes,
        "per_image": evaluation.per_image,
    }
    written = [write_json_atomic(out / "scores.json", summary)]
    names = list(evaluation.metrics)
    with (out / "scores.csv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "caption", *names])
        for image_id, row in evaluation.per_image.items():
            writer.writerow([image_id, row["caption"], *(repr(row[name]) for name in names)])
    written.append(out / "scores.csv")
    with (out / "corpus.csv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["images", *names])
        writer.writerow([evaluation.images, *(repr(evaluation.metrics[name]) for name in names)])
    written.append(out / "corpus.csv")
    return written


def main(argv: list[str]) -> int:
    """``capattn evaluate RESULTS --references REFS [--split test] [--out DIR] [--allow-partial] [--spice]``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="capattn evaluate",
        description="Score a COCO-format results file ([{image_id, caption}]) with BLEU-1..4, METEOR, ROUGE-L and "
        "CIDEr-D (PTB tokenizer), exactly as the official coco-caption code does.",
    )
    parser.add_argument("results", type=str, help="results JSON: [{'image_id': …, 'caption': '…'}, …]")
    parser.add_argument(
        "--references",
        type=str,
        required=True,
        help="COCO caption annotations, Karpathy JSON, Flickr8k.token.txt / captions.txt, or a Hugging Face "
        "dataset folder (format detected)",
    )
    parser.add_argument("--split", type=str | None, default=None, help="train, val (dev) or test; not for COCO files")
    parser.add_argument("--out", type=str | None, default=None, help="folder for scores.json, scores.csv, corpus.csv")
    parser.add_argument("--allow-partial", action="store_true", help="score the images results and references share")
    parser.add_argument("--spice", action="store_true", help="also SPICE (needs Java and Stanford CoreNLP models)")
    parser.add_argument("--split-dir", type=str | None, default=None, help="Flickr8k: folder of the split lists")
    parser.add_argument("--caption-column", type=str | None, default=None, help="Hugging Face: the caption column")
    parser.add_argument("--image-id-column", type=str | None, default=None, help="Hugging Face: the image id column")
    args = parser.parse_args(argv)

    results = read_results(args.results)
    references = read_references(
        args.references,
        split=args.split,
        split_dir=args.split_dir,
        caption_column=args.caption_column,
        image_id_column=args.image_id_column,
    )
    evaluation = evaluate(
        results, references, results_path=args.results, allow_partial=args.allow_partial, spice=args.spice
    )
    for note in evaluation.notes:
        logger.info(note)
    per_image = sum(len(c) for i, c in references.captions.items() if i in evaluation.per_image) / evaluation.images
    print(f"scored {evaluation.images:,} images of {references.describe()}, {per_image:.1f} references per image")
    print(format_table(evaluation))
    if args.out is not None:
        written = write_outputs(evaluation, args.out, results_path=args.results)
        logger.info("wrote %s", ", ".join(map(str, written)))
    return 0
