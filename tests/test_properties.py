"""Property-based tests (hypothesis): tokenizer/vocabulary round trips and decoding invariants."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capattn.decoding import beam_search, greedy
from capattn.models.decoders import ShowAttendTellDecoder, ShowTellDecoder
from capattn.models.encoder import EncoderOutput
from capattn.vocab import SPECIALS, Vocabulary, tokenize

PAD, BOS, EOS = 0, 1, 2
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

words = st.text(alphabet=st.characters(categories=("Ll", "Lu", "Nd")), min_size=1, max_size=8)
captions = st.lists(
    st.builds(
        lambda ws, seps: "".join(w + s for w, s in zip(ws, seps)),
        st.lists(words, min_size=1, max_size=8),
        st.lists(st.sampled_from([" ", ", ", ". ", "  ", "-", "!", " _ "]), min_size=8, max_size=8),
    ),
    min_size=1,
    max_size=6,
)


# --- tokenizer and vocabulary -----------------------------------------------------------------


@FAST
@given(st.text(max_size=60))
def test_tokenize_is_idempotent_and_yields_clean_lowercase_words(text):
    tokens = tokenize(text)
    assert tokenize(" ".join(tokens)) == tokens
    for token in tokens:
        assert token and not any(ch.isspace() for ch in token)
        assert token == token.lower() or tokenize(token) == [token]


@FAST
@given(captions)
def test_encode_then_decode_gives_back_the_tokenized_caption(texts):
    vocab = Vocabulary.build(texts)
    for text in texts:
        ids = vocab.encode(text)
        assert ids[0] == vocab.bos and ids[-1] == vocab.eos
        assert all(0 <= i < len(vocab) for i in ids)
        assert vocab.decode(ids) == " ".join(tokenize(text))
        assert vocab.unk not in ids  # every training word is in the vocabulary


@FAST
@given(captions, st.integers(1, 3), st.one_of(st.none(), st.integers(4, 12)))
def test_vocabulary_cut_offs_and_serialisation_round_trip(texts, min_count, max_size):
    vocab = Vocabulary.build(texts, min_count=min_count, max_size=max_size)
    assert vocab.itos[: len(SPECIALS)] == list(SPECIALS)
    assert max_size is None or len(vocab) <= max(max_size, len(SPECIALS))
    assert Vocabulary.from_dict(vocab.to_dict()) == vocab
    assert Vocabulary.build(list(reversed(texts)), min_count=min_count, max_size=max_size) == vocab  # order-free
    for text in texts:
        assert vocab.decode(vocab.encode(text)).split() == [w if w in vocab.stoi else "<unk>" for w in tokenize(text)]


# --- decoding ---------------------------------------------------------------------------------


def _decoder(kind: str, vocab_size: int, seed: int):
    torch.manual_seed(seed)
    if kind == "show_tell":
        decoder = ShowTellDecoder(vocab_size=vocab_size, feature_dim=6, embed_dim=5, hidden_dim=7, dropout=0.0)
    else:
        decoder = ShowAttendTellDecoder(
            vocab_size=vocab_size, feature_dim=6, embed_dim=5, hidden_dim=7, attention_dim=4, dropout=0.0
        )
    return decoder.eval()


def _images(batch: int, seed: int) -> EncoderOutput:
    g = torch.Generator().manual_seed(seed)
    grid = torch.randn(batch, 4, 6, generator=g)  # (B, L, D)
    return EncoderOutput(grid=grid, pooled=grid.mean(1))


decoding_cases = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["show_tell", "show_attend_tell"]),
        "vocab_size": st.integers(5, 9),
        "batch": st.integers(1, 3),
        "beam_size": st.integers(1, 4),
        "max_len": st.integers(1, 7),
        "length_alpha": st.sampled_from([0.0, 0.7]),
        "seed": st.integers(0, 2**16),
    }
)


def _trim(row: torch.Tensor) -> list[int]:
    ids = row.tolist()
    while ids and ids[-1] == PAD:
        ids.pop()
    return ids


@FAST
@given(decoding_cases)
def test_beam_search_invariants(case):
    decoder = _decoder(case["kind"], case["vocab_size"], case["seed"])
    enc = _images(case["batch"], case["seed"])
    special = {"bos": BOS, "eos": EOS, "pad": PAD}
    out = beam_search(
        decoder,
        enc,
        **special,
        beam_size=case["beam_size"],
        max_len=case["max_len"],
        length_alpha=case["length_alpha"],
    )
    b, k = case["batch"], case["beam_size"]
    assert out.tokens.shape[:2] == (b, k) and out.tokens.shape[2] <= case["max_len"]
    assert out.scores.shape == (b, k)
    # Best first: scores never increase along the beam.
    assert torch.all(out.scores[:, 1:] <= out.scores[:, :-1] + 1e-5)
    for row in out.tokens.flatten(0, 1):
        ids = _trim(row)
        assert len(ids) <= case["max_len"]
        assert BOS not in ids and PAD not in ids  # nothing but <pad> after a caption ends
        assert EOS not in ids[:-1]  # no token after <eos>
    # Batched equals one image at a time.
    for i in range(b):
        one = beam_search(
            decoder,
            EncoderOutput(grid=enc.grid[i : i + 1], pooled=enc.pooled[i : i + 1]),
            **special,
            beam_size=k,
            max_len=case["max_len"],
            length_alpha=case["length_alpha"],
        )
        assert [_trim(r) for r in one.tokens[0]] == [_trim(r) for r in out.tokens[i]]
        torch.testing.assert_close(one.scores[0], out.scores[i], atol=1e-5, rtol=1e-5)


@FAST
@given(decoding_cases)
def test_greedy_is_beam_one_and_stops_at_eos(case):
    decoder = _decoder(case["kind"], case["vocab_size"], case["seed"])
    enc = _images(case["batch"], case["seed"])
    g = greedy(decoder, enc, bos=BOS, eos=EOS, pad=PAD, max_len=case["max_len"])
    b1 = beam_search(decoder, enc, bos=BOS, eos=EOS, pad=PAD, beam_size=1, max_len=case["max_len"])
    assert g.tokens.shape[:2] == (case["batch"], 1)
    assert [_trim(r) for r in g.tokens[:, 0]] == [_trim(r) for r in b1.tokens[:, 0]]
    for row in g.tokens[:, 0]:
        ids = _trim(row)
        assert len(ids) <= case["max_len"] and EOS not in ids[:-1]
