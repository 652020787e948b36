"""The built-in dataset: a deterministic world of coloured shapes on a 3×3 grid, captioned by a small grammar.

Every image shows one to three shapes (circle, square or triangle; red, green, blue, yellow or
white; small or large), each in its own cell of a 3×3 grid with a little jitter inside the cell,
on a dark, noisy background. Every image gets five different captions, drawn from templates that
vary in detail the way human references do: kinds ("two circles and a square"), a list of
coloured shapes ("a red circle and a blue square"), a spatial relation
("a small red circle left of a large blue square", "the red circle is above the blue square"),
or a position on the grid ("there is one small yellow square in the top left corner"). Every
relation and position is true of the scene: "left of" means a smaller column, "above" a smaller
row. The vocabulary has about forty words.

Why attention has something to win here: with two or three shapes, a caption is only right when
each colour is bound to the shape that carries it and when the model knows which of two shapes
sits left of or above the other. Both facts live at specific grid cells; a single pooled image
vector (Show and Tell) mixes the cells together, while soft attention (Show, Attend and Tell)
can look at the cell of the shape it is naming.

Everything is a pure function of ``(seed, split, index)``: the scene, the captions and the
pixels of record ``index`` of ``split`` come from their own ``numpy.random.SeedSequence``, so any
record can be rendered alone in a DataLoader worker and the same seed always gives the same bytes.
No files are read or written.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image

from capattn.data.readers.base import CaptionReader
from capattn.data.records import CaptionRecord
from capattn.errors import DataError

__all__ = [
    "COLOURS",
    "GRID",
    "KINDS",
    "POSITIONS",
    "SIZES",
    "SPLITS",
    "Scene",
    "Shape",
    "ShapesReader",
    "cell_box",
    "describe",
    "make_scene",
    "render",
    "shape_pixels",
]

GRID = 3  # the world is a GRID × GRID board; each shape has a cell of its own
KINDS = ("circle", "square", "triangle")
SIZES = ("small", "large")
# Every colour has a channel ≥ 200 while the background stays ≤ 80, and any two colours differ by
# ≥ 150 in some channel, so colours stay distinguishable on the noise. Channels stay in [25, 230]
# so that colour + noise - 25 never leaves [0, 255].
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 40, 40),
    "green": (40, 200, 60),
    "blue": (60, 110, 230),
    "yellow": (230, 215, 40),
    "white": (225, 225, 225),
}
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "in the top left corner",
    (0, 1): "at the top",
    (0, 2): "in the top right corner",
    (1, 0): "on the left",
    (1, 1): "in the centre",
    (1, 2): "on the right",
    (2, 0): "in the bottom left corner",
    (2, 1): "at the bottom",
    (2, 2): "in the bottom right corner",
}
SPLITS = ("train", "val", "test")
MIN_IMAGE_SIZE = 24

_NUMBERS = {1: "one", 2: "two", 3: "three"}
_COUNT_CUMULATIVE = (0.2, 0.6)  # P(1, 2, 3 shapes) = 0.2, 0.4, 0.4: most scenes have a relation to describe
_BACKGROUND_NOISE = 51  # per-pixel, per-channel noise in [0, 51), shared by background and shapes
_BACKGROUND_LEVEL = (5, 30)  # per-image base brightness of the background, [low, high)
_STREAM_SCENE, _STREAM_PIXELS = 0, 1  # scene then captions from one generator; pixels from another
_SHADES = {name: np.asarray(rgb, dtype=np.uint8) - np.uint8(_BACKGROUND_NOISE // 2) for name, rgb in COLOURS.items()}
_IMAGE_ID = re.compile(r"shapes-(?P<split>[a-z]+)-(?P<index>\d+)")
# Rendered images a reader keeps, in bytes (each DataLoader worker keeps its own). The demo's 3,000
# images of 48 × 48 take 21 MB, and a training image is read 5 times an epoch (once per caption):
# rendering took 0.15 ms an image, 10 of a demo batch's 21 ms of data time.
RENDERED_BYTES = 64 << 20


@dataclass(frozen=True)
class Shape:
    """One shape of a scene.

    Args:
        kind: one of ``KINDS`` (``"circle"``, ``"square"``, ``"triangle"``).
        colour: one of ``COLOURS`` (``"red"``, ``"green"``, ``"blue"``, ``"yellow"``, ``"white"``).
        size: one of ``SIZES`` (``"small"``, ``"large"``).
        row: grid row, 0 (top) to 2 (bottom).
        col: grid column, 0 (left) to 2 (right).

    Raises:
        ValueError: a field is outside the world's vocabulary or grid.
    """

    kind: str
    colour: str
    size: str
    row: int
    col: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"shape kind must be one of {KINDS}, got {self.kind!r}")
        if self.colour not in COLOURS:
            raise ValueError(f"shape colour must be one of {tuple(COLOURS)}, got {self.colour!r}")
        if self.size not in SIZES:
            raise ValueError(f"shape size must be one of {SIZES}, got {self.size!r}")
        for name, value in (("row", self.row), ("col", self.col)):
            if not isinstance(value, int) or not 0 <= value < GRID:
                raise ValueError(f"shape {name} must be an integer in [0, {GRID}), got {value!r}")

    @property
    def cell(self) -> tuple[int, int]:
        """The shape's grid cell as ``(row, col)``."""
        return (self.row, self.col)

    @property
    def position(self) -> str:
        """The caption phrase for the shape's cell, e.g. ``"in the top left corner"``."""
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Scene:
    """What one image shows: 1–3 shapes in distinct cells, no two of the same colour and kind.

    Distinct colour-and-kind pairs make every noun phrase ("the red circle") name one shape, so
    every caption has one meaning.

    Args:
        shapes: the shapes, conventionally in reading order (by row, then column).

    Raises:
        ValueError: no shapes, more than 3, two in one cell, or two of the same colour and kind.
    """

    shapes: tuple[Shape, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.shapes) <= 3:
            raise ValueError(f"a scene has 1 to 3 shapes, got {len(self.shapes)}")
        cells = [shape.cell for shape in self.shapes]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two shapes share a grid cell: {cells}")
        names = [(shape.colour, shape.kind) for shape in self.shapes]
        if len(set(names)) != len(names):
            raise ValueError(f"two shapes have the same colour and kind: {names}")

    def __len__(self) -> int:
        return len(self.shapes)

    def at(self, row: int, col: int) -> Shape | None:
        """Returns the shape in cell ``(row, col)``, or None when the cell is empty."""
        return next((shape for shape in self.shapes if shape.cell == (row, col)), None)


def make_scene(rng: np.random.Generator) -> Scene:
    """Draws a random scene.

    Args:
        rng: the generator to draw from; the scene depends on nothing else.

    Returns:
        A scene with 1 (20 %), 2 (40 %) or 3 (40 %) shapes in reading order.
    """
    # One draw for everything: the count, then random keys whose argsort gives the cells and the
    # (colour, kind) pairs without repeats, then the sizes.
    draw = rng.random(1 + GRID * GRID + len(COLOURS) * len(KINDS) + 3)
    n = 1 + int(np.searchsorted(_COUNT_CUMULATIVE, draw[0], side="right"))
    cells = np.argsort(draw[1 : 1 + GRID * GRID])[:n]
    looks = np.argsort(draw[1 + GRID * GRID : -3])[:n]  # distinct (colour, kind) pairs
    sizes = (draw[-3:][:n] * len(SIZES)).astype(int)
    colours = tuple(COLOURS)
    shapes = [
        Shape(
            kind=KINDS[look % len(KINDS)],
            colour=colours[look // len(KINDS)],
            size=SIZES[size],
            row=cell // GRID,
            col=cell % GRID,
        )
        for cell, look, size in zip(cells.tolist(), looks.tolist(), sizes.tolist(), strict=True)
    ]
    return Scene(tuple(sorted(shapes, key=lambda shape: shape.cell)))


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool):
        raise ValueError(f"image_size must be an integer, got {image_size!r}")
    if image_size < MIN_IMAGE_SIZE or image_size % GRID:
        raise ValueError(
            f"image_size must be at least {MIN_IMAGE_SIZE} and divisible by {GRID} (one cell per grid square), "
            f"got {image_size} — try 48"
        )


def shape_pixels(image_size: int) -> dict[str, int]:
    """Returns the side in pixels of a small and of a large shape at this image size.

    Args:
        image_size: the image's side in pixels (≥ 24, divisible by 3).

    Returns:
        ``{"small": s, "large": l}``; at 48 pixels (16-pixel cells) that is 7 and 12.
    """
    _check_image_size(image_size)
    cell = image_size // GRID
    small = max(3, round(cell * 0.45))
    large = min(cell - 2, max(small + 2, round(cell * 0.75)))  # ≥ 1 pixel of margin each side
    return {"small": small, "large": large}


def cell_box(row: int, col: int, image_size: int) -> tuple[int, int, int, int]:
    """Returns the pixel box ``(top, left, bottom, right)`` of a grid cell, bottom/right exclusive.

    A shape never leaves its cell's box, so figures can outline it or compare it with attention.
    """
    _check_image_size(image_size)
    cell = image_size // GRID
    return (row * cell, col * cell, (row + 1) * cell, (col + 1) * cell)


@functools.cache
def _mask(kind: str, side: int) -> np.ndarray:
    y, x = np.mgrid[0:side, 0:side] + 0.5  # pixel centres
    if kind == "square":
        mask = np.ones((side, side), dtype=bool)
    elif kind == "circle":
        mask = (x - side / 2) ** 2 + (y - side / 2) ** 2 <= (side / 2) ** 2
    else:  # apex up, base on the bottom row: half the square's area, so it never looks like one
        mask = np.abs(x - side / 2) <= (y - 0.5) / (side - 1) * side / 2
    mask = mask[:, :, None]  # (side, side, 1): broadcasts over RGB
    mask.setflags(write=False)
    return mask


def render(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draws a scene.

    The background is dark per-pixel noise; each shape is filled with its colour plus the same
    kind of noise, jittered inside its cell by the generator, and never crosses its cell's border.

    Args:
        scene: what to draw.
        image_size: side of the square image in pixels (≥ 24, divisible by 3).
        rng: the generator for noise and jitter; the same state gives the same bytes.

    Returns:
        An RGB image of ``image_size`` × ``image_size`` pixels.
    """
    sides = shape_pixels(image_size)
    cell = image_size // GRID
    noise = rng.integers(0, _BACKGROUND_NOISE, size=(image_size, image_size, 3), dtype=np.uint8)
    image = noise + np.uint8(rng.integers(*_BACKGROUND_LEVEL))  # ≤ 80: no uint8 overflow
    for shape in scene.shapes:
        side = sides[shape.size]
        # Offsets in [1, cell - side - 1] keep a pixel of background between the shape and its cell's border.
        dy, dx = rng.integers(1, cell - side, size=2).tolist()
        top, left = shape.row * cell + dy, shape.col * cell + dx
        box = np.s_[top : top + side, left : left + side]
        # The shape's pixels are its colour plus the noise already drawn there, re-centred on zero.
        np.copyto(image[box], noise[box] + _SHADES[shape.colour], where=_mask(shape.kind, side))
    return Image.frombytes("RGB", (image_size, image_size), image.tobytes())


def _relations(a: Shape, b: Shape) -> list[str]:
    """The relation words true of ``a`` with respect to ``b``."""
    words = []
    if a.col != b.col:
        words.append("left of" if a.col < b.col else "right of")
    if a.row != b.row:
        words.append("above" if a.row < b.row else "below")
    return words


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else " ".join(parts[:-1]) + " and " + parts[-1]


def _kind_counts(scene: Scene, article: str) -> str:
    counts = Counter(shape.kind for shape in scene.shapes)
    kinds = sorted(counts, key=lambda kind: (-counts[kind], KINDS.index(kind)))
    return _join([f"{article} {kind}" if counts[kind] == 1 else f"{_NUMBERS[counts[kind]]} {kind}s" for kind in kinds])


def _templates(scene: Scene) -> dict[str, list[str]]:
    """Every caption each template can say of the scene; all of them are true."""
    shapes = scene.shapes
    # Noun phrases with and without the size ("small red circle", "red circle"); a caption uses
    # sizes for all of its shapes or for none.
    phrases = [(f"{shape.size} {shape.colour} {shape.kind}", f"{shape.colour} {shape.kind}") for shape in shapes]
    places = [shape.position for shape in shapes]
    if len(shapes) == 1:
        place = places[0]
        return {
            "bare": [f"a {phrase}" for phrase in phrases[0]],
            "single": [f"a single {phrase}" for phrase in phrases[0]],
            "position": [f"a {phrase} {place}" for phrase in phrases[0]],
            "there_is": [f"there is one {phrase} {place}" for phrase in phrases[0]],
            "fronted": [f"{place} there is a {phrase}" for phrase in phrases[0]],
        }
    number = _NUMBERS[len(shapes)]
    pairs = list(itertools.permutations(range(len(shapes)), 2))
    # (a, relation, b) with a, b phrased alike: "small red circle", "left of", "large blue square".
    triples = [
        (phrases[a][sized], relation, phrases[b][sized])
        for a, b in pairs
        for relation in _relations(shapes[a], shapes[b])
        for sized in (0, 1)
    ]
    # No count-only caption ("three shapes"): true of a third of all images, it would let a model
    # that never looks score well on BLEU, and beam search favours such short captions.
    return {
        "kinds": list(dict.fromkeys(_kind_counts(scene, article) for article in ("a", "one"))),
        "list": [
            _join([f"a {phrases[index][sized]}" for index in order])
            for order in itertools.permutations(range(len(shapes)))
            for sized in (0, 1)
        ],
        "relation": [f"a {a} {relation} a {b}" for a, relation, b in triples],
        "the_relation": [f"the {a} is {relation} the {b}" for a, relation, b in triples],
        "count_relation": [f"{number} shapes with a {a} {relation} a {b}" for a, relation, b in triples],
        # One template for all position wordings, so that no image gets the same claim twice
        # ("there is a red circle on the left", "on the left there is a red circle").
        "position": [f"there is a {phrase} {places[i]}" for i in range(len(shapes)) for phrase in phrases[i]]
        + [f"{places[i]} there is a {phrase}" for i in range(len(shapes)) for phrase in phrases[i]]
        + [f"a {phrases[a][s]} {places[a]} and a {phrases[b][s]} {places[b]}" for a, b in pairs for s in (0, 1)],
    }


def describe(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """Writes ``n`` different true captions of a scene.

    Templates are visited in a random order and each gives one caption before any gives a
    second, so the references of one image differ in form and detail (count, kinds, colours,
    sizes, relations, positions) the way human references do.

    Args:
        scene: the scene to describe.
        rng: the generator choosing templates and wordings.
        n: how many captions.

    Returns:
        ``n`` distinct lowercase captions without punctuation.

    Raises:
        ValueError: the grammar cannot say ``n`` different things about this scene.
    """
    pools = list(_templates(scene).values())
    keys = rng.random(sum(len(pool) for pool in pools)).tolist()
    starts = list(itertools.accumulate((len(pool) for pool in pools), initial=0))
    # Sorting each pool by its own random keys shuffles all of them with one draw from the generator.
    pools = [
        [caption for _, caption in sorted(zip(keys[start:], pool, strict=False))]
        for start, pool in zip(starts, pools, strict=False)
    ]
    order = rng.permutation(len(pools)).tolist()
    captions: dict[str, None] = {}  # insertion-ordered set
    while len(captions) < n and any(pools):
        for index in order:
            pool = pools[index]
            while pool:
                caption = pool.pop()
                if caption not in captions:
                    captions[caption] = None
                    break
            if len(captions) == n:
                break
    if len(captions) < n:
        raise ValueError(f"the shapes grammar has only {len(captions)} different captions for {scene}, asked for {n}")
    return list(captions)


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index, stream]))


class ShapesReader(CaptionReader):
    """The synthetic shapes dataset, generated from a seed: no files, same seed, same bytes.

    Record ``i`` of split ``s`` depends only on ``(seed, s, i)``: changing ``num_train`` adds or
    removes records at the end and leaves the others as they were.

    Args:
        num_train: number of training images.
        num_val: number of validation images.
        num_test: number of test images.
        image_size: side of the rendered images in pixels (≥ 24, divisible by 3).
        seed: the world's seed (a non-negative integer).

    Raises:
        ValueError: a count is not positive, the image size is unusable or the seed is negative.
    """

    def __init__(
        self, *, num_train: int = 4000, num_val: int = 250, num_test: int = 250, image_size: int = 48, seed: int = 0
    ) -> None:
        for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            _check_count(name, value)
        _check_image_size(image_size)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.image_size = image_size
        self.seed = seed
        self._captions: dict[str, tuple[str, ...]] = {}  # filled by read(); saves regenerating captions per image
        self._rendered: dict[tuple[str, int], bytes] = {}  # load_image's pixels, up to RENDERED_BYTES

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_rendered": {}}  # a worker renders its own: the cache is not sent to it

    def __repr__(self) -> str:
        counts = ", ".join(f"num_{split}={count}" for split, count in self.sizes.items())
        return f"{type(self).__name__}({counts}, image_size={self.image_size}, seed={self.seed})"

    @property
    def name(self) -> str:
        """``"shapes"``."""
        return "shapes"

    def settings(self) -> dict[str, int]:
        """The constructor's arguments: the split sizes, the image size and the seed."""
        counts = {f"num_{split}": count for split, count in self.sizes.items()}
        return {**counts, "image_size": self.image_size, "seed": self.seed}

    def record(self, split: str, index: int) -> CaptionRecord:
        """Returns record ``index`` of ``split`` without generating the others.

        Raises:
            ValueError: unknown split or index out of range.
        """
        if split not in self.sizes:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(index, int) or not 0 <= index < self.sizes[split]:
            raise ValueError(f"index must be in [0, {self.sizes[split]}) for split {split!r}, got {index!r}")
        rng = _rng(self.seed, split, index, _STREAM_SCENE)
        scene = make_scene(rng)
        captions = describe(scene, rng)  # drawn after the scene, so scene() can stop at the scene
        return CaptionRecord(
            image_id=f"shapes-{split}-{index:05d}", image_path=None, captions=tuple(captions), split=split
        )

    def read(self) -> list[CaptionRecord]:
        """Returns every record: train, then val, then test, each in index order."""
        records = [self.record(split, index) for split in SPLITS for index in range(self.sizes[split])]
        self._captions = {record.image_id: record.captions for record in records}
        return records

    def _locate(self, record: CaptionRecord) -> tuple[str, int]:
        match = _IMAGE_ID.fullmatch(record.image_id)
        if match is None or match["split"] not in self.sizes or match["split"] != record.split:
            raise DataError(
                f"record {record.image_id!r} (split {record.split!r}) is not a shapes record — "
                f"{self!r} only renders the records its read() returns"
            )
        split, index = match["split"], int(match["index"])
        if index >= self.sizes[split]:
            raise DataError(f"record {record.image_id!r} is beyond the {self.sizes[split]} {split} images of {self!r}")
        # A subset, not equality, so that a loader may keep fewer references than were written.
        own = self._captions.get(record.image_id) or self.record(split, index).captions
        if not set(record.captions) <= set(own):
            raise DataError(
                f"record {record.image_id!r} has captions that {self!r} did not write — "
                "it comes from a reader with another seed; build the images with the reader that read the records"
            )
        return split, index

    def scene(self, record: CaptionRecord) -> Scene:
        """Returns the scene a record shows (for tests and attention figures).

        Raises:
            DataError: the record was not made by this reader.
        """
        split, index = self._locate(record)
        return make_scene(_rng(self.seed, split, index, _STREAM_SCENE))

    def load_image(self, record: CaptionRecord) -> Image.Image:
        """Renders a record's image, and keeps its pixels for the next call (up to ``RENDERED_BYTES``);
        safe in DataLoader workers, identical bytes on every call.

        Raises:
            DataError: the record was not made by this reader.
        """
        key = self._locate(record)
        size = (self.image_size, self.image_size)
        pixels = self._rendered.get(key)
        if pixels is not None:
            return Image.frombytes("RGB", size, pixels)
        split, index = key
        scene = make_scene(_rng(self.seed, split, index, _STREAM_SCENE))
        image = render(scene, self.image_size, _rng(self.seed, split, index, _STREAM_PIXELS))
        if (len(self._rendered) + 1) * self.image_size**2 * 3 <= RENDERED_BYTES:
            self._rendered[key] = image.tobytes()
        return image
