"""A user's own workflows never get a silently wrong answer: torch.compile, copies, pickling, ties."""

from __future__ import annotations

import copy
import io
import pickle
import sys
from pathlib import Path

import pytest
import torch

import vlmprune
from vlmprune.scoring import topk_indices

sys.path.insert(0, str(Path(__file__).parent))
from test_internvl import IMG_CTX, MERGED, batch, prompt, split, tiny_internvl  # noqa: E402

from tiny import llava_inputs, tiny_llava  # noqa: E402


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# -- torch.compile ---------------------------------------------------------------------------------


def test_compiled_before_apply_refuses_instead_of_bypassing():
    model = tiny_llava(seed=0)
    inp = llava_inputs(model)
    compiled = torch.compile(model, backend="eager")
    compiled(**inp)  # traced and cached before the method exists
    with vlmprune.apply(model, "fastervlm", ratio=0.75) as handle:
        with pytest.raises(RuntimeError, match="cannot run under torch.compile"):
            compiled(**inp)
        assert not handle.stats.records
        model(**inp)  # the model itself still runs, pruned
        assert handle.stats.last.visual_out == [4]
    assert compiled(**inp).logits.shape[1] == inp["input_ids"].shape[1]  # works again after remove()


def test_compiled_after_apply_refuses():
    model = tiny_llava(seed=0)
    inp = llava_inputs(model)
    with vlmprune.apply(model, "random", ratio=0.5):
        compiled = torch.compile(model, backend="eager")
        with pytest.raises(RuntimeError, match="cannot run under torch.compile"):
            compiled(**inp)


def test_apply_on_a_compiled_wrapper_says_what_to_do():
    model = tiny_llava(seed=0)
    with pytest.raises(TypeError, match=r"compiled\._orig_mod"):
        vlmprune.apply(torch.compile(model, backend="eager"), "fastervlm")
    model.compile(backend="eager")
    with pytest.raises(TypeError, match="compiled in place"):
        vlmprune.apply(model, "fastervlm")


# -- copies and pickling -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fastervlm", "dyvte"])
def test_deepcopy_of_a_patched_model_is_a_clean_unpatched_copy(method):
    model = tiny_llava(seed=0)
    inp = llava_inputs(model, batch=2)
    stock = model(**inp).logits
    options = {"ratio": 0.75} if method == "fastervlm" else {"exit_layer": 1}
    handle = vlmprune.apply(model, method, **options)
    patched = model(**inp).logits
    clone = copy.deepcopy(model)
    assert "_vlmprune_handles" not in clone.__dict__  # no stale "active" handle
    assert "__deepcopy__" not in clone.__dict__
    assert torch.equal(clone(**inp).logits, stock)
    assert torch.equal(model(**inp).logits, patched)  # the original stays patched
    with vlmprune.apply(clone, method, **options) as own:  # and the copy can be patched on its own
        assert torch.equal(clone(**inp).logits, patched)
        assert own.stats.records and len(handle.stats.records) == 2
    handle.remove()
    assert "__deepcopy__" not in model.__dict__
    assert torch.equal(model(**inp).logits, stock)


def test_torch_save_of_a_patched_model_saves_the_unpatched_model():
    model, twin = tiny_llava(seed=0), tiny_llava(seed=0)
    inp = llava_inputs(model)
    with vlmprune.apply(model, "fastervlm", ratio=0.75):
        buf = io.BytesIO()
        torch.save(model, buf)
        restored = pickle.loads(pickle.dumps(model))
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert "_vlmprune_handles" not in loaded.__dict__
    assert torch.equal(loaded(**inp).logits, twin(**inp).logits)
    assert torch.equal(restored(**inp).logits, twin(**inp).logits)


def test_pickling_after_a_forward_fails_with_a_clear_message():
    """transformers installs unpicklable hooks on the first forward (the stock model fails too);
    the patched model says so and names the ways to save."""
    model = tiny_llava(seed=0)
    inp = llava_inputs(model)
    with vlmprune.apply(model, "fastervlm", ratio=0.75):
        model(**inp)
        with pytest.raises(TypeError, match="save_pretrained"):
            torch.save(model, io.BytesIO())


# -- ties ------------------------------------------------------------------------------------------------


def test_topk_ties_go_to_the_lowest_index():
    for n in (8, 64, 256, 1024):
        assert topk_indices(torch.ones(n), 5).tolist() == [0, 1, 2, 3, 4]
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.5, 0.5, 0.2])
    assert topk_indices(scores, 4).tolist() == [1, 2, 3, 4]
    # without ties it is exactly torch.topk's set
    g = torch.Generator().manual_seed(0)
    s = torch.rand(577, generator=g)
    assert torch.equal(topk_indices(s, 57), torch.sort(torch.topk(s, 57).indices).values)


def test_tied_scores_keep_the_same_tokens_in_a_batch_and_alone():
    """A flat tile (every patch equal, no position embedding) ties every score exactly: the kept set
    must not depend on which other images share the batch."""
    model = tiny_internvl(seed=0)
    with torch.no_grad():
        model.model.vision_tower.embeddings.position_embeddings.zero_()
    inputs = batch([prompt([1]), prompt([1])], 2)
    inputs["pixel_values"][1] = 0.3  # the second sample's tile is flat
    alone = split(inputs, 1, 1, 1)
    kept = []
    with vlmprune.apply(model, "fastervlm", ratio=0.75):
        for call in (inputs, alone):
            seen: list[torch.Tensor] = []
            h = model.model.language_model.register_forward_pre_hook(
                lambda m, a, k, seen=seen: seen.append(k["inputs_embeds"]), with_kwargs=True)
            model(**call)
            h.remove()
            kept.append(seen[0][-1])
    n_kept = max(1, round(MERGED * 0.25))
    assert kept[0].shape == kept[1].shape
    torch.testing.assert_close(kept[0], kept[1])
    assert int((prompt([1]) == IMG_CTX).sum()) == MERGED and kept[0].shape[0] == prompt([1]).numel() - MERGED + n_kept
