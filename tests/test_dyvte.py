"""DyVTE (visual-token exit inside the LLM): reference computations on tiny random-init models.

The reference for a fixed exit is the paper's own training formulation: the stock model, with the
visual *key* columns blocked for text queries in every layer at or after the exit (and nothing
removed). Removal must equal it on every text position and in greedy generation, while the
layers after the exit really hold shorter KV caches.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

import vlmprune
from vlmprune.methods.dyvte import (
    DyVTEConfig,
    ExitGates,
    GatesError,
    Router,
    exit_decision,
    exit_labels,
    gate_features,
    load_gates,
    save_gates,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_qwen2_vl import IMG, VID, make_batch, tiny_qwen2_5_vl, tiny_qwen2_vl  # noqa: E402

from tiny import IMAGE_TOKEN, PAD, llama_config  # noqa: E402

LAYERS = 4


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def tiny_llava4(seed: int = 0, attn: str = "sdpa") -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=llama_config(num_hidden_layers=LAYERS, initializer_range=0.2),
                      image_token_id=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg._attn_implementation = attn
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


def llava_batch(lengths: list[tuple[int, int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded prompts ``text_before, 16 image tokens, text_after`` per (before, after)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.cat([torch.randint(4, 64, (b,), generator=g), torch.full((16,), IMAGE_TOKEN),
                       torch.randint(4, 64, (a,), generator=g)]) for b, a in lengths]
    width = max(r.numel() for r in rows)
    ids = torch.stack([torch.cat([torch.full((width - r.numel(),), PAD), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - r.numel(), dtype=torch.long), torch.ones(r.numel(), dtype=torch.long)]) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(len(rows), 3, 32, 32, generator=g)}


def one(inputs: dict, i: int) -> dict:
    """Sample ``i`` alone, its padding removed."""
    keep = inputs["attention_mask"][i].bool()
    out = {"input_ids": inputs["input_ids"][i : i + 1, keep], "attention_mask": inputs["attention_mask"][i : i + 1, keep]}
    out["pixel_values"] = inputs["pixel_values"][i : i + 1]
    return out


class MaskedExit:
    """The oracle: stock model, visual keys blocked for text queries in layers >= exit_at[b]."""

    def __init__(self, model, exit_at: list[int], visual_ids: tuple[int, ...]) -> None:
        self.model, self.exit_at, self.visual_ids = model, torch.tensor(exit_at), visual_ids
        self.handles = []

    def __enter__(self):
        lm = self.model.model.language_model
        self.handles.append(lm.register_forward_pre_hook(self._decoder, with_kwargs=True))
        for i, layer in enumerate(lm.layers):
            self.handles.append(layer.register_forward_pre_hook(self._layer(i), with_kwargs=True))
        self.visual = None
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _decoder(self, module, args, kwargs):
        embeds = kwargs["inputs_embeds"]
        mask = kwargs.get("attention_mask")
        q = embeds.shape[1]
        if self.visual is None:
            ids = self.ids
            self.visual = torch.zeros_like(ids, dtype=torch.bool)
            for t in self.visual_ids:
                self.visual |= ids == t
        cache = kwargs.get("cache")
        past = cache.get_seq_length() if cache is not None else 0
        kv = mask.shape[1] if isinstance(mask, torch.Tensor) else past + q
        valid = mask.bool() if isinstance(mask, torch.Tensor) else torch.ones(embeds.shape[0], kv, dtype=torch.bool)
        vis = torch.zeros_like(valid)
        vis[:, : self.visual.shape[1]] = self.visual
        query_vis = vis[:, kv - q :]
        allowed = torch.zeros(embeds.shape[0], q, kv, dtype=torch.bool)
        for r in range(q):
            allowed[:, r, : kv - q + r + 1] = True
        allowed &= valid.unsqueeze(1)
        self.base = allowed
        self.block = (~query_vis).unsqueeze(2) & vis.unsqueeze(1)

    def _layer(self, i):
        def hook(module, args, kwargs):
            exited = (self.exit_at <= i).view(-1, 1, 1)
            allowed = self.base & ~(self.block & exited)
            allowed = (allowed | ~allowed.any(-1, keepdim=True)).unsqueeze(1)
            like = kwargs.get("attention_mask")
            if isinstance(like, torch.Tensor) and like.is_floating_point():  # eager: additive mask
                allowed = torch.zeros(allowed.shape, dtype=like.dtype).masked_fill(~allowed, torch.finfo(like.dtype).min)
            kwargs["attention_mask"] = allowed
            return args, kwargs

        return hook

    def run(self, inputs: dict, **gen):
        self.ids = inputs["input_ids"]
        self.visual = None
        if gen:
            return self.model.generate(**inputs, **gen)
        return self.model(**inputs)


def kept_columns(inputs: dict, visual_ids=(IMAGE_TOKEN,)) -> torch.Tensor:
    """Expected column map after removal: real, non-visual columns, left re-padded (-1 = pad)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    vis = torch.zeros_like(mask)
    for t in visual_ids:
        vis |= ids == t
    keep = mask & ~vis
    width = int(keep.sum(1).max())
    cols = torch.full((ids.shape[0], width), -1)
    for b in range(ids.shape[0]):
        idx = torch.nonzero(keep[b]).squeeze(1)
        cols[b, width - idx.numel() :] = idx
    return cols


def assert_text_logits_equal(short: torch.Tensor, full: torch.Tensor, cols: torch.Tensor, atol=2e-5) -> None:
    for b in range(cols.shape[0]):
        sel = cols[b] >= 0
        torch.testing.assert_close(short[b, sel], full[b, cols[b, sel]], atol=atol, rtol=1e-4)


# -- config and bad input --------------------------------------------------------------------------
def test_config_validation():
    with pytest.raises(ValueError, match="exactly one"):
        DyVTEConfig()
    with pytest.raises(ValueError, match="exactly one"):
        DyVTEConfig(exit_layer=1, gates="x")
    with pytest.raises(ValueError, match="exit_layer"):
        DyVTEConfig(exit_layer=-1)
    with pytest.raises(ValueError, match="threshold"):
        DyVTEConfig(exit_layer=1, threshold=1.0)
    model = tiny_llava4()
    with pytest.raises(ValueError, match=r"0\.\.4"):
        vlmprune.apply(model, "dyvte", exit_layer=5)
    assert not model._forward_pre_hooks and "_vlmprune_handles" not in model.__dict__


# -- fixed exit ------------------------------------------------------------------------------------
def test_exit_at_last_layer_is_bit_identical():
    model = tiny_llava4()
    x = llava_batch([(3, 4), (1, 6)])
    ref = model(**x).logits
    gen = model.generate(**x, max_new_tokens=4, do_sample=False)
    with vlmprune.apply(model, "dyvte", exit_layer=LAYERS) as h:
        assert torch.equal(model(**x).logits, ref)
        assert torch.equal(model.generate(**x, max_new_tokens=4, do_sample=False), gen)
        assert h.stats.last.exit_layers == [LAYERS, LAYERS]
    assert torch.equal(model(**x).logits, ref)


@pytest.mark.parametrize("exit_layer", [0, 1, 2, 3])
def test_fixed_exit_equals_masking_and_caches_shrink(exit_layer):
    model = tiny_llava4()
    x = llava_batch([(3, 4)])
    with MaskedExit(model, [exit_layer], (IMAGE_TOKEN,)) as oracle:
        ref = oracle.run(x).logits
        ref_gen = oracle.run(x, max_new_tokens=5, do_sample=False)
    with vlmprune.apply(model, "dyvte", exit_layer=exit_layer) as h:
        out = model(**x, use_cache=True)
        n, v = x["input_ids"].shape[1], 16
        lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
        assert lengths == [n] * exit_layer + [n - v] * (LAYERS - exit_layer)
        assert_text_logits_equal(out.logits, ref, kept_columns(x))
        gen = model.generate(**x, max_new_tokens=5, do_sample=False)
        assert torch.equal(gen, ref_gen)
        rec = h.stats.last
        assert rec.exit_layers == [exit_layer]
        assert rec.visual_in == [16] and rec.visual_out == [round(16 * exit_layer / LAYERS)]
        assert rec.layer_tokens == [[n] * exit_layer + [n - v] * (LAYERS - exit_layer)]


def test_decode_cache_grows_in_every_layer():
    model = tiny_llava4()
    x = llava_batch([(3, 4)])
    with vlmprune.apply(model, "dyvte", exit_layer=2):
        out = model.generate(**x, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    n = x["input_ids"].shape[1]
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert lengths == [n + 2] * 2 + [n - 16 + 2] * 2  # the last token is sampled, not cached


def test_fixed_exit_batch_equals_each_alone():
    model = tiny_llava4()
    x = llava_batch([(3, 4), (1, 7), (5, 2)], seed=3)
    with vlmprune.apply(model, "dyvte", exit_layer=2):
        batched = model(**x).logits
        gen = model.generate(**x, max_new_tokens=4, do_sample=False)[:, -4:]
        for i in range(3):
            alone = model(**one(x, i)).logits
            torch.testing.assert_close(batched[i, -alone.shape[1] :], alone[0], atol=2e-5, rtol=1e-4)
            assert torch.equal(gen[i], model.generate(**one(x, i), max_new_tokens=4, do_sample=False)[0, -4:])


def test_loss_uses_the_kept_columns():
    model = tiny_llava4()
    x = llava_batch([(3, 4)])
    labels = torch.full_like(x["input_ids"], -100)
    labels[:, -3:] = x["input_ids"][:, -3:]  # the answer: the prompt (and the image) carry no loss
    with MaskedExit(model, [2], (IMAGE_TOKEN,)) as oracle:
        oracle.ids = x["input_ids"]
        ref = model(**x, labels=labels).loss
    with vlmprune.apply(model, "dyvte", exit_layer=2):
        loss = model(**x, labels=labels).loss
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)


def test_composes_with_fastervlm():
    model = tiny_llava4()
    x = llava_batch([(3, 4), (2, 5)])
    with vlmprune.apply(model, [vlmprune.FasterVLMConfig(ratio=0.5), DyVTEConfig(exit_layer=1)]) as h:
        out = model(**x, use_cache=True)
        lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
        # 16 visual tokens -> 8 kept before the LLM; all 8 leave after layer 0
        n = x["input_ids"].shape[1] - 8
        assert lengths == [n] + [n - 8] * (LAYERS - 1)
        assert h.stats.records[-1].exit_layers == [1, 1]
        model.generate(**x, max_new_tokens=3, do_sample=False)


@pytest.mark.parametrize("builder", [tiny_qwen2_vl, tiny_qwen2_5_vl])
def test_qwen2_vl_positions_preserved(builder):
    """M-RoPE (Qwen2-VL and Qwen2.5-VL): removal equals masking, so the text tokens kept their 3-D positions."""
    model = builder()
    model.config.text_config.num_hidden_layers = 2
    x = make_batch(model, [dict(images=[(1, 8, 8)], videos=[(2, 4, 4)], before=3, after=5)])
    with MaskedExit(model, [1], (IMG, VID)) as oracle:
        ref = oracle.run(x).logits
        ref_gen = oracle.run(x, max_new_tokens=4, do_sample=False)
    with vlmprune.apply(model, "dyvte", exit_layer=1):
        out = model(**x)
        assert_text_logits_equal(out.logits, ref, kept_columns(x, (IMG, VID)))
        assert torch.equal(model.generate(**x, max_new_tokens=4, do_sample=False), ref_gen)


def test_eager_attention_too():
    model = tiny_llava4(attn="eager")
    x = llava_batch([(3, 4), (1, 6)])
    with MaskedExit(model, [2, 2], (IMAGE_TOKEN,)) as oracle:
        ref = oracle.run(x).logits
    with vlmprune.apply(model, "dyvte", exit_layer=2):
        assert_text_logits_equal(model(**x).logits, ref, kept_columns(x))


# -- gates -----------------------------------------------------------------------------------------
def test_router_matches_reference_formula_and_tie_keeps():
    torch.manual_seed(0)
    router = Router(8, 16)
    x = torch.randn(5, 8)
    ref = torch.nn.functional.gelu(x @ router.w1.weight.T) @ router.w2.weight.T
    torch.testing.assert_close(router(x), ref)
    assert exit_decision(torch.tensor([[1.0, 1.0], [0.0, 2.0], [3.0, -1.0]])).tolist() == [False, True, False]
    assert exit_decision(torch.tensor([[0.0, 1.0]]), threshold=0.8).tolist() == [False]


def test_gate_features_text_after_image():
    h = torch.arange(2 * 6 * 1, dtype=torch.float32).view(2, 6, 1)
    visual = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0]]).bool()
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]]).bool()
    f = gate_features(h, visual, valid)
    assert f[0].tolist() == [3.5, 5.0]  # mean of columns 3, 4; last = column 5
    assert f[1].tolist() == [10.0, 11.0]  # only column 4 between the image and the last token
    # no text between the image and the last token: the mean falls back to the last token
    f = gate_features(h[:1], torch.tensor([[0, 1, 1, 1, 1, 0]]).bool(), valid[:1])
    assert f[0].tolist() == [5.0, 5.0]


def test_exit_labels_rule():
    logits_full = torch.tensor([[[5.0, 0.0], [0.0, 5.0]], [[5.0, 0.0], [0.0, 5.0]]])
    logits_exit = torch.tensor([[[5.1, 0.0], [0.0, 5.0]], [[5.0, 0.0], [5.0, 0.0]]])
    labels = torch.tensor([[0, 1], [0, 1]])
    # sample 0: same argmax everywhere, loss no higher -> exit; sample 1: disagrees -> keep
    assert exit_labels(logits_full, logits_exit, labels).tolist() == [1, 0]
    worse = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert exit_labels(logits_full[:1], worse, labels[:1]).tolist() == [0]  # agrees but loss much higher


def sign_gates(hidden: int, layers: int, coordinate: int, fire_layers: set[int]) -> ExitGates:
    """Routers that fire iff feature ``coordinate`` > 0 (GELU(x) > 0 iff x > 0), at chosen layers."""
    gates = ExitGates(layers, hidden, 2 * hidden)
    for i, r in enumerate(gates.visual_gates_router):
        torch.nn.init.zeros_(r.w2.weight)
        r.w1.weight.copy_(torch.eye(2 * hidden))
        if i in fire_layers:
            r.w2.weight[1, coordinate] = 1.0
    return gates


def test_gates_save_load_roundtrip_and_reference_keys(tmp_path):
    torch.manual_seed(0)
    gates = ExitGates(LAYERS, 32, 16)
    gates.reset_parameters()
    path = save_gates(gates, tmp_path / "g", extra={"model": "tiny"})
    loaded = load_gates(tmp_path / "g", LAYERS, 32)
    for k, v in gates.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    from safetensors.torch import save_file

    ref = {"model." + k: v for k, v in gates.state_dict().items()}
    save_file(ref, str(tmp_path / "ref.safetensors"))
    loaded = load_gates(tmp_path / "ref.safetensors", LAYERS, 32)
    assert torch.equal(loaded.visual_gates_router[2].w1.weight, gates.visual_gates_router[2].w1.weight)
    with pytest.raises(GatesError, match="decoder layers"):
        load_gates(path, 6, 32)
    with pytest.raises(GatesError, match="hidden size"):
        load_gates(path, LAYERS, 64)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(GatesError, match="corrupt"):
        load_gates(tmp_path / "bad.safetensors")
    with pytest.raises(GatesError, match="no DyVTE gates"):
        load_gates(tmp_path / "missing")
    model = tiny_llava4()
    save_gates(ExitGates(LAYERS, 16, 8), tmp_path / "small")
    with pytest.raises(GatesError, match="hidden size"):
        vlmprune.apply(model, "dyvte", gates=str(tmp_path / "small"))
    assert "_vlmprune_handles" not in model.__dict__


def test_gated_exits_per_sample_and_batch_equals_alone(tmp_path):
    model = tiny_llava4()
    x = llava_batch([(3, 4), (1, 7), (5, 3), (2, 2)], seed=5)
    chosen = None
    for coord in range(64):  # a router coordinate that splits these samples across layers
        save_gates(sign_gates(32, LAYERS, coord, {1, 2}), tmp_path / f"g{coord}")
        with vlmprune.apply(model, "dyvte", gates=str(tmp_path / f"g{coord}")) as h:
            model(**x)
            exits = h.stats.last.exit_layers
        if len(set(exits)) >= 3:
            chosen = coord
            break
    assert chosen is not None, "no coordinate gave three different exits"
    assert LAYERS in exits  # one sample never exits
    with vlmprune.apply(model, "dyvte", gates=str(tmp_path / f"g{chosen}")) as h:
        batched = model(**x).logits
        gen = model.generate(**x, max_new_tokens=4, do_sample=False)[:, -4:]
        for i in range(x["input_ids"].shape[0]):
            xi = one(x, i)
            alone = model(**xi).logits[0]
            assert h.stats.last.exit_layers == [exits[i]]
            text = xi["input_ids"][0] != IMAGE_TOKEN
            if alone.shape[0] == text.numel():  # never exited: full layout; else the text only
                alone = alone[text]
            row = batched[i, -text.numel() :][text]  # the batch kept every row (one sample never exits)
            torch.testing.assert_close(row, alone, atol=2e-5, rtol=1e-4)
            assert torch.equal(gen[i], model.generate(**one(x, i), max_new_tokens=4, do_sample=False)[0, -4:])
    # and each sample equals the masking oracle at its own exit
    with MaskedExit(model, exits, (IMAGE_TOKEN,)) as oracle:
        ref = oracle.run(x).logits
    assert_text_logits_equal(batched, ref, torch.arange(x["input_ids"].shape[1]).expand_as(x["input_ids"]).masked_fill(~x["attention_mask"].bool(), -1))


def test_never_exiting_gates_equal_stock(tmp_path):
    model = tiny_llava4()
    x = llava_batch([(3, 4), (1, 6)])
    ref = model(**x).logits
    gen = model.generate(**x, max_new_tokens=4, do_sample=False)
    save_gates(sign_gates(32, LAYERS, 0, set()), tmp_path / "never")
    with vlmprune.apply(model, "dyvte", gates=str(tmp_path / "never")) as h:
        assert torch.equal(model(**x).logits, ref)
        assert torch.equal(model.generate(**x, max_new_tokens=4, do_sample=False), gen)
        assert h.stats.last.exit_layers == [LAYERS, LAYERS]


@pytest.mark.parametrize("family", ["next", "onevision", "internvl"])
def test_other_families_equal_masking(family):
    """Every adapter: a fixed exit equals the masking oracle and shortens the later caches."""
    if family == "internvl":
        from test_internvl import IMG_CTX, batch, prompt, tiny_internvl

        model, ids = tiny_internvl(), (IMG_CTX,)
        x = batch([prompt([2], seed=1)], 2)
    else:
        from test_llava_next import BIG, IMAGE, VIDEO, call, make_inputs, tiny_next, tiny_onevision

        model = tiny_next() if family == "next" else tiny_onevision()
        ids = (IMAGE, VIDEO)
        x = call(make_inputs(model, [{"images": [BIG], "seed": 1, "video": family == "onevision"}]))
    model.generation_config.eos_token_id = None
    with MaskedExit(model, [1], ids) as oracle:
        ref = oracle.run(x).logits
        ref_gen = oracle.run(x, max_new_tokens=3, do_sample=False)
    with vlmprune.apply(model, "dyvte", exit_layer=1):
        out = model(**x, use_cache=True)
        assert_text_logits_equal(out.logits, ref, kept_columns(x, ids))
        lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
        n = x["input_ids"].shape[1]
        visual = int(sum((x["input_ids"] == t).sum() for t in ids))
        assert lengths == [n] + [n - visual] * (len(lengths) - 1)
        assert torch.equal(model.generate(**x, max_new_tokens=3, do_sample=False), ref_gen)


@pytest.mark.parametrize("exit_layer", [0, 2])
def test_flops_count_each_layer_at_its_length(exit_layer):
    from test_flops import _counted

    model = tiny_llava4(attn="eager")
    x = llava_batch([(3, 4), (1, 6)])
    with vlmprune.apply(model, "dyvte", exit_layer=exit_layer) as h:
        measured, _ = _counted(lambda: model(**x, use_cache=False))
        report = h.flops(x)
    n = x["input_ids"].shape[1]
    assert h.stats.last.layer_seq_len == [n] * exit_layer + [n - 16] * (LAYERS - exit_layer)
    assert abs(report.total - measured) / measured < 1e-9
    full = vlmprune.flops.estimate(model, x, n, batch_size=2)
    assert report.llm_prefill < full.llm_prefill


# -- gate training ---------------------------------------------------------------------------------
def test_answer_labels_right_aligned():
    from vlmprune.methods.dyvte.training import answer_labels

    ids = torch.tensor([[5, 6, 7, 8], [0, 5, 6, 9]])
    assert answer_labels(ids, torch.tensor([2, 1])).tolist() == [[7, 8], [-100, 9]]


def test_gate_step_labels_and_last_layer_always_exits():
    """Exiting after the last layer changes nothing, so every sample is labelled "exit"."""
    from vlmprune.adapters import for_model
    from vlmprune.methods.dyvte.training import gate_step

    model = tiny_llava4()
    x = llava_batch([(3, 4), (1, 6)])
    gates = ExitGates(LAYERS, 32, 16)
    gates.reset_parameters()
    with torch.enable_grad():
        loss, metrics = gate_step(model, for_model(model), gates, (x, torch.tensor([2, 3])), LAYERS - 1)
        loss.backward()
    assert metrics["exit_share"] == 1.0
    assert gates.visual_gates_router[LAYERS - 1].w1.weight.grad is not None
    assert gates.visual_gates_router[0].w1.weight.grad is None
    assert all(p.grad is None for p in model.parameters())


def test_train_gates_cli_steps_resume_and_frozen_model(tmp_path):
    from vlmprune.evals.builtin import build_untrained
    from vlmprune.methods.dyvte.training import build_parser, builtin_batches, exit_report, train_gates

    model, processor = build_untrained(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = builtin_batches(processor, 2, seed=0)
    args = build_parser().parse_args(["--output", str(tmp_path), "--steps", "2", "--width", "8", "--lr", "1e-2"])
    gates, result = train_gates(model, batches, args)
    assert result["steps"] == 2 and (tmp_path / "train-state.pt").exists()
    args = build_parser().parse_args(["--output", str(tmp_path), "--steps", "3", "--width", "8", "--lr", "1e-2"])
    gates, result = train_gates(model, batches, args)  # resumes at step 2
    assert result["steps"] == 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    path = save_gates(gates, tmp_path)
    report = exit_report(model, path, batches, 1)
    assert report["samples"] == 2 and 0 <= report["agreement_with_full"] <= 1


def test_exit_report_decides_from_the_prompt_as_a_prefill_does(tmp_path):
    """The held-out report must pick the exit layer the gated model picks at inference, where
    the prefill holds the prompt alone (not the teacher-forced answer)."""
    from vlmprune.adapters import for_model
    from vlmprune.evals.builtin import build_untrained
    from vlmprune.methods.dyvte.training import builtin_batches, exit_report

    model, processor = build_untrained(seed=0)
    adapter = for_model(model)
    torch.manual_seed(1)
    gates = ExitGates(len(adapter.decoder_layers), adapter.text_config.hidden_size, 8)
    gates.reset_parameters()
    path = save_gates(gates, tmp_path)
    batches = builtin_batches(processor, 1, seed=0)
    reported, prefill = [], []
    for step in range(6):
        inputs, answer_len = batches(step)
        reported += list(exit_report(model, path, lambda s, b=(inputs, answer_len): b, 1)["exit_layer_counts"])
        cut = int(answer_len[0])
        prompt = {k: v[:, :-cut] if k in ("input_ids", "attention_mask") else v for k, v in inputs.items()}
        with vlmprune.apply(model, "dyvte", gates=str(path)) as handle:
            model(**prompt)
        prefill += handle.stats.last.exit_layers
    assert reported == prefill
    assert len(set(prefill)) > 1  # the random gates exit at several layers, so the check has teeth
