"""FLASH speculative decoding: losslessness (random, oracle, adversarial drafts), cache
consistency, the draft's pure pieces (SAR layout, compression, loss), rejection sampling keeping
the target distribution, files and errors, and composition with FasterVLM."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from test_internvl import batch as internvl_batch
from test_internvl import prompt as internvl_prompt
from test_internvl import tiny_internvl
from test_llava_next import make_inputs, tiny_next, tiny_onevision
from test_qwen2_vl import make_batch, tiny_qwen2_vl
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

import vlmprune
from vlmprune.adapters import for_model
from vlmprune.methods.flash import FlashConfig, untrained_head
from vlmprune.methods.flash.draft import (
    DraftCache,
    DraftError,
    DraftHead,
    DraftSpec,
    draft_context,
    draft_loss,
    load_draft,
    rearrange_block_diag,
    save_draft,
    tile_targets,
)
from vlmprune.seams.decode import Sampling, verify_chain_sampling, verify_greedy, verify_siblings

from tiny import llama_config, tiny_llava


def _cache(out):
    """A forward's KV cache: ``out.cache`` since transformers 5.20, ``out.past_key_values`` before."""
    return out.cache if hasattr(out, "cache") else out.past_key_values


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _llava():
    m = tiny_llava()
    m.generation_config.eos_token_id = None
    return m


def llava_prompt(model, seed: int = 0, image: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    parts = [torch.randint(4, 64, (3,), generator=g)]
    if image:
        parts.append(torch.full((n,), 3))
    parts.append(torch.randint(4, 64, (4,), generator=g))
    ids = torch.cat(parts).unsqueeze(0)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if image:
        out["pixel_values"] = torch.randn(1, 3, vc.image_size, vc.image_size, generator=g)
    return out


def _family_cases():
    def llava():
        m = _llava()
        return m, llava_prompt(m, 1)

    def qwen():
        m = tiny_qwen2_vl()
        return m, make_batch(m, [dict(images=[(1, 4, 8)], videos=[(2, 4, 4)])])

    def internvl():
        m = tiny_internvl()
        m.generation_config.eos_token_id = None
        return m, internvl_batch([internvl_prompt([1, 2])], 3)

    def nxt():
        m = tiny_next()
        m.generation_config.eos_token_id = None
        inp = make_inputs(m, [{"images": [(48, 96)], "seed": 3}])
        return m, {k: v for k, v in inp.items() if not k.startswith("_")}

    def onevision():
        m = tiny_onevision()
        m.generation_config.eos_token_id = None
        inp = make_inputs(m, [{"images": [(48, 48)], "video": True, "seed": 4}])
        return m, {k: v for k, v in inp.items() if not k.startswith("_")}

    return {"llava": llava, "qwen2_vl": qwen, "internvl": internvl, "llava_next": nxt, "llava_onevision": onevision}


FAMILIES = _family_cases()


class Oracle:
    """A drafter that proposes the target's own greedy continuation (or always a wrong token)."""

    def __init__(self, reference: torch.Tensor, prompt_len: int, wrong: bool = False, vocab: int = 64) -> None:
        self.ref = reference[0, prompt_len:].tolist()
        self.wrong = wrong
        self.vocab = vocab
        self.pos = 0

    def reset(self, prompt, first_token: int) -> None:
        self.pos = 1

    def extend(self, next_tokens, features) -> None:
        self.pos += int(next_tokens.shape[0])

    def propose(self, depth, sampling, generator):
        toks = self.ref[self.pos : self.pos + depth]
        toks += [0] * (depth - len(toks))
        t = torch.tensor(toks)
        return ((t + 1) % self.vocab if self.wrong else t), None

    def propose_tree(self, depth, branches, sampling, generator):
        """Every branch but the last is wrong from its first token: the loop must pick the last."""
        right, _ = self.propose(depth, sampling, generator)
        rows = [(right + 1 + j) % self.vocab for j in range(branches - 1)] + [right]
        return torch.stack(rows), None


# -- losslessness --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_lossless_random_draft_every_family(family):
    model, inp = FAMILIES[family]()
    ref = model.generate(**inp, max_new_tokens=12, do_sample=False)
    for k, depth in ((1, 3), (2, 5)):
        head = untrained_head(model, k=k, latents=4)
        with vlmprune.apply(model, "flash", draft=head, depth=depth) as h:
            out = model.generate(**inp, max_new_tokens=12, do_sample=False)
            assert torch.equal(out, ref), (family, k, depth)
            rec = h.stats.decode[-1]
            assert rec.new_tokens == 12 and rec.rounds >= 1 and rec.k == k
    assert "generate" not in model.__dict__  # removal restores the class's generate


def test_greedy_lossless_text_only_several_prompts_and_latent_settings():
    model = _llava()
    for seed in range(3):
        for image in (True, False):
            inp = llava_prompt(model, seed, image)
            ref = model.generate(**inp, max_new_tokens=10, do_sample=False)
            for latents in (0, 4):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    h = vlmprune.apply(model, "flash", draft=None, latents=latents, depth=3)
                assert torch.equal(model.generate(**inp, max_new_tokens=10, do_sample=False), ref)
                h.remove()


def test_untrained_draft_warns():
    model = _llava()
    with pytest.warns(UserWarning, match="UNTRAINED"):
        vlmprune.apply(model, "flash").remove()


def test_oracle_draft_accepts_everything():
    model = _llava()
    inp = llava_prompt(model)
    n, depth = 13, 3
    ref = model.generate(**inp, max_new_tokens=n, do_sample=False)
    with vlmprune.apply(model, "flash", draft=Oracle(ref, inp["input_ids"].shape[1]), depth=depth) as h:
        out = model.generate(**inp, max_new_tokens=n, do_sample=False)
    assert torch.equal(out, ref)
    rec = h.stats.decode[-1]
    assert rec.accept_lengths == [depth] * 3  # 1 (prefill) + 3 rounds x 4 = 13 tokens
    assert rec.target_forwards == 1 + math.ceil((n - 1) / (depth + 1))
    assert rec.mean_accepted == depth and rec.tokens_per_round == depth + 1


@pytest.mark.parametrize("k,depth,latents", [(1, 3, 4), (2, 5, 4), (1, 4, 0)])
def test_decode_flops_match_a_flop_counter(k, depth, latents):
    """The record's target decode FLOPs (every verified position, rejected ones included) plus the
    draft's own FLOPs equal what torch's FlopCounterMode counts for the whole generate minus its
    prefill (eager target and math SDPA, so that attention is counted too)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = tiny_llava(attn="eager")
    model.generation_config.eos_token_id = None
    inp = llava_prompt(model)
    head = untrained_head(model, k=k, latents=latents)
    with sdpa_kernel(SDPBackend.MATH), vlmprune.apply(model, "flash", draft=head, depth=depth) as h:
        with FlopCounterMode(display=False) as prefill:
            model(**inp, logits_to_keep=1)
        with FlopCounterMode(display=False) as whole:
            model.generate(**inp, max_new_tokens=16, do_sample=False)
        rec = h.stats.decode[-1]
    measured = whole.get_total_flops() - prefill.get_total_flops()
    assert rec.rounds > 1 and rec.draft_flops > 0
    assert rec.target_decode_flops + rec.draft_flops == pytest.approx(measured, rel=0.03)


def test_adversarial_draft_one_token_per_round():
    model = _llava()
    inp = llava_prompt(model)
    ref = model.generate(**inp, max_new_tokens=9, do_sample=False)
    with vlmprune.apply(model, "flash", draft=Oracle(ref, inp["input_ids"].shape[1], wrong=True), depth=4) as h:
        out = model.generate(**inp, max_new_tokens=9, do_sample=False)
    assert torch.equal(out, ref)
    rec = h.stats.decode[-1]
    assert rec.accepted == 0 and rec.rounds == 8 and set(rec.accept_lengths) == {0}


def test_eos_stops_like_generate():
    model = tiny_llava()  # eos_token_id = 2
    inp = llava_prompt(model, 2)
    ref = model.generate(**inp, max_new_tokens=15, do_sample=False)
    model.generation_config.eos_token_id = int(ref[0, inp["input_ids"].shape[1] + 3])  # stop at the 4th token
    ref = model.generate(**inp, max_new_tokens=15, do_sample=False)
    with vlmprune.apply(model, "flash", draft=Oracle(ref, inp["input_ids"].shape[1]), depth=5):
        out = model.generate(**inp, max_new_tokens=15, do_sample=False)
    assert torch.equal(out, ref)


# -- caches ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_target_cache_equals_fresh_prefill_each_round(family):
    model, inp = FAMILIES[family]()
    head = untrained_head(model, k=2, latents=4)
    checked = []

    def check(state):
        seq = state["sequence"].unsqueeze(0)
        fresh_inp = dict(inp, input_ids=seq, attention_mask=torch.ones_like(seq))
        if "mm_token_type_ids" in inp:
            extra = seq.shape[1] - inp["input_ids"].shape[1]
            fresh_inp["mm_token_type_ids"] = torch.cat([inp["mm_token_type_ids"], torch.zeros(1, extra, dtype=torch.long)], 1)
        fresh = _cache(model(**fresh_inp, use_cache=True))
        cache = state["cache"]
        assert cache.get_seq_length() == seq.shape[1]
        for a, b in zip(cache.layers, fresh.layers):
            torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-4)
        drafter = state["drafter"]
        assert drafter.cache.length == drafter.stable  # speculative draft entries were dropped
        checked.append(state["accepted"])

    ref = model.generate(**inp, max_new_tokens=10, do_sample=False)
    with vlmprune.apply(model, "flash", draft=head, depth=3):
        out = model.generate(**inp, max_new_tokens=10, do_sample=False, on_round=check)
    assert torch.equal(out, ref) and len(checked) >= 3


def test_draft_stable_length_tracks_compressed_accepted_length():
    model = _llava()
    inp = llava_prompt(model)
    head = untrained_head(model, k=1, latents=4)
    n_vis = 16
    lengths = []

    def check(state):
        d = state["drafter"]
        if state["done"]:
            return
        assert d.cache.length == d.stable and bool(d.cache.valid.all())  # one row: no padded entries
        assert int(d.pos[0]) == d.stable
        pending = d.pending[0]
        lengths.append((d.stable + (pending.shape[0] if pending is not None else 0), state["sequence"].numel()))

    with vlmprune.apply(model, "flash", draft=head, depth=2):
        model.generate(**inp, max_new_tokens=6, do_sample=False, on_round=check)
    assert lengths
    for draft_len, seq_len in lengths:
        assert draft_len == seq_len - n_vis + 4  # one pair per target cache position; span -> 4 latents


# -- the draft's pieces --------------------------------------------------------------------------------


def _spec(**kw) -> DraftSpec:
    base = dict(hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=4, intermediate_size=32, vocab_size=11,
                target_layers=2, k=1, num_latents=3)
    base.update(kw)
    return DraftSpec(**base)


def test_k1_sar_head_equals_chain_head_with_same_weights():
    torch.manual_seed(0)
    sar = DraftHead(_spec(k=3))
    chain = DraftHead(_spec(k=1))
    state = sar.state_dict()
    state["down_proj.weight"] = state["down_proj.weight"][:16]
    chain.load_state_dict(state)
    x = torch.randn(1, 7, 16)
    torch.testing.assert_close(sar(x)[:, :, 0], chain(x)[:, :, 0])
    out = torch.randn(2, 5, 1, 16)
    assert torch.equal(rearrange_block_diag(out), out[:, :, 0])


def test_cached_forward_equals_full_forward():
    torch.manual_seed(0)
    head = DraftHead(_spec(k=2))
    x = torch.randn(1, 9, 16)
    full = head(x)
    cache = DraftCache()
    a = head(x[:, :5], cache=cache)
    b = head(x[:, 5:], cache=cache)
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-6, rtol=1e-5)
    cache.crop(5)
    torch.testing.assert_close(head(x[:, 5:], cache=cache), full[:, 5:], atol=1e-6, rtol=1e-5)


def test_block_layout_and_tiling():
    bsz, length, k, h = 2, 6, 3, 4
    out = torch.randn(bsz, length, k, h)
    r = rearrange_block_diag(out, pad=-7.0)
    for i in range(k):
        for p in range(length):
            got = r[:, i * length + p]
            if p >= i:
                assert torch.equal(got, out[:, p - i, i])
            else:
                assert (got == -7.0).all()
    target = torch.randn(bsz, length, h)
    t, m = tile_targets(target, torch.ones(bsz, length), k)
    for i in range(k):
        assert torch.equal(t[:, i * length : (i + 1) * length], target)
        assert m[:, i * length : i * length + i].sum() == 0 and m[:, i * length + i : (i + 1) * length].all()


def test_compression_shapes_identity_permutation_and_text_only():
    torch.manual_seed(0)
    head = DraftHead(_spec(num_latents=4))
    n, h = 12, 16
    hidden = torch.randn(n, h)
    emb = torch.randn(n, h)
    visual = torch.zeros(n, dtype=torch.bool)
    visual[2:6] = True
    visual[8:10] = True  # two spans
    seq, src = draft_context(head, emb, hidden, visual)
    assert seq.shape[0] == n - 6 + 2 * 4 and int((src < 0).sum()) == 8
    # one-hot weights: Q = n_vis queries that are large multiples of the (orthogonal) inputs
    basis = torch.eye(h)[:4] * 3.0
    with torch.no_grad():
        head.latents.copy_(basis * 100.0)
    torch.testing.assert_close(head.compress(basis), basis)
    perm = torch.randperm(4)
    vis = torch.randn(4, h)
    torch.testing.assert_close(head.compress(vis[perm]), head.compress(vis), atol=1e-6, rtol=1e-5)
    seq0, src0 = draft_context(head, emb, hidden, torch.zeros(n, dtype=torch.bool))
    torch.testing.assert_close(seq0, head.fuse(emb, hidden))
    assert torch.equal(src0, torch.arange(n))


def test_loss_sanity():
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(8, 5, bias=False)
    f = torch.randn(2, 6, 8)
    mask = torch.ones(2, 6)
    loss, parts = draft_loss(f.clone(), f, mask, lm_head, ce_weight=0.1)
    p = torch.softmax(lm_head(f), -1)
    entropy = float(-(p * p.log()).sum(-1).mean())
    assert parts["reg"] == 0.0 and abs(parts["ce"] - entropy) < 1e-5
    assert abs(float(loss) - 0.1 * entropy) < 1e-5


# -- verification rules --------------------------------------------------------------------------------


def _chi2_ok(counts: torch.Tensor, probs: torch.Tensor, trials: int) -> bool:
    """Pearson chi-square against ``probs`` at p > 0.01 (critical values for df <= 7)."""
    crit = {1: 6.635, 2: 9.210, 3: 11.345, 4: 13.277, 5: 15.086, 6: 16.812, 7: 18.475}
    support = probs > 0
    exp = probs[support] * trials
    stat = float(((counts[support] - exp) ** 2 / exp).sum())
    return stat < crit[int(support.sum()) - 1] and int(counts[~support].sum()) == 0


@pytest.mark.parametrize("case", ["one", "siblings", "q_equals_p"])
def test_rejection_sampling_keeps_the_target_distribution(case):
    g = torch.Generator().manual_seed(0)
    vocab, trials, temp = 6, 8_000, 0.8
    logits = torch.tensor([1.0, 0.3, -0.5, 2.0, -3.0, 0.0])
    p = Sampling(temperature=temp, top_k=5).probs(logits)  # one token outside the top-k: prob 0
    q = p.clone() if case == "q_equals_p" else torch.softmax(torch.tensor([0.0, 2.0, 1.0, -1.0, 0.5, 0.2]), -1)
    siblings = 3 if case == "siblings" else 1
    counts = torch.zeros(vocab)
    accepted = 0
    # sibling candidates drawn without replacement from q (multinomial draws them sequentially)
    drawn = torch.multinomial(q.expand(trials, vocab), siblings, replacement=False, generator=g).tolist()
    for cands in drawn:
        idx, tok = verify_siblings(p, q, cands, g)
        accepted += idx >= 0
        counts[tok] += 1
    assert _chi2_ok(counts, p, trials)
    if case == "q_equals_p":
        assert accepted == trials


def test_chain_sampling_and_greedy_rules():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 7)
    drafts = logits[:3].argmax(-1).clone()
    drafts[2] = (drafts[2] + 1) % 7
    assert verify_greedy(logits, drafts) == (2, int(logits[2].argmax()))
    p = torch.softmax(logits, -1)
    a, tok = verify_chain_sampling(p, p[:3].clone(), drafts[:2], g)  # q = p: always accepted
    assert a == 2 and 0 <= tok < 7


def test_sampling_generate_runs_and_is_seeded():
    model = _llava()
    inp = llava_prompt(model)
    head = untrained_head(model, k=2, latents=4)
    with vlmprune.apply(model, "flash", draft=head, depth=3, seed=5):
        a = model.generate(**inp, max_new_tokens=8, do_sample=True, temperature=0.7, top_k=20)
        b = model.generate(**inp, max_new_tokens=8, do_sample=True, temperature=0.7, top_k=20)
    assert torch.equal(a, b) and a.shape[1] == inp["input_ids"].shape[1] + 8


# -- files and errors ----------------------------------------------------------------------------------


def test_save_load_roundtrip_and_errors(tmp_path):
    model = _llava()
    inp = llava_prompt(model)
    head = untrained_head(model, k=2, latents=4)
    path = save_draft(head, tmp_path / "d", extra={"note": "test"})
    loaded = load_draft(tmp_path / "d")
    for key, value in head.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    ref = model.generate(**inp, max_new_tokens=8, do_sample=False)
    with vlmprune.apply(model, "flash", draft=str(tmp_path / "d"), depth=3) as h:
        assert torch.equal(model.generate(**inp, max_new_tokens=8, do_sample=False), ref)
        assert h.config.to_dict()["draft"] == str(tmp_path / "d")
    # another model: width, vocabulary, depth
    for kw, what in ((dict(hidden_size=48), "hidden width"), (dict(vocab_size=80), "vocabulary"),
                     (dict(num_hidden_layers=3), "decoder layers")):
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  image_size=32, patch_size=8, projection_dim=32)
        cfg = LlavaConfig(vision_config=vision, text_config=llama_config(**kw), image_token_id=3)
        other = LlavaForConditionalGeneration(cfg).eval()
        with pytest.raises(DraftError, match=what):
            vlmprune.apply(other, "flash", draft=str(path))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(DraftError, match="corrupt"):
        vlmprune.apply(model, "flash", draft=str(bad))
    with pytest.raises(DraftError, match="no FLASH draft"):
        vlmprune.apply(model, "flash", draft=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="k"):
        vlmprune.apply(model, "flash", draft=str(path), k=0)
    with pytest.raises(ValueError, match="k=3"):
        vlmprune.apply(model, "flash", draft=str(path), k=3)
    with pytest.raises(ValueError, match="tree"):
        FlashConfig(tree="dynamic")
    with pytest.raises(ValueError, match="depth"):
        FlashConfig(depth=0)


def test_batch_and_options_no_longer_refused_beams_are():
    """Batches and the standard options run (tests/test_flash_batch.py checks them against plain
    generate); beam search is refused with the reason."""
    model = _llava()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h = vlmprune.apply(model, "flash")
    one = llava_prompt(model)
    two = {k: torch.cat([v, v]) for k, v in one.items()}
    out = model.generate(**two, max_new_tokens=4, repetition_penalty=1.3)
    assert out.shape == (2, one["input_ids"].shape[1] + 4) and torch.equal(out[0], out[1])
    with pytest.raises(ValueError, match="num_beams.*beam search"):
        model.generate(**one, max_new_tokens=4, num_beams=2)
    h.remove()


# -- composition -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_composes_with_fastervlm(family):
    model, inp = FAMILIES[family]()
    with vlmprune.apply(model, "fastervlm", ratio=0.5):
        ref = model.generate(**inp, max_new_tokens=10, do_sample=False)
    plain = model.generate(**inp, max_new_tokens=10, do_sample=False)
    assert not torch.equal(ref, plain) or family == "qwen2_vl"  # pruning changes this tiny model's output
    head = untrained_head(model, k=2, latents=4)
    with vlmprune.apply(model, "fastervlm", ratio=0.5) as prune, vlmprune.apply(model, "flash", draft=head, depth=3) as h:
        out = model.generate(**inp, max_new_tokens=10, do_sample=False)
        assert prune.stats.last is not None and prune.stats.last.visual_out[0] < prune.stats.last.visual_in[0]
        assert h.stats.decode[-1].rounds >= 1
    assert torch.equal(out, ref)
    # one apply with both configs
    with vlmprune.apply(model, [vlmprune.FasterVLMConfig(ratio=0.5), FlashConfig(draft=head, depth=2)]):
        assert torch.equal(model.generate(**inp, max_new_tokens=10, do_sample=False), ref)
    assert "generate" not in model.__dict__


def test_adapter_families_expose_visual_ids():
    for name, build in FAMILIES.items():
        model, _ = build()
        assert for_model(model).placeholder_ids(), name


# -- training ----------------------------------------------------------------------------------------


def test_training_smoke_loss_falls_and_resumes(tmp_path):
    from vlmprune.methods.flash.training import distill, draft_step
    from vlmprune.training.loop import LoopConfig, train_loop

    model = _llava()
    samples = distill(model, [llava_prompt(model, s) for s in range(3)], max_new_tokens=6)
    assert samples[0]["answer"].sum() == 6 and samples[0]["visual"].sum() == 16
    adapter = for_model(model)
    embed, lm_head = adapter.inner.get_input_embeddings(), model.get_output_embeddings()

    def fresh():
        torch.manual_seed(0)
        return untrained_head(model, k=2, latents=4).train()

    def run(head, steps, resume):
        cfg = LoopConfig(steps=steps, lr=3e-3, warmup=1, log_every=1, checkpoint_every=2, resume_file=resume)
        with torch.enable_grad():
            return train_loop({"draft": head}, list(head.parameters()),
                              lambda s: draft_step(head, embed, lm_head, samples, noise=0.0), cfg)

    with torch.enable_grad():
        head = fresh()
        first = float(draft_step(head, embed, lm_head, samples, noise=0.0)[0].detach())
    result = run(head, 12, tmp_path / "state.pt")
    assert result["history"][-1]["loss"] < first
    resumed = fresh()
    out = run(resumed, 14, tmp_path / "state.pt")  # continues from step 12
    assert out["steps"] == 14 and len(out["history"]) == 14


def test_train_draft_cli_smoke(tmp_path):
    from vlmprune.cli import main

    rc = main(["train-draft", "--output", str(tmp_path / "d"), "--state-dir", str(tmp_path / "s"), "--samples", "2",
               "--steps", "3", "--batch-size", "2", "--eval-prompts", "1", "--max-new-tokens", "8", "--threads", "1"])
    assert rc == 0
    head = load_draft(tmp_path / "d")
    assert head.spec.k == 2 and (tmp_path / "d" / "draft.json").exists()
    assert not (tmp_path / "d" / "train-state.pt").exists()


# -- tree drafting -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tree_greedy_lossless_every_family(family):
    model, inp = FAMILIES[family]()
    ref = model.generate(**inp, max_new_tokens=10, do_sample=False)
    head = untrained_head(model, k=2, latents=4)
    with vlmprune.apply(model, "flash", draft=head, depth=3, tree="static", branches=3) as h:
        assert torch.equal(model.generate(**inp, max_new_tokens=10, do_sample=False), ref)
        assert h.stats.decode[-1].tree == "static"


def test_tree_oracle_picks_the_right_branch_and_cache_is_compacted():
    model, inp = FAMILIES["qwen2_vl"]()  # M-RoPE positions: the tree's depth-based positions matter
    n, depth = 13, 3
    ref = model.generate(**inp, max_new_tokens=n, do_sample=False)

    def check(state):
        seq = state["sequence"].unsqueeze(0)
        extra = seq.shape[1] - inp["input_ids"].shape[1]
        types = torch.cat([inp["mm_token_type_ids"], torch.zeros(1, extra, dtype=torch.long)], 1)
        fresh = _cache(model(**dict(inp, input_ids=seq, attention_mask=torch.ones_like(seq), mm_token_type_ids=types),
                             use_cache=True))
        for a, b in zip(state["cache"].layers, fresh.layers):
            torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-4)

    oracle = Oracle(ref, inp["input_ids"].shape[1])
    with vlmprune.apply(model, "flash", draft=oracle, depth=depth, tree="static", branches=3) as h:
        out = model.generate(**inp, max_new_tokens=n, do_sample=False, on_round=check)
    assert torch.equal(out, ref)
    assert h.stats.decode[-1].accept_lengths == [depth] * 3


def test_tree_sampling_runs_and_tree_refuses_pruning():
    model = _llava()
    inp = llava_prompt(model)
    head = untrained_head(model, k=1, latents=4)
    with vlmprune.apply(model, "flash", draft=head, depth=2, tree="static", branches=2, seed=1):
        out = model.generate(**inp, max_new_tokens=6, do_sample=True, top_p=0.9)
    assert out.shape[1] == inp["input_ids"].shape[1] + 6
    with vlmprune.apply(model, "fastervlm", ratio=0.5), vlmprune.apply(model, "flash", draft=head, tree="static"):
        with pytest.raises(ValueError, match="tree drafting does not compose"):
            model.generate(**inp, max_new_tokens=4)


def test_shipped_draft_fits_the_builtin_model_and_bench_smoke():
    from vlmprune.methods.flash import bench as bench_flash

    path = bench_flash.default_draft()
    if not (path / "draft.safetensors").exists():
        pytest.skip("no shipped draft")
    result = bench_flash.run(path, prompts=1, repeats=1, warmup=0, max_new_tokens=8)
    for name in ("flash", "flash-untrained"):
        assert result["variants"][name]["identical_to_greedy"], name
    assert "speedup_decode" in result["variants"]["flash"]
    # a batch of 4 with the trained draft: rows accept different numbers of drafts, output identical
    result = bench_flash.run(path, prompts=4, repeats=1, warmup=0, max_new_tokens=24, variants=("trained",),
                             batch_size=4)
    flash = result["variants"]["flash"]
    assert result["batch_size"] == 4 and flash["identical_to_greedy"] and flash["mean_accepted"] > 1
