"""The dense video-captioning task, its scoring, the captioner and its FLASH draft."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vlmprune.evals import builtin, data, harness
from vlmprune.evals import train_captioner as tc

CAPTIONER = tc.CAPTIONER
DRAFT = CAPTIONER / "flash-draft"


def test_dense_clips_are_deterministic_and_long():
    for split in ("train", "val", "test"):
        for i in range(12):
            a, b = data.make_dense_video(split, i), data.make_dense_video(split, i)
            assert a.caption == b.caption and np.array_equal(a.frames, b.frames)
            assert a.frames.shape == (data.NUM_FRAMES, data.FRAME_SIZE, data.FRAME_SIZE, 3)
            words = a.caption.split()
            assert 30 <= len(words) <= 60
            assert len(a.objects) in (2, 3) and len({o.color for o in a.objects}) == len(a.objects)
            assert list(a.appear) == sorted(a.appear)  # caption order is the order of events
    assert data.make_dense_video("val", 0).caption != data.make_dense_video("test", 0).caption
    # the short clips are untouched: their own generator stream
    assert data.make_video("test", 0).caption == " ".join(data.caption_words(*_short(data.make_video("test", 0))))


def _short(v):
    return v.objects, v.motions, v.appear


def test_dense_caption_words_and_facts():
    objs = (data.Obj("circle", "red", "small", 0, 0), data.Obj("cross", "blue", "large", 5, 5))
    words = data.dense_caption_words(objs, ("down", "still"), (0, 3))
    assert " ".join(words) == (
        "there are two objects . first a small red circle appears at the top left and moves down . "
        "then a large blue cross appears at the bottom right and stays still ."
    )
    facts = data.dense_facts(words)
    assert ("count", "two") in facts and ("red", "motion", "down") in facts and ("blue", "event", "1") in facts
    assert ("blue", "horizontal", "right") in facts and ("red", "horizontal", "left") in facts
    assert len(facts) == 1 + 6 * 2
    assert data.fact_score(words, words) == 1.0
    wrong = [w if w != "down" else "up" for w in words]
    assert data.fact_score(wrong, words) == pytest.approx(12 / 13)
    recoloured = [w if w != "red" else "green" for w in words]  # every fact of that object is lost
    assert data.fact_score(recoloured, words) == pytest.approx(7 / 13)
    assert data.fact_score([], words) == 0.0
    simultaneous = data.dense_caption_words(objs, ("down", "still"), (0, 0))
    assert ("blue", "event", "0") in data.dense_facts(simultaneous) and " and a large blue" in " ".join(simultaneous)
    # a fact stated twice with different values is wrong
    doubled = [*words, "and", "a", "small", "red", "square", "."]
    assert data.fact_score(doubled, words) == pytest.approx(11 / 13)  # red's shape and event now conflict


def test_captioner_vocabulary_extends_the_builtin_one():
    base, extended = builtin.vocabulary(), builtin.vocabulary(data.DENSE_WORDS)
    assert extended[: len(base)] == base and set(data.DENSE_WORDS) <= set(extended)
    assert not set(data.DENSE_WORDS) & set(data.VOCAB)


def test_dense_task_loads_and_scores(tmp_path: Path):
    task = harness.TASKS["video_dense_caption"]()
    items = task.load(2, tmp_path)
    assert [it.uid for it in items] == ["dense-test-0/dense", "dense-test-1/dense"]
    assert len(items[0].images) == 2 and items[0].answer == data.make_dense_video("test", 0).caption
    assert (tmp_path / "dense-test-0.mp4").is_file()
    assert "video_dense_caption" not in harness.BUILTIN_TASKS  # not in the default grid


def test_grow_from_preserves_the_builtin_model():
    model, _ = tc.build_captioner(seed=0)
    source, processor = builtin.load_builtin()
    clip = data.make_video("val", 3)
    inputs = builtin.encode(processor, [builtin.caption_prompt(2)], [data.mosaic(clip.frames)])
    with torch.no_grad():
        a = source(**inputs).logits
        b = model(**inputs).logits[..., : a.shape[-1]]
    assert torch.allclose(a, b, atol=1e-2)
    assert sum(p.numel() for p in model.model.language_model.parameters()) > 6e6


def test_bench_parse_method():
    from vlmprune.methods.flash.bench import parse_method

    assert parse_method("fastervlm:ratio=0.9") == ("fastervlm", {"ratio": 0.9})
    assert parse_method("fastervlm") == ("fastervlm", {})


@pytest.mark.skipif(not (CAPTIONER / "model.safetensors").exists(), reason="captioner not shipped")
def test_captioner_and_draft_load_offline_and_flash_is_lossless():
    import vlmprune
    from vlmprune.methods.flash.draft import load_draft

    em = harness.load_model(str(CAPTIONER))
    assert em.builtin and next(em.model.parameters()).dtype == torch.float32
    assert em.model.config.text_config.num_hidden_layers == 8
    assert (CAPTIONER / "model.safetensors").stat().st_size < 40e6
    load_draft(DRAFT)
    clips = [data.make_dense_video("val", i) for i in range(2)]
    for batch in ([clips[0]], clips):
        inputs = builtin.encode(em.processor, [tc.dense_prompt()] * len(batch), [data.mosaic(c.frames) for c in batch])
        ref = em.model.generate(**inputs, max_new_tokens=harness.DENSE_CAPTION_MAX_NEW_TOKENS, do_sample=False)
        with vlmprune.apply(em.model, "flash", draft=str(DRAFT), depth=4) as h:
            out = em.model.generate(**inputs, max_new_tokens=harness.DENSE_CAPTION_MAX_NEW_TOKENS, do_sample=False)
        assert torch.equal(out, ref)
        assert h.stats.decode[-1].accepted > 0


def test_shipped_checkpoints_by_name():
    """``--model captioner`` / ``builtin`` name the shipped checkpoints wherever pip put them."""
    from pathlib import Path

    from vlmprune.artifacts import named_checkpoint
    from vlmprune.evals import harness
    from vlmprune.training.data import load_model

    assert Path(named_checkpoint("captioner"), "config.json").exists()
    assert Path(named_checkpoint("builtin"), "config.json").exists()
    assert named_checkpoint("some/dir") == "some/dir"
    em = harness.load_model("captioner")
    assert em.model.config.text_config.num_hidden_layers == 8 and em.path == Path(named_checkpoint("captioner"))
    model, _ = load_model("captioner", "cpu")
    assert model.config.text_config.num_hidden_layers == 8
