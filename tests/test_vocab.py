"""Tokenizer and vocabulary."""

from __future__ import annotations

import json

import pytest

from capattn.errors import DataError
from capattn.vocab import SPECIALS, Vocabulary, tokenize


def test_tokenize_lowercases_and_strips_punctuation():
    assert tokenize("A man, riding a HORSE!  On the beach.") == [
        "a",
        "man",
        "riding",
        "a",
        "horse",
        "on",
        "the",
        "beach",
    ]
    assert tokenize("don't stop_here") == ["don", "t", "stop", "here"]
    assert tokenize(" ... ") == []


def test_build_orders_by_frequency_and_applies_cut_offs():
    captions = ["a red circle", "a blue circle", "a red square", "a tiny dot"]
    vocab = Vocabulary.build(captions)
    assert vocab.itos[:4] == list(SPECIALS)
    assert vocab.itos[4:7] == ["a", "circle", "red"]  # counts 4, 2, 2: ties alphabetical
    assert len(Vocabulary.build(captions, min_count=2)) == 4 + 3
    assert len(Vocabulary.build(captions, max_size=6)) == 6


def test_encode_decode_round_trip():
    vocab = Vocabulary.build(["a red circle left of a blue square"])
    ids = vocab.encode("A red circle, left of a BLUE square.")
    assert ids[0] == vocab.bos and ids[-1] == vocab.eos
    assert vocab.decode(ids) == "a red circle left of a blue square"
    assert vocab.decode(vocab.encode("a green circle")) == "a <unk> circle"


def test_decode_stops_at_eos_and_drops_specials():
    vocab = Vocabulary.build(["a red circle"])
    a, red, circle = (vocab.stoi[w] for w in ("a", "red", "circle"))
    assert vocab.decode([vocab.bos, a, vocab.pad, red, vocab.eos, circle, circle]) == "a red"
    assert vocab.decode([vocab.eos, a]) == ""


def test_save_load_round_trip(tmp_path):
    vocab = Vocabulary.build(["a red circle", "two blue squares"])
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json") == vocab
    assert Vocabulary.from_dict(vocab.to_dict()) == vocab


def test_bad_vocabulary_files_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        Vocabulary.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        Vocabulary.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"itos": ["a", "b"]}))
    with pytest.raises(DataError, match="not a capattn vocabulary"):
        Vocabulary.load(tmp_path / "other.json")


def test_difference_names_what_differs():
    data = Vocabulary.build(["a red circle", "a blue square", "blue blue"])
    ckpt = Vocabulary.build(["a red circle", "a blue square", "red red"])
    same_words = ckpt.difference(data, this="the checkpoint", that="the data")
    assert "same 9 words with other ids" in same_words and "word counts differ" in same_words
    assert "'red' in the checkpoint but 'blue' in the data" in same_words

    other = Vocabulary.build(["a red circle star moon"])
    text = ckpt.difference(other, this="the checkpoint", that="the data")
    assert text == "2 words only in the checkpoint ('blue', 'square'); 2 words only in the data ('moon', 'star')"
    bigger = Vocabulary.build(["a red circle star"])
    assert bigger.difference(other, this="x", that="y").startswith("8 tokens in x, 9 in y; 1 word only in y ('moon')")
