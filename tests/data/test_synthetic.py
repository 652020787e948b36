"""The synthetic shapes world: deterministic, true captions, faithful pixels, clear errors."""

from __future__ import annotations

import pickle
import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from capattn.data import synthetic
from capattn.data.records import CaptionRecord
from capattn.data.synthetic import (
    COLOURS,
    Scene,
    Shape,
    ShapesReader,
    cell_box,
    describe,
    make_scene,
    render,
    shape_pixels,
)
from capattn.errors import DataError

# The grammar, written again here so that the captions are checked against the world's rules,
# not against the code that wrote them.
NP = r"(?:(small|large) )?(red|green|blue|yellow|white) (circle|square|triangle)"
REL = r"(left of|right of|above|below)"
PLACES = {
    "in the top left corner": (0, 0),
    "at the top": (0, 1),
    "in the top right corner": (0, 2),
    "on the left": (1, 0),
    "in the centre": (1, 1),
    "on the right": (1, 2),
    "in the bottom left corner": (2, 0),
    "at the bottom": (2, 1),
    "in the bottom right corner": (2, 2),
}
PLACE = "(" + "|".join(PLACES) + ")"
NUMBER = {"one": 1, "two": 2, "three": 3}
KIND_ITEM = r"(?:a|one|two|three) (?:circle|square|triangle)s?"


def _find(scene: Scene, size: str | None, colour: str, kind: str):
    """The shape a noun phrase names; fails when the scene has none (or the size is wrong)."""
    matches = [s for s in scene.shapes if (s.colour, s.kind) == (colour, kind)]
    assert len(matches) == 1, f"no {colour} {kind} in {scene}"
    assert size in (None, matches[0].size), f"{matches[0]} is not {size}"
    return matches[0]


def _holds(a: Shape, relation: str, b: Shape) -> bool:
    return {
        "left of": a.col < b.col,
        "right of": a.col > b.col,
        "above": a.row < b.row,
        "below": a.row > b.row,
    }[relation]


def check_caption(caption: str, scene: Scene) -> str:
    """Parses a caption with the grammar and checks every claim against the scene.

    Returns:
        the name of the form that parsed it.
    """
    n = len(scene.shapes)
    if m := re.fullmatch(r"(?:there are )?(one|two|three) (?:(small|large) )?shapes?", caption):
        assert NUMBER[m[1]] == n
        assert m[2] is None or all(s.size == m[2] for s in scene.shapes)
        return "count"
    if m := re.fullmatch(rf"(?:a|the) {NP} (?:is )?{REL} (?:a|the) {NP}", caption):
        a, b = _find(scene, *m.groups()[:3]), _find(scene, *m.groups()[4:])
        assert _holds(a, m[4], b), f"{a} is not {m[4]} {b}"
        return "relation"
    if m := re.fullmatch(rf"(one|two|three) shapes with a {NP} {REL} a {NP}", caption):
        assert NUMBER[m[1]] == n
        a, b = _find(scene, *m.groups()[1:4]), _find(scene, *m.groups()[5:])
        assert _holds(a, m[5], b), f"{a} is not {m[5]} {b}"
        return "count_relation"
    if m := re.fullmatch(rf"a (?:single )?{NP}", caption):
        _find(scene, *m.groups())
        assert "single" not in caption or n == 1
        return "bare"
    placed = re.fullmatch(rf"(?:there is (?:a|one) |a ){NP} {PLACE}", caption)
    fronted = re.fullmatch(rf"{PLACE} there is a {NP}", caption)
    if placed or fronted:
        size, colour, kind, place = placed.groups() if placed else (*fronted.groups()[1:], fronted[1])
        shape = _find(scene, size, colour, kind)
        assert shape.cell == PLACES[place], f"{shape} is not {place}"
        assert not caption.startswith("there is one") or n == 1
        return "position"
    if m := re.fullmatch(rf"a {NP} {PLACE} and a {NP} {PLACE}", caption):
        for offset in (0, 4):
            shape = _find(scene, *m.groups()[offset : offset + 3])
            assert shape.cell == PLACES[m[offset + 4]]
        return "positions"
    if re.fullmatch(rf"{KIND_ITEM}(?: {KIND_ITEM})*(?: and {KIND_ITEM})?", caption):
        counts = Counter()
        for number, kind in re.findall(r"(a|one|two|three) (circle|square|triangle)", caption):
            counts[kind] += NUMBER.get(number, 1)
        assert counts == Counter(s.kind for s in scene.shapes)
        return "kinds"
    if re.fullmatch(rf"a {NP}(?: a {NP})*(?: and a {NP})?", caption):
        named = [_find(scene, size or None, colour, kind) for size, colour, kind in re.findall(NP, caption)]
        assert sorted(named, key=lambda s: s.cell) == list(scene.shapes), "a list names every shape"
        sizes = [found[0] for found in re.findall(NP, caption)]
        assert all(sizes) or not any(sizes), "sizes for all shapes or for none"
        return "list"
    raise AssertionError(f"caption outside the grammar: {caption!r}")


@pytest.fixture(scope="module")
def reader() -> ShapesReader:
    return ShapesReader(num_train=300, num_val=40, num_test=30, seed=0)


@pytest.fixture(scope="module")
def records(reader: ShapesReader) -> list[CaptionRecord]:
    return reader.read()


def test_splits_have_the_requested_sizes_and_disjoint_ids(records: list[CaptionRecord]) -> None:
    sizes = Counter(record.split for record in records)
    assert sizes == {"train": 300, "val": 40, "test": 30}
    assert len({record.image_id for record in records}) == len(records)
    assert records[42].image_id == "shapes-train-00042"
    assert all(record.image_path is None for record in records)


def test_same_seed_same_records_and_bytes_other_seed_differs(reader, records) -> None:
    again = ShapesReader(num_train=300, num_val=40, num_test=30, seed=0)
    assert again.read() == records
    for record in records[:5] + records[-3:]:
        assert reader.load_image(record).tobytes() == again.load_image(record).tobytes()
    other = ShapesReader(num_train=300, num_val=40, num_test=30, seed=1).read()
    assert [r.captions for r in other] != [r.captions for r in records]
    other_reader = ShapesReader(num_train=300, num_val=40, num_test=30, seed=1)
    assert other_reader.load_image(other[0]).tobytes() != reader.load_image(records[0]).tobytes()


def test_a_record_depends_only_on_seed_split_and_index(records) -> None:
    fresh = ShapesReader(num_train=20, num_val=5, num_test=5, seed=0)  # fewer records, never read()
    record = fresh.record("train", 7)
    assert record == records[7]
    # In any order, in a fresh reader (as in a DataLoader worker), the same bytes.
    later = fresh.load_image(fresh.record("train", 9)).tobytes()
    assert fresh.load_image(record).tobytes() == ShapesReader(seed=0).load_image(records[7]).tobytes()
    assert later == ShapesReader(seed=0).load_image(records[9]).tobytes()


def test_reader_survives_pickling_into_a_worker(reader, records) -> None:
    worker = pickle.loads(pickle.dumps(reader))
    assert worker.load_image(records[3]).tobytes() == reader.load_image(records[3]).tobytes()


def test_rendered_images_are_kept_within_a_budget(records, monkeypatch) -> None:
    """A training image is read once per caption and epoch: the reader keeps its pixels and gives
    the same bytes from them, never more than RENDERED_BYTES of them, and sends none to a worker."""
    reader = ShapesReader(num_train=300, num_val=40, num_test=30, seed=0)
    first = [reader.load_image(record).tobytes() for record in records[:20]]
    assert [reader.load_image(record).tobytes() for record in records[:20]] == first
    assert len(reader._rendered) == 20
    assert pickle.loads(pickle.dumps(reader))._rendered == {}
    monkeypatch.setattr(synthetic, "RENDERED_BYTES", 3 * 48 * 48 * 3)  # room for three images
    small = ShapesReader(num_train=300, num_val=40, num_test=30, seed=0)
    assert [small.load_image(record).tobytes() for record in records[:20] * 2] == first * 2
    assert len(small._rendered) == 3


def test_five_distinct_non_empty_captions_each(records) -> None:
    for record in records:
        assert len(record.captions) == 5
        assert len(set(record.captions)) == 5
        assert all(caption and caption == caption.strip().lower() for caption in record.captions)


def test_every_caption_parses_and_is_true_of_its_scene(reader, records) -> None:
    forms = Counter()
    for record in records:
        scene = reader.scene(record)
        for caption in record.captions:
            forms[check_caption(caption, scene)] += 1
    # Every form of the grammar occurs, relations among the most common.
    assert set(forms) == {"relation", "count_relation", "bare", "position", "positions", "kinds", "list"}
    assert forms["relation"] + forms["count_relation"] > len(records) // 2


def test_captions_of_a_hand_made_scene() -> None:
    scene = Scene((Shape("circle", "red", "small", 0, 0), Shape("square", "blue", "large", 2, 2)))
    captions = describe(scene, np.random.default_rng(0), n=12)
    assert len(set(captions)) == 12
    for caption in captions:
        check_caption(caption, scene)
    lonely = Scene((Shape("triangle", "white", "large", 1, 1),))
    assert all(check_caption(caption, lonely) for caption in describe(lonely, np.random.default_rng(3)))
    with pytest.raises(ValueError, match="only"):
        describe(lonely, np.random.default_rng(0), n=50)


def test_counts_one_two_and_three_all_occur(reader, records) -> None:
    counts = Counter(len(reader.scene(record)) for record in records)
    assert set(counts) == {1, 2, 3}
    assert min(counts.values()) > len(records) // 10


def test_vocabulary_is_small(records) -> None:
    words = {word for record in records for caption in record.captions for word in caption.split()}
    assert {"red", "circle", "left", "above", "three", "corner"} <= words
    assert len(words) <= 45


@pytest.mark.parametrize("image_size", [24, 48, 96])
def test_each_shape_is_drawn_in_its_own_colour_in_its_own_cell(image_size: int) -> None:
    reader = ShapesReader(num_train=25, num_val=1, num_test=1, image_size=image_size, seed=3)
    sides = shape_pixels(image_size)
    for record in reader.read()[:25]:
        image = reader.load_image(record)
        assert image.size == (image_size, image_size)
        assert image.mode == "RGB"
        pixels = np.asarray(image)
        scene = reader.scene(record)
        for row in range(3):
            for col in range(3):
                top, left, bottom, right = cell_box(row, col, image_size)
                block = pixels[top:bottom, left:right].astype(float)
                bright = block.max(axis=2) > 120  # the background stays dark
                shape = scene.at(row, col)
                if shape is None:
                    assert not bright.any(), f"something drawn in empty cell {row, col} of {record.image_id}"
                    continue
                # A pixel of background all round: the shape stays inside its cell.
                border = np.concatenate([bright[0], bright[-1], bright[:, 0], bright[:, -1]])
                assert not border.any(), f"{shape} touches its cell's border in {record.image_id}"
                mean = block[bright].mean(axis=0)
                assert np.abs(mean - COLOURS[shape.colour]).max() < 20, (shape, mean)
                ys, xs = np.nonzero(bright)
                height, width = np.ptp(ys) + 1, np.ptp(xs) + 1
                assert max(height, width) == sides[shape.size]
                fill = bright.sum() / (height * width)
                expected = {"square": (0.95, 1.0), "circle": (0.7, 0.9), "triangle": (0.45, 0.7)}[shape.kind]
                assert expected[0] <= fill <= expected[1], (shape, fill)


def test_large_shapes_are_larger_and_the_grid_fits() -> None:
    for image_size in (24, 48, 99):
        sides = shape_pixels(image_size)
        assert 3 <= sides["small"] < sides["large"] <= image_size // 3 - 2


def test_render_and_make_scene_are_deterministic() -> None:
    scene = make_scene(np.random.default_rng(11))
    assert scene == make_scene(np.random.default_rng(11))
    first = render(scene, 48, np.random.default_rng(5)).tobytes()
    assert first == render(scene, 48, np.random.default_rng(5)).tobytes()
    assert first != render(scene, 48, np.random.default_rng(6)).tobytes()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_train": 0},
        {"num_val": -1},
        {"num_test": 2.5},
        {"image_size": 21},
        {"image_size": 50},
        {"image_size": 48.0},
        {"seed": -1},
    ],
)
def test_bad_arguments_raise_value_error(kwargs) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ShapesReader(**kwargs)


@pytest.mark.parametrize(
    "shape",
    [
        ("hexagon", "red", "small", 0, 0),
        ("circle", "pink", "small", 0, 0),
        ("circle", "red", "huge", 0, 0),
        ("circle", "red", "small", 3, 0),
        ("circle", "red", "small", 0, -1),
    ],
)
def test_shapes_outside_the_world_raise_value_error(shape) -> None:
    with pytest.raises(ValueError, match="shape"):
        Shape(*shape)


def test_invalid_scenes_raise_value_error() -> None:
    red_circle = Shape("circle", "red", "small", 0, 0)
    with pytest.raises(ValueError, match="cell"):
        Scene((red_circle, Shape("square", "blue", "small", 0, 0)))
    with pytest.raises(ValueError, match="colour and kind"):
        Scene((red_circle, Shape("circle", "red", "large", 1, 1)))
    with pytest.raises(ValueError, match="1 to 3"):
        Scene(())


def test_foreign_records_raise_data_error(reader, records) -> None:
    foreign = [
        CaptionRecord(image_id="COCO_val2014_000000042", image_path=None, captions=("a cat",), split="val"),
        replace(records[0], split="val"),  # id says train
        CaptionRecord(image_id="shapes-val-00040", image_path=None, captions=(), split="val"),  # only 40 val images
        ShapesReader(num_train=300, num_val=40, num_test=30, seed=1).record("train", 0),  # another seed
    ]
    for record in foreign:
        with pytest.raises(DataError, match=record.image_id):
            reader.load_image(record)
    # A record keeping only some of its references still belongs to the reader.
    fewer = replace(records[0], captions=records[0].captions[:2])
    assert reader.load_image(fewer).tobytes() == reader.load_image(records[0]).tobytes()
