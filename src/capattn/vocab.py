"""Tokenizer and vocabulary: text ↔ token ids, saved with every checkpoint."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from capattn.errors import DataError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)

_PUNCT = re.compile(r"[^\w\s]|_")


def tokenize(text: str) -> list[str]:
    """Lowercases, strips punctuation and splits on whitespace (Karpathy's preprocessing)."""
    return _PUNCT.sub(" ", text.lower()).split()


def words_of(tokens: Any, itos: Sequence[str], *, eos: int, pad: int) -> list[str]:
    """A caption's words up to and including ``<eos>`` (each has an attention map), pads dropped.

    ``tokens``: a (T,) tensor of ids (this module does not import torch, hence ``Any``).
    """
    words = []
    for i in tokens.tolist():
        if i == pad:
            break
        words.append(itos[i])
        if i == eos:
            break
    return words


class Vocabulary:
    """Maps words to ids and back. Ids 0–3 are ``<pad> <bos> <eos> <unk>``.

    Args:
        words: the non-special words, most frequent first; their ids follow the specials.
    """

    def __init__(self, words: Sequence[str]) -> None:
        clash = set(words) & set(SPECIALS)
        if clash:
            raise ValueError(f"vocabulary words may not be special tokens: {sorted(clash)}")
        self.itos: list[str] = [*SPECIALS, *words]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary words must be unique")
        self.pad, self.bos, self.eos, self.unk = (self.stoi[s] for s in SPECIALS)

    @classmethod
    def build(cls, captions: Iterable[str], *, min_count: int = 1, max_size: int | None = None) -> Vocabulary:
        """Builds a vocabulary from raw captions.

        Args:
            captions: raw caption texts (training split only, so test words stay unknown).
            min_count: keep words seen at least this often.
            max_size: keep at most this many words (specials included), most frequent first.

        Returns:
            The vocabulary; ties in frequency are broken alphabetically so builds are reproducible.
        """
        counts = Counter(word for caption in captions for word in tokenize(caption))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[: max(0, max_size - len(SPECIALS))]
        return cls(words)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocabulary(size={len(self)})"

    def difference(self, other: Vocabulary, *, this: str = "this", that: str = "the other") -> str:
        """What differs between two vocabularies, in words (for error messages).

        Args:
            other: the vocabulary compared with.
            this: what this vocabulary is called in the message ("the checkpoint").
            that: what ``other`` is called ("the data").

        Returns:
            e.g. ``"2 words only in the checkpoint ('hexagon', 'star'); …"`` or, for the same words
            in another order, which id changed and why it happens.
        """
        only_this = [w for w in self.itos if w not in other.stoi]
        only_that = [w for w in other.itos if w not in self.stoi]

        def words(ws: list[str]) -> str:
            shown = ", ".join(repr(w) for w in ws[:3])
            return f"{len(ws)} word{'s' if len(ws) > 1 else ''} only in {{}} ({shown}{', …' if len(ws) > 3 else ''})"

        parts = []
        if len(self) != len(other):
            parts.append(f"{len(self)} tokens in {this}, {len(other)} in {that}")
        if only_this:
            parts.append(words(only_this).format(this))
        if only_that:
            parts.append(words(only_that).format(that))
        if not parts:
            i = next(i for i, (a, b) in enumerate(zip(self.itos, other.itos, strict=True)) if a != b)
            parts.append(
                f"the same {len(self)} words with other ids (id {i} is {self.itos[i]!r} in {this} but "
                f"{other.itos[i]!r} in {that}): the training captions' word counts differ"
            )
        return "; ".join(parts)

    def encode(self, text: str) -> list[int]:
        """``<bos>`` + word ids (unknown words → ``<unk>``) + ``<eos>``."""
        return [self.bos, *(self.stoi.get(w, self.unk) for w in tokenize(text)), self.eos]

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first ``<eos>``, with ``<pad>``/``<bos>`` dropped (``<unk>`` is kept)."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos:
                break
            if i in (self.pad, self.bos):
                continue
            words.append(self.itos[i])
        return " ".join(words)

    def to_dict(self) -> dict:
        return {"itos": self.itos}

    @classmethod
    def from_dict(cls, data: dict) -> Vocabulary:
        itos = data.get("itos") if isinstance(data, dict) else None
        if not isinstance(itos, list) or tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise DataError(f"not a capattn vocabulary: expected 'itos' starting with {list(SPECIALS)}")
        return cls(itos[len(SPECIALS) :])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=0) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise DataError(f"vocabulary file not found: {path}") from None
        except (json.JSONDecodeError, DataError) as err:
            raise DataError(f"cannot read vocabulary {path}: {err}") from None
