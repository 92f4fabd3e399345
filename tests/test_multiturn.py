"""Multi-turn chat that reuses the KV cache: the second turn passes the whole history's input_ids and
the returned cache, without the image. With any method applied it must give what a fresh run of the
same patched model on the full history gives (or refuse clearly), on every family."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import vlmprune

sys.path.insert(0, str(Path(__file__).parent))
from test_flops import FAMILIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.past_key_values. is deprecated")

#: method -> options; each is checked on every family
METHODS = {
    "fastervlm": {"ratio": 0.75},
    "random": {"ratio": 0.75, "seed": 3},
    "pool": {"ratio": 0.75},
    "dyvte": {"exit_layer": 1},
}
VISUAL_KEYS = ("pixel_values", "image_sizes", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
               "batch_num_images")


def _no_placeholders(model) -> list[int]:
    """Image / video placeholder ids: a random tiny model may generate them, and a generated
    placeholder would be read as an image slot when the history is run afresh."""
    from vlmprune.adapters import for_model

    return for_model(model).placeholder_ids()


def _two_turns(model, inputs):
    """(cached second turn, fresh second turn) greedy tokens and their step logits."""
    first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                           suppress_tokens=_no_placeholders(model))
    new = torch.randint(5, 60, (first.sequences.shape[0], 6), generator=torch.Generator().manual_seed(1))
    history = torch.cat([first.sequences, new], dim=1)
    mask = torch.ones_like(history)
    opts = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True,
                suppress_tokens=_no_placeholders(model))
    cached = model.generate(input_ids=history, attention_mask=mask, past_key_values=first.past_key_values, **opts)
    visual = {k: v for k, v in inputs.items() if k in VISUAL_KEYS}
    fresh = model.generate(input_ids=history, attention_mask=mask, **visual, **opts)
    return cached, fresh, history, first.past_key_values, visual


def _gap(cached, fresh) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(cached.logits, fresh.logits))


@pytest.fixture(scope="module")
def stock_gap():
    """How far a stock model's cached second turn is from its fresh run, per family: transformers'
    own chunked-prefill noise (about 1e-3 for Qwen's M-RoPE models, 1e-6 elsewhere), the floor the
    patched models are held to."""
    gaps = {}

    def get(family: str) -> float:
        if family not in gaps:
            torch.manual_seed(0)
            model, inputs, _ = FAMILIES[family]("sdpa")
            inputs = dict(inputs, attention_mask=torch.ones_like(inputs["input_ids"]))
            with torch.no_grad():
                cached, fresh, *_ = _two_turns(model, inputs)
            assert torch.equal(cached.sequences, fresh.sequences)
            gaps[family] = _gap(cached, fresh)
        return gaps[family]

    return get


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_second_turn_on_the_cache_equals_a_fresh_run(family, method, stock_gap):
    torch.manual_seed(0)
    model, inputs, _ = FAMILIES[family]("sdpa")
    inputs = dict(inputs, attention_mask=torch.ones_like(inputs["input_ids"]))
    with torch.no_grad(), vlmprune.apply(model, method, **METHODS[method]) as handle:
        cached, fresh, *_ = _two_turns(model, inputs)
        assert handle.stats.records, "the method did not run"
    assert torch.equal(cached.sequences, fresh.sequences), (family, method)
    assert _gap(cached, fresh) <= 2 * stock_gap(family) + 1e-4, (family, method, _gap(cached, fresh))


@pytest.mark.parametrize("method", ["fastervlm", "random", "pool"])
def test_image_passed_again_on_a_pruned_cache_is_a_clear_error(method):
    torch.manual_seed(0)
    model, inputs, _ = FAMILIES["llava-clip"]("sdpa")
    with torch.no_grad(), vlmprune.apply(model, method, ratio=0.75):
        _, _, history, cache, visual = _two_turns(model, dict(inputs, attention_mask=torch.ones_like(inputs["input_ids"])))
        with pytest.raises(ValueError, match="already holds the pruned image tokens"):
            model.generate(input_ids=history, past_key_values=cache, **visual, max_new_tokens=2)


def test_the_cache_reports_the_unpruned_length_only_while_generate_continues_on_it():
    """generate slices the new tokens by the cache length; masks and everyone else see the real
    (pruned) length, and the cache really is shorter."""
    torch.manual_seed(0)
    model, inputs, n = FAMILIES["llava-clip"]("sdpa")
    seen = []
    with torch.no_grad(), vlmprune.apply(model, "fastervlm", ratio=0.75) as handle:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        cache = out.past_key_values
        removed = handle.stats.records[0].visual_in[0] - handle.stats.records[0].visual_out[0]
        assert cache.get_seq_length() == n + 2 - removed == cache.layers[0].keys.shape[-2]
        hook = model.model.language_model.register_forward_pre_hook(
            lambda m, a, k: seen.append((cache.get_seq_length(), cache.get_query_offset())), with_kwargs=True)
        history = torch.cat([out.sequences, torch.tensor([[7, 8]])], dim=1)
        model.generate(input_ids=history, past_key_values=cache, max_new_tokens=2, do_sample=False)
        hook.remove()
        assert seen[0] == (n + 2, n + 2 - removed)  # what a stock cache would hold / what this one holds
        assert cache.get_seq_length() == cache.layers[0].keys.shape[-2] == n + 6 - removed


def _explicit_cache_turns(model, inputs, new_tokens=(7, 8, 9), suppress=True):
    """The other common pattern: the caller owns a cache object and passes it to both turns."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.get_text_config())
    quiet = dict(do_sample=False, suppress_tokens=_no_placeholders(model) if suppress else None)
    sequences = model.generate(**inputs, past_key_values=cache, max_new_tokens=3, **quiet)
    history = torch.cat([sequences, torch.tensor([list(new_tokens)] * sequences.shape[0])], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones(history.shape[0], history.shape[1] - inputs["attention_mask"].shape[1],
                                                           dtype=inputs["attention_mask"].dtype)], dim=1)
    cached = model.generate(input_ids=history, attention_mask=mask, past_key_values=cache, max_new_tokens=4, **quiet)
    visual = {k: v for k, v in inputs.items() if k in VISUAL_KEYS}
    fresh = model.generate(input_ids=history, attention_mask=mask, **visual, max_new_tokens=4, **quiet)
    return cached, fresh


@pytest.mark.parametrize("mode", ["fast", "pooling", "hybrid"])
def test_slowfast_second_turn_equals_a_fresh_run(mode):
    """Hybrid with ``cross_attn_during_decode=True``: every text token after the video queries the
    slow tokens, in a prefill or a later step alike. With the reference's default (False), tokens
    that arrive after the prefill (generated ones, a later turn's) get no cross-attention by design,
    so a cached later turn and a fresh prefill of the history differ there (docs/troubleshooting.md)."""
    from test_slowfast import VIDEO, randomise, tiny_video_llava, video_batch

    model = tiny_video_llava()
    inputs = video_batch([2, 2], seed=3, text_before=2)  # two samples, left padded, a 2-mosaic video each
    options = dict(VIDEO, mode=mode)
    if mode == "hybrid":
        options["cross_attn_during_decode"] = True
    if mode == "pooling":
        options = dict(mode=mode, mosaic=2, slow_frames=1, slow_stride=2, fast_stride=4)
    with torch.no_grad(), vlmprune.apply(model, "slowfast", **options) as handle:
        if mode == "hybrid":
            randomise(handle, warm=0.7)
        cached, fresh = _explicit_cache_turns(model, inputs)
    assert torch.equal(cached, fresh)


@pytest.mark.parametrize("method", ["fastervlm", "random", "pool", "dyvte"])
def test_a_caller_owned_cache_across_turns_equals_a_fresh_run(method):
    torch.manual_seed(0)
    model, inputs, _ = FAMILIES["llava-clip"]("sdpa")
    inputs = dict(inputs, attention_mask=torch.ones_like(inputs["input_ids"]))
    with torch.no_grad(), vlmprune.apply(model, method, **METHODS[method]):
        cached, fresh = _explicit_cache_turns(model, inputs)
    assert torch.equal(cached, fresh)


def test_flash_refuses_to_continue_on_a_filled_cache():
    """Speculative decoding prefills on its own; continuing on a filled cache gave wrong tokens."""
    torch.manual_seed(0)
    model, inputs, _ = FAMILIES["llava-clip"]("sdpa")
    inputs = dict(inputs, attention_mask=torch.ones_like(inputs["input_ids"]))
    with torch.no_grad(), pytest.warns(UserWarning, match="UNTRAINED"), vlmprune.apply(model, "flash"):
        with pytest.raises(ValueError, match="cannot continue on a filled KV cache"):
            _explicit_cache_turns(model, inputs, suppress=False)


@pytest.mark.parametrize("vtu", ["fast", False])
def test_dymu_second_turn_equals_a_fresh_run(vtu):
    """DyMU keeps a full-length cache with VTU and a compact one without; both continue right."""
    from test_dymu import tiny

    from tiny import llava_inputs

    model = tiny()
    inputs = llava_inputs(model, batch=2)
    with torch.no_grad(), vlmprune.apply(model, "dymu", thresholds=[0.2] * 4, vtu=vtu) as handle:
        cached, fresh = _explicit_cache_turns(model, inputs)
        assert handle.stats.records[0].visual_out[0] < handle.stats.records[0].visual_in[0]  # it merged
    assert torch.equal(cached, fresh)
