"""Write the example notebooks (and run them, so they are committed with their outputs).

``python examples/make_notebooks.py`` rebuilds ``examples/*.ipynb`` from the cells below and
executes them with nbclient (offline; each in well under 3 minutes on a laptop CPU). CI runs the
committed notebooks again through ``tests/test_notebooks.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).parent


def md(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(text.strip())


def code(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(text.strip())


QUICKSTART = [
    md("""
# vlmprune quickstart

`vlmprune.apply(model, method, **options)` patches one model instance (hooks only, no class
patching) and returns a handle; `handle.remove()` or leaving a `with` block restores the model
bit for bit. This notebook uses the project's shipped built-in model (offline), then shows the
same calls on a Hugging Face checkpoint (skipped when offline), and runs `vlmprune-eval` from
Python.
"""),
    code("""
import torch
import vlmprune
from vlmprune.evals import builtin, data

torch.set_num_threads(1)
model, processor = builtin.load_builtin()
sample = data.make_image("test", 0)
question = sample.questions[0]
inputs = builtin.encode(processor, [builtin.image_prompt(question.words)], [[sample.image]])
print(question.text, "->", question.answer)
print(vlmprune.available_methods())
"""),
    code("""
def answer(model):
    logits = model(**inputs).logits[0, -1]
    ids = builtin.choice_ids(processor.tokenizer, question.choices)
    return question.choices[int(logits[ids].argmax())]

before = model(**inputs).logits[0, -1]
with vlmprune.apply(model, "fastervlm", ratio=0.9) as handle:
    print("FasterVLM 0.9 answers:", answer(model))
    print(handle.stats.last)                  # visual tokens in / out, LLM length, scoring, backend
    print(f"{handle.flops(inputs).total / 1e9:.3f} GFLOPs")
after = model(**inputs).logits[0, -1]
print("restored bit for bit:", torch.equal(before, after))
"""),
    code("""
# methods at other stages compose in stage order: FasterVLM before the LLM, DyVTE inside it
handle = vlmprune.apply(model, [vlmprune.FasterVLMConfig(ratio=0.75), vlmprune.DyVTEConfig(exit_layer=2)])
print(answer(model), [r.method for r in handle.stats.records], handle.stats.last.exit_layers)
handle.remove()
"""),
    md("""
## A Hugging Face checkpoint

The same calls work on the stock classes (LLaVA-1.5 / NeXT / OneVision, Qwen2-VL / 2.5-VL,
InternVL). This cell downloads LLaVA-OneVision-0.5B when a network is available and says so
when it is not.
"""),
    code("""
import os
from transformers import AutoModelForImageTextToText, AutoProcessor
from PIL import Image

name = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
try:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise OSError("HF_HUB_OFFLINE=1")
    hf_model = AutoModelForImageTextToText.from_pretrained(name)
    hf_processor = AutoProcessor.from_pretrained(name)
except Exception as exc:  # offline (CI) or no access
    print(f"skipped: cannot load {name} here ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
else:
    image = Image.fromarray(sample.image)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shapes do you see?"}]}]
    prompt = hf_processor.apply_chat_template(conv, add_generation_prompt=True)
    hf_inputs = hf_processor(images=image, text=prompt, return_tensors="pt")
    with vlmprune.apply(hf_model, "fastervlm", ratio=0.9) as h:
        out = hf_model.generate(**hf_inputs, max_new_tokens=20)
        print(hf_processor.decode(out[0, hf_inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        print(h.stats.last)
"""),
    md("## `vlmprune-eval` from Python"),
    code("""
from IPython.display import Image as Show
from vlmprune.evals import harness

em = harness.load_model(None)
rows = harness.run_eval(em, ["image_mc"], ["none", "fastervlm", "random"], [0.75, 0.9], limit=60, progress=False)
harness.print_tables(rows, plain=True)
Show(filename=str(harness.plot(rows, "quickstart_plot.png")))
"""),
]

VIDEO = [
    md("""
# Video captioning with visual-token reduction

A clip is written as an mp4, read back with decord, captioned by the shipped built-in model, and
captioned again under every method that applies to video. The table compares the captions, the
visual tokens the LLM saw, FLOPs and wall time. Set `MY_VIDEO` to caption your own file (the
built-in model only knows the synthetic shapes world, so expect nonsense on real footage).
"""),
    code("""
import tempfile, time
from pathlib import Path
import numpy as np
import torch
import matplotlib.pyplot as plt
import vlmprune
from vlmprune.evals import builtin, data, harness
from vlmprune.flops import estimate

torch.set_num_threads(1)
MY_VIDEO = None  # e.g. "/path/to/clip.mp4"

clip = data.make_video("test", 7)
path = Path(tempfile.mkdtemp()) / "clip.mp4"
data.write_mp4(clip.frames, path)
frames = data.read_video(MY_VIDEO or path)          # decord, uniform sampling of 8 frames
print(frames.shape, "reference caption:", clip.caption)
fig, axes = plt.subplots(1, len(frames), figsize=(2 * len(frames), 2))
for ax, f, t in zip(axes, frames, range(len(frames))):
    ax.imshow(f); ax.set_title(f"frame {t}", fontsize=8); ax.axis("off")
plt.show()
"""),
    code("""
em = harness.load_model(None)
model, processor = em.model, em.processor
mosaics = data.mosaic(frames)                      # 2 x (2x2 frames) = 512 visual tokens
inputs = builtin.encode(processor, [builtin.caption_prompt(len(mosaics))], [mosaics])
ckpt = builtin.CHECKPOINT

def caption(**gen):
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=processor.tokenizer.eos_token_id)
    return " ".join(em.words(out[0, inputs["input_ids"].shape[1]:].tolist()))

METHODS = {
    "none": None,
    "fastervlm 0.75": [vlmprune.FasterVLMConfig(ratio=0.75)],
    "pool 0.75": [vlmprune.PoolConfig(ratio=0.75)],
    "dymu mid": [vlmprune.DyMUConfig(preset="mid")],
    "slowfast pooling": [vlmprune.SlowFastConfig(mode="pooling", mosaic=2, slow_frames=1, slow_stride=2, fast_stride=8)],
    "slowfast hybrid": [vlmprune.SlowFastConfig(mode="hybrid", mosaic=2, adapter=str(ckpt / "slowfast-hybrid"))],
    "flash": [vlmprune.FlashConfig(draft=str(ckpt / "flash-draft"))],
    "fastervlm 0.75 + flash": [vlmprune.FasterVLMConfig(ratio=0.75), vlmprune.FlashConfig(draft=str(ckpt / "flash-draft"))],
}
rows = []
for name, configs in METHODS.items():
    handle = vlmprune.apply(model, configs) if configs else None
    caption()                                                     # warm-up
    if handle is not None:
        handle.stats.reset()
    start = time.perf_counter()
    text = caption()
    seconds = time.perf_counter() - start
    rec = handle.stats.last if handle is not None and handle.stats.records else None
    tokens = rec.visual_out[0] if rec is not None else 512
    gen = len(text.split()) + 1
    flops = (handle.flops(inputs, gen) if rec is not None else estimate(model, inputs, inputs["input_ids"].shape[1], generated_tokens=gen)).total
    rows.append((name, text, tokens, flops / 1e9, seconds))
    if handle is not None:
        handle.remove()
base = rows[0][4]
print("| method | caption | visual tokens | GFLOPs | wall s | speed-up |")
print("|---|---|---|---|---|---|")
for name, text, tokens, gflops, seconds in rows:
    print(f"| {name} | {text} | {tokens} | {gflops:.2f} | {seconds:.3f} | {base / seconds:.2f}x |")
print("reference:", clip.caption)
"""),
    code("""
names = [r[0] for r in rows]
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.5))
a.barh(names, [r[2] for r in rows]); a.set_xlabel("visual tokens in the LLM"); a.invert_yaxis()
b.barh(names, [r[4] for r in rows], color="tab:orange"); b.set_xlabel("caption wall time (s)"); b.invert_yaxis()
plt.tight_layout(); plt.show()
"""),
    md("Which patches FasterVLM keeps at 0.75 on the two mosaics (each is 4 frames; green = kept):"),
    code("""
from vlmprune.evals import analysis
from vlmprune.method import keep_count

scores = analysis.cls_attention(model, inputs["pixel_values"])          # (2, 16, 16)
fig, axes = plt.subplots(1, 2, figsize=(8, 4))
for ax, img, s in zip(axes, mosaics, scores):
    k = keep_count(s.numel(), 0.75)
    kept = torch.zeros(s.numel(), dtype=torch.bool)
    kept[s.flatten().topk(k).indices] = True
    ax.imshow(img)
    for idx in torch.nonzero(kept).flatten().tolist():
        r, c = divmod(idx, data.GRID)
        ax.add_patch(plt.Rectangle((c * data.PATCH, r * data.PATCH), data.PATCH, data.PATCH, fill=False, ec="lime", lw=1))
    ax.axis("off")
plt.tight_layout(); plt.show()
"""),
    md("""
## FLASH where decoding dominates: the dense captioner

The built-in model's captions are ~10 tokens from a 1 M-parameter LM, so there is little decoding
to speed up. The shipped **captioner** (`evals/captioner`: the same frozen vision tower, an 8-layer,
256-wide LM) writes 33-47 word dense captions (every object, its size, colour, shape, where it
appears, how it moves, the order of events), and its FLASH draft (`evals/captioner/flash-draft`,
one layer) drafts 6 words per round, which the target checks in one forward. Plain greedy decoding and FLASH run
interleaved on the same clips; the captions must be identical (FLASH is lossless), and the
per-fact score says how many of the clip's facts the caption gets right.
"""),
    code("""
from vlmprune.evals import train_captioner

cap = harness.load_model(str(train_captioner.CAPTIONER))
draft = str(train_captioner.CAPTIONER / "flash-draft")
clips = [data.make_dense_video("test", i) for i in range(4)]

def dense(inputs):
    out = cap.model.generate(**inputs, max_new_tokens=harness.DENSE_CAPTION_MAX_NEW_TOKENS, do_sample=False)
    return out

timings = {"plain": [], "flash": []}
for i, c in enumerate(clips):
    inp = builtin.encode(cap.processor, [train_captioner.dense_prompt()], [data.mosaic(c.frames)])
    dense(inp)                                                   # warm-up
    for rep in range(2):
        t = time.perf_counter(); ref = dense(inp); timings["plain"].append(time.perf_counter() - t)
        with vlmprune.apply(cap.model, "flash", draft=draft, depth=6) as h:
            t = time.perf_counter(); out = dense(inp); timings["flash"].append(time.perf_counter() - t)
        assert torch.equal(out, ref)                             # identical greedy captions
    words = cap.words(ref[0, inp["input_ids"].shape[1]:].tolist())
    rec = h.stats.decode[-1]
    print(f"clip {i}: {' '.join(words)}")
    print(f"   per-fact score {100 * data.fact_score(words, c.caption.split()):.0f}%, "
          f"{rec.new_tokens} tokens in {rec.rounds} FLASH rounds ({rec.accepted / rec.rounds:.2f} drafts accepted per round)")
plain_s, flash_s = sum(timings["plain"]), sum(timings["flash"])
print(f"identical captions; end-to-end speed-up {plain_s / flash_s:.2f}x "
      f"({1e3 * plain_s / len(timings['plain']):.0f} ms -> {1e3 * flash_s / len(timings['flash']):.0f} ms per caption)")
"""),
]


def build(name: str, cells: list, run: bool = True) -> Path:
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = HERE / name
    if run:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    nbformat.write(nb, path)
    return path


if __name__ == "__main__":
    run = "--no-run" not in sys.argv
    for name, cells in (("quickstart.ipynb", QUICKSTART), ("video_captioning.ipynb", VIDEO)):
        print(build(name, cells, run))
