"""FLASH on batches and with transformers' generation options: every row of a left-padded batch
gets exactly plain batched ``generate``'s tokens (random, perfect, always-wrong and noisy drafts;
rows that stop early; the cache holding each row's accepted sequence), the standard options give
plain ``generate``'s output, the batched sampling rule keeps the target's distribution, and what
stays unsupported says why."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_flash import _chi2_ok, _llava
from test_qwen2_vl import make_batch, tiny_qwen2_vl

import vlmprune
from vlmprune.methods.flash import untrained_head
from vlmprune.seams.decode import verify_chain_sampling, verify_chain_sampling_batch

from tiny import IMAGE_TOKEN, PAD


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def padded_llava_batch(model, before=(3, 6, 1), after=(4, 2, 7), seed: int = 0, image=(True, True, True)) -> dict:
    """A left-padded LLaVA batch whose rows have different lengths (and images or not)."""
    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    rows = []
    for b, a, img in zip(before, after, image):
        parts = [torch.randint(4, 64, (b,), generator=g)]
        if img:
            parts.append(torch.full((n,), IMAGE_TOKEN))
        parts.append(torch.randint(4, 64, (a,), generator=g))
        rows.append(torch.cat(parts))
    width = max(r.numel() for r in rows)
    ids = torch.stack([torch.cat([torch.full((width - r.numel(),), PAD), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - r.numel(), dtype=torch.long),
                                   torch.ones(r.numel(), dtype=torch.long)]) for r in rows])
    out = {"input_ids": ids, "attention_mask": mask}
    if any(image):
        out["pixel_values"] = torch.randn(sum(image), 3, vc.image_size, vc.image_size, generator=g)
    return out


class BatchOracle:
    """A batch drafter that knows each row's reference continuation and proposes it (``mode``
    "right"), a wrong token everywhere ("wrong"), or the right token with probability 0.6 ("noisy"),
    so rows accept different numbers of drafts per round."""

    def __init__(self, reference: torch.Tensor, prompt_len: int, mode: str = "right", vocab: int = 64) -> None:
        self.ref = reference[:, prompt_len:]
        self.mode = mode
        self.vocab = vocab
        self.gen = torch.Generator().manual_seed(0)

    def reset_batch(self, prompts, first_tokens) -> None:
        first = torch.tensor(first_tokens)
        # rows are identified by their first token's position in the reference (all rows start active
        # unless they stopped at once: then match the remaining rows by their first token)
        rows = [r for r in range(self.ref.shape[0])]
        if len(rows) != len(first_tokens):
            rows = [r for r in rows if self.ref.shape[1] > 1 and self.ref[r, 1] != PAD][: len(first_tokens)]
        self.rows = rows
        self.pos = [1] * len(rows)
        assert all(int(self.ref[r, 0]) == int(t) for r, t in zip(rows, first))

    def extend_batch(self, next_tokens, features) -> None:
        self.pos = [p + int(t.shape[0]) for p, t in zip(self.pos, next_tokens)]

    def select_rows(self, rows) -> None:
        self.rows = [self.rows[i] for i in rows.tolist()]
        self.pos = [self.pos[i] for i in rows.tolist()]

    def propose_batch(self, depth, sampling, generator):
        out = []
        for r, p in zip(self.rows, self.pos):
            toks = self.ref[r, p : p + depth].tolist()
            toks += [5] * (depth - len(toks))
            t = torch.tensor(toks)
            if self.mode == "wrong":
                t = (t + 1) % self.vocab
            elif self.mode == "noisy":
                flip = torch.rand(depth, generator=self.gen) > 0.6
                t = torch.where(flip, (t + 1) % self.vocab, t)
            out.append(t)
        return torch.stack(out), None


class RandomDrafter:
    """A one-sequence drafter (no batch methods): the loop runs a shallow copy per row."""

    def __init__(self) -> None:
        self.gen = torch.Generator().manual_seed(1)

    def reset(self, prompt, first_token) -> None:
        self.seen = [first_token]

    def extend(self, next_tokens, features) -> None:
        self.seen = self.seen + next_tokens.tolist()

    def propose(self, depth, sampling, generator):
        return torch.randint(4, 64, (depth,), generator=self.gen), None


def _plain(model, inp, **kw):
    return model.generate(**inp, do_sample=False, **kw)


def _flash(model, inp, draft, depth=3, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with vlmprune.apply(model, "flash", draft=draft, depth=depth) as h:
            out = model.generate(**inp, do_sample=False, **kw)
    return out, h.stats.decode[-1]


# -- losslessness on batches -----------------------------------------------------------------------


def test_batch_random_draft_every_row_equals_plain_batched_generate():
    model = _llava()
    inp = padded_llava_batch(model)
    ref = _plain(model, inp, max_new_tokens=14)
    for k, depth in ((1, 3), (2, 5)):
        out, rec = _flash(model, inp, untrained_head(model, k=k, latents=4), depth=depth, max_new_tokens=14)
        assert torch.equal(out, ref), (k, depth)
        assert rec.batch == 3 and rec.new_tokens == 3 * 14
    # a text-only row in the batch, and a one-sequence drafter run row by row
    inp = padded_llava_batch(model, image=(True, False, True), seed=3)
    ref = _plain(model, inp, max_new_tokens=10)
    assert torch.equal(_flash(model, inp, RandomDrafter(), max_new_tokens=10)[0], ref)


def test_batch_qwen2_vl_mrope_rows():
    model = tiny_qwen2_vl()
    model.generation_config.eos_token_id = None
    inp = make_batch(model, [dict(images=[(1, 4, 8)], before=2), dict(videos=[(2, 4, 4)], before=6, after=2),
                             dict(before=5)])
    ref = _plain(model, inp, max_new_tokens=10)
    out, _ = _flash(model, inp, untrained_head(model, k=2, latents=4), depth=3, max_new_tokens=10)
    assert torch.equal(out, ref)
    out, _ = _flash(model, inp, BatchOracle(ref, inp["input_ids"].shape[1], "noisy"), depth=4, max_new_tokens=10)
    assert torch.equal(out, ref)


def _other_families():
    from test_internvl import IMG_CTX, batch, prompt, tiny_internvl
    from test_llava_next import make_inputs, tiny_next, tiny_onevision

    def nxt():
        m = tiny_next()
        inp = make_inputs(m, [{"images": [(48, 96)], "seed": 3}, {"images": [(48, 48)], "seed": 4, "before": 7}])
        return m, inp

    def onevision():
        m = tiny_onevision()
        inp = make_inputs(m, [{"images": [(48, 48)], "video": True, "seed": 4}, {"seed": 5, "before": 9}])
        return m, inp

    def internvl():
        m = tiny_internvl()
        short, long = prompt([1], seed=1), prompt([2], before=6, seed=2)
        width = long.numel()
        rows = [torch.cat([torch.full((width - short.numel(),), PAD), short]), long]
        inp = batch(rows, 3)
        inp["attention_mask"][0, : width - short.numel()] = 0
        assert int((inp["input_ids"] == IMG_CTX).sum()) > 0
        return m, inp

    return {"llava_next": nxt, "llava_onevision": onevision, "internvl": internvl}


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "internvl"])
def test_batch_other_families(family):
    model, inp = _other_families()[family]()
    model.generation_config.eos_token_id = None
    inp = {k: v for k, v in inp.items() if not k.startswith("_")}
    ref = _plain(model, inp, max_new_tokens=10)
    out, _ = _flash(model, inp, untrained_head(model, k=2, latents=4), depth=3, max_new_tokens=10)
    assert torch.equal(out, ref)
    out, _ = _flash(model, inp, BatchOracle(ref, inp["input_ids"].shape[1], "noisy"), depth=4, max_new_tokens=10)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("mode", ["right", "wrong", "noisy"])
def test_batch_oracle_drafts(mode):
    model = _llava()
    inp = padded_llava_batch(model, before=(3, 6, 1, 2), after=(4, 2, 7, 3), image=(True, True, False, True))
    n, depth = 13, 3
    ref = _plain(model, inp, max_new_tokens=n)
    out, rec = _flash(model, inp, BatchOracle(ref, inp["input_ids"].shape[1], mode), depth=depth, max_new_tokens=n)
    assert torch.equal(out, ref)
    if mode == "right":
        assert rec.accept_lengths == [depth] * 12 and rec.target_forwards == 4
    elif mode == "wrong":
        assert rec.accepted == 0 and rec.rounds == 4 * (n - 1)
    else:
        assert 0 < rec.accepted < rec.drafted and len(set(rec.accept_lengths)) > 1


def test_batch_cache_holds_each_rows_accepted_sequence():
    """After every round each active row's unmasked cache columns are a fresh prefill of that
    row's (unpadded) sequence; the masked columns are the padding and the rejected drafts."""
    model = _llava()
    inp = padded_llava_batch(model)
    ref = _plain(model, inp, max_new_tokens=12)
    prompt_len = inp["input_ids"].shape[1]
    checked = []

    def check(state):
        if state["done"]:
            return
        cache, rows, dec = state["cache"], state["rows"], state["mask"]
        for i, r in enumerate(rows):
            seq = state["sequences"][r][:-1]  # the last token is not in the cache yet
            real = torch.cat([inp["attention_mask"][r].bool(), dec[i]])
            assert int(real.sum()) == int(inp["attention_mask"][r].sum()) + seq.numel() - prompt_len
            one = {"input_ids": seq[prompt_len - int(inp["attention_mask"][r].sum()):].unsqueeze(0),
                   "pixel_values": inp["pixel_values"][r : r + 1]}
            fresh = model(**one, use_cache=True).cache
            for a, b in zip(cache.layers, fresh.layers):
                torch.testing.assert_close(a.keys[i][:, real], b.keys[0], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(a.values[i][:, real], b.values[0], atol=1e-5, rtol=1e-4)
        checked.append(len(rows))

    with vlmprune.apply(model, "flash", draft=BatchOracle(ref, prompt_len, "noisy"), depth=4):
        out = model.generate(**inp, max_new_tokens=12, do_sample=False, on_round=check)
    assert torch.equal(out, ref) and len(checked) >= 3


def test_batch_rows_that_stop_early_are_padded_like_generate():
    model = _llava()
    inp = padded_llava_batch(model, before=(3, 6, 1, 2), after=(4, 2, 7, 3), image=(True, True, False, True), seed=5)
    prompt_len = inp["input_ids"].shape[1]
    free = _plain(model, inp, max_new_tokens=16)[:, prompt_len:]
    # an EOS id that row 0 emits early; other rows stop at other steps or never
    model.generation_config.eos_token_id = int(free[0, 3])
    model.generation_config.pad_token_id = PAD
    ref = _plain(model, inp, max_new_tokens=16)
    stops = [(row == model.generation_config.eos_token_id).nonzero() for row in ref[:, prompt_len:]]
    assert ref.shape[1] > prompt_len + 4 and any(s.numel() == 0 or int(s[0]) > 3 for s in stops)
    for draft in (untrained_head(model, k=2, latents=4), BatchOracle(ref, prompt_len, "noisy"),
                  BatchOracle(ref, prompt_len, "right")):
        out, _ = _flash(model, inp, draft, depth=4, max_new_tokens=16)
        assert torch.equal(out, ref)
    # several EOS ids (a list), one of them the first token of a row: that row leaves the batch at once
    eos = [int(free[1, 0]), int(free[2, 5])]
    ref = _plain(model, inp, max_new_tokens=16, eos_token_id=eos)
    out, _ = _flash(model, inp, untrained_head(model, k=1, latents=4), max_new_tokens=16, eos_token_id=eos)
    assert torch.equal(out, ref)


# -- the generation options --------------------------------------------------------------------------


def _char_tokenizer(vocab: int = 64):
    """One character per token id, decoded by concatenation (what stop_strings needs)."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = (string.ascii_lowercase + string.ascii_uppercase + string.digits + "+-")[:vocab]
    tok = Tokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(chars)}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="a")


OPTIONS = {
    "min_new_tokens": dict(min_new_tokens=6),
    "repetition_penalty": dict(repetition_penalty=1.8),
    "no_repeat_ngram_size": dict(no_repeat_ngram_size=1),
    "bad_words_ids": dict(bad_words_ids=[[7], [11, 12]]),
    "several": dict(repetition_penalty=0.7, no_repeat_ngram_size=3, min_new_tokens=3, suppress_tokens=[9, 10]),
    "length_rules": dict(forced_eos_token_id=13, begin_suppress_tokens=[51, 44, 45], max_length=40,
                         sequence_bias={(57,): 4.0}),
    # batch_id is the row's index: row 0 may only emit even ids, the others odd ones
    "prefix_allowed_tokens_fn": dict(prefix_allowed_tokens_fn=lambda b, ids: list(range(0 if b == 0 else 1, 64, 2))),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_generation_options_equal_plain_generate(name):
    model = _llava()
    model.generation_config.pad_token_id = PAD
    inp = padded_llava_batch(model, seed=7)
    prompt_len = inp["input_ids"].shape[1]
    free = _plain(model, inp, max_new_tokens=12)[:, prompt_len:]
    eos = [int(free[0, 2]), int(free[1, 1])]  # without min_new_tokens these stop rows early
    kw = dict(max_new_tokens=12, eos_token_id=eos, **OPTIONS[name])
    if "max_length" in kw:
        del kw["max_new_tokens"]
    ref = _plain(model, inp, **kw)
    assert not torch.equal(ref, _plain(model, inp, max_new_tokens=12, eos_token_id=eos))  # the option acts
    for draft in (untrained_head(model, k=2, latents=4), BatchOracle(_plain(model, inp, **kw), prompt_len, "noisy")):
        assert torch.equal(_flash(model, inp, draft, depth=3, **kw)[0], ref), name
    one = {k: v[:1] for k, v in inp.items()}
    one["input_ids"], one["attention_mask"] = one["input_ids"][:, 3:], one["attention_mask"][:, 3:]  # unpadded
    assert torch.equal(_flash(model, one, untrained_head(model, k=1, latents=4), **kw)[0], _plain(model, one, **kw))


@pytest.mark.parametrize("with_eos", [True, False])
def test_stop_strings_equal_plain_generate(with_eos):
    """stop_strings (a tokenizer kwarg as in transformers). Without an EOS criterion plain generate
    keeps decoding a stopped row until every row has stopped; with one it pads."""
    model = _llava()
    model.generation_config.pad_token_id = PAD
    tok = _char_tokenizer()
    inp = padded_llava_batch(model, seed=11)
    prompt_len = inp["input_ids"].shape[1]
    free = _plain(model, inp, max_new_tokens=14)[:, prompt_len:]
    # one stop string per row (the second spans two tokens): the rows stop at different steps
    stops = [tok.decode(free[0, 7]), tok.decode(free[1, 4:6]), tok.decode(free[2, 2])]
    kw = dict(max_new_tokens=14, stop_strings=stops, tokenizer=tok)
    if with_eos:
        kw["eos_token_id"] = 63
    ref = _plain(model, inp, **kw)
    assert ref.shape[1] < prompt_len + 14
    for draft in (untrained_head(model, k=2, latents=4), BatchOracle(ref, prompt_len, "noisy"),
                  BatchOracle(ref, prompt_len, "right")):
        assert torch.equal(_flash(model, inp, draft, depth=4, **kw)[0], ref)


def test_sampling_with_top_k_1_is_greedy_and_sampling_runs_on_batches():
    """do_sample with top_k=1 leaves one token with probability 1: the sampled output must be plain
    greedy's, which checks that the target's p goes through transformers' processors (the
    repetition penalty too)."""
    model = _llava()
    inp = padded_llava_batch(model, seed=2)
    kw = dict(max_new_tokens=10, repetition_penalty=1.5)
    ref = _plain(model, inp, **kw)
    head = untrained_head(model, k=2, latents=4)
    with vlmprune.apply(model, "flash", draft=head, depth=3, seed=3):
        out = model.generate(**inp, do_sample=True, top_k=1, **kw)
        assert torch.equal(out, ref)
        a = model.generate(**inp, do_sample=True, temperature=0.8, top_p=0.9, **kw)
        b = model.generate(**inp, do_sample=True, temperature=0.8, top_p=0.9, **kw)
        c = model.generate(**inp, do_sample=True, num_return_sequences=2, max_new_tokens=6)
    assert torch.equal(a, b) and a.shape == ref.shape and c.shape[0] == 6


def test_batched_sampling_rule_keeps_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    vocab, trials = 5, 12_000
    p = torch.softmax(torch.tensor([[1.0, 0.2, -0.5, 2.0, -1.0], [0.0, 1.5, -2.0, 0.3, 0.7]]), -1)
    q = torch.softmax(torch.tensor([[0.0, 2.0, 1.0, -1.0, 0.5]]), -1)
    p, q = p.expand(trials, 2, vocab), q.expand(trials, 1, vocab)
    drafts = torch.multinomial(q[:, 0], 1, generator=g)
    accepted, nxt = verify_chain_sampling_batch(p, q, drafts, g)
    first = torch.where(accepted > 0, drafts[:, 0], nxt)
    assert _chi2_ok(torch.bincount(first, minlength=vocab).float(), p[0, 0], trials)
    second = nxt[accepted == 1]  # after an accepted draft the bonus follows p_1
    assert _chi2_ok(torch.bincount(second, minlength=vocab).float(), p[0, 1], second.numel())
    # acceptance matches the one-row rule's rate (min(1, p/q) summed under q)
    rate = float(torch.minimum(p[0, 0], q[0, 0]).sum())
    assert abs(float(accepted.float().mean()) - rate) < 0.02
    seq = [verify_chain_sampling(p[0], q[0], drafts[i], g)[0] for i in range(2000)]
    assert abs(sum(seq) / 2000 - rate) < 0.04
    # q = p: every draft accepted
    acc, _ = verify_chain_sampling_batch(p, p[:, :1], torch.multinomial(p[:, 0], 1, generator=g), g)
    assert bool((acc == 1).all())


# -- composition, streaming, refusals ---------------------------------------------------------------


def test_batch_composes_with_fastervlm():
    model = _llava()
    inp = padded_llava_batch(model, seed=4)
    with vlmprune.apply(model, "fastervlm", ratio=0.5):
        ref = _plain(model, inp, max_new_tokens=16)
    prompt_len = inp["input_ids"].shape[1]
    # the noisy draft makes rows accept different counts, so the masked columns get compacted
    for draft in (untrained_head(model, k=2, latents=4), BatchOracle(ref, prompt_len, "noisy")):
        with vlmprune.apply(model, "fastervlm", ratio=0.5), vlmprune.apply(model, "flash", draft=draft, depth=4):
            assert torch.equal(model.generate(**inp, max_new_tokens=16, do_sample=False), ref)


def test_streamer_gets_the_tokens_of_one_prompt():
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.seen, self.ended = [], False

        def put(self, value):
            self.seen.append(value.view(-1).tolist())

        def end(self):
            self.ended = True

    model = _llava()
    inp = {k: v[:1, 3:] if k != "pixel_values" else v[:1] for k, v in padded_llava_batch(model).items()}
    ref = _plain(model, inp, max_new_tokens=9)
    s = Collect()
    out, _ = _flash(model, inp, untrained_head(model, k=2, latents=4), max_new_tokens=9, streamer=s)
    assert torch.equal(out, ref) and s.ended
    assert [t for chunk in s.seen[1:] for t in chunk] == ref[0, inp["input_ids"].shape[1]:].tolist()


def test_unsupported_options_say_why():
    model = _llava()
    inp = padded_llava_batch(model)
    head = untrained_head(model, k=1, latents=4)
    with vlmprune.apply(model, "flash", draft=head):
        for kw, match in ((dict(num_beams=2), "beam search"), (dict(output_scores=True, return_dict_in_generate=True),
                          "not collected"), (dict(assistant_model=model), "itself speculative"),
                          (dict(guidance_scale=1.5), "guidance"), (dict(use_cache=False), "KV cache"),
                          (dict(cache_implementation="static"), "cropped")):
            with pytest.raises(ValueError, match=match):
                model.generate(**inp, max_new_tokens=4, **kw)
        embeds = model.get_input_embeddings()(inp["input_ids"])
        with pytest.raises(ValueError, match="input_ids"):
            model.generate(inputs_embeds=embeds, attention_mask=inp["attention_mask"], max_new_tokens=4)
        with pytest.raises(ValueError, match="streamer"):
            from transformers.generation.streamers import BaseStreamer

            model.generate(**inp, max_new_tokens=4, streamer=BaseStreamer())
    with vlmprune.apply(model, "flash", draft=head, tree="static"):
        with pytest.raises(ValueError, match="one prompt per call"):
            model.generate(**inp, max_new_tokens=4)
        with pytest.raises(ValueError, match="chain drafting"):
            model.generate(**{k: v[:1] for k, v in inp.items()}, max_new_tokens=4, repetition_penalty=1.2)


def test_draft_cache_padding_and_compaction_are_exact():
    """A batched draft forward with padded (masked) rows equals each row run alone, and compacting
    the cache changes nothing."""
    from vlmprune.methods.flash.draft import DraftCache, DraftHead, DraftSpec

    torch.manual_seed(0)
    head = DraftHead(DraftSpec(hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=4, intermediate_size=32,
                               vocab_size=11, target_layers=2, k=2, num_latents=0))
    rows = [torch.randn(n, 16) for n in (5, 2, 7)]
    chunks = [[3, 1, 4], [1, 1, 1], [2, 3, 1]]  # per row, entries fed per step
    alone = [head(r.unsqueeze(0))[0] for r in rows]
    cache = DraftCache()
    pos = torch.zeros(3, dtype=torch.long)
    start = [0, 0, 0]
    for step in range(3):
        pieces = [r[s : s + c[step]] for r, s, c in zip(rows, start, chunks)]
        lengths = torch.tensor([p.shape[0] for p in pieces])
        x = torch.nn.utils.rnn.pad_sequence(pieces, batch_first=True)
        steps = torch.arange(x.shape[1])
        valid = steps.unsqueeze(0) < lengths.unsqueeze(1)
        out = head(x, positions=pos.unsqueeze(1) + steps, cache=cache, valid=valid)
        for i in range(3):
            torch.testing.assert_close(out[i, : lengths[i]], alone[i][start[i] : start[i] + lengths[i]],
                                       atol=1e-5, rtol=1e-4)
        pos += lengths
        start = [s + int(n) for s, n in zip(start, lengths)]
        if step == 1:
            assert cache.waste() > 0
            cache.compact()
            assert cache.waste() == 0 and cache.length == int(cache.valid.sum(1).max())


def test_sampled_generate_keeps_the_target_distribution_end_to_end():
    """2 000 copies of one prompt sample three tokens each (the second is a verified draft or the
    residual's draw); the joint frequency of (token 1, token 2) matches the target's processed distribution
    (temperature 1.5 and top-k 3 via transformers' warpers), chi-square at p = 0.001."""
    model = _llava()
    one = {k: v[:1, 3:] if k != "pixel_values" else v[:1] for k, v in padded_llava_batch(model, seed=8).items()}
    temp, top_k, n = 1.5, 3, 2000

    def probs(logits):
        x = logits.float() / temp
        kth = torch.topk(x, top_k).values[-1]
        return torch.softmax(x.masked_fill(x < kth, float("-inf")), -1)

    p1 = probs(model(**one).logits[0, -1])
    expected = {}
    for x1 in p1.nonzero().flatten().tolist():
        ids = torch.cat([one["input_ids"], torch.tensor([[x1]])], 1)
        p2 = probs(model(input_ids=ids, pixel_values=one["pixel_values"]).logits[0, -1])
        for x2 in p2.nonzero().flatten().tolist():
            expected[(x1, x2)] = float(p1[x1] * p2[x2])
    batch = {k: v.expand(n, *v.shape[1:]) for k, v in one.items()}
    # a draft that draws uniformly from the second tokens' support and one token outside it: some
    # drafts are accepted, some rejected (the residual's draw)
    support = sorted({x2 for _, x2 in expected} | {63})

    class Uniform(RandomDrafter):
        def propose(self, depth, sampling, generator):
            q = torch.zeros(depth, 64)
            q[:, support] = 1.0 / len(support)
            return torch.multinomial(q, 1, generator=generator).squeeze(1), q

    with vlmprune.apply(model, "flash", draft=Uniform(), depth=2, seed=0) as h:
        out = model.generate(**batch, do_sample=True, temperature=temp, top_k=top_k, max_new_tokens=3)
    rec = h.stats.decode[-1]
    assert rec.drafted == n and 0.2 * n < rec.accepted < 0.9 * n  # one verified draft per row
    start = one["input_ids"].shape[1]
    pairs = [tuple(r) for r in out[:, start : start + 2].tolist()]
    assert set(pairs) <= set(expected)
    counts = torch.tensor([pairs.count(key) for key in expected], dtype=torch.float)
    exp = torch.tensor(list(expected.values())) * n
    stat = float(((counts - exp) ** 2 / exp).sum())
    crit = {5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12}  # chi-square 0.999 quantiles by degrees of freedom
    assert len(expected) - 1 in crit and stat < crit[len(expected) - 1], (stat, len(expected))
