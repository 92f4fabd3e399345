"""The shipped built-in model: loads offline, answers the synthetic tasks, trains end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import vlmprune
from vlmprune.evals import builtin, data, train


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield

needs_checkpoint = pytest.mark.skipif(
    not (builtin.CHECKPOINT / "model.safetensors").exists(), reason="no shipped checkpoint in this tree"
)


@pytest.fixture(scope="module")
def shipped():
    return builtin.load_builtin()


@needs_checkpoint
def test_checkpoint_is_small_and_logged():
    size = sum(p.stat().st_size for p in builtin.CHECKPOINT.iterdir())
    assert size < 25 * 2**20
    log = json.loads((builtin.CHECKPOINT / "train_log.json").read_text())
    assert log["training_minutes"] <= 45 and "val_accuracy" in log


@needs_checkpoint
def test_shipped_model_loads_offline_and_answers(shipped):
    model, processor = shipped
    acc = train.quick_accuracy(model, processor, "test", n=40)
    # README: 92.3% image / 89.3% video multiple choice on the default test items; this fixed
    # subset measured 93.6% / 90.7% when the checkpoint was made. The image bound is the issue's
    # 90% target; the video one leaves the same margin for other CPUs' numerics.
    assert acc["image_mc"] >= 90.0, acc
    assert acc["video_mc"] >= 87.0, acc


@needs_checkpoint
def test_fastervlm_keeps_accuracy_on_shipped_model(shipped):
    model, processor = shipped
    with vlmprune.apply(model, "fastervlm", ratio=0.75) as handle:
        acc = train.quick_accuracy(model, processor, "test", n=40)
    kept = {v for r in handle.stats.records for v in r.visual_out}
    assert kept == {64, 128}  # 64 of 256 tokens per image; videos are two mosaic images
    assert acc["image_mc"] >= 88.0, acc  # measured 91.3% on this subset


def test_untrained_architecture_matches_contract():
    model, processor = builtin.build_untrained()
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    inputs = builtin.encode(processor, [builtin.image_prompt(["how", "many", "objects", "are", "there", "?"])],
                            [[data.make_image("test", 0).image]])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == data.GRID * data.GRID
    assert len(builtin.choice_ids(processor.tokenizer, data.COUNT_WORDS)) == 5
    with pytest.raises(ValueError, match="not in the built-in vocabulary"):
        builtin.choice_ids(processor.tokenizer, ["zebra"])


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-builtin"):
        builtin.load_builtin(tmp_path)


def test_training_smoke_run_saves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    with torch.enable_grad():
        rc = train.main([
            "--output", str(out), "--vision-steps", "2", "--place-steps", "2", "--lm-steps", "2",
            "--vision-batch", "2", "--lm-batch", "2", "--eval-samples", "2", "--resume-dir", str(tmp_path / "state"),
            "--threads", "1", "--cache-images", "3", "--cache-clips", "2", "--curriculum-share", "0.5",
        ])
    assert rc == 0
    model, processor = builtin.load_builtin(out)
    assert (out / "train_log.json").exists() and (tmp_path / "state" / "language.pt").exists()
    # resuming a finished run is a no-op that keeps the step count
    state = torch.load(tmp_path / "state" / "language.pt", weights_only=False)
    assert state["step"] == 2


@pytest.fixture(scope="module")
def tiny_cache():
    model, processor = builtin.build_untrained()
    cache = train.build_feature_cache(model.model.vision_tower, model.config.vision_feature_layer, 6, 3)
    return model, processor, cache


def test_feature_cache_equals_the_towers_features(tiny_cache):
    model, processor, cache = tiny_cache
    assert cache.image_feats.shape == (6, 256, 128) and cache.clip_feats.shape == (3, 512, 128)
    ref = model.model.get_image_features(pixel_values=train.to_pixels([cache.images[1].image]))
    ref = ref.pooler_output if hasattr(ref, "pooler_output") else ref
    ref = ref[0] if isinstance(ref, (list, tuple)) else ref
    projected = model.model.multi_modal_projector(cache.image_feats[1:2].float())
    torch.testing.assert_close(projected.reshape(ref.shape), ref, atol=0.05, rtol=0.05)  # bf16 cache
    assert cache.image_objects[1].sum() == int((cache.images[1].patch_labels()[0] > 0).sum())


def test_curriculum_batch_keeps_objects_at_original_positions(tiny_cache):
    model, processor, cache = tiny_cache
    tok, img = processor.tokenizer, model.config.image_token_id
    full = train.lm_batch(3, cache, 4, 0.5, 6, tok, img)
    short = train.lm_batch(3, cache, 4, 0.5, 6, tok, img, train.BatchPlan(keep_background=5))
    assert full["input_ids"].shape[1] > short["input_ids"].shape[1]
    for b in (full, short):
        n_slots = int((b["input_ids"] == img).sum())
        assert b["image_features"].shape[0] == n_slots
        # labels only on answers: every labelled token is a word or the end token, never an image slot
        labelled = b["labels"] != -100
        assert not (labelled & (b["input_ids"] == img)).any() and labelled.any()
        assert torch.equal(b["labels"][labelled], b["input_ids"][labelled])
    for row in range(4):
        ids, pos = short["input_ids"][row], short["position_ids"][row]
        slots = ids == img
        vis = pos[slots]
        assert torch.all(vis[1:] > vis[:-1])  # kept patches in order, at their own positions
        span = 256 if int(vis.max()) <= 256 else 512  # a clip's second mosaic always holds its objects
        text = pos[~slots & (short["attention_mask"][row] == 1)]
        assert int(ids[0]) == tok.bos_token_id and int(pos[0]) == 0 and int(vis[0]) >= 1
        assert int(text[1]) == span + 1 and torch.all(text[1:].diff() == 1)  # text continues after the full span
    # the curriculum keeps every object patch
    rng_objs = [int(cache.image_objects[j].sum()) for j in range(6)] + [int(cache.clip_objects[j].sum()) for j in range(3)]
    kept = short["input_ids"].eq(img).sum(1)
    assert all(int(k) - 5 in rng_objs for k in kept)


def test_contiguous_curriculum_numbers_like_a_pruned_sequence(tiny_cache):
    model, processor, cache = tiny_cache
    tok, img = processor.tokenizer, model.config.image_token_id
    original = train.lm_batch(5, cache, 3, 0.5, 6, tok, img, train.BatchPlan(keep_background=4))
    contiguous = train.lm_batch(5, cache, 3, 0.5, 6, tok, img, train.BatchPlan(keep_background=4, contiguous=True))
    assert torch.equal(original["input_ids"], contiguous["input_ids"])  # same tokens, only numbered differently
    assert torch.equal(original["image_features"], contiguous["image_features"])
    for row in range(3):
        n = int(contiguous["attention_mask"][row].sum())
        assert contiguous["position_ids"][row, :n].tolist() == list(range(n))
    # full sequences are numbered 0..N-1 whatever the flag
    full = train.lm_batch(5, cache, 3, 0.5, 6, tok, img, train.BatchPlan(contiguous=True))
    n = int(full["attention_mask"][0].sum())
    assert full["position_ids"][0, :n].tolist() == list(range(n))


def test_image_turns_cover_every_applicable_type():
    sample = data.make_image("train", 7)
    rng = np.random.default_rng(0)
    turns = train.image_turns(sample, rng, 12)
    assert len(turns) == 12
    cands = data.image_question_candidates(sample.objects)
    applicable = {t for t, pool in cands.items() if pool}
    asked = {next(q.qtype for t in cands.values() for q in t if list(q.words) == words) for words, _ in turns}
    assert asked == applicable


def test_size_labels_mark_object_patches():
    sample = data.make_image("train", 3)
    sizes = train.size_labels(sample)
    shapes = sample.patch_labels()[0].reshape(-1)
    assert ((sizes > 0) == (shapes > 0)).all()
    assert set(sizes[sizes > 0].tolist()) <= {1, 2}


def test_count_analysis_splits_images_by_object_coverage():
    from vlmprune.evals import analysis

    model, processor = builtin.build_untrained()
    out = analysis.count_when_objects_kept(model, processor, ratio=0.5, n=3)
    assert out["images"] == 3 and 0 <= out["all_objects_kept"] <= 3
    assert -4 <= out["mean_count_error"] <= 4


def _plan_args(**over):
    args = train.build_parser().parse_args([])
    for k, v in over.items():
        setattr(args, k, v)
    return args


def test_stage2_plan_curriculum_then_background_dropout():
    args = _plan_args(lm_steps=1000, curriculum_share=0.4, dropout_share=0.5, video_share=0.3, mixed_batches=False)
    plans = [train.stage2_plan(s, args) for s in range(1000)]
    assert plans == [train.stage2_plan(s, args) for s in range(1000)]  # drawn from the step: a resume repeats it
    early, late = plans[:400], plans[400:]
    assert all(p.keep_background == args.keep_background and p.background_share is None for p in early)
    assert not any(p.contiguous for p in early)  # curriculum at original positions by default
    assert all(p.keep_background is None for p in late)
    dropped = [p for p in late if p.background_share is not None]
    assert 0.4 < len(dropped) / len(late) < 0.6
    assert 0.35 < np.mean([p.contiguous for p in dropped]) < 0.65  # "mixed" numbering
    assert not any(p.contiguous for p in late if p.background_share is None)
    assert 0.24 < np.mean([p.kind == "video" for p in plans]) < 0.36 and {p.kind for p in plans} == {"image", "video"}
    assert {train.stage2_plan(s, _plan_args()).kind for s in range(50)} == {None}  # default: each row drawn
    no_dropout = _plan_args(lm_steps=100, curriculum_share=0.0, dropout_share=0.0)
    assert all(train.stage2_plan(s, no_dropout).background_share is None for s in range(100))


def test_one_kind_batches_and_background_share(tiny_cache):
    model, processor, cache = tiny_cache
    tok, img = processor.tokenizer, model.config.image_token_id
    video = train.lm_batch(2, cache, 4, 0.3, 6, tok, img, plan=train.BatchPlan("video"))
    assert video["input_ids"].eq(img).sum(1).tolist() == [512] * 4
    images = train.lm_batch(2, cache, 4, 0.3, 6, tok, img, plan=train.BatchPlan("image"))
    assert images["input_ids"].eq(img).sum(1).tolist() == [256] * 4
    none = train.lm_batch(2, cache, 4, 0.3, 6, tok, img, plan=train.BatchPlan("image", background_share=0.0))
    objects = sorted(int(cache.image_objects[j].sum()) for j in range(6))
    assert all(int(k) in objects for k in none["input_ids"].eq(img).sum(1))  # objects only
    half = train.lm_batch(2, cache, 4, 0.3, 6, tok, img, plan=train.BatchPlan("image", background_share=0.5))
    kept = half["input_ids"].eq(img).sum(1)
    assert all(any(int(k) == o + round(0.5 * (256 - o)) for o in objects) for k in kept)
    contiguous = train.lm_batch(2, cache, 4, 0.3, 6, tok, img,
                                plan=train.BatchPlan("image", background_share=0.5, contiguous=True))
    n = int(contiguous["attention_mask"][0].sum())
    assert contiguous["position_ids"][0, :n].tolist() == list(range(n))
    assert not torch.equal(half["position_ids"], contiguous["position_ids"])


def test_near_miss_exist_questions_share_a_colour_or_shape():
    for i in range(20):
        objects = data.make_image("train", i).objects
        pool = data.image_question_candidates(objects)["exist"]
        near = data.near_miss_exist(pool)
        colors, shapes = {o.color for o in objects}, {o.shape for o in objects}
        assert all(q.answer == "no" and (q.words[3] in colors or q.words[4] in shapes) for q in near)
        others = [q for q in pool if q.answer == "no" and q not in near]
        assert all(q.words[3] not in colors and q.words[4] not in shapes for q in others)
