"""Synthetic image and video tasks for the built-in benchmark, generated deterministically offline.

Why synthetic: nobody running the benchmark can download a checkpoint or a dataset, and a pruning
method is only worth measuring on inputs where the answer lives in a few image regions. Every
scene is a handful of coloured shapes on a textured grey background, so "which visual tokens
matter" has a ground truth (:meth:`ImageSample.object_patches`) and the questions can only be
answered by looking at those tokens.

Images are 224 px with 14 px patches (a 16x16 grid of 256 tokens). Objects sit on patch-aligned
cells (small = 2x2 patches, large = 3x3) with at least one empty patch between them. Video clips are
8 frames of 112 px, so four frames tile one 224 px image (:func:`mosaic`, the pixel-space version of
LLaVA-OneVision's 2x2 token pooling); objects move a few pixels per frame or stay still, and the
second of two objects may only appear later. Clips are written as real mp4 (PyAV) and read back with
decord, so a model sees what a video decoder delivers.

Determinism: sample ``i`` of a split is generated from ``numpy.random.Generator(PCG64(seed))`` with
``seed = SPLIT_SEEDS[split] + i`` and nothing else (no global RNG); videos use the same seed one
PCG64 jump further, so image ``i`` and video ``i`` of a split do not share random draws. Objects,
questions and captions are identical on every machine; pixels are identical on one machine, and
across CPUs at most a rare pixel may differ by one level (the texture uses float ``cos``, whose last
bit numpy's SIMD kernels do not promise).

Every question is a tuple of lower-case words ("?" is its own word) and every answer is one word from
the question's ``choices``, so multiple choice can be scored by comparing the logits of the answer
words and short answer by the first generated word. :data:`VOCAB` holds every word a question,
answer, caption or the caption prompt can contain.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES: tuple[str, ...] = ("small", "large")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four", "five")
YES_NO: tuple[str, ...] = ("yes", "no")
MOTIONS: tuple[str, ...] = DIRECTIONS + ("still",)

IMAGE_SIZE = 224
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 16
FRAME_SIZE = 112
FRAME_GRID = FRAME_SIZE // PATCH  # 8
NUM_FRAMES = 8
FPS = 8

SPLIT_SEEDS: dict[str, int] = {"train": 0, "val": 1_000_000, "test": 2_000_000}
IMAGE_QTYPES: tuple[str, ...] = ("color", "shape", "count", "size", "relation", "exist")
VIDEO_QTYPES: tuple[str, ...] = ("direction", "moving", "first", "count")

#: The question a caption answers (the model is prompted with it; the reference caption follows).
CAPTION_PROMPT: tuple[str, ...] = ("describe", "the", "video", "?")

#: Object side in pixels per size: 2x2 / 3x3 patches in images, half that in video frames.
IMAGE_SIZE_PX: dict[str, int] = {"small": 28, "large": 42}
FRAME_SIZE_PX: dict[str, int] = {"small": 14, "large": 21}

#: Saturated, mutually distinct colours; each object gets a small per-object jitter on top.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 215, 40),
    "purple": (145, 50, 195),
    "orange": (245, 135, 25),
}

_MAX_OBJECTS = 5
_MAX_QUESTIONS = 6
_VIDEO_SPEEDS = (2, 3)  # pixels per frame: 14-21 px over a clip, clearly visible, stays in frame
_VIDEO_GAP_PX = 14  # one patch between the regions two objects sweep over the clip
_DIR_VECTORS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0), "still": (0, 0)}

# Fixed grammar words (everything else comes from the attribute tuples above).
_TEMPLATE_WORDS = (
    "what color is the ? shape object how many objects are there or left of above a "
    "which way does move moves appears first stays still and then describe video an"
).split()

VOCAB: tuple[str, ...] = tuple(
    sorted(set(_TEMPLATE_WORDS) | set(SHAPES) | set(COLORS) | set(SIZES) | set(DIRECTIONS) | set(COUNT_WORDS) | set(YES_NO))
)


class VideoReadError(ValueError):
    """A video file is missing, empty or cannot be decoded; the message names the file."""


@dataclass(frozen=True)
class Obj:
    """One object. ``row``/``col``: top-left cell in patch units of its own canvas (the 16x16 image
    grid, or the 8x8 frame grid at the object's first visible frame for videos)."""

    shape: str
    color: str
    size: str
    row: int
    col: int


@dataclass(frozen=True)
class Question:
    """A question as words, its one-word answer, and the candidate answers for multiple choice."""

    qtype: str
    words: tuple[str, ...]
    answer: str
    choices: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.words)


@dataclass
class ImageSample:
    uid: str
    image: np.ndarray  # (224, 224, 3) uint8
    objects: tuple[Obj, ...]
    questions: tuple[Question, ...]

    def object_patches(self) -> np.ndarray:
        """(GRID, GRID) bool: patches holding at least one object pixel; the ground truth for
        "does the [CLS] attention land on the objects"."""
        counts = _patch_counts([(o, o.row * PATCH, o.col * PATCH, IMAGE_SIZE_PX[o.size]) for o in self.objects], IMAGE_SIZE)
        return counts.max(axis=0) > 0 if len(counts) else np.zeros((GRID, GRID), bool)

    def patch_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """(GRID, GRID) int64 shape ids (0 = background, 1..4 in SHAPES order) and colour ids
        (0 = background, 1..6 in COLORS order) of the object with the most pixels in each patch:
        targets for dense per-patch heads when pre-training the vision tower."""
        placed = [(o, o.row * PATCH, o.col * PATCH, IMAGE_SIZE_PX[o.size]) for o in self.objects]
        return _labels_from_counts(self.objects, _patch_counts(placed, IMAGE_SIZE), GRID)


@dataclass
class VideoSample:
    uid: str
    frames: np.ndarray  # (8, 112, 112, 3) uint8
    objects: tuple[Obj, ...]  # positions at each object's first visible frame
    motions: tuple[str, ...]  # "left" / "right" / "up" / "down" / "still" per object
    appear: tuple[int, ...]  # first frame in which each object is visible
    questions: tuple[Question, ...]
    caption: str
    path: str | None = None  # the mp4 once written
    speeds: tuple[int, ...] = ()  # pixels per frame per object (0 for still objects)

    def positions(self) -> np.ndarray:
        """(NUM_FRAMES, n_objects, 2) int pixel (y, x) of each object's top-left corner per frame
        (extrapolated before it appears; use ``appear`` to know when it is visible)."""
        return _track(self.objects, self.motions, self.speeds, self.appear, len(self.frames))

    def frame_patch_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """Shape ids and colour ids, each (T, 8, 8) int64, per frame on its 8x8 patch grid (same
        id convention as :meth:`ImageSample.patch_labels`; objects not yet visible are absent)."""
        pos = self.positions()
        t_count = len(self.frames)
        shapes = np.zeros((t_count, FRAME_GRID, FRAME_GRID), np.int64)
        colors = np.zeros_like(shapes)
        for t in range(t_count):
            visible = [i for i in range(len(self.objects)) if t >= self.appear[i]]
            placed = [(self.objects[i], pos[t, i, 0], pos[t, i, 1], FRAME_SIZE_PX[self.objects[i].size]) for i in visible]
            s, c = _labels_from_counts([self.objects[i] for i in visible], _patch_counts(placed, FRAME_SIZE), FRAME_GRID)
            shapes[t], colors[t] = s, c
        return shapes, colors


# --------------------------------------------------------------------------------------------------
# Rendering


@functools.cache
def shape_mask(shape: str, px: int) -> np.ndarray:
    """(px, px) bool mask of a shape drawn in a px-sized cell (read-only, cached): a disc, a slightly
    inset square, an upward triangle, or a plus sign with bars a third of the cell wide."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    m = max(1, round(px * 0.07))  # inset so neighbouring shapes never touch the cell border
    y, x = np.mgrid[0:px, 0:px].astype(np.float64) + 0.5  # pixel centres
    c = px / 2
    inner = (y >= m) & (y <= px - m) & (x >= m) & (x <= px - m)
    if shape == "circle":
        mask = (y - c) ** 2 + (x - c) ** 2 <= (c - m + 0.25) ** 2
    elif shape == "square":
        mask = inner
    elif shape == "triangle":
        height = px - 2 * m
        half = (px - 2 * m) / 2
        mask = inner & (np.abs(x - c) <= (y + 0.5 - m) / height * half)  # apex row: 1-2 px wide
    else:  # cross
        # bar width closest to px / 3 with the parity of px, so the bars sit exactly in the middle
        w = min((v for v in range(1, px + 1) if (px - v) % 2 == 0), key=lambda v: abs(v - px / 3))
        lo = (px - w) // 2
        band_x = (x > lo) & (x < lo + w)
        band_y = (y > lo) & (y < lo + w)
        mask = inner & (band_x | band_y)
    mask = np.ascontiguousarray(mask)
    mask.setflags(write=False)
    return mask


def _patch_counts(placed: list[tuple[Obj, int, int, int]], canvas: int) -> np.ndarray:
    """(n, g, g) object-pixel counts per patch for objects placed at pixel (y, x) with side px."""
    g = canvas // PATCH
    out = np.zeros((len(placed), g, g), np.int64)
    for k, (obj, y, x, px) in enumerate(placed):
        full = np.zeros((canvas, canvas), np.int64)
        mask = shape_mask(obj.shape, px)
        y0, x0 = max(0, y), max(0, x)
        y1, x1 = min(canvas, y + px), min(canvas, x + px)
        full[y0:y1, x0:x1] = mask[y0 - y : y1 - y, x0 - x : x1 - x]
        out[k] = full.reshape(g, PATCH, g, PATCH).sum(axis=(1, 3))
    return out


def _labels_from_counts(objects: tuple[Obj, ...] | list[Obj], counts: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray]:
    shapes = np.zeros((g, g), np.int64)
    colors = np.zeros((g, g), np.int64)
    if len(objects) == 0:
        return shapes, colors
    shape_ids = np.array([SHAPES.index(o.shape) + 1 for o in objects])
    color_ids = np.array([COLORS.index(o.color) + 1 for o in objects])
    dominant = counts.argmax(axis=0)
    present = counts.max(axis=0) > 0
    shapes[present] = shape_ids[dominant[present]]
    colors[present] = color_ids[dominant[present]]
    return shapes, colors


def _background(rng: np.random.Generator, size: int, specks: tuple[int, int]) -> np.ndarray:
    """(size, size, 3) float32: tinted grey with a faint low-frequency texture and a few small
    low-contrast grey specks, so the background is not trivially flat but holds no objects."""
    base = rng.uniform(110.0, 150.0)
    tint = rng.uniform(-12.0, 12.0, 3)
    u = np.arange(size, dtype=np.float32) * np.float32(2 * np.pi / size)
    tex = np.zeros((size, size), np.float32)
    for _ in range(3):  # cos(2pi(fy*y + fx*x) + phase) as separable outer products (fast)
        fy, fx = rng.uniform(0.5, 3.0, 2) * rng.choice((-1.0, 1.0), 2)
        phase = rng.uniform(0.0, 2 * np.pi)
        amp = rng.uniform(2.0, 5.0)
        a = u * np.float32(fy) + np.float32(phase)
        b = u * np.float32(fx)
        tex += np.float32(amp) * (np.outer(np.cos(a), np.cos(b)) - np.outer(np.sin(a), np.sin(b)))
    img = tex[..., None] + (base + tint).astype(np.float32)
    for _ in range(int(rng.integers(specks[0], specks[1] + 1))):
        r = int(rng.integers(1, 4))  # 3-7 px across: far smaller than any object
        cy, cx = rng.integers(r, size - r, 2)
        delta = rng.uniform(12.0, 28.0) * rng.choice((-1.0, 1.0))
        img[cy - r : cy + r + 1, cx - r : cx + r + 1] += np.float32(delta) * _disc(r)
    return img


@functools.cache
def _disc(r: int) -> np.ndarray:
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy**2 + xx**2 <= r * r + r).astype(np.float32)[..., None]


def _noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean triangular pixel noise with standard deviation ``sigma`` (difference of two uniform
    bytes: several times cheaper than Gaussian draws, and indistinguishable at this amplitude)."""
    n = int(np.prod(shape))
    raw = np.frombuffer(rng.bytes(2 * n), np.uint8).reshape(2, *shape)
    out = raw[0].astype(np.float32)
    out -= raw[1]
    out *= np.float32(sigma / (255.0 / np.sqrt(6.0)))
    return out


def _object_rgb(rng: np.random.Generator, color: str) -> np.ndarray:
    return (np.array(COLOR_RGB[color], np.float32) + rng.uniform(-12.0, 12.0, 3).astype(np.float32)).clip(0, 255)


def _paint(canvas: np.ndarray, obj: Obj, y: int, x: int, px: int, rgb: np.ndarray) -> None:
    mask = shape_mask(obj.shape, px)
    h, w = canvas.shape[:2]
    y0, x0 = max(0, y), max(0, x)
    y1, x1 = min(h, y + px), min(w, x + px)
    canvas[y0:y1, x0:x1][mask[y0 - y : y1 - y, x0 - x : x1 - x]] = rgb


def _finish(img: np.ndarray, noise: np.ndarray) -> np.ndarray:
    img += noise
    img += np.float32(0.5)  # round half up on the cast below
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Images


def _seed(split: str, index: int) -> int:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_SEEDS)}")
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    if index >= 1_000_000:
        raise ValueError(f"index {index} would overlap the next split's seeds (at most 999999)")
    return SPLIT_SEEDS[split] + int(index)


def _sample_attributes(rng: np.random.Generator, n: int, distinct_colors: bool) -> list[tuple[str, str, str]]:
    """n (shape, colour, size) triples with unique (shape, colour) pairs (or unique colours)."""
    out: list[tuple[str, str, str]] = []
    used: set[tuple[str, str]] = set()
    used_colors: set[str] = set()
    while len(out) < n:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = COLORS[int(rng.integers(len(COLORS)))]
        if (shape, color) in used or (distinct_colors and color in used_colors):
            continue
        used.add((shape, color))
        used_colors.add(color)
        out.append((shape, color, SIZES[int(rng.integers(len(SIZES)))]))
    return out


def _place_cells(rng: np.random.Generator, cells: list[int]) -> list[tuple[int, int]] | None:
    """Patch-aligned top-left cells for squares of the given sides, non-overlapping with at least
    one empty patch between any two; None when the sequence jams (the caller retries)."""
    blocked = np.zeros((GRID + 1, GRID + 1), np.int64)  # occupancy dilated by the gap, padded
    out = []
    for s in cells:
        # valid (r, c): blocked[r:r+s, c:c+s] is empty, found with an integral image
        integ = np.zeros((GRID + 1, GRID + 1), np.int64)
        integ[1:, 1:] = blocked[:GRID, :GRID].cumsum(0).cumsum(1)
        n = GRID - s + 1
        sums = integ[s : s + n, s : s + n] - integ[:n, s : s + n] - integ[s : s + n, :n] + integ[:n, :n]
        free = np.argwhere(sums == 0)
        if len(free) == 0:
            return None
        r, c = (int(v) for v in free[int(rng.integers(len(free)))])
        blocked[max(0, r - 1) : r + s + 1, max(0, c - 1) : c + s + 1] = 1
        out.append((r, c))
    return out


def _centre(o: Obj) -> tuple[float, float]:
    side = IMAGE_SIZE_PX[o.size] / PATCH
    return o.row + side / 2, o.col + side / 2


def _the(o: Obj) -> tuple[str, str, str]:
    return ("the", o.color, o.shape)


def article(word: str) -> str:
    """The article ("a" or "an") for the word that follows, so questions and captions read as English."""
    return "an" if word[0] in "aeiou" else "a"


def image_question_candidates(objects: tuple[Obj, ...]) -> dict[str, list[Question]]:
    """Every applicable question of every image type (the ``exist`` "no" questions name every
    absent pair). Public so tests and analyses can see the full pool a sample is drawn from."""
    shape_n = {s: sum(o.shape == s for o in objects) for s in SHAPES}
    color_n = {c: sum(o.color == c for o in objects) for c in COLORS}
    q: dict[str, list[Question]] = {t: [] for t in IMAGE_QTYPES}
    for o in objects:
        if shape_n[o.shape] == 1:
            q["color"].append(Question("color", ("what", "color", "is", "the", o.shape, "?"), o.color, COLORS))
        if color_n[o.color] == 1:
            q["shape"].append(Question("shape", ("what", "shape", "is", "the", o.color, "object", "?"), o.shape, SHAPES))
        q["size"].append(Question("size", ("is", *_the(o), "small", "or", "large", "?"), o.size, SIZES))
        q["exist"].append(Question("exist", ("is", "there", article(o.color), o.color, o.shape, "?"), "yes", YES_NO))
    q["count"].append(Question("count", ("how", "many", "objects", "are", "there", "?"), COUNT_WORDS[len(objects) - 1], COUNT_WORDS))
    for a in objects:
        for b in objects:
            if a is b:
                continue
            (ay, ax), (by, bx) = _centre(a), _centre(b)
            if abs(ax - bx) >= 1:  # unambiguous: centres at least one patch apart on that axis
                ans = "yes" if ax < bx else "no"
                q["relation"].append(Question("relation", ("is", *_the(a), "left", "of", *_the(b), "?"), ans, YES_NO))
            if abs(ay - by) >= 1:
                ans = "yes" if ay < by else "no"
                q["relation"].append(Question("relation", ("is", *_the(a), "above", *_the(b), "?"), ans, YES_NO))
    present = {(o.shape, o.color) for o in objects}
    for s in SHAPES:
        for c in COLORS:
            if (s, c) not in present:
                q["exist"].append(Question("exist", ("is", "there", article(c), c, s, "?"), "no", YES_NO))
    return q


def near_miss_exist(pool: list[Question]) -> list[Question]:
    """The "no" exist questions that share a colour or a shape with a present object: they force
    the model to bind colour to shape instead of checking either alone."""
    present = [q for q in pool if q.answer == "yes"]
    colors = {q.words[3] for q in present}
    shapes = {q.words[4] for q in present}
    return [q for q in pool if q.answer == "no" and (q.words[3] in colors or q.words[4] in shapes)]


def _pick_balanced(rng: np.random.Generator, pool: list[Question], prefer: list[Question] | None = None) -> Question:
    """A yes/no question with the answer drawn 50/50 first (when both answers are possible)."""
    answers = sorted({q.answer for q in pool})
    want = answers[int(rng.integers(len(answers)))]
    options = [q for q in pool if q.answer == want]
    if prefer is not None and want == "no":
        near = [q for q in options if q in prefer]
        if near and rng.random() < 0.5:
            options = near
    return options[int(rng.integers(len(options)))]


def _image_questions(rng: np.random.Generator, objects: tuple[Obj, ...]) -> tuple[Question, ...]:
    """One question per applicable type (so every type is frequent across a split), yes/no types
    balanced by drawing the answer first, in a random order."""
    cands = image_question_candidates(objects)
    near_miss = near_miss_exist(cands["exist"])
    chosen = []
    for t in IMAGE_QTYPES:
        pool = cands[t]
        if not pool:
            continue
        if t == "relation":
            chosen.append(_pick_balanced(rng, pool))
        elif t == "exist":
            chosen.append(_pick_balanced(rng, pool, prefer=near_miss))
        else:
            chosen.append(pool[int(rng.integers(len(pool)))])
    order = rng.permutation(len(chosen))
    return tuple(chosen[i] for i in order[:_MAX_QUESTIONS])


def make_image(split: str, index: int) -> ImageSample:
    """Image ``index`` of ``split``: 1-5 objects on a textured background, with its questions."""
    seed = _seed(split, index)
    rng = np.random.Generator(np.random.PCG64(seed))
    n = int(rng.integers(1, _MAX_OBJECTS + 1))
    attrs = _sample_attributes(rng, n, distinct_colors=False)
    cells = [IMAGE_SIZE_PX[size] // PATCH for _, _, size in attrs]
    placed = None
    for _ in range(100):  # a jam needs 5 large objects in an unlucky order: rare
        placed = _place_cells(rng, cells)
        if placed is not None:
            break
    if placed is None:  # pragma: no cover - practically unreachable, keeps the count honest
        attrs = [(s, c, "small") for s, c, _ in attrs]
        placed = _place_cells(rng, [2] * n)
        assert placed is not None
    objects = tuple(Obj(s, c, z, r, col) for (s, c, z), (r, col) in zip(attrs, placed))
    img = _background(rng, IMAGE_SIZE, specks=(3, 8))
    for o in objects:
        _paint(img, o, o.row * PATCH, o.col * PATCH, IMAGE_SIZE_PX[o.size], _object_rgb(rng, o.color))
    image = _finish(img, _noise(rng, img.shape, float(rng.uniform(2.0, 5.0))))
    return ImageSample(f"{split}-{index}", image, objects, _image_questions(rng, objects))


def image_split(split: str, n: int) -> list[ImageSample]:
    """The first ``n`` images of ``split`` (a fixed list: sample ``i`` is always ``make_image(split, i)``)."""
    return [make_image(split, i) for i in range(n)]


# --------------------------------------------------------------------------------------------------
# Videos


def _track(objects, motions, speeds, appear, t_count: int) -> np.ndarray:
    pos = np.zeros((t_count, len(objects), 2), np.int64)
    t = np.arange(t_count)
    for i, o in enumerate(objects):
        dy, dx = _DIR_VECTORS[motions[i]]
        v = speeds[i] if speeds else 0
        steps = t - appear[i]
        pos[:, i, 0] = o.row * PATCH + dy * v * steps
        pos[:, i, 1] = o.col * PATCH + dx * v * steps
    return pos


def _swept_box(o: Obj, motion: str, speed: int, appear: int) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) pixels covered by the object over its visible frames."""
    px = FRAME_SIZE_PX[o.size]
    dy, dx = _DIR_VECTORS[motion]
    travel = speed * (NUM_FRAMES - 1 - appear)
    y0, x0 = o.row * PATCH, o.col * PATCH
    y1, x1 = y0 + dy * travel, x0 + dx * travel
    return min(y0, y1), min(x0, x1), max(y0, y1) + px, max(x0, x1) + px


def caption_words(objects: tuple[Obj, ...], motions: tuple[str, ...], appear: tuple[int, ...]) -> tuple[str, ...]:
    """The reference caption as words, one clause per object in order of appearance, e.g.
    "a red circle moves left and a small blue square stays still" or
    "a green cross moves up then a large orange triangle appears and stays still". The size is named
    for still objects (where it is easy to see), the motion for every object."""
    words: list[str] = []
    for i, o in enumerate(objects):
        if i > 0:
            words.append("then" if appear[i] > 0 else "and")
        noun = [o.size, o.color, o.shape] if motions[i] == "still" else [o.color, o.shape]
        words += [article(noun[0]), *noun]
        if appear[i] > 0:
            words += ["appears", "and"]
        words += ["stays", "still"] if motions[i] == "still" else ["moves", motions[i]]
    return tuple(words)


def video_question_candidates(objects: tuple[Obj, ...], motions: tuple[str, ...], appear: tuple[int, ...]) -> dict[str, list[Question]]:
    """Every applicable question of every video type."""
    q: dict[str, list[Question]] = {t: [] for t in VIDEO_QTYPES}
    for o, m in zip(objects, motions):
        if m != "still":
            q["direction"].append(Question("direction", ("which", "way", "does", *_the(o), "move", "?"), m, DIRECTIONS))
    moving = [i for i, m in enumerate(motions) if m != "still"]
    if len(objects) == 2 and len(moving) == 1 and objects[0].color != objects[1].color:
        q["moving"].append(Question("moving", ("which", "object", "moves", "?"), objects[moving[0]].color, COLORS))
    if len(objects) == 2 and appear[0] != appear[1] and objects[0].color != objects[1].color:
        first = objects[int(np.argmin(appear))]
        q["first"].append(Question("first", ("which", "object", "appears", "first", "?"), first.color, COLORS))
    q["count"].append(Question("count", ("how", "many", "objects", "are", "there", "?"), COUNT_WORDS[len(objects) - 1], COUNT_WORDS[:2]))
    return q


def _render_clip(rng: np.random.Generator, objs: tuple[Obj, ...], motions: tuple[str, ...],
                 speeds: tuple[int, ...], appear: tuple[int, ...]) -> np.ndarray:
    """The clip's frames (background, objects along their tracks, noise), drawing from ``rng`` in
    one fixed order so every task built on it stays deterministic."""
    bg = _background(rng, FRAME_SIZE, specks=(1, 4))
    rgbs = [_object_rgb(rng, o.color) for o in objs]
    pos = _track(objs, motions, speeds, appear, NUM_FRAMES)
    noise = _noise(rng, (NUM_FRAMES, FRAME_SIZE, FRAME_SIZE, 3), float(rng.uniform(1.5, 3.0)))
    frames = np.empty((NUM_FRAMES, FRAME_SIZE, FRAME_SIZE, 3), np.float32)
    for t in range(NUM_FRAMES):
        frames[t] = bg
        for i, o in enumerate(objs):
            if t >= appear[i]:
                _paint(frames[t], o, int(pos[t, i, 0]), int(pos[t, i, 1]), FRAME_SIZE_PX[o.size], rgbs[i])
    return _finish(frames, noise)


def make_video(split: str, index: int) -> VideoSample:
    """Clip ``index`` of ``split`` (frames in memory; see :func:`video_split` for the mp4 path).

    1 or 2 objects (50/50) with distinct colours. One object moves with probability 3/4; two objects
    are one moving + one still (1/2), both moving (3/10) or both still (1/5). In about a third of the
    two-object clips the second object appears only at frame 2-4. Moving objects travel 2-3 px per
    frame in a straight line and never leave the frame.
    """
    seed = _seed(split, index)
    rng = np.random.Generator(np.random.PCG64(seed).jumped())
    n = int(rng.integers(1, 3))
    if n == 1:
        moving_flags = [rng.random() < 0.75]
    else:
        pattern = rng.choice(3, p=(0.5, 0.3, 0.2))
        if pattern == 0:
            first_moves = bool(rng.random() < 0.5)
            moving_flags = [first_moves, not first_moves]
        else:
            moving_flags = [pattern == 1, pattern == 1]
    motions = tuple(DIRECTIONS[int(rng.integers(4))] if mv else "still" for mv in moving_flags)
    speeds = tuple(int(rng.choice(_VIDEO_SPEEDS)) if mv else 0 for mv in moving_flags)
    appear = (0,) if n == 1 else (0, int(rng.integers(2, 5)) if rng.random() < 1 / 3 else 0)
    attrs = _sample_attributes(rng, n, distinct_colors=True)
    objects: list[Obj] = []
    for i, (shape, color, size) in enumerate(attrs):
        px = FRAME_SIZE_PX[size]
        dy, dx = _DIR_VECTORS[motions[i]]
        travel = speeds[i] * (NUM_FRAMES - 1 - appear[i])
        # start cells from which the whole path stays inside the frame
        rows = [r for r in range(FRAME_GRID) if 0 <= r * PATCH + dy * travel and r * PATCH + dy * travel + px <= FRAME_SIZE and r * PATCH + px <= FRAME_SIZE]
        cols = [c for c in range(FRAME_GRID) if 0 <= c * PATCH + dx * travel and c * PATCH + dx * travel + px <= FRAME_SIZE and c * PATCH + px <= FRAME_SIZE]
        for _ in range(200):
            cand = Obj(shape, color, size, int(rng.choice(rows)), int(rng.choice(cols)))
            box = _swept_box(cand, motions[i], speeds[i], appear[i])
            clear = True
            for j, other in enumerate(objects):
                ob = _swept_box(other, motions[j], speeds[j], appear[j])
                gap_y = max(ob[0] - box[2], box[0] - ob[2])
                gap_x = max(ob[1] - box[3], box[1] - ob[3])
                if max(gap_y, gap_x) < _VIDEO_GAP_PX:
                    clear = False
            if clear:
                break
        else:  # pragma: no cover - two swept boxes always fit in a 112 px frame
            raise RuntimeError(f"could not place video objects for {split}-{index}")
        objects.append(cand)
    # Describe simultaneous objects top-to-bottom, left-to-right so the caption order is visual.
    if n == 2 and appear[0] == appear[1] and (objects[1].row, objects[1].col) < (objects[0].row, objects[0].col):
        objects.reverse()
        motions, speeds = motions[::-1], speeds[::-1]
    objs = tuple(objects)

    frames = _render_clip(rng, objs, motions, speeds, appear)

    cands = video_question_candidates(objs, motions, appear)
    chosen = [cands[t][int(rng.integers(len(cands[t])))] for t in VIDEO_QTYPES if cands[t]]
    order = rng.permutation(len(chosen))
    questions = tuple(chosen[i] for i in order)
    caption = " ".join(caption_words(objs, motions, appear))
    return VideoSample(f"{split}-{index}", frames, objs, motions, appear, questions, caption, None, speeds)


# --------------------------------------------------------------------------------------------------
# Dense video captions


#: Words of the dense captions that the short captions and questions never use. They are kept out
#: of :data:`VOCAB` so the shipped built-in tokenizer (and its checkpoint) stay as they are; the
#: captioner's tokenizer is the built-in vocabulary with these appended.
DENSE_WORDS: tuple[str, ...] = ("in", "detail", "at", "top", "middle", "bottom", "center", ".")
#: The dense captioning prompt (the reference caption follows it).
DENSE_PROMPT: tuple[str, ...] = ("describe", "the", "video", "in", "detail", "?")
VERTICAL: tuple[str, ...] = ("top", "middle", "bottom")
HORIZONTAL: tuple[str, ...] = ("left", "center", "right")
_DENSE_SPEEDS = (3, 4)  # faster than the short clips: 21-28 px over a clip, so direction is plain


@dataclass
class DenseVideoSample:
    """A clip of the dense captioning task: 2 or 3 objects, each with its motion and first frame."""

    uid: str
    frames: np.ndarray  # (8, 112, 112, 3) uint8
    objects: tuple[Obj, ...]  # in caption order (order of events), positions at first visible frame
    motions: tuple[str, ...]
    appear: tuple[int, ...]
    speeds: tuple[int, ...]
    caption: str
    path: str | None = None


def region(o: Obj) -> tuple[str, str]:
    """(vertical, horizontal) third of the 112 px frame that holds the object's centre."""
    c = FRAME_SIZE_PX[o.size] / 2
    y, x = o.row * PATCH + c, o.col * PATCH + c
    third = FRAME_SIZE / 3
    return VERTICAL[min(2, int(y // third))], HORIZONTAL[min(2, int(x // third))]


def dense_caption_words(objects: tuple[Obj, ...], motions: tuple[str, ...], appear: tuple[int, ...]) -> tuple[str, ...]:
    """The dense reference caption: the object count, then one sentence per object in order of
    events ("first", "and" for an object appearing together with the previous one, "then" for a
    later one) naming its size, colour, shape, where it appears and how it moves, e.g.
    "there are two objects . first a small red circle appears at the top left and moves down .
    then a large blue cross appears at the bottom right and stays still ." (33 or 47 words)."""
    words = ["there", "are", COUNT_WORDS[len(objects) - 1], "objects", "."]
    for i, o in enumerate(objects):
        lead = "first" if i == 0 else ("and" if appear[i] == appear[i - 1] else "then")
        v, h = region(o)
        move = ["stays", "still"] if motions[i] == "still" else ["moves", motions[i]]
        words += [lead, "a", o.size, o.color, o.shape, "appears", "at", "the", v, h, "and", *move, "."]
    return tuple(words)


def dense_facts(words: tuple[str, ...] | list[str]) -> set[tuple[str, ...]]:
    """The facts a dense caption states, read back from its words: ("count", n) and, per object
    keyed by its colour (colours are distinct in a clip), its shape, size, motion, vertical and
    horizontal place and event number (0 for the first appearance, +1 per "then"). Sentences that
    do not parse contribute only what they state unambiguously, so a half-right caption gets
    partial credit and nothing else."""
    words = list(words)
    facts: set[tuple[str, ...]] = set()
    if len(words) >= 3 and words[:2] == ["there", "are"] and words[2] in COUNT_WORDS:
        facts.add(("count", words[2]))
    event = 0
    sentence: list[str] = []
    for w in [*words, "."]:
        if w != ".":
            sentence.append(w)
            continue
        s, sentence = sentence, []
        if not s or s[0] not in ("first", "and", "then"):
            continue
        if s[0] == "then":
            event += 1
        color = next((t for t in s if t in COLORS), None)
        if color is None:
            continue
        facts.add((color, "event", str(event)))
        for t in s:
            if t in SHAPES:
                facts.add((color, "shape", t))
            elif t in SIZES:
                facts.add((color, "size", t))
            elif t in VERTICAL:
                facts.add((color, "vertical", t))
        after_at = s[s.index("the") + 1:] if "the" in s else []
        if len(after_at) >= 2 and after_at[1] in HORIZONTAL:
            facts.add((color, "horizontal", after_at[1]))
        if "still" in s:
            facts.add((color, "motion", "still"))
        elif "moves" in s and s.index("moves") + 1 < len(s) and s[s.index("moves") + 1] in DIRECTIONS:
            facts.add((color, "motion", s[s.index("moves") + 1]))
    return facts


def fact_score(prediction: tuple[str, ...] | list[str], reference: tuple[str, ...] | list[str]) -> float:
    """Share of the reference caption's facts that the prediction states correctly (a fact stated
    twice with different values counts as wrong)."""
    ref = dense_facts(reference)
    pred = dense_facts(prediction)
    keys: dict[tuple[str, ...], int] = {}
    for f in pred:
        keys[f[:-1]] = keys.get(f[:-1], 0) + 1
    hits = sum(1 for f in ref if f in pred and keys[f[:-1]] == 1)
    return hits / len(ref) if ref else float(not pred)


def _place_dense(rng: np.random.Generator, attrs, motions, speeds, appear) -> list[Obj] | None:
    objects: list[Obj] = []
    for i, (shape, color, size) in enumerate(attrs):
        px = FRAME_SIZE_PX[size]
        dy, dx = _DIR_VECTORS[motions[i]]
        travel = speeds[i] * (NUM_FRAMES - 1 - appear[i])
        rows = [r for r in range(FRAME_GRID) if 0 <= r * PATCH + dy * travel and r * PATCH + dy * travel + px <= FRAME_SIZE and r * PATCH + px <= FRAME_SIZE]
        cols = [c for c in range(FRAME_GRID) if 0 <= c * PATCH + dx * travel and c * PATCH + dx * travel + px <= FRAME_SIZE and c * PATCH + px <= FRAME_SIZE]
        for _ in range(100):
            cand = Obj(shape, color, size, int(rng.choice(rows)), int(rng.choice(cols)))
            box = _swept_box(cand, motions[i], speeds[i], appear[i])
            if all(
                max(max(ob[0] - box[2], box[0] - ob[2]), max(ob[1] - box[3], box[1] - ob[3])) >= _VIDEO_GAP_PX
                for ob in (_swept_box(other, motions[j], speeds[j], appear[j]) for j, other in enumerate(objects))
            ):
                objects.append(cand)
                break
        else:
            return None
    return objects


def make_dense_video(split: str, index: int) -> DenseVideoSample:
    """Clip ``index`` of ``split`` for dense captioning (frames in memory).

    2 or 3 objects (50/50) with distinct colours; each moves (3 or 4 px per frame, in a straight
    line that stays in frame) with probability 0.6; each object after the first appears at frame 0
    (1/2) or at frame 2-4. Drawn from the sample's seed two PCG64 jumps on, so it shares no draws
    with image or short-clip ``index``. A draw whose swept paths cannot be kept one patch apart is
    redrawn from the same generator (deterministic)."""
    seed = _seed(split, index)
    rng = np.random.Generator(np.random.PCG64(seed).jumped(2))
    while True:
        n = int(rng.integers(2, 4))
        motions = tuple(DIRECTIONS[int(rng.integers(4))] if rng.random() < 0.6 else "still" for _ in range(n))
        speeds = tuple(int(rng.choice(_DENSE_SPEEDS)) if m != "still" else 0 for m in motions)
        appear = tuple([0] + [int(rng.integers(2, 5)) if rng.random() < 0.5 else 0 for _ in range(n - 1)])
        attrs = _sample_attributes(rng, n, distinct_colors=True)
        placed = _place_dense(rng, attrs, motions, speeds, appear)
        if placed is not None:
            break
    # order of events: by first frame, then top-to-bottom, left-to-right
    order = sorted(range(n), key=lambda i: (appear[i], placed[i].row, placed[i].col))
    objs = tuple(placed[i] for i in order)
    motions = tuple(motions[i] for i in order)
    speeds = tuple(speeds[i] for i in order)
    appear = tuple(appear[i] for i in order)

    frames = _render_clip(rng, objs, motions, speeds, appear)
    caption = " ".join(dense_caption_words(objs, motions, appear))
    return DenseVideoSample(f"dense-{split}-{index}", frames, objs, motions, appear, speeds, caption)


def dense_clip(split: str, index: int, directory: str | os.PathLike) -> DenseVideoSample:
    """Dense clip ``index`` of ``split`` as read back from its mp4 (``<directory>/dense-<split>-<index>.mp4``),
    cached and checked like :func:`video_clip`."""
    sample = make_dense_video(split, index)
    sample.frames, sample.path = _through_mp4(sample.frames, Path(directory) / f"{sample.uid}.mp4")
    return sample


def _through_mp4(expected: np.ndarray, path: Path) -> tuple[np.ndarray, str]:
    frames = None
    if path.is_file():
        try:
            frames = read_video(path)
        except VideoReadError:
            frames = None
        if frames is not None and (frames.shape != expected.shape or np.abs(frames.astype(np.int16) - expected).mean() > 8.0):
            frames = None
    if frames is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_mp4(expected, path)
        frames = read_video(path)
    return frames, str(path)


# --------------------------------------------------------------------------------------------------
# mp4 I/O


def _codec() -> tuple[str, dict[str, str]]:
    import av

    if "libx264" in av.codecs_available:
        # near-lossless, no B-frames: exact frame count and cheap random access for decord
        return "libx264", {"crf": "10", "preset": "veryfast", "tune": "zerolatency"}
    return "mpeg4", {"qscale": "2"}


def write_mp4(frames: np.ndarray, path: str | os.PathLike) -> None:
    """Write (T, H, W, 3) uint8 RGB frames as an 8 fps yuv420p mp4 (libx264 crf 10, or mpeg4 when
    PyAV lacks x264). Written to a temporary name and renamed, so an interrupted run never leaves a
    truncated file that looks finished."""
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be a non-empty (T, H, W, 3) uint8 array, got {frames.shape} {frames.dtype}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"yuv420p needs even frame sides, got {frames.shape[1]}x{frames.shape[2]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.mp4")
    codec, options = _codec()
    try:
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream(codec, rate=FPS)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = options
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_video(path: str | os.PathLike, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """Decode ``num_frames`` frames sampled uniformly over the clip with decord (indices
    ``np.linspace(0, len - 1, num_frames)`` rounded, as LLaVA-style video loaders do) as
    (T, H, W, 3) uint8. Raises :class:`VideoReadError` naming the file when it is missing, empty
    or cannot be decoded."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    p = Path(path)
    if not p.is_file():
        raise VideoReadError(f"video file not found: {p}")
    if p.stat().st_size == 0:
        raise VideoReadError(f"video file is empty: {p}")
    import decord

    try:
        reader = decord.VideoReader(str(p), ctx=decord.cpu(0), num_threads=1)
        total = len(reader)
        if total == 0:
            raise VideoReadError(f"video file has no frames: {p}")
        idx = np.linspace(0, total - 1, num_frames).round().astype(np.int64)
        batch = reader.get_batch(idx.tolist())
    except VideoReadError:
        raise
    except Exception as err:  # decord raises RuntimeError / DECORDError with a C++ log line
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VideoReadError(f"cannot decode video file {p}: {first_line}") from err
    out = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)  # any decord bridge
    return np.ascontiguousarray(out, dtype=np.uint8)


def video_split(split: str, n: int, directory: str | os.PathLike, progress: bool = False) -> list[VideoSample]:
    """The first ``n`` clips of ``split`` as mp4 files ``<directory>/<split>-<index>.mp4``.

    Existing files are reused when decord reads them with the right shape and their frames match
    the generator (so an evaluation does not re-encode every run, and a stale or damaged cache is
    replaced rather than trusted); otherwise the clip is (re)written. Each sample's ``frames`` are
    the decoded ones, so what a model sees is what decord delivers.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    indices = range(n)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"videos ({split})", unit="clip")
    return [video_clip(split, i, directory) for i in indices]


def video_clip(split: str, index: int, directory: str | os.PathLike) -> VideoSample:
    """Clip ``index`` of ``split`` as it is read back from its mp4 file (see :func:`video_split`)."""
    directory = Path(directory)
    sample = make_video(split, index)
    path = directory / f"{split}-{index}.mp4"
    frames = None
    if path.is_file():
        try:
            frames = read_video(path)
        except VideoReadError:
            frames = None
        if frames is not None and (
            frames.shape != sample.frames.shape or np.abs(frames.astype(np.int16) - sample.frames).mean() > 8.0
        ):
            frames = None
    if frames is None:
        directory.mkdir(parents=True, exist_ok=True)
        write_mp4(sample.frames, path)
        frames = read_video(path)
    sample.frames = frames
    sample.path = str(path)
    return sample


def mosaic(frames: np.ndarray) -> list[np.ndarray]:
    """Tile each run of 4 frames (T, 112, 112, 3) into one 224x224 image, row-major (frame t top-left,
    t+1 top-right, t+2 bottom-left, t+3 bottom-right): each frame keeps 8x8 patches, a 2x2 token
    pooling done in pixel space, so 8 frames cost 2 images (512 visual tokens)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[1:] != (FRAME_SIZE, FRAME_SIZE, 3):
        raise ValueError(f"mosaic expects (T, {FRAME_SIZE}, {FRAME_SIZE}, 3) frames, got {frames.shape}")
    if len(frames) == 0 or len(frames) % 4:
        raise ValueError(f"mosaic needs a positive multiple of 4 frames, got {len(frames)}")
    out = []
    for t in range(0, len(frames), 4):
        top = np.concatenate([frames[t], frames[t + 1]], axis=1)
        bottom = np.concatenate([frames[t + 2], frames[t + 3]], axis=1)
        out.append(np.ascontiguousarray(np.concatenate([top, bottom], axis=0)))
    return out


# --------------------------------------------------------------------------------------------------
# Looking at the data


def save_examples(directory: str | os.PathLike, n: int = 4, split: str = "val") -> list[str]:
    """Write ``n`` images and ``n`` clips of ``split`` as PNGs with their questions in .txt files,
    plus ``grid.png`` (images with the 14 px patch grid and object patches outlined), so a person can
    check that the testbed looks right. Returns the written paths."""
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    tiles = []
    for i in range(n):
        s = make_image(split, i)
        Image.fromarray(s.image).save(directory / f"image_{i}.png")
        lines = [f"uid {s.uid}"] + [f"object {o.color} {o.shape} {o.size} at row {o.row} col {o.col}" for o in s.objects]
        lines += [f"[{q.qtype}] {q.text} -> {q.answer}   (choices: {' '.join(q.choices)})" for q in s.questions]
        (directory / f"image_{i}.txt").write_text("\n".join(lines) + "\n")
        written += [directory / f"image_{i}.png", directory / f"image_{i}.txt"]
        big = s.image.repeat(2, 0).repeat(2, 1).copy()
        big[:: 2 * PATCH] = big[:: 2 * PATCH] // 2 + 64  # faint patch grid
        big[:, :: 2 * PATCH] = big[:, :: 2 * PATCH] // 2 + 64
        obj = s.object_patches()
        for r, c in np.argwhere(obj):
            y, x = 2 * PATCH * r, 2 * PATCH * c
            big[y, x : x + 2 * PATCH] = big[y + 2 * PATCH - 1, x : x + 2 * PATCH] = 255
            big[y : y + 2 * PATCH, x] = big[y : y + 2 * PATCH, x + 2 * PATCH - 1] = 255
        tiles.append(big)
    if tiles:
        Image.fromarray(np.concatenate(tiles, axis=1)).save(directory / "grid.png")
        written.append(directory / "grid.png")
    for i in range(n):
        v = make_video(split, i)
        strip = np.concatenate(list(v.frames), axis=1).repeat(2, 0).repeat(2, 1)
        Image.fromarray(strip).save(directory / f"video_{i}.png")
        lines = [f"uid {v.uid}", f"caption: {v.caption}"]
        lines += [
            f"object {o.color} {o.shape} {o.size} start row {o.row} col {o.col}, {m} at {sp} px/frame, appears at frame {a}"
            for o, m, sp, a in zip(v.objects, v.motions, v.speeds, v.appear)
        ]
        lines += [f"[{q.qtype}] {q.text} -> {q.answer}   (choices: {' '.join(q.choices)})" for q in v.questions]
        (directory / f"video_{i}.txt").write_text("\n".join(lines) + "\n")
        written += [directory / f"video_{i}.png", directory / f"video_{i}.txt"]
    return [str(p) for p in written]


__all__ = [
    "CAPTION_PROMPT",
    "DENSE_PROMPT",
    "DENSE_WORDS",
    "DenseVideoSample",
    "dense_caption_words",
    "dense_clip",
    "dense_facts",
    "fact_score",
    "make_dense_video",
    "region",
    "COLORS",
    "COLOR_RGB",
    "COUNT_WORDS",
    "DIRECTIONS",
    "FPS",
    "FRAME_GRID",
    "FRAME_SIZE",
    "FRAME_SIZE_PX",
    "GRID",
    "IMAGE_QTYPES",
    "IMAGE_SIZE",
    "IMAGE_SIZE_PX",
    "MOTIONS",
    "NUM_FRAMES",
    "PATCH",
    "SHAPES",
    "SIZES",
    "SPLIT_SEEDS",
    "VIDEO_QTYPES",
    "VOCAB",
    "YES_NO",
    "ImageSample",
    "Obj",
    "Question",
    "VideoReadError",
    "VideoSample",
    "article",
    "caption_words",
    "image_question_candidates",
    "image_split",
    "make_image",
    "make_video",
    "mosaic",
    "read_video",
    "save_examples",
    "shape_mask",
    "video_question_candidates",
    "video_split",
    "write_mp4",
]
