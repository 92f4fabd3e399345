"""The built-in benchmark's synthetic data: determinism, ground truth, balance, vocabulary, mp4 I/O.

Answers are recomputed here from the objects (and object pixels are found in the image by colour
saturation, not with the generator's masks), so a bug in the generator's bookkeeping cannot hide
behind the same bug in the check.
"""

from __future__ import annotations

import collections
import hashlib
import os

import numpy as np
import pytest

from vlmprune.evals import data as D

N_CHECK = 300  # samples whose answers are recomputed
N_BALANCE = 500  # samples per split whose answer distributions are measured
PINNED_DIGEST = "a47191eba1f21f2c"  # objects, questions and captions of the first train/test samples


@pytest.fixture(scope="module")
def images() -> list[D.ImageSample]:
    return D.image_split("train", max(N_CHECK, N_BALANCE))


@pytest.fixture(scope="module")
def videos() -> list[D.VideoSample]:
    return [D.make_video("train", i) for i in range(N_BALANCE)]


def saturated(pixels: np.ndarray) -> np.ndarray:
    """Object pixels: the background and its specks are grey (channel spread < ~50 with tint and
    noise), every object colour has a spread > ~80, so a threshold in between finds exactly them."""
    p = pixels.astype(np.int16)
    return (p.max(-1) - p.min(-1)) > 65


def nearest_color(rgb: np.ndarray) -> str:
    ref = np.array([D.COLOR_RGB[c] for c in D.COLORS], np.float64)
    return D.COLORS[int(np.argmin(((ref - np.asarray(rgb, np.float64)) ** 2).sum(-1)))]


def find(objects, color: str, shape: str) -> D.Obj:
    hits = [o for o in objects if o.color == color and o.shape == shape]
    assert len(hits) == 1, (color, shape, objects)
    return hits[0]


def centre_px(o: D.Obj) -> tuple[float, float]:
    side = D.IMAGE_SIZE_PX[o.size]
    return o.row * D.PATCH + side / 2, o.col * D.PATCH + side / 2


# -- determinism ------------------------------------------------------------------------------------


def test_same_split_and_index_give_identical_bytes():
    a, b = D.make_image("val", 7), D.make_image("val", 7)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.objects == b.objects and a.questions == b.questions and a.uid == b.uid == "val-7"
    assert not np.array_equal(a.image, D.make_image("val", 8).image)
    assert not np.array_equal(a.image, D.make_image("train", 7).image)
    v, w = D.make_video("test", 3), D.make_video("test", 3)
    assert v.frames.tobytes() == w.frames.tobytes()
    assert (v.objects, v.motions, v.appear, v.speeds, v.questions, v.caption) == (
        w.objects,
        w.motions,
        w.appear,
        w.speeds,
        w.questions,
        w.caption,
    )
    assert not np.array_equal(v.frames, D.make_video("test", 4).frames)


def test_split_contents_are_pinned():
    """The shipped checkpoint was trained and scored on these splits: changing what the generator
    draws silently changes the benchmark, so it has to be a deliberate edit of this digest. (Only
    the discrete content is pinned; pixel values go through float transcendental functions whose
    last bit may differ between CPUs.)"""
    h = hashlib.sha256()
    for split in ("train", "test"):
        for i in range(5):
            s = D.make_image(split, i)
            h.update(repr((s.objects, s.questions)).encode())
            v = D.make_video(split, i)
            h.update(repr((v.objects, v.motions, v.appear, v.speeds, v.questions, v.caption)).encode())
    assert h.hexdigest()[:16] == PINNED_DIGEST


def test_image_and_video_use_the_split_seeds():
    assert D.SPLIT_SEEDS == {"train": 0, "val": 1_000_000, "test": 2_000_000}
    with pytest.raises(ValueError, match="unknown split"):
        D.make_image("dev", 0)
    with pytest.raises(ValueError, match="non-negative"):
        D.make_video("train", -1)
    assert [s.uid for s in D.image_split("test", 3)] == ["test-0", "test-1", "test-2"]


# -- rendering and patch bookkeeping ----------------------------------------------------------------


def test_shape_masks_have_their_shape():
    for px in (14, 21, 28, 42):
        circle, square, triangle, cross = (D.shape_mask(s, px) for s in D.SHAPES)
        for m in (circle, square, triangle, cross):
            rows, cols = np.nonzero(m)
            assert rows.max() - rows.min() + 1 >= 0.8 * px and cols.max() - cols.min() + 1 >= 0.8 * px
            assert np.array_equal(m, m[:, ::-1])  # left-right symmetric
        assert np.array_equal(square, square.T) and square[1:-1, 1:-1].sum() >= 0.7 * px * px
        r = (px - 2 * max(1, round(px * 0.07))) / 2
        assert abs(circle.sum() - np.pi * r * r) < 0.15 * np.pi * r * r
        assert not circle[1, 1] and square[px // 8 + 1, px // 8 + 1]  # corners: cut vs filled
        rows = np.nonzero(triangle.any(1))[0]
        assert triangle[rows[0]].sum() < triangle[rows[-1]].sum() / 3  # narrow apex on top
        assert cross[px // 2, px // 2] and not cross[px // 5, px // 5]  # plus sign: empty corners
        bar = cross[:, px // 2 - 1].sum(), cross[px // 2 - 1].sum()
        width = cross[px // 5].sum()  # one bar crossing a row near the top
        assert abs(width - px / 3) <= 2 and bar[0] >= 0.8 * px


def test_image_layout_and_background():
    for s in D.image_split("test", 40):
        assert s.image.shape == (224, 224, 3) and s.image.dtype == np.uint8
        assert 1 <= len(s.objects) <= 5
        assert len({(o.shape, o.color) for o in s.objects}) == len(s.objects)
        occupied = np.zeros((D.GRID, D.GRID), int)
        for o in s.objects:
            side = D.IMAGE_SIZE_PX[o.size] // D.PATCH
            assert 0 <= o.row <= D.GRID - side and 0 <= o.col <= D.GRID - side
            occupied[max(0, o.row - 1) : o.row + side + 1, max(0, o.col - 1) : o.col + side + 1] += 1
        # boxes grown by one patch may touch each other's margin but never another box
        for o in s.objects:
            side = D.IMAGE_SIZE_PX[o.size] // D.PATCH
            assert occupied[o.row : o.row + side, o.col : o.col + side].max() == 1
        background = s.image[~saturated(s.image)].astype(float)
        assert 95 < background.mean() < 165 and background.std() > 2  # tinted grey, not flat


def test_object_patches_and_labels_match_the_drawn_pixels(images):
    for s in images[:100]:
        sat = saturated(s.image)
        drawn = np.zeros((224, 224), bool)
        for o in s.objects:
            px = D.IMAGE_SIZE_PX[o.size]
            drawn[o.row * 14 : o.row * 14 + px, o.col * 14 : o.col * 14 + px] |= D.shape_mask(o.shape, px)
        assert np.array_equal(sat, drawn), s.uid  # the pixels are exactly the declared shapes
        per_patch = sat.reshape(16, 14, 16, 14).sum(axis=(1, 3))
        flagged = s.object_patches()
        assert flagged.shape == (16, 16) and flagged.dtype == bool
        assert np.array_equal(flagged, per_patch > 0)  # every object pixel is in a flagged patch
        shape_ids, color_ids = s.patch_labels()
        assert (shape_ids[~flagged] == 0).all() and (color_ids[~flagged] == 0).all()
        assert (shape_ids[flagged] > 0).all() and (color_ids[flagged] > 0).all()
        for r, c in np.argwhere(flagged):
            patch = s.image[r * 14 : r * 14 + 14, c * 14 : c * 14 + 14]
            mean_rgb = patch[sat[r * 14 : r * 14 + 14, c * 14 : c * 14 + 14]].mean(0)
            assert D.COLORS[color_ids[r, c] - 1] == nearest_color(mean_rgb)
            (owner,) = [
                o
                for o in s.objects
                if o.row <= r < o.row + D.IMAGE_SIZE_PX[o.size] // 14
                and o.col <= c < o.col + D.IMAGE_SIZE_PX[o.size] // 14
            ]
            assert D.SHAPES[shape_ids[r, c] - 1] == owner.shape
        # the information sits in a few patches
        assert flagged.mean() < 0.25


# -- questions --------------------------------------------------------------------------------------


def check_image_question(q: D.Question, objects: tuple[D.Obj, ...]) -> None:
    w = q.words
    assert q.answer in q.choices and w[-1] == "?"
    if q.qtype == "color":
        assert w[:4] == ("what", "color", "is", "the") and q.choices == D.COLORS
        (o,) = [o for o in objects if o.shape == w[4]]
        assert q.answer == o.color
    elif q.qtype == "shape":
        assert w[:4] == ("what", "shape", "is", "the") and w[5] == "object" and q.choices == D.SHAPES
        (o,) = [o for o in objects if o.color == w[4]]
        assert q.answer == o.shape
    elif q.qtype == "count":
        assert w == ("how", "many", "objects", "are", "there", "?") and q.choices == D.COUNT_WORDS
        assert q.answer == ("one", "two", "three", "four", "five")[len(objects) - 1]
    elif q.qtype == "size":
        assert w[4:7] == ("small", "or", "large") and q.choices == ("small", "large")
        assert q.answer == find(objects, w[2], w[3]).size
    elif q.qtype == "relation":
        assert q.choices == ("yes", "no") and w[:2] == ("is", "the")
        a = find(objects, w[2], w[3])
        if w[4] == "left":
            assert w[5:7] == ("of", "the")
            b = find(objects, w[7], w[8])
            axis = 1
        else:
            assert w[4:6] == ("above", "the")
            b = find(objects, w[6], w[7])
            axis = 0
        ca, cb = centre_px(a)[axis], centre_px(b)[axis]
        assert abs(ca - cb) >= D.PATCH  # unambiguous
        assert q.answer == ("yes" if ca < cb else "no")
    elif q.qtype == "exist":
        assert w[:2] == ("is", "there") and w[2] == ("an" if w[3] == "orange" else "a") and q.choices == ("yes", "no")
        present = any(o.color == w[3] and o.shape == w[4] for o in objects)
        assert q.answer == ("yes" if present else "no")
    else:
        raise AssertionError(q.qtype)


def test_image_answers_are_correct(images):
    for s in images[:N_CHECK]:
        assert 1 <= len(s.questions) <= 6
        assert len({q.qtype for q in s.questions}) == len(s.questions)  # one per type
        for q in s.questions:
            check_image_question(q, s.objects)
        # every type that applies is asked
        cands = D.image_question_candidates(s.objects)
        assert {q.qtype for q in s.questions} == {t for t, pool in cands.items() if pool}
        for pool in cands.values():
            for q in pool:
                check_image_question(q, s.objects)


def distribution(questions) -> dict[str, dict[str, float]]:
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for q in questions:
        counts[q.qtype][q.answer] += 1
    return {t: {a: n / sum(c.values()) for a, n in sorted(c.items())} for t, c in counts.items()}


def test_image_answer_balance(images, capsys):
    qs = [q for s in images[:N_BALANCE] for q in s.questions]
    dist = distribution(qs)
    with capsys.disabled():
        print("\nimage answer distribution over", N_BALANCE, "train images:")
        for t in D.IMAGE_QTYPES:
            print(f"  {t:9s} n={sum(q.qtype == t for q in qs):4d}", {a: round(p, 3) for a, p in dist[t].items()})
    for t in D.IMAGE_QTYPES:
        assert sum(q.qtype == t for q in qs) >= 0.6 * N_BALANCE, t  # every type is frequent
    for t in ("relation", "exist", "size"):
        assert set(dist[t]) == {"yes", "no"} or set(dist[t]) == {"small", "large"}
        assert max(dist[t].values()) <= 0.6, (t, dist[t])
    assert set(dist["color"]) == set(D.COLORS) and max(dist["color"].values()) < 0.25
    assert set(dist["shape"]) == set(D.SHAPES) and max(dist["shape"].values()) < 0.35
    assert set(dist["count"]) == set(D.COUNT_WORDS) and max(dist["count"].values()) < 0.3
    # "no" exist questions often name a present colour or shape (colour-shape binding)
    near = [
        q
        for s in images[:N_BALANCE]
        for q in s.questions
        if q.qtype == "exist" and q.answer == "no" and any(o.color == q.words[3] or o.shape == q.words[4] for o in s.objects)
    ]
    assert len(near) >= 0.4 * dist["exist"]["no"] * sum(q.qtype == "exist" for q in qs)


def test_every_word_is_in_the_vocabulary(images, videos):
    assert list(D.VOCAB) == sorted(set(D.VOCAB))
    vocab = set(D.VOCAB)
    for words in (D.SHAPES, D.COLORS, D.SIZES, D.DIRECTIONS, D.COUNT_WORDS, D.CAPTION_PROMPT, ("yes", "no")):
        assert set(words) <= vocab
    for s in images:
        for q in s.questions:
            assert set(q.words) <= vocab and q.answer in vocab and set(q.choices) <= vocab
            assert all(w == w.lower() and " " not in w for w in q.words)
            assert q.text == " ".join(q.words)
    for v in videos:
        assert set(v.caption.split()) <= vocab
        for q in v.questions:
            assert set(q.words) <= vocab and q.answer in vocab and set(q.choices) <= vocab


# -- videos -----------------------------------------------------------------------------------------


def test_videos_match_their_ground_truth(videos):
    for v in videos[:150]:
        assert v.frames.shape == (8, 112, 112, 3) and v.frames.dtype == np.uint8 and v.path is None
        n = len(v.objects)
        assert n in (1, 2) and len(v.motions) == len(v.appear) == len(v.speeds) == n
        assert len({o.color for o in v.objects}) == n
        assert v.appear[0] == 0 and all(a == 0 or 2 <= a <= 4 for a in v.appear)
        pos = v.positions()
        sat = saturated(v.frames)
        ref = np.array([D.COLOR_RGB[c] for c in D.COLORS], np.float32)
        nearest = ((v.frames[..., None, :].astype(np.float32) - ref) ** 2).sum(-1).argmin(-1)
        for i, o in enumerate(v.objects):
            px = D.FRAME_SIZE_PX[o.size]
            assert (v.speeds[i] == 0) == (v.motions[i] == "still") and v.speeds[i] in (0, 2, 3)
            mine = sat & (nearest == D.COLORS.index(o.color))
            centroids = []
            for t in range(8):
                if t < v.appear[i]:
                    assert not mine[t].any(), (v.uid, t)  # not visible yet
                    continue
                y, x = pos[t, i]
                assert 0 <= y and y + px <= 112 and 0 <= x and x + px <= 112  # stays inside
                ys, xs = np.nonzero(mine[t])
                assert len(ys) > 0.4 * px * px
                centroids.append((ys.mean(), xs.mean()))
            dy, dx = np.array(centroids[-1]) - np.array(centroids[0])
            travel = v.speeds[i] * (7 - v.appear[i])
            expect = {"left": (0, -travel), "right": (0, travel), "up": (-travel, 0), "down": (travel, 0), "still": (0, 0)}
            assert np.allclose((dy, dx), expect[v.motions[i]], atol=0.5), (v.uid, i, dy, dx)
        for q in v.questions:
            assert q.answer in q.choices
            if q.qtype == "direction":
                assert q.choices == D.DIRECTIONS
                (i,) = [k for k, o in enumerate(v.objects) if (o.color, o.shape) == (q.words[4], q.words[5])]
                assert q.words[:4] == ("which", "way", "does", "the") and q.answer == v.motions[i] != "still"
            elif q.qtype == "moving":
                assert q.words == ("which", "object", "moves", "?") and q.choices == D.COLORS
                assert sorted(m == "still" for m in v.motions) == [False, True]
                (i,) = [k for k, m in enumerate(v.motions) if m != "still"]
                assert q.answer == v.objects[i].color
            elif q.qtype == "first":
                assert q.words == ("which", "object", "appears", "first", "?") and q.choices == D.COLORS
                assert n == 2 and v.appear[1] > 0 and q.answer == v.objects[0].color
            elif q.qtype == "count":
                assert q.choices == ("one", "two") and q.answer == ("one", "two")[n - 1]
            else:
                raise AssertionError(q.qtype)
        # the caption names every object with its colour, shape and motion
        words = v.caption.split()
        for o, m, a in zip(v.objects, v.motions, v.appear):
            assert o.color in words and o.shape in words
            assert ("stays" in words and "still" in words) if m == "still" else m in words
            if m == "still":
                assert o.size in words
            if a > 0:
                assert "appears" in words and "then" in words
        assert words[0] in ("a", "an")


def test_frame_patch_labels_match_the_pixels(videos):
    for v in videos[:40]:
        shapes, colors = v.frame_patch_labels()
        assert shapes.shape == colors.shape == (8, 8, 8)
        sat = saturated(v.frames).reshape(8, 8, 14, 8, 14).sum(axis=(2, 4)) > 0
        assert np.array_equal(sat, colors > 0) and np.array_equal(sat, shapes > 0), v.uid
        for t, r, c in np.argwhere(sat):
            patch = v.frames[t, r * 14 : r * 14 + 14, c * 14 : c * 14 + 14]
            rgb = patch[saturated(patch)].mean(0)
            assert D.COLORS[colors[t, r, c] - 1] == nearest_color(rgb)
            (o,) = [o for o in v.objects if o.color == D.COLORS[colors[t, r, c] - 1]]
            assert shapes[t, r, c] == D.SHAPES.index(o.shape) + 1


def test_video_balance(videos, capsys):
    qs = [q for v in videos for q in v.questions]
    dist = distribution(qs)
    two = [v for v in videos if len(v.objects) == 2]
    late = sum(v.appear[1] > 0 for v in two) / len(two)
    moving = collections.Counter(m for v in videos for m in v.motions)
    with capsys.disabled():
        print(f"\nvideo answer distribution over {len(videos)} train clips (late second object in {late:.2f} of two-object clips):")
        for t in D.VIDEO_QTYPES:
            print(f"  {t:9s} n={sum(q.qtype == t for q in qs):4d}", {a: round(p, 3) for a, p in dist[t].items()})
        print("  motions", dict(moving))
    assert 0.2 < late < 0.45
    assert max(dist["count"].values()) <= 0.6
    assert set(dist["direction"]) == set(D.DIRECTIONS) and max(dist["direction"].values()) < 0.35
    for t in ("moving", "first"):
        assert sum(q.qtype == t for q in qs) >= 0.1 * len(videos) and max(dist[t].values()) < 0.3
    assert 0.2 < moving["still"] / sum(moving.values()) < 0.6


# -- mp4 I/O ----------------------------------------------------------------------------------------


def test_mp4_round_trip_keeps_frames_and_colours(tmp_path):
    v = D.make_video("val", 5)
    path = tmp_path / "clip.mp4"
    D.write_mp4(v.frames, path)
    back = D.read_video(path)
    assert back.shape == v.frames.shape and back.dtype == np.uint8
    assert np.abs(back.astype(float) - v.frames).mean() < 3.0
    pos = v.positions()
    for t in range(8):
        for i, o in enumerate(v.objects):
            if t < v.appear[i]:
                continue
            px = D.FRAME_SIZE_PX[o.size]
            y, x = pos[t, i]
            inside = D.shape_mask(o.shape, px)
            inside = inside & np.pad(inside, 1)[2:, 1:-1] & np.pad(inside, 1)[:-2, 1:-1]  # away from edges
            rgb = back[t, y : y + px, x : x + px][inside].mean(0)
            assert nearest_color(rgb) == o.color
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed away


def test_read_video_samples_uniformly(tmp_path):
    frames = np.zeros((8, 32, 32, 3), np.uint8)
    for t in range(8):
        frames[t] = 20 + 28 * t  # each frame its own grey level
    path = tmp_path / "ramp.mp4"
    D.write_mp4(frames, path)
    for k in (1, 3, 4, 8, 12):
        got = D.read_video(path, num_frames=k)
        idx = np.linspace(0, 7, k).round().astype(int)
        assert got.shape == (k, 32, 32, 3)
        level = np.rint((got.reshape(k, -1).mean(1) - 20) / 28).astype(int)
        assert level.tolist() == idx.tolist(), (k, level, idx)
    assert np.linspace(0, 7, 4).round().astype(int).tolist() == [0, 2, 5, 7]
    with pytest.raises(ValueError):
        D.read_video(path, num_frames=0)


def test_unreadable_videos_raise_naming_the_file(tmp_path):
    missing = tmp_path / "missing.mp4"
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    for path in (missing, empty, corrupt):
        with pytest.raises(D.VideoReadError) as info:
            D.read_video(path)
        assert str(path) in str(info.value)
        assert isinstance(info.value, ValueError)


def test_write_mp4_rejects_bad_frames(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        D.write_mp4(np.zeros((2, 16, 16, 3), np.float32), tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="even"):
        D.write_mp4(np.zeros((2, 15, 16, 3), np.uint8), tmp_path / "x.mp4")


def test_video_split_writes_once_and_repairs(tmp_path):
    clips = D.video_split("test", 3, tmp_path)
    paths = [tmp_path / f"test-{i}.mp4" for i in range(3)]
    assert [c.path for c in clips] == [str(p) for p in paths]
    for c, p in zip(clips, paths):
        assert np.array_equal(c.frames, D.read_video(p))  # what decord decodes, not the raw frames
        assert c.questions == D.make_video("test", int(c.uid.split("-")[1])).questions
    stamps = [os.stat(p).st_mtime_ns for p in paths]
    again = D.video_split("test", 3, tmp_path)
    assert [os.stat(p).st_mtime_ns for p in paths] == stamps  # reused, not re-encoded
    assert all(np.array_equal(a.frames, b.frames) for a, b in zip(clips, again))
    paths[0].unlink()
    paths[1].write_bytes(b"not a video")
    D.write_mp4(D.make_video("test", 0).frames, paths[2])  # a stale clip from another index
    repaired = D.video_split("test", 3, tmp_path)
    for c, p in zip(repaired, paths):
        assert np.abs(D.read_video(p).astype(float) - D.make_video("test", int(c.uid.split("-")[1])).frames).mean() < 3.0
    assert np.array_equal(repaired[0].frames, clips[0].frames)


# -- mosaic -----------------------------------------------------------------------------------------


def test_mosaic_tiles_four_frames_row_major():
    frames = np.stack([np.full((112, 112, 3), t, np.uint8) for t in range(8)])
    tiles = D.mosaic(frames)
    assert len(tiles) == 2 and all(t.shape == (224, 224, 3) and t.dtype == np.uint8 for t in tiles)
    for k, tile in enumerate(tiles):
        quads = [tile[:112, :112], tile[:112, 112:], tile[112:, :112], tile[112:, 112:]]
        assert [int(q.mean()) for q in quads] == [4 * k, 4 * k + 1, 4 * k + 2, 4 * k + 3]
    v = D.make_video("test", 1)
    assert np.array_equal(D.mosaic(v.frames)[1][112:, 112:], v.frames[7])
    with pytest.raises(ValueError, match="multiple of 4"):
        D.mosaic(frames[:6])
    with pytest.raises(ValueError, match="112"):
        D.mosaic(np.zeros((4, 64, 64, 3), np.uint8))


def test_save_examples(tmp_path):
    paths = D.save_examples(tmp_path, n=1)
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["grid.png", "image_0.png", "image_0.txt", "video_0.png", "video_0.txt"]
    assert "->" in (tmp_path / "image_0.txt").read_text() and "caption:" in (tmp_path / "video_0.txt").read_text()
