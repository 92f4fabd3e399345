"""The published-geometry tier (``pytest -m published``; not in the default run): every method on every
published geometry of ``published.py``, fed straight from the real processor class.

Per (geometry, method): apply, the stats' token counts, ``generate``, a batch of two different images
equal to each alone, ``remove()`` bit-exact; per geometry, bfloat16. A method that refuses a family at
``apply`` with a ValueError (e.g. a signal the family lacks) is reported as a skip with its message.

Batch parity of a pre-LLM method: a batched vision tower rounds differently from a single one (about
1e-5 here), and a discrete choice can flip on that (VisPruner's duplicate removal on random-init
SigLIP, whose patch features all have cosine similarity ~0.9, flips on every image). So each group's
decision is recorded: where batch and single decided alike, the logits must agree; where they did
not, the signals the decisions were made from must agree to rounding (a grouping or padding bug
would not), and the single run replaying the batch's decisions must give the batch's logits."""

from __future__ import annotations

import gc
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")

from published import PUBLISHED  # noqa: E402

import vlmprune  # noqa: E402
from vlmprune.registry import available_methods, lookup  # noqa: E402
from vlmprune.seams.pre_llm import PreLLMMethod  # noqa: E402

pytestmark = pytest.mark.published

#: options a method needs to run here (artifacts it would otherwise load)
OPTIONS = {"dyvte": {"exit_layer": 1}, "dymu": {"thresholds": "per-block"}}
#: methods this tier cannot run, and why
NOT_HERE = {
    "flash": "needs a draft trained for the checkpoint (vlmprune train-draft)",
    "slowfast": "acts on videos only; its hybrid mode needs trained layers",
}


def methods() -> list[str]:
    return [m for m in available_methods() if m not in NOT_HERE]


#: VisualGroup signals a pre-LLM decision is made from
SIGNALS = ("scores", "features", "instruction", "vision", "vision_cls", "keys")


class Decisions:
    """Records each group's (signals, Reduction) of a pre-LLM method; or, given ``replay``, returns
    those reductions instead of deciding (in the order the groups come)."""

    def __init__(self, method: PreLLMMethod):
        self.method, self.decide = method, method.reduce
        self.log: list = []
        self.replay: list | None = None
        method.reduce = self

    def __call__(self, group, generator=None):
        red = self.decide(group, generator) if self.replay is None else self.replay.pop(0)
        signals = {k: getattr(group, k).detach().clone() for k in SIGNALS if getattr(group, k) is not None}
        self.log.append((group.sample, group.grid, signals, red))
        return red

    def take(self) -> list:
        out, self.log = self.log, []
        return out

    def close(self) -> None:
        del self.method.reduce


def same_signals(a: dict, b: dict) -> bool:
    """Equal up to rounding (relative to each signal's scale)."""
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape
        and torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-4 * float(a[k].abs().max()) + 1e-12)
        for k in a)


_CACHE: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _threads():
    """Real-size matrices use every core (the suite's default of one thread suits tiny models)."""
    before = torch.get_num_threads()
    import os

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    yield
    torch.set_num_threads(before)


def built(name: str):
    """The model and processor of one geometry, kept while its tests run (one geometry in memory)."""
    if name not in _CACHE:
        _CACHE.clear()
        gc.collect()
        model, processor = PUBLISHED[name].build()
        _CACHE[name] = (model, processor, {})
    return _CACHE[name]


def pictures(n: int, size: tuple[int, int]) -> list[np.ndarray]:
    rng = np.random.RandomState(0)
    out = []
    for _ in range(n):
        base = rng.randint(0, 255, (8, 8, 3)).astype(np.float32)
        img = np.kron(base, np.ones((size[0] // 8 + 1, size[1] // 8 + 1, 1)))[: size[0], : size[1]]
        out.append(np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8))
    return out


def inputs_for(processor, images: list[np.ndarray], prompts: list[str]) -> dict:
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}], add_generation_prompt=True)
        for p in prompts]
    return dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))


def options_for(method: str, model) -> dict:
    opts = dict(OPTIONS.get(method, {}))
    if opts.get("thresholds") == "per-block":
        from vlmprune.adapters import for_model
        from vlmprune.methods.dymu.method import POST_MERGE_ROUNDS, encoder_layout
        from vlmprune.seams.encoder import EmittedLayout

        layout = encoder_layout(for_model(model))
        count = POST_MERGE_ROUNDS if isinstance(layout, EmittedLayout) else len(layout.blocks)
        opts["thresholds"] = [0.9] * count
    fields = set(lookup(method)[0].option_names())
    if "ratio" in fields and "ratio" not in opts:
        opts["ratio"] = 0.75
    return opts


def cases() -> list:
    return [pytest.param(g, m, id=f"{g}-{m}") for g in PUBLISHED for m in methods()]


@pytest.mark.parametrize("geometry,method", cases())
def test_method_on_published_geometry(geometry, method):
    model, processor, memo = built(geometry)
    size = PUBLISHED[geometry].image_size
    imgs = pictures(2, size)
    batch = inputs_for(processor, imgs, ["describe the image", "what is in this picture ?"])
    singles = [inputs_for(processor, [img], [p]) for img, p in zip(imgs, ["describe the image", "what is in this picture ?"])]
    opts = options_for(method, model)
    with torch.no_grad():
        if "base" not in memo:
            memo["base"] = model(**singles[0]).logits[:, -1]
        base = memo["base"]
        try:
            handle = vlmprune.apply(model, method, **opts)
        except ValueError as exc:
            pytest.skip(f"{method} does not apply to {geometry}: {str(exc).splitlines()[0]}")
        pre = [m for m in handle.methods if isinstance(m, PreLLMMethod)]
        decisions = Decisions(pre[0]) if len(pre) == 1 else None
        try:
            alone, decided_alone = [], []
            for s in singles:
                alone.append(model(**s).logits[:, -1])
                decided_alone.append(decisions.take() if decisions else None)
            rec = handle.stats.last
            assert rec is not None and sum(rec.visual_in) > 0
            assert sum(rec.visual_out) <= sum(rec.visual_in)
            together = model(**batch).logits[:, -1]
            decided_together = decisions.take() if decisions else None
            for i in range(2):
                if decisions is None:
                    flipped = False
                else:
                    mine = [d for d in decided_together if d[0] == i]
                    assert [d[1] for d in mine] == [d[1] for d in decided_alone[i]], (geometry, method, i, "groups")
                    flipped = any(not torch.equal(a[3].anchors, b[3].anchors) for a, b in zip(mine, decided_alone[i]))
                if not flipped:
                    assert torch.allclose(together[i], alone[i][0], atol=2e-3, rtol=1e-3), (geometry, method, i)
                    continue
                for a, b in zip(mine, decided_alone[i]):
                    assert same_signals(a[2], b[2]), (geometry, method, i, "signals differ beyond rounding")
                decisions.replay = [d[3] for d in mine]
                replayed = model(**singles[i]).logits[:, -1]
                decisions.replay = None
                decisions.take()
                assert torch.allclose(together[i], replayed[0], atol=2e-3, rtol=1e-3), (geometry, method, i, "replay")
                warnings.warn(f"{geometry}/{method}: sample {i}'s decision flipped between batch and single on "
                              "rounding of its signals; the single run replaying the batch's decision agrees", stacklevel=1)
            out = model.generate(**singles[0], max_new_tokens=2, do_sample=False)
            assert out.shape[1] == singles[0]["input_ids"].shape[1] + 2
        finally:
            if decisions is not None:
                decisions.close()
            handle.remove()
        assert torch.equal(model(**singles[0]).logits[:, -1], base)


@pytest.mark.parametrize("geometry", list(PUBLISHED))
def test_bfloat16_on_published_geometry(geometry):
    model, processor, _ = built(geometry)
    inputs = inputs_for(processor, pictures(1, PUBLISHED[geometry].image_size), ["describe the image"])
    model.to(torch.bfloat16)
    try:
        pv = {k: (v.to(torch.bfloat16) if k.startswith("pixel_values") and v.is_floating_point() else v)
              for k, v in inputs.items()}
        with torch.no_grad():
            for method in ("fastervlm", "fastv"):
                if method not in available_methods():
                    continue
                with vlmprune.apply(model, method, ratio=0.75) as handle:
                    logits = model(**pv).logits
                    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
                    assert sum(handle.stats.last.visual_out) < sum(handle.stats.last.visual_in)
    finally:
        model.to(torch.float32)


def test_next_spatial_layout_on_published_geometry():
    """LLaVA-v1.6's reference layout at the paper's 95%: k = 29 per crop, no newlines (the FasterVLM
    README's 29 x 5 = 145 for a 2 x 2 grid), straight from the real processor."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    from vlmprune.method import keep_count

    model, processor, _ = built("llava-v1.6-mistral-7b")
    inputs = inputs_for(processor, pictures(1, PUBLISHED["llava-v1.6-mistral-7b"].image_size), ["describe the image"])
    crops = image_size_to_num_patches(inputs["image_sizes"][0].tolist(), model.config.image_grid_pinpoints, 336)
    with torch.no_grad():
        base = model(**inputs).logits[:, -1]
        with vlmprune.apply(model, "fastervlm", ratio=0.95, anyres="spatial") as handle:
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
            assert out.shape[1] == inputs["input_ids"].shape[1] + 2
            prefill = handle.stats.records[0]
            assert prefill.visual_out[0] == keep_count(576, 0.95) * crops
        assert torch.equal(model(**inputs).logits[:, -1], base)
