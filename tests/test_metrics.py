"""COCO caption metrics: equal to pycocoevalcap called directly, fallbacks without Java, bad input, DDP gathering."""

from __future__ import annotations

import json
import shutil
import socket
import warnings
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as meteor_module
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from capattn import metrics
from capattn.metrics import METRIC_KEYS, SCORERS, CaptionScorer, score_captions

COCO_CAPTIONS = "coco-caption-eval/extra/coco_val2014_captions_subset4800_from_Elsa1024.json"
HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="needs a Java runtime (PTB tokenizer, METEOR)")

# Small made-up corpus: distinct captions per image, so CIDEr-D's document frequencies are informative.
TOY_REFERENCES = {
    "1": ["A man riding a horse on a beach.", "A person rides a brown horse near the sea."],
    "2": ["Two dogs play in the snow.", "A pair of dogs running through snow."],
    "3": ["A red bus parked on a city street.", "A double-decker bus on the road."],
    "4": ["A plate of pasta with tomato sauce.", "Spaghetti served on a white plate."],
    "5": ["A child flying a kite in a park.", "A kid holds a kite string on the grass."],
    "6": ["A cat sleeping on a laptop keyboard.", "A grey cat lies on a computer."],
}
TOY_HYPOTHESES = {
    "1": "a man riding a horse on the beach",
    "2": "two dogs running in the snow",
    "3": "a red bus on a street",
    "4": "a plate of spaghetti",
    "5": "",
    "6": "a cat on a laptop",
}
FAST_SCORERS = ("bleu", "rouge", "cider")


@pytest.fixture(scope="module")
def coco_subset(shared_data: Path) -> tuple[dict[str, str], dict[str, list[str]], list[dict]]:
    """100 real COCO val2014 images: first caption as hypothesis (one made empty), the others as references."""
    path = shared_data / COCO_CAPTIONS
    if not path.is_file():
        pytest.skip(f"COCO caption subset not found at {path}")
    annotations = json.loads(path.read_text())["annotations"]
    by_image: dict[int, list[dict]] = defaultdict(list)
    for annotation in sorted(annotations, key=lambda a: a["id"]):
        by_image[annotation["image_id"]].append(annotation)
    image_ids = sorted(by_image)[:100]
    hypotheses = {str(i): by_image[i][0]["caption"] for i in image_ids}
    references = {str(i): [a["caption"] for a in by_image[i][1:]] for i in image_ids}
    # An untrained model may emit nothing; the reference computation below must agree on that case too.
    hypotheses[str(image_ids[7])] = ""
    return hypotheses, references, [a for i in image_ids for a in by_image[i]]


@pytest.fixture(scope="module")
def coco_scores(coco_subset) -> tuple[dict[str, float], dict[str, float], list[Meteor]]:
    """(pycocoevalcap called as coco-caption's COCOEvalCap.evaluate does, score_captions, Meteor instances made)."""
    hypotheses, references, _ = coco_subset
    # The coco-caption input format: {id: [annotation dict, ...]}; only "caption" is read.
    gts = PTBTokenizer().tokenize({i: [{"image_id": i, "caption": c} for c in refs] for i, refs in references.items()})
    res = PTBTokenizer().tokenize({i: [{"image_id": i, "caption": c}] for i, c in hypotheses.items()})
    expected = dict(zip(METRIC_KEYS[:4], Bleu(4).compute_score(gts, res, verbose=0)[0], strict=True))
    expected["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    expected["CIDEr-D"] = Cider().compute_score(gts, res)[0]
    meteor = Meteor()
    expected["METEOR"] = meteor.compute_score(gts, res)[0]
    metrics._close_meteor(meteor)  # pycocoevalcap only stops it in __del__, leaving its pipes open

    made: list[Meteor] = []

    class RecordingMeteor(Meteor):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metrics, "Meteor", RecordingMeteor)
        actual = score_captions(hypotheses, references)
    return expected, actual, made


@needs_java
def test_scores_equal_pycocoevalcap_on_real_coco(coco_scores) -> None:
    expected, actual, _ = coco_scores
    assert list(actual) == list(METRIC_KEYS)
    assert all(isinstance(value, float) for value in actual.values())
    assert actual == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # Human captions against the other humans: the known COCO ballpark, so the data really went through.
    assert 0.5 < actual["BLEU-1"] < 0.8 and 0.5 < actual["CIDEr-D"] < 1.5 and 0.15 < actual["METEOR"] < 0.35


@needs_java
def test_meteor_process_is_stopped_after_scoring(coco_scores) -> None:
    *_, made = coco_scores
    assert len(made) == 1
    process = made[0].meteor_p
    assert process.returncode is not None, "METEOR's JVM is still running"
    assert process.stdin.closed and process.stdout.closed and process.stderr.closed
    assert not made[0].lock.locked()


@needs_java
def test_identical_captions_score_perfectly() -> None:
    references = {i: [refs[0]] * 3 for i, refs in TOY_REFERENCES.items()}
    hypotheses = {i: refs[0] for i, refs in TOY_REFERENCES.items()}
    scores = score_captions(hypotheses, references, scorers=FAST_SCORERS)
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert scores[key] == pytest.approx(1.0, abs=1e-6), key
    # CIDEr-D is 10 x the mean n-gram cosine similarity, so a perfect caption gets 10.
    assert scores["CIDEr-D"] == pytest.approx(10.0, abs=1e-6)


def test_simple_tokenizer_lowercases_and_strips_punctuation() -> None:
    exact = score_captions({"a": "A dog, running!"}, {"a": ["a dog running"]}, scorers=["bleu"], tokenizer="simple")
    assert exact["BLEU-3"] == pytest.approx(1.0, abs=1e-6)
    # The vocabulary's tokenizer: punctuation becomes a space, as in Karpathy's preprocessing.
    assert metrics._simple_tokenize({"a": ["  The CAT's   hat.\n"]}) == {"a": ["the cat s hat"]}


@needs_java
def test_line_breaks_inside_a_caption_do_not_shift_other_captions() -> None:
    # Java splits lines at \r; PTBTokenizer itself only replaces \n.
    broken = {"1": "a man riding\ra horse", "2": "two dogs in the snow"}
    clean = {"1": "a man riding a horse", "2": "two dogs in the snow"}
    assert metrics._ptb_tokenize({k: [v] for k, v in broken.items()}) == {k: [v] for k, v in clean.items()}


@needs_java
def test_a_failing_ptb_tokenizer_reports_java_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ptbtokenizer, "STANFORD_CORENLP_3_4_1_JAR", "missing-corenlp.jar")
    with pytest.raises(RuntimeError, match=r"PTB tokenizer \(Java\) returned incomplete output; its stderr:\n\S"):
        score_captions(TOY_HYPOTHESES, TOY_REFERENCES, scorers=["bleu"])


@needs_java
def test_a_failing_meteor_process_is_reported_and_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(meteor_module, "METEOR_JAR", "missing-meteor.jar")
    made: list[Meteor] = []

    def recording_meteor() -> Meteor:
        made.append(Meteor())
        return made[-1]

    monkeypatch.setattr(metrics, "Meteor", recording_meteor)
    with pytest.raises(RuntimeError, match=r"METEOR's Java process failed .*its stderr:\n.*missing-meteor\.jar"):
        score_captions(TOY_HYPOTHESES, TOY_REFERENCES, scorers=["meteor"], tokenizer="simple")
    assert made[0].meteor_p.returncode is not None and not made[0].lock.locked()


def test_without_java_meteor_is_skipped_and_tokenizer_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = score_captions(TOY_HYPOTHESES, TOY_REFERENCES, scorers=FAST_SCORERS, tokenizer="simple")

    def no_java_tool(*args: object, **kwargs: object) -> None:
        raise AssertionError("a Java tool was started although java is missing")

    monkeypatch.setattr(metrics.shutil, "which", lambda name, *args, **kwargs: None)
    monkeypatch.setattr(metrics, "Meteor", no_java_tool)
    monkeypatch.setattr(metrics, "PTBTokenizer", no_java_tool)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = score_captions(TOY_HYPOTHESES, TOY_REFERENCES)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages
    assert sum("METEOR skipped" in m and "Install a Java runtime" in m for m in messages) == 1
    assert sum("simple tokenizer" in m and "NOT comparable" in m for m in messages) == 1
    assert "METEOR" not in scores
    assert scores == expected

    # Asked for METEOR alone: nothing can run, still one warning and no crash.
    with pytest.warns(UserWarning, match="METEOR skipped"):
        assert score_captions(TOY_HYPOTHESES, TOY_REFERENCES, scorers=["meteor"], tokenizer="simple") == {}


@pytest.mark.parametrize(
    ("hypotheses", "references", "kwargs", "message"),
    [
        ({"1": "a dog"}, {"1": ["a dog"]}, {"scorers": ["bleu", "spice"]}, r"unknown caption scorer.*'spice'.*'bleu'"),
        ({"1": "a dog"}, {"1": ["a dog"]}, {"scorers": []}, "no caption scorer selected"),
        ({"1": "a dog"}, {"1": ["a dog"]}, {"tokenizer": "nltk"}, r"unknown caption tokenizer 'nltk'.*'ptb'"),
        ({}, {"1": ["a dog"]}, {}, "no captions to score"),
        ({"1": "a dog", "42": "a cat"}, {"1": ["a dog"]}, {}, r"image '42' has a hypothesis but no references"),
        ({"1": "a dog"}, {"1": []}, {}, r"image '1' has an empty list of references"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(hypotheses, references, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        score_captions(hypotheses, references, **kwargs)


def test_references_given_as_one_string_are_rejected() -> None:
    with pytest.raises(TypeError, match="must be a list of str"):
        score_captions({"1": "a dog"}, {"1": "a dog"})  # type: ignore[dict-item]


def test_caption_scorer_rejects_unknown_scorer_at_construction() -> None:
    with pytest.raises(ValueError, match=r"valid names are \['bleu', 'meteor', 'rouge', 'cider'\]"):
        CaptionScorer(scorers=["bleu", "cidre"])


@pytest.mark.parametrize("tokenizer", ["simple", pytest.param("ptb", marks=needs_java)])
def test_empty_hypotheses_score_without_crashing(tokenizer: str) -> None:
    # METEOR's empty-hypothesis case is covered by the real-COCO comparison above (one hypothesis is "").
    mixed = score_captions(TOY_HYPOTHESES, TOY_REFERENCES, scorers=FAST_SCORERS, tokenizer=tokenizer)
    assert set(mixed) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"}
    assert all(value > 0.0 for value in mixed.values())
    all_empty = score_captions(
        dict.fromkeys(TOY_REFERENCES, ""), TOY_REFERENCES, scorers=FAST_SCORERS, tokenizer=tokenizer
    )
    assert all_empty["ROUGE-L"] == 0.0 and all_empty["CIDEr-D"] == 0.0
    assert all_empty["BLEU-4"] == pytest.approx(0.0, abs=1e-6)


def test_caption_scorer_single_process() -> None:
    scorer = CaptionScorer(scorers=FAST_SCORERS, tokenizer="simple")
    ids = list(TOY_REFERENCES)
    last = [*ids[4:], "1"]
    scorer.update(ids[:4], [TOY_HYPOTHESES[i] for i in ids[:4]], [TOY_REFERENCES[i] for i in ids[:4]])
    # The last batch repeats image 1, as a padded sampler would.
    scorer.update(last, [TOY_HYPOTHESES[i] for i in last], [TOY_REFERENCES[i] for i in last])
    assert len(scorer) == 7
    assert scorer.gather() == (TOY_HYPOTHESES, TOY_REFERENCES)
    assert scorer.compute() == score_captions(TOY_HYPOTHESES, TOY_REFERENCES, scorers=FAST_SCORERS, tokenizer="simple")

    scorer.update(["1"], ["a horse"], [["some other reference"]])
    with pytest.raises(
        ValueError, match=r"image '1' was given to CaptionScorer\.update twice with different references"
    ):
        scorer.gather()
    scorer.reset()
    assert len(scorer) == 0
    with pytest.raises(ValueError, match="no captions to score"):
        scorer.compute()
    with pytest.raises(ValueError, match="equally long"):
        scorer.update(["1", "2"], ["a dog"], [["a dog"], ["a cat"]])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, shards: list[list[str]], out_dir: str) -> None:
    import os

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        scorer = CaptionScorer(scorers=FAST_SCORERS, tokenizer="simple")
        ids = shards[rank]
        for start in range(0, len(ids), 2):  # batches of two, like validation steps
            batch = ids[start : start + 2]
            scorer.update(batch, [TOY_HYPOTHESES[i] for i in batch], [TOY_REFERENCES[i] for i in batch])
        hypotheses, references = scorer.gather()
        scores = scorer.compute()

        # A failure while rank 0 scores must reach every rank instead of leaving them in the broadcast.
        if rank == 0:

            def broken(*args: object, **kwargs: object) -> dict[str, float]:
                raise RuntimeError("java exploded")

            metrics.score_captions = broken
        try:
            scorer.compute()
            failure = None
        except RuntimeError as err:
            failure = str(err)
        result = {"len": len(scorer), "hypotheses": hypotheses, "references": references, "scores": scores}
        result["failure"] = failure
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def test_caption_scorer_gathers_and_scores_across_ddp_ranks(tmp_path: Path) -> None:
    # Rank 1 ends with image "1" again, as DistributedSampler pads; rank 0 also sees "2" twice.
    shards = [["1", "2", "3", "2"], ["4", "5", "6", "1"]]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), shards, str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]

    expected = score_captions(TOY_HYPOTHESES, TOY_REFERENCES, scorers=FAST_SCORERS, tokenizer="simple")
    for rank, result in enumerate(results):
        assert result["len"] == 4, rank
        assert result["hypotheses"] == TOY_HYPOTHESES, rank
        assert result["references"] == TOY_REFERENCES, rank
        assert result["scores"] == pytest.approx(expected, rel=1e-12), rank
    assert results[0]["scores"] == results[1]["scores"]  # bit-identical on every rank
    assert results[0]["failure"] == "java exploded"
    assert results[1]["failure"] == "caption scoring failed on rank 0: RuntimeError: java exploded"


def test_public_names() -> None:
    assert METRIC_KEYS == ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
    assert SCORERS == ("bleu", "meteor", "rouge", "cider")


def test_score_corpus_gives_per_image_scores_that_average_to_the_corpus() -> None:
    scores = metrics.score_corpus(TOY_HYPOTHESES, TOY_REFERENCES, scorers=FAST_SCORERS, tokenizer="simple")
    assert scores.corpus == score_captions(TOY_HYPOTHESES, TOY_REFERENCES, scorers=FAST_SCORERS, tokenizer="simple")
    assert list(scores.per_image) == list(TOY_HYPOTHESES)
    for key in ("ROUGE-L", "CIDEr-D"):  # corpus ROUGE-L and CIDEr-D are means over images; BLEU is not
        mean = sum(image[key] for image in scores.per_image.values()) / len(scores.per_image)
        assert mean == pytest.approx(scores.corpus[key], rel=1e-12), key
    assert scores.per_image["5"]["CIDEr-D"] == 0.0  # the empty hypothesis
    assert scores.per_image["1"]["BLEU-1"] > scores.per_image["4"]["BLEU-1"]


def test_english_jvm_adds_its_options_and_restores_the_users(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAVA_TOOL_OPTIONS", "-Xss4m")
    with metrics.english_jvm():
        assert metrics.os.environ["JAVA_TOOL_OPTIONS"] == "-Xss4m " + " ".join(metrics.JVM_OPTIONS)
        assert "-Duser.language=en" in metrics.JVM_OPTIONS and "-Duser.country=US" in metrics.JVM_OPTIONS
    assert metrics.os.environ["JAVA_TOOL_OPTIONS"] == "-Xss4m"
    monkeypatch.delenv("JAVA_TOOL_OPTIONS")
    with metrics.english_jvm():
        pass
    assert "JAVA_TOOL_OPTIONS" not in metrics.os.environ


def test_spice_is_skipped_with_a_reason_when_its_models_are_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_spice_models_present", lambda: False)
    with pytest.warns(UserWarning, match=r"SPICE skipped: it needs the Stanford CoreNLP 3\.6\.0 jars"):
        scores = metrics.score_corpus(TOY_HYPOTHESES, TOY_REFERENCES, scorers=["bleu"], tokenizer="simple", spice=True)
    assert "SPICE" not in scores.corpus and "BLEU-4" in scores.corpus
