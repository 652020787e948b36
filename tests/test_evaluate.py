"""`capattn evaluate` on real captions: equal to pycocoevalcap called directly, for every reference format."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from capattn import metrics
from capattn.cli import main
from capattn.evaluate import detect_format, evaluate, read_references, read_results

from .conftest import REPO_ROOT

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs a Java runtime (PTB tokenizer, METEOR)")
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
FAST = ("bleu", "rouge", "cider")
COCO_SUBSET = "coco-caption-eval/extra/coco_val2014_captions_subset4800_from_Elsa1024.json"
FAKECAP = "coco-caption-eval/captions_val2014_fakecap_results.json"


def pycocoevalcap_scores(
    results: dict[str, str], references: dict[str, list[str]], scorers=("bleu", "meteor", "rouge", "cider")
) -> dict[str, float]:
    """pycocoevalcap called as coco-caption's COCOEvalCap.evaluate does, images in the results' order."""
    gts = PTBTokenizer().tokenize({i: [{"caption": c} for c in references[i]] for i in results})
    res = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in results.items()})
    scores: dict[str, float] = {}
    if "bleu" in scorers:
        scores.update(zip(("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"), Bleu(4).compute_score(gts, res, verbose=0)[0]))
    if "meteor" in scorers:
        meteor = Meteor()
        scores["METEOR"] = meteor.compute_score(gts, res)[0]
        metrics._close_meteor(meteor)
    if "rouge" in scorers:
        scores["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    if "cider" in scorers:
        scores["CIDEr-D"] = Cider().compute_score(gts, res)[0]
    return scores


@pytest.fixture(scope="module")
def flickr(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Real Flickr8k: per test image, the first human caption is the result and the other four the references.

    The same references are written in every format `evaluate` reads; the results file is R.json.
    """
    text = shared_data / "flickr8k" / "text"
    captions: dict[str, list[str]] = {}
    for line in (text / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
        key, _, caption = line.partition("\t")
        captions.setdefault(key.rpartition("#")[0], []).append(caption)
    splits = {
        split: [n.strip() for n in (text / name).read_text().splitlines() if n.strip()]
        for split, name in SPLIT_FILES.items()
    }
    out = tmp_path_factory.mktemp("flickr")
    results = {name.removesuffix(".jpg"): captions[name][0] for name in splits["test"]}
    refs = {split: {n.removesuffix(".jpg"): captions[n][1:] for n in names} for split, names in splits.items()}
    (out / "R.json").write_text(json.dumps([{"image_id": i, "caption": c} for i, c in results.items()]))

    # Flickr8k token file with the split lists beside it.
    lines = [
        f"{i}.jpg#{n + 1}\t{c}" for split in refs.values() for i, caps in split.items() for n, c in enumerate(caps)
    ]
    (out / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name in SPLIT_FILES.values():
        shutil.copy(text / name, out / name)
    # COCO caption annotations of the test split (string ids, as Flickr8k's names are).
    test = refs["test"]
    coco = {
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in test],
        "annotations": [
            {"id": k, "image_id": i, "caption": c} for k, (i, c) in enumerate((i, c) for i in test for c in test[i])
        ],
    }
    (out / "refs.json").write_text(json.dumps(coco))
    # Karpathy's format, as dataset_flickr8k.json has it.
    karpathy = {
        "dataset": "flickr8k",
        "images": [
            {
                "filename": f"{i}.jpg",
                "imgid": k,
                "split": split,
                "sentences": [{"raw": c, "tokens": c.lower().split()} for c in caps],
            }
            for split, images in refs.items()
            for k, (i, caps) in enumerate(images.items())
        ],
    }
    (out / "dataset_flickr8k.json").write_text(json.dumps(karpathy))
    # A Hugging Face dataset, as save_to_disk writes it (no images: evaluate never opens them).
    import datasets

    hf = datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict({"image_id": list(images), "captions": list(images.values())})
            for name, images in zip(("train", "validation", "test"), refs.values(), strict=True)
        }
    )
    hf.save_to_disk(str(out / "hf"))
    return {"dir": out, "results": results, "references": test, "shared_csv": shared_data / "flickr8k" / "captions.txt"}


def _run(*args: str) -> int:
    return main(list(args))


# --- reading ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("Flickr8k.token.txt", "flickr8k"),
        ("refs.json", "coco"),
        ("dataset_flickr8k.json", "karpathy"),
        ("hf", "hf"),
    ],
)
def test_every_reference_format_gives_the_same_references(flickr, name, kind):
    path = flickr["dir"] / name
    assert detect_format(path) == kind
    refs = read_references(path, split=None if kind == "coco" else "test")
    assert refs.captions == flickr["references"]
    assert len(refs.captions) == 1000 and all(len(c) == 4 for c in refs.captions.values())


def test_kaggle_csv_with_split_lists_in_text_subfolder(flickr):
    # The shared captions.txt holds all five captions; its split lists are in text/ beside it.
    refs = read_references(flickr["shared_csv"], split="test")
    assert refs.kind == "Kaggle Flickr8k captions.txt" and len(refs.captions) == 1000
    assert all(refs.captions[i][1:] == caps for i, caps in flickr["references"].items())
    assert read_references(flickr["shared_csv"], split="dev").split == "val"  # Flickr8k's own name for val


def test_results_file_reads_ids_as_strings(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('[{"image_id": 404464, "caption": "a man", "score": -3.2}, {"image_id": "abc", "caption": "x"}]')
    assert read_results(path) == {"404464": "a man", "abc": "x"}


# --- scores equal pycocoevalcap's -------------------------------------------------------------


def _german_locale(tmp_path: Path) -> dict[str, str] | None:
    """Environment variables selecting a German locale, compiled into tmp_path if the system has none."""
    installed = subprocess.run(["locale", "-a"], capture_output=True, text=True).stdout.split()
    for name in installed:
        if name.lower().replace("-", "") == "de_de.utf8":
            return {"LC_ALL": name, "LANG": name}
    if shutil.which("localedef") and Path("/usr/share/i18n/locales/de_DE").is_file():
        done = subprocess.run(
            ["localedef", "-i", "de_DE", "-f", "UTF-8", str(tmp_path / "de_DE.UTF-8")], capture_output=True
        )
        if done.returncode == 0:
            return {"LOCPATH": str(tmp_path), "LC_ALL": "de_DE.UTF-8", "LANG": "de_DE.UTF-8"}
    return None


@needs_java
def test_cli_equals_pycocoevalcap_under_a_german_locale(flickr, tmp_path):
    """`capattn evaluate R.json --references refs.json`, METEOR included, with LC_ALL=de_DE.UTF-8 when possible.

    Under a German locale METEOR's JVM writes "0,31" and pycocoevalcap alone crashes; capattn gives the
    JVM an English locale. The command runs in a subprocess while pycocoevalcap computes the expected scores.
    """
    german = _german_locale(tmp_path)
    command = [sys.executable, "-m", "capattn.cli", "evaluate", str(flickr["dir"] / "R.json")]
    command += ["--references", str(flickr["dir"] / "refs.json"), "--out", str(tmp_path / "out")]
    env = {**os.environ, **(german or {})}
    pipe = subprocess.PIPE
    with subprocess.Popen(command, stdout=pipe, stderr=pipe, text=True, env=env, cwd=REPO_ROOT) as cli:
        expected = pycocoevalcap_scores(flickr["results"], flickr["references"])
        stdout, stderr = cli.communicate(timeout=300)
    assert cli.returncode == 0, stderr
    lines = stdout.splitlines()
    assert lines[0] == "scored 1,000 images of refs.json (COCO caption annotations), 4.0 references per image"
    printed = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert list(printed) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"]
    for key, value in expected.items():
        assert printed[key] == [f"{value:.4f}", f"{100 * value:.1f}"], key
    saved = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert saved["metrics"] == pytest.approx(expected, rel=1e-12, abs=0)
    assert saved["images"] == 1000 and len(saved["per_image"]) == 1000
    # Humans against the other four humans: the known ballpark, so the real data went through.
    assert 0.5 < expected["BLEU-1"] < 0.8 and 0.15 < expected["METEOR"] < 0.3 and 0.4 < expected["CIDEr-D"] < 1.2
    with (tmp_path / "out" / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1000 and rows[0]["image_id"] == next(iter(flickr["results"]))
    assert rows[0]["caption"] == next(iter(flickr["results"].values()))
    # Per-image CIDEr-D averages to the corpus value, as pycocoevalcap defines it.
    assert sum(float(r["CIDEr-D"]) for r in rows) / len(rows) == pytest.approx(expected["CIDEr-D"], rel=1e-9)
    if german is None:
        pytest.skip("scores checked, but no German locale could be made here (locale -a, localedef)")


@needs_java
def test_official_fakecap_results_on_real_coco_annotations(shared_data):
    """The official COCO demo results file against real val2014 annotations: the 134 images both hold."""
    results = read_results(shared_data / FAKECAP)
    refs = read_references(shared_data / COCO_SUBSET)
    with pytest.raises(Exception, match=r"866 of its 1,000 image ids are not in .* --allow-partial to score the 134"):
        evaluate(results, refs, scorers=FAST)
    evaluation = evaluate(results, refs, allow_partial=True, scorers=FAST)
    assert evaluation.images == 134
    assert any("866 of the 1,000 results are not in" in note for note in evaluation.notes)
    assert any("134 of the 4,800 images" in note and "document frequencies" in note for note in evaluation.notes)
    shared = {i: c for i, c in results.items() if i in refs.captions}
    assert evaluation.metrics == pytest.approx(pycocoevalcap_scores(shared, refs.captions, FAST), rel=1e-12, abs=0)


def test_official_fakecap_scores_when_the_official_annotations_exist(shared_data):
    """The numbers the official demo notebook printed, when captions_val2014.json is beside the results file."""
    annotations = shared_data / "coco-caption-eval" / "captions_val2014.json"
    if not annotations.is_file():
        pytest.skip(
            f"{annotations} is absent (see coco-caption-eval/README.md): the official numbers cannot be checked"
        )
    evaluation = evaluate(read_results(shared_data / FAKECAP), read_references(annotations), allow_partial=True)
    official = {"BLEU-1": 0.579, "BLEU-2": 0.404, "BLEU-3": 0.279, "BLEU-4": 0.191, "METEOR": 0.195}
    official |= {"ROUGE-L": 0.396, "CIDEr-D": 0.600}
    assert {k: round(v, 3) for k, v in evaluation.metrics.items()} == official


@pytest.fixture(scope="module")
def expected_all(flickr) -> dict[str, float]:
    """pycocoevalcap's scores of R.json against the four other captions, METEOR included (computed once)."""
    return pycocoevalcap_scores(flickr["results"], flickr["references"])


@pytest.mark.slow
@needs_java
@pytest.mark.parametrize("name", ["Flickr8k.token.txt", "refs.json", "dataset_flickr8k.json", "hf"])
def test_every_format_scores_equal_pycocoevalcap(flickr, expected_all, name):
    refs = read_references(flickr["dir"] / name, split=None if name == "refs.json" else "test")
    evaluation = evaluate(read_results(flickr["dir"] / "R.json"), refs)
    assert evaluation.metrics == pytest.approx(expected_all, rel=1e-12, abs=0)


@needs_java
def test_allow_partial_scores_a_subset_and_says_cider_depends_on_it(flickr, tmp_path, capsys):
    half = dict(list(flickr["results"].items())[:50])
    path = tmp_path / "half.json"
    path.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in half.items()]))
    with pytest.raises(SystemExit):
        _run("evaluate", str(path), "--references", str(flickr["dir"] / "refs.json"))
    err = capsys.readouterr().err.strip()
    assert (
        err.count("\n") == 0 and "950 of the 1,000 reference images have no caption" in err and "--allow-partial" in err
    )
    evaluation = evaluate(half, read_references(flickr["dir"] / "refs.json"), allow_partial=True, scorers=("bleu",))
    assert evaluation.images == 50
    (note,) = evaluation.notes
    assert "50 of the 1,000 images" in note and "CIDEr-D's document frequencies come from the scored" in note


# --- bad input: one line, exit 2, no traceback ------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b'[{"image_id": "a", "caption": "x"}, {"image_id": "a", "caption": "y"}]',
            r"image a appears twice \(entries 0 and 1\)",
        ),
        (b'[{"image_id": "a", "caption": "  "}]', r"entry 0 \(image a\) has an empty caption"),
        ('[{"image_id": "a", "caption": "caf\u00e9"}]'.encode("latin-1"), r"is not UTF-8 text \(byte 0xe9 at offset"),
        (b'{"image_id": "a", "caption": "x"}', r"holds a JSON dict, not a list"),
        (
            b'[{"id": "a", "text": "x"}]',
            r"entry 0 is \{\"id\": \"a\", \"text\": \"x\"\}, not \{'image_id', 'caption'\}",
        ),
        (b'[{"image_id": 1.5, "caption": "x"}]', r"entry 0 has image_id 1.5"),
        (b"[]", r"holds no results"),
        (b"image_id,caption\na,x\n", r"is not JSON \(line 1, column 1"),
    ],
    ids=["duplicate", "empty-caption", "latin-1", "dict", "wrong-keys", "float-id", "empty", "csv"],
)
def test_bad_results_file_is_one_clear_line(flickr, tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_:
        _run("evaluate", str(path), "--references", str(flickr["dir"] / "refs.json"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(f"capattn: error: {path}")
    assert __import__("re").search(message, err), err


def test_unknown_image_ids_are_refused_and_shown(flickr, tmp_path, capsys):
    rows = [{"image_id": f"{i}.jpg", "caption": c} for i, c in flickr["results"].items()]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(SystemExit):
        _run("evaluate", str(path), "--references", str(flickr["dir"] / "Flickr8k.token.txt"), "--split", "test")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    first = next(iter(flickr["results"]))
    assert "1,000 of its 1,000 image ids are not in split test of Flickr8k.token.txt (Flickr8k token file)" in err
    assert f"(e.g. '{first}.jpg'" in err
    assert "the references' ids look like" in err and "no image is in both" in err


def test_results_of_another_split_name_it(flickr, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run("evaluate", str(flickr["dir"] / "R.json"), "--references", str(flickr["dir"] / "hf"), "--split", "val")
    assert "some are in split test" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (lambda d: d / "refs.csv", [], r"unknown references format \(it starts 'id;text'\)"),
        (lambda d: d / "missing.json", [], r"references not found: .*missing\.json"),
        (lambda d: d / "Flickr8k.token.txt", [], r"holds train, val and test: choose .* --split test"),
        (lambda d: d / "refs.json", ["--split", "test"], r"is a COCO annotation file, which is one split already"),
        (lambda d: d / "Flickr8k.token.txt", ["--split", "testing"], r"unknown split 'testing'"),
        (lambda d: d / "not_coco.json", [], r"no 'annotations' list at the top"),
    ],
    ids=["unknown-format", "missing", "no-split", "coco-split", "bad-split", "json-not-coco"],
)
def test_bad_references_are_one_clear_line(flickr, tmp_path, capsys, make, args, message):
    (tmp_path / "refs.csv").write_text("id;text\n1;a dog\n")
    (tmp_path / "not_coco.json").write_text('{"images": []}')
    for name in ("Flickr8k.token.txt", "refs.json"):
        (tmp_path / name).symlink_to(flickr["dir"] / name)
    with pytest.raises(SystemExit) as exit_:
        _run("evaluate", str(flickr["dir"] / "R.json"), "--references", str(make(tmp_path)), *args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("capattn: error:"), err
    assert __import__("re").search(message, err), err


def test_evaluate_and_report_start_without_torch():
    code = "import sys, capattn.evaluate, capattn.report, capattn.metrics; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
