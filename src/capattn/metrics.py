"""The official COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) through pycocoevalcap.

``score_captions`` scores one split at once; ``CaptionScorer`` collects decoded captions over
validation or test steps, gathers them from every DDP rank and scores the whole split once, because
CIDEr-D's document frequencies and the corpus-level BLEU and METEOR are not averages over batches.

pycocoevalcap's ``COCOEvalCap.evaluate()`` is never called: it always runs SPICE, which downloads
Stanford CoreNLP models at first use and so fails offline. The scorers are built one by one instead,
with the same tokenization and arguments that ``evaluate()`` uses, so the numbers equal coco-caption's.

torch is imported only where ranks are gathered, so ``capattn evaluate`` starts without it.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from capattn.vocab import tokenize

METRIC_KEYS: tuple[str, ...] = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
SCORERS: tuple[str, ...] = ("bleu", "meteor", "rouge", "cider")
TOKENIZERS: tuple[str, ...] = ("ptb", "simple")

# Which METRIC_KEYS each scorer produces.
_SCORER_KEYS: dict[str, tuple[str, ...]] = {
    "bleu": ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"),
    "meteor": ("METEOR",),
    "rouge": ("ROUGE-L",),
    "cider": ("CIDEr-D",),
}

# Java formats and parses numbers in the default locale: under a German LC_ALL METEOR answers "0,31" (or
# nothing at all) and Python's float() fails. user.* fixes the locale, file.encoding how captions are read.
JVM_OPTIONS: tuple[str, ...] = ("-Duser.language=en", "-Duser.country=US", "-Dfile.encoding=UTF-8")

# Constant texts, so that Python's default warning filter shows each once per process, not every epoch.
_NO_JAVA_METEOR = (
    "METEOR skipped: no `java` found on PATH, and METEOR runs in a Java process. "
    "Install a Java runtime (for example `apt-get install default-jre-headless`) to compute it."
)
_NO_JAVA_PTB = (
    "PTB tokenizer unavailable: no `java` found on PATH. Falling back to the simple tokenizer "
    "(lowercase, strip punctuation, split on whitespace); scores are NOT comparable to published COCO numbers. "
    "Install a Java runtime (for example `apt-get install default-jre-headless`) for the official tokenization."
)
_NO_JAVA_SPICE = "SPICE skipped: no `java` found on PATH, and SPICE runs in a Java process."
_NO_SPICE_MODELS = (
    "SPICE skipped: it needs the Stanford CoreNLP 3.6.0 jars in {lib}, which pycocoevalcap downloads at first use; "
    "run `python -m pycocoevalcap.spice.get_stanford_models` once with internet access"
)


@dataclass(frozen=True)
class CaptionScores:
    """Scores of a corpus and of each of its images.

    Args:
        corpus: corpus-level scores keyed by ``METRIC_KEYS`` names (and ``"SPICE"`` when it ran).
        per_image: image id → that image's scores under the same keys. BLEU per image is sentence
            BLEU, CIDEr-D per image uses the whole corpus's document frequencies (as pycocoevalcap's).
    """

    corpus: dict[str, float]
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)


def score_captions(
    hypotheses: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    scorers: Sequence[str] = SCORERS,
    tokenizer: Literal["ptb", "simple"] = "ptb",
) -> dict[str, float]:
    """Scores generated captions against references at corpus level, as coco-caption does.

    Only the images in ``hypotheses`` are scored; extra images in ``references`` are ignored, like
    coco-caption's ``params['image_id'] = cocoRes.getImgIds()``. CIDEr-D takes its document frequencies
    from the scored references, so it needs a corpus: a single image always scores 0.

    Without Java, METEOR is skipped and the PTB tokenizer falls back to the simple one, each with a
    warning, and the other metrics are still computed.

    Args:
        hypotheses: image id -> one generated caption, raw text (may be empty).
        references: image id -> that image's human captions, raw text.
        scorers: any of ``SCORERS`` (``"bleu"``, ``"meteor"``, ``"rouge"``, ``"cider"``).
        tokenizer: ``"ptb"``, the Stanford PTB tokenizer coco-caption uses (needs Java); or
            ``"simple"``: lowercase, strip punctuation, split on whitespace (not comparable to papers).

    Returns:
        Scores in [0, 1] (CIDEr-D in [0, 10]) keyed by ``METRIC_KEYS`` names, in that order, holding
        only the metrics whose scorer ran.

    Raises:
        ValueError: unknown scorer or tokenizer, no hypotheses, or an image without references.
        RuntimeError: a Java tool (PTB tokenizer, METEOR) failed.
    """
    return score_corpus(hypotheses, references, scorers=scorers, tokenizer=tokenizer).corpus


def score_corpus(
    hypotheses: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    scorers: Sequence[str] = SCORERS,
    tokenizer: Literal["ptb", "simple"] = "ptb",
    spice: bool = False,
) -> CaptionScores:
    """Like ``score_captions``, and also each image's scores; optionally SPICE.

    Args:
        hypotheses: image id -> one generated caption, raw text (may be empty).
        references: image id -> that image's human captions, raw text.
        scorers: any of ``SCORERS``.
        tokenizer: ``"ptb"`` or ``"simple"``; see ``score_captions``.
        spice: also compute SPICE, when it can run: it needs Java and the Stanford CoreNLP 3.6.0 models
            that pycocoevalcap downloads at first use; without them it is skipped with a warning.

    Returns:
        Corpus and per-image scores, keys in ``METRIC_KEYS`` order, then ``"SPICE"``.

    Raises:
        ValueError: unknown scorer or tokenizer, no hypotheses, or an image without references.
        RuntimeError: a Java tool (PTB tokenizer, METEOR, SPICE) failed.
    """
    selected = _check_scorers(scorers)
    _check_tokenizer(tokenizer)
    _check_captions(hypotheses, references)

    if shutil.which("java") is None:
        if "meteor" in selected:
            warnings.warn(_NO_JAVA_METEOR, stacklevel=3)
            selected = [name for name in selected if name != "meteor"]
        if tokenizer == "ptb":
            warnings.warn(_NO_JAVA_PTB, stacklevel=3)
            tokenizer = "simple"
        if spice:
            warnings.warn(_NO_JAVA_SPICE, stacklevel=3)
            spice = False
    if spice and not _spice_models_present():
        warnings.warn(_NO_SPICE_MODELS.format(lib=_spice_lib()), stacklevel=3)
        spice = False
    if not selected and not spice:
        return CaptionScores(corpus={})

    # The scorers want {id: [caption, ...]} with exactly one hypothesis per id and the same ids on both sides.
    res = {image_id: [hypotheses[image_id]] for image_id in hypotheses}
    gts = {image_id: list(references[image_id]) for image_id in hypotheses}
    if tokenizer == "ptb":
        gts, res = _ptb_tokenize(gts), _ptb_tokenize(res)
    else:
        gts, res = _simple_tokenize(gts), _simple_tokenize(res)

    corpus: dict[str, float] = {}
    per_key: dict[str, list[float]] = {}  # metric -> per-image scores, in the order of gts' keys
    # Bleu prints its n-gram counts; no pycocoevalcap scorer output belongs on the CLI.
    with contextlib.redirect_stdout(io.StringIO()):
        for name in selected:
            if name == "bleu":
                bleu, per_image = Bleu(4).compute_score(gts, res)
                for key, value, values in zip(_SCORER_KEYS["bleu"], bleu, per_image, strict=True):
                    corpus[key], per_key[key] = float(value), list(values)
            elif name == "meteor":
                corpus["METEOR"], per_key["METEOR"] = _meteor_score(gts, res)
            elif name == "rouge":
                value, values = Rouge().compute_score(gts, res)
                corpus["ROUGE-L"], per_key["ROUGE-L"] = float(value), list(values)
            else:
                value, values = Cider().compute_score(gts, res)
                corpus["CIDEr-D"], per_key["CIDEr-D"] = float(value), list(values)
        if spice:
            corpus["SPICE"], per_key["SPICE"] = _spice_score(gts, res)
    keys = [key for key in (*METRIC_KEYS, "SPICE") if key in corpus]
    per_image = {image_id: {key: float(per_key[key][index]) for key in keys} for index, image_id in enumerate(gts)}
    return CaptionScores(corpus={key: corpus[key] for key in keys}, per_image=per_image)


class CaptionScorer:
    """Accumulates decoded captions over steps, gathers them from all DDP ranks, scores the split once.

    torchmetrics' ``Metric`` can only sync tensor states across ranks, and these states are strings,
    so the sync is written here with ``torch.distributed.all_gather_object``.

    Usage in a LightningModule: ``update`` in ``validation_step``, ``compute`` then ``reset`` in
    ``on_validation_epoch_end`` (on every rank: ``compute`` is a collective call).

    Args:
        scorers: any of ``SCORERS``; see ``score_captions``.
        tokenizer: ``"ptb"`` or ``"simple"``; see ``score_captions``.
    """

    def __init__(self, *, scorers: Sequence[str] = SCORERS, tokenizer: Literal["ptb", "simple"] = "ptb") -> None:
        # Checked now so that a typo in the YAML fails at start-up, not after the first validation epoch.
        self.scorers = tuple(_check_scorers(scorers))
        self.tokenizer = _check_tokenizer(tokenizer)
        self._image_ids: list[str] = []
        self._hypotheses: list[str] = []
        self._references: list[list[str]] = []

    def update(self, image_ids: Sequence[str], hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        """Adds one batch of decoded captions.

        Args:
            image_ids: the B image ids.
            hypotheses: the B generated captions, raw text with special tokens stripped.
            references: the B lists of human captions, raw text.

        Raises:
            ValueError: the three sequences differ in length.
            TypeError: a hypothesis is not a str, or an image's references are one str instead of a list.
        """
        if not len(image_ids) == len(hypotheses) == len(references):
            raise ValueError(
                f"CaptionScorer.update got {len(image_ids)} image ids, {len(hypotheses)} hypotheses and "
                f"{len(references)} reference lists; they must be equally long (one entry per image)"
            )
        for image_id, hypothesis, refs in zip(image_ids, hypotheses, references, strict=True):
            if not isinstance(hypothesis, str):
                raise TypeError(f"hypothesis for image {image_id!r} must be a str, got {type(hypothesis).__name__}")
            if isinstance(refs, str):
                raise TypeError(f"references for image {image_id!r} must be a list of str, got one str: {refs!r}")
        self._image_ids.extend(image_ids)
        self._hypotheses.extend(hypotheses)
        self._references.extend(list(refs) for refs in references)

    def gather(self) -> tuple[dict[str, str], dict[str, list[str]]]:
        """Collects every rank's captions, one entry per image id; the same result on every rank.

        DistributedSampler pads the last batches by repeating samples, and a loader may yield one item
        per reference caption, so an image can arrive several times; its first occurrence (in rank order)
        is kept. Duplicates would otherwise weigh twice in BLEU and shift CIDEr-D's document frequencies.

        Returns:
            ``(hypotheses, references)`` as ``score_captions`` takes them.

        Raises:
            ValueError: an image id arrived twice with different references.
        """
        local = list(zip(self._image_ids, self._hypotheses, self._references, strict=True))
        if _distributed():
            import torch.distributed

            per_rank: list[list[tuple[str, str, list[str]]] | None] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_rank, local)
            entries = [entry for rank_entries in per_rank for entry in rank_entries or []]
        else:
            entries = local
        hypotheses: dict[str, str] = {}
        references: dict[str, list[str]] = {}
        for image_id, hypothesis, refs in entries:
            if image_id not in hypotheses:
                hypotheses[image_id] = hypothesis
                references[image_id] = refs
            elif list(refs) != list(references[image_id]):
                raise ValueError(
                    f"image {image_id!r} was given to CaptionScorer.update twice with different references "
                    f"({references[image_id]!r} and {refs!r}); each update must carry ALL references of its image"
                )
        return hypotheses, references

    def compute(self) -> dict[str, float]:
        """Scores every rank's captions; a collective call under DDP.

        Rank 0 scores (one METEOR process, not one per rank) and broadcasts, so every rank returns
        identical floats. If scoring fails on rank 0 the other ranks raise too instead of waiting forever.

        Returns:
            Scores keyed by ``METRIC_KEYS`` names; see ``score_captions``.

        Raises:
            ValueError: nothing was collected on any rank, or see ``gather``.
            RuntimeError: scoring failed (on rank 0, under DDP).
        """
        return self.score(*self.gather())

    def score(self, hypotheses: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
        """Scores captions already gathered by ``gather`` (same on every rank); a collective call under DDP.

        For callers that also need the gathered captions (to write a results file) without gathering twice.
        """
        # Every rank holds the same gathered captions, so input errors are raised by all ranks alike.
        _check_captions(hypotheses, references)
        if not _distributed():
            return score_captions(hypotheses, references, scorers=self.scorers, tokenizer=self.tokenizer)
        import torch.distributed

        error: BaseException | None = None
        message: list[object] = [None]
        if torch.distributed.get_rank() == 0:
            try:
                message[0] = score_captions(hypotheses, references, scorers=self.scorers, tokenizer=self.tokenizer)
            except Exception as err:  # re-raised below, once the other ranks are told
                error = err
                message[0] = f"{type(err).__name__}: {err}"
        torch.distributed.broadcast_object_list(message, src=0)
        if error is not None:
            raise error
        if isinstance(message[0], str):
            raise RuntimeError(f"caption scoring failed on rank 0: {message[0]}")
        return dict(message[0])  # type: ignore[arg-type]

    def reset(self) -> None:
        """Forgets every caption held locally, for the next epoch."""
        self._image_ids.clear()
        self._hypotheses.clear()
        self._references.clear()

    def __len__(self) -> int:
        """Number of captions held on this rank, duplicates included."""
        return len(self._image_ids)


def _distributed() -> bool:
    if "torch" not in sys.modules:  # nothing distributed can run without it; don't import it for nothing
        return False
    import torch.distributed

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _check_scorers(scorers: Sequence[str]) -> list[str]:
    if isinstance(scorers, str):  # a lone name from YAML, not its letters
        scorers = [scorers]
    unknown = [name for name in scorers if name not in SCORERS]
    if unknown:
        raise ValueError(f"unknown caption scorer(s) {unknown}; valid names are {list(SCORERS)}")
    if not scorers:
        raise ValueError(f"no caption scorer selected; choose any of {list(SCORERS)}")
    return list(dict.fromkeys(scorers))


def _check_tokenizer(tokenizer: str) -> Literal["ptb", "simple"]:
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown caption tokenizer {tokenizer!r}; valid names are {list(TOKENIZERS)}")
    return tokenizer  # type: ignore[return-value]


def _check_captions(hypotheses: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> None:
    if not hypotheses:
        raise ValueError("no captions to score: hypotheses is empty (did the evaluation loop run, and call update()?)")
    for image_id, hypothesis in hypotheses.items():
        if not isinstance(hypothesis, str):
            raise TypeError(f"hypothesis for image {image_id!r} must be a str, got {type(hypothesis).__name__}")
        if image_id not in references:
            raise ValueError(f"image {image_id!r} has a hypothesis but no references")
        refs = references[image_id]
        if isinstance(refs, str):
            raise TypeError(f"references for image {image_id!r} must be a list of str, got one str: {refs!r}")
        if len(refs) == 0:
            raise ValueError(f"image {image_id!r} has an empty list of references")


def _simple_tokenize(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    return {
        image_id: [" ".join(tokenize(caption)) for caption in texts]  # the vocabulary's own tokenizer
        for image_id, texts in captions.items()
    }


def _ptb_tokenize(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    # Java ends lines at \r, \u2028 and friends too, while PTBTokenizer only replaces \n, so such a
    # character would shift every later caption onto the wrong image. PTB splits on whitespace anyway,
    # so collapsing it changes no token.
    cleaned = {
        image_id: [{"caption": " ".join(text.split())} for text in texts] for image_id, texts in captions.items()
    }
    with _capture_stderr_fd() as java_stderr, english_jvm():
        try:
            tokenized = PTBTokenizer().tokenize(cleaned)
        except PermissionError as err:
            raise RuntimeError(
                f"the PTB tokenizer could not write its temporary file next to its jar in "
                f"{os.path.dirname(os.path.abspath(ptbtokenizer.__file__))} ({err}); make that folder writable "
                f"or use tokenizer='simple' (scores then not comparable to published numbers)"
            ) from None
        # A Java failure only shows as missing output lines, which the scorers would report as a bare assert.
        if any(len(tokenized.get(image_id, ())) != len(texts) for image_id, texts in captions.items()):
            java_stderr.seek(0)
            details = java_stderr.read().decode(errors="replace").strip()
            raise RuntimeError(f"the PTB tokenizer (Java) returned incomplete output; its stderr:\n{details}")
    return tokenized


@contextlib.contextmanager
def _capture_stderr_fd() -> Iterator[IO[bytes]]:
    # The PTB tokenizer's JVM inherits file descriptor 2 and reports "PTBTokenizer tokenized N tokens"
    # on it; redirect_stderr cannot reach a child process, so the descriptor itself is swapped.
    with tempfile.TemporaryFile() as sink:
        with contextlib.suppress(AttributeError, ValueError, OSError):  # sys.stderr may be replaced or closed
            sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:  # no descriptor 2 at all (a detached daemon): nothing to keep quiet
            yield sink
            return
        os.dup2(sink.fileno(), 2)
        try:
            yield sink
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _meteor_score(gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[float, list[float]]:
    with english_jvm():
        meteor = Meteor()  # the JVM starts here, reading JAVA_TOOL_OPTIONS
    failure: Exception | None = None
    try:
        score, scores = meteor.compute_score(gts, res)
    except (ValueError, OSError) as err:  # a dead JVM: float('') on its empty reply, or a broken pipe
        failure = err
    finally:
        java_stderr = _close_meteor(meteor)
    if failure is not None:
        raise RuntimeError(
            f"METEOR's Java process failed ({failure}); its stderr:\n{java_stderr}\n"
            "Check the Java runtime, or leave 'meteor' out of scorers."
        ) from failure
    return float(score), [float(value) for value in scores]


def _close_meteor(meteor: Meteor) -> str:
    # pycocoevalcap 1.2's Meteor has no close(): its JVM (2 GB heap allowed) lives until __del__, which
    # leaves the pipes open and takes a lock that compute_score never releases if it raises, so a failed
    # call would hang at garbage collection. Stop it here; the later __del__ then finds nothing to do.
    process = meteor.meteor_p
    process.kill()
    process.wait()
    stderr = process.stderr.read().decode(errors="replace").strip() if process.stderr else ""
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):  # unflushed input to a dead process
                stream.close()
    if meteor.lock.locked():
        meteor.lock.release()
    return stderr


@contextlib.contextmanager
def english_jvm() -> Iterator[None]:
    """Java processes started inside run with an English locale and UTF-8 (``JVM_OPTIONS``).

    pycocoevalcap starts ``java`` itself, with a fixed command line; ``JAVA_TOOL_OPTIONS`` is the one
    setting every JVM reads at start-up. The user's own options stay, ours come last and so win.
    """
    saved = os.environ.get("JAVA_TOOL_OPTIONS")
    os.environ["JAVA_TOOL_OPTIONS"] = " ".join([*([saved] if saved else []), *JVM_OPTIONS])
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("JAVA_TOOL_OPTIONS", None)
        else:
            os.environ["JAVA_TOOL_OPTIONS"] = saved


def _spice_lib() -> Path:
    from pycocoevalcap.spice import spice

    return Path(spice.__file__).resolve().parent / "lib"


def _spice_models_present() -> bool:
    return all(
        (_spice_lib() / name).is_file() for name in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
    )


def _spice_score(gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[float, list[float]]:
    from pycocoevalcap.spice.spice import Spice

    with english_jvm(), _capture_stderr_fd() as java_stderr:
        try:
            score, scores = Spice().compute_score(gts, res)
        except (subprocess.CalledProcessError, OSError, ValueError) as err:
            java_stderr.seek(0)
            details = java_stderr.read().decode(errors="replace").strip()[-2000:]
            raise RuntimeError(f"SPICE's Java process failed ({err}); its stderr:\n{details}") from None
    by_id = dict(zip(sorted(gts), scores, strict=True))  # Spice scores images in sorted id order
    return float(score), [float(by_id[image_id]["All"]["f"]) for image_id in gts]
