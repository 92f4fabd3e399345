"""FLASH decode speed-up on the built-in captioning tasks (``vlmprune bench-flash``).

For every held-out video-captioning prompt (or left-padded batch of ``--batch-size`` prompts), plain
greedy ``generate`` and FLASH's speculative ``generate`` run back to back (interleaved, after
warm-up, same process, same prompts), so machine noise hits both alike. Reported per variant:
median end-to-end time per call, decode time (end-to-end minus the prefill: the plain prefill is
timed in the same interleaving as ``generate(max_new_tokens=1)``, i.e. preparation, prompt forward
and first token, which is what FLASH's record counts as its prefill; both totals are timed around
the ``generate`` call), tokens per second, the speed-ups as ratios of summed times and as medians
of the paired (same batch, same repeat) ratios, mean accepted drafts per round and prompt, and
whether every output equals the plain greedy output. Nothing is hard-coded: the ratios are what
this machine measured.

``--task video_dense_caption`` (with ``--model evals/captioner`` and its draft) times the dense
captions, where decoding dominates; every variant's captions are also scored against the
references (per-fact score and token F1), so a variant that is not lossless shows what it costs.
``--prefill-method fastervlm:ratio=0.9`` adds two variants: that method alone and FLASH with it
(one ``apply`` of both), both timed against the unpatched plain model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from vlmprune.files import writable_file


def default_draft() -> Path:
    """The shipped draft for the built-in model (next to the built-in checkpoint)."""
    from vlmprune.artifacts import shipped

    return shipped("flash-draft")


TASKS = ("video_caption", "video_dense_caption")


def _prompts(processor: Any, n: int, seed: int, batch_size: int = 1,
             task: str = "video_caption") -> list[dict[str, torch.Tensor]]:
    """``n`` held-out caption prompts, encoded in left-padded batches of ``batch_size``."""
    return _prompts_and_refs(processor, n, seed, batch_size, task)[0]


def _prompts_and_refs(processor: Any, n: int, seed: int, batch_size: int,
                      task: str) -> tuple[list[dict[str, torch.Tensor]], list[list[str]]]:
    from vlmprune.artifacts import builtin_benchmark

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    bench = builtin_benchmark()
    builtin, data = bench.builtin, bench.data

    texts, images, refs = [], [], []
    for i in range(n):
        if task == "video_caption":
            clip = data.make_video("val", 50_000 + seed * 1_009 + i)
            text = builtin.caption_prompt(2)
        else:
            clip = data.make_dense_video("val", 50_000 + seed * 1_009 + i)
            text = builtin.image_prompt(data.DENSE_PROMPT, 2)
        imgs = data.mosaic(clip.frames)
        texts.append(text)
        images.append(imgs)
        refs.append(clip.caption.split())
    batches = [builtin.encode(processor, texts[i : i + batch_size], images[i : i + batch_size])
               for i in range(0, n, batch_size)]
    return batches, refs


def _scores(processor: Any, outs: list[torch.Tensor], inputs: list[dict], refs: list[list[str]],
            eos: Any, task: str) -> dict[str, float]:
    """Mean token F1 (and per-fact score on the dense task), percent, of the captions in ``outs``."""
    from vlmprune.artifacts import builtin_benchmark

    data = builtin_benchmark().data
    tok = processor.tokenizer
    eos_ids = {int(eos)} if isinstance(eos, int) else {int(e) for e in (eos or [])}
    words = []
    for out, inp in zip(outs, inputs):
        for row in out[:, inp["input_ids"].shape[1]:].tolist():
            stop = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
            words.append(tok.decode(row[:stop], skip_special_tokens=True).split())
    f1 = [_token_f1(w, r) for w, r in zip(words, refs)]
    result = {"token_f1": 100.0 * sum(f1) / len(f1)}
    if task == "video_dense_caption":
        result["fact_score"] = 100.0 * sum(data.fact_score(w, r) for w, r in zip(words, refs)) / len(refs)
    return result


def _token_f1(prediction: list[str], reference: list[str]) -> float:
    from collections import Counter

    if not prediction or not reference:
        return float(not prediction and not reference)
    common = sum((Counter(prediction) & Counter(reference)).values())
    if common == 0:
        return 0.0
    p, r = common / len(prediction), common / len(reference)
    return 2 * p * r / (p + r)


def parse_method(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME`` or ``NAME:key=value;key=value`` (numbers parsed) -> (name, options)."""
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for part in filter(None, rest.replace(",", ";").split(";")):
        key, _, value = part.partition("=")
        try:
            options[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            options[key.strip()] = value.strip()
    return name.strip(), options


def _row_tokens(out: torch.Tensor, prompt_len: int, eos: Any) -> int:
    """Tokens the rows of a batch generated (each up to and including its EOS; not the pads after)."""
    eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    new = out[:, prompt_len:]
    total = 0
    for row in new.tolist():
        stop = next((i for i, t in enumerate(row) if t in eos_ids), None)
        total += len(row) if stop is None else stop + 1
    return total


@torch.no_grad()
def run(draft: str | Path | None, prompts: int = 12, repeats: int = 3, warmup: int = 2, depth: int = 4,
        k: int | None = None, max_new_tokens: int = 32, seed: int = 0, model_path: str | None = None,
        variants: tuple[str, ...] = ("trained", "untrained"), tree: str | None = None,
        branches: int = 3, batch_size: int = 1, task: str = "video_caption",
        prefill_method: str | None = None) -> dict[str, Any]:
    import vlmprune
    from vlmprune.artifacts import builtin_benchmark
    from vlmprune.registry import make_config

    model, processor = builtin_benchmark().load_model(model_path)
    inputs, refs = _prompts_and_refs(processor, prompts, seed, batch_size, task)
    eos = model.generation_config.eos_token_id
    drafts: dict[str, Any] = {}
    if "trained" in variants:
        if draft is None or not Path(draft).exists():
            raise ValueError(f"no FLASH draft at {draft}; train one with `vlmprune train-draft`")
        drafts["flash"] = str(draft)
    if "untrained" in variants:  # the same loop with a random head: what verification alone costs
        from .method import untrained_head

        torch.manual_seed(seed)
        drafts["flash-untrained"] = untrained_head(model, k=k or 1, latents=16)

    def plain(inp: dict) -> tuple[torch.Tensor, float]:
        t = time.perf_counter()
        out = model.generate(**inp, max_new_tokens=max_new_tokens, do_sample=False)
        return out, time.perf_counter() - t

    def prefill(inp: dict) -> float:
        # what FLASH's record counts as its prefill: generate's preparation, the prompt's forward and
        # the first token
        t = time.perf_counter()
        model.generate(**inp, max_new_tokens=1, do_sample=False)
        return time.perf_counter() - t

    if "flash" in drafts:
        from .draft import load_draft

        drafts["flash"] = load_draft(drafts["flash"])  # read once; checked against the model by apply
    extra: list[Any] = []
    pruned: str | None = None
    if prefill_method:
        name, options = parse_method(prefill_method)
        extra = [make_config(name, options)]
        pruned = prefill_method
        if "flash" in drafts:
            drafts[f"flash+{prefill_method}"] = drafts["flash"]

    def spec(name: str, inp: dict) -> tuple[torch.Tensor, Any]:
        # one flash handle at a time: each variant is applied around its own call (untimed), and
        # the loop's own clock (prefill, draft, verify) times the call
        flash = make_config("flash", {"draft": drafts[name], "depth": depth, "k": k, "tree": tree, "branches": branches})
        with vlmprune.apply(model, [flash, *(extra if "+" in name else [])]) as h:
            t = time.perf_counter()
            out = model.generate(**inp, max_new_tokens=max_new_tokens, do_sample=False)
            elapsed = time.perf_counter() - t
        rec = h.stats.decode[-1]
        rec.total_s = elapsed  # timed from outside, like plain generate (includes option parsing)
        return out, rec

    def alone(inp: dict) -> tuple[torch.Tensor, float]:
        with vlmprune.apply(model, extra):
            t = time.perf_counter()
            out = model.generate(**inp, max_new_tokens=max_new_tokens, do_sample=False)
            return out, time.perf_counter() - t

    for inp in inputs[:warmup]:
        plain(inp)
        prefill(inp)
        if pruned:
            alone(inp)
        for name in drafts:
            spec(name, inp)
    names = ["plain", *([pruned] if pruned else []), *drafts]
    rows: dict[str, dict[str, list[float]]] = {n: {"total": [], "decode": [], "tokens": [], "accepted": [],
                                                   "rounds": [], "draft": [], "verify": []} for n in names}
    identical = {name: True for name in names[1:]}
    outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for rep in range(repeats):
        for inp in inputs:
            ref, t_plain = plain(inp)
            t_pre = prefill(inp)
            new = _row_tokens(ref, inp["input_ids"].shape[1], eos)
            rows["plain"]["total"].append(t_plain)
            rows["plain"]["decode"].append(max(t_plain - t_pre, 1e-9))
            rows["plain"]["tokens"].append(new)
            if rep == 0:
                outputs["plain"].append(ref)
            if pruned:
                out, t_alone = alone(inp)
                identical[pruned] &= bool(torch.equal(out, ref))
                rows[pruned]["total"].append(t_alone)
                rows[pruned]["decode"].append(float("nan"))  # its prefill is not timed apart
                rows[pruned]["tokens"].append(_row_tokens(out, inp["input_ids"].shape[1], eos))
                if rep == 0:
                    outputs[pruned].append(out)
            for name in drafts:
                out, rec = spec(name, inp)
                if rep == 0:
                    outputs[name].append(out)
                identical[name] &= bool(torch.equal(out, ref))
                r = rows[name]
                r["total"].append(rec.total_s)
                r["decode"].append(max(rec.total_s - rec.prefill_s, 1e-9))
                r["tokens"].append(rec.new_tokens)
                r["accepted"].append(rec.accepted)
                r["rounds"].append(rec.rounds)
                r["draft"].append(rec.draft_s)
                r["verify"].append(rec.verify_s)
    plain_total = sum(rows["plain"]["total"])
    plain_decode = sum(rows["plain"]["decode"])
    result: dict[str, Any] = {"task": task, "prompts": prompts, "batch_size": batch_size, "repeats": repeats,
                              "depth": depth, "prefill_method": prefill_method,
                              "tree": tree or "chain",
                              "branches": branches if tree else 1, "max_new_tokens": max_new_tokens,
                              "threads": torch.get_num_threads(), "variants": {}}
    for name, r in rows.items():
        tokens = sum(r["tokens"])
        entry = {
            "median_total_ms": 1e3 * statistics.median(r["total"]),
            "tokens_per_second": tokens / sum(r["total"]),
            "mean_new_tokens": tokens / (prompts * repeats),
            **_scores(processor, outputs[name], inputs, refs, eos, task),
        }
        if name == pruned:  # the pruning method alone: end to end only
            entry.update({"speedup_total": plain_total / sum(r["total"]),
                          "speedup_total_median": statistics.median(
                              a / b for a, b in zip(rows["plain"]["total"], r["total"])),
                          "identical_to_greedy": identical[name]})
            result["variants"][name] = entry
            continue
        entry["median_decode_ms"] = 1e3 * statistics.median(r["decode"])
        entry["decode_tokens_per_second"] = (tokens - prompts * repeats) / sum(r["decode"])
        if name != "plain":
            entry.update({
                "speedup_total": plain_total / sum(r["total"]),
                "speedup_decode": plain_decode / sum(r["decode"]),
                "speedup_total_median": statistics.median(a / b for a, b in zip(rows["plain"]["total"], r["total"])),
                "speedup_decode_median": statistics.median(a / b for a, b in zip(rows["plain"]["decode"], r["decode"])),
                "verify_share_of_decode": sum(r["verify"]) / sum(r["decode"]),
                "mean_accepted": sum(r["accepted"]) / max(sum(r["rounds"]), 1),
                "draft_share_of_decode": sum(r["draft"]) / sum(r["decode"]),
                "draft_ms_per_round": 1e3 * sum(r["draft"]) / max(sum(r["rounds"]), 1),
                "verify_ms_per_round": 1e3 * sum(r["verify"]) / max(sum(r["rounds"]), 1),
                "plain_ms_per_token": 1e3 * plain_decode / max(sum(rows["plain"]["tokens"]) - prompts * repeats, 1),
                "identical_to_greedy": identical[name],
            })
        result["variants"][name] = entry
    lm = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    result["target_lm_params"] = lm
    return result


def format_table(result: dict[str, Any]) -> str:
    head = (f"{'variant':<30}{'total ms':>10}{'decode ms':>11}{'tok/s':>9}{'x total':>9}{'x decode':>10}"
            f"{'acc/round':>11}{'same':>6}{'F1':>7}{'facts':>7}")
    lines = [f"{result.get('task', 'video_caption')}, batch {result['batch_size']}", head, "-" * len(head)]
    for name, e in result["variants"].items():
        lines.append(
            f"{name:<30}{e['median_total_ms']:>10.1f}{e.get('median_decode_ms', float('nan')):>11.1f}"
            f"{e['tokens_per_second']:>9.1f}"
            f"{e.get('speedup_total', 1.0):>9.2f}{e.get('speedup_decode', float('nan') if name != 'plain' else 1.0):>10.2f}"
            f"{e.get('mean_accepted', float('nan')):>11.2f}{str(e.get('identical_to_greedy', '-')):>6}"
            f"{e.get('token_f1', float('nan')):>7.1f}{e.get('fact_score', float('nan')):>7.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vlmprune bench-flash", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--draft", default=None, help="draft directory or .safetensors file (default: the shipped one)")
    p.add_argument("--model", default=None, help="checkpoint directory, or builtin / captioner (default: builtin); its flash-draft/ is the default draft")
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--batch-size", type=_sizes, default=[1],
                   help="prompts per generate call (a left-padded batch; both variants get the same batches); "
                        "a comma list runs each in turn (the JSON is then a list)")
    p.add_argument("--task", choices=TASKS, default="video_caption",
                   help="video_dense_caption: the dense captions (use with --model captioner)")
    p.add_argument("--prefill-method", default=None,
                   help="e.g. 'fastervlm:ratio=0.9': also time that method alone and FLASH with it")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--k", type=int, default=None, help="tokens per draft forward (default: the draft's)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--tree", choices=["chain", "static"], default="chain")
    p.add_argument("--branches", type=int, default=3, help="top-w children of the last token (--tree static)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-untrained", action="store_true", help="skip the untrained-draft row")
    p.add_argument("--output", help="also write the result as JSON")
    args = p.parse_args(argv)
    if min(args.prompts, args.repeats, args.depth, args.max_new_tokens, *args.batch_size) < 1 or args.warmup < 0:
        raise ValueError("--prompts, --batch-size, --repeats, --depth and --max-new-tokens must be >= 1, --warmup >= 0")
    if args.output:
        writable_file(args.output)
    from vlmprune.artifacts import named_checkpoint

    args.model = named_checkpoint(args.model)
    if args.model is not None and not Path(args.model).is_dir():
        raise ValueError(f"--model {args.model!r}: no such checkpoint directory")
    own = Path(args.model) / "flash-draft" if args.model is not None else None
    draft = args.draft or (own if own is not None and own.exists() else default_draft())
    if args.draft is not None and not Path(draft).exists():
        raise ValueError(f"--draft {args.draft!r}: no such file or directory; train one with `vlmprune train-draft`")
    torch.set_num_threads(args.threads)
    variants = ("trained",) if args.no_untrained else ("trained", "untrained")
    results = []
    for size in args.batch_size:
        result = run(draft, args.prompts, args.repeats, args.warmup, args.depth, args.k, args.max_new_tokens,
                     args.seed, args.model, variants, None if args.tree == "chain" else args.tree, args.branches,
                     size, args.task, args.prefill_method)
        print(format_table(result), flush=True)
        results.append(result)
    final = results[0] if len(results) == 1 else results
    print(json.dumps(final, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(final, indent=1))
    return 0


def _sizes(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None


if __name__ == "__main__":
    raise SystemExit(main())
