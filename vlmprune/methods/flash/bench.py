"""FLASH decode speed-up on the built-in captioning task (``vlmprune bench-flash``).

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


def _prompts(processor: Any, n: int, seed: int, batch_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """``n`` held-out caption prompts, encoded in left-padded batches of ``batch_size``."""
    from vlmprune.artifacts import builtin_benchmark

    bench = builtin_benchmark()
    builtin, data = bench.builtin, bench.data

    texts, images = [], []
    for i in range(n):
        clip = data.make_video("val", 50_000 + seed * 1_009 + i)
        imgs = data.mosaic(clip.frames)
        texts.append(builtin.caption_prompt(len(imgs)))
        images.append(imgs)
    return [builtin.encode(processor, texts[i : i + batch_size], images[i : i + batch_size])
            for i in range(0, n, batch_size)]


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
        branches: int = 3, batch_size: int = 1) -> dict[str, Any]:
    import vlmprune
    from vlmprune.artifacts import builtin_benchmark

    model, processor = builtin_benchmark().load_model(model_path)
    inputs = _prompts(processor, prompts, seed, batch_size)
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

    def spec(name: str, inp: dict) -> tuple[torch.Tensor, Any]:
        # one flash handle at a time: each variant is applied around its own call (untimed), and
        # the loop's own clock (prefill, draft, verify) times the call
        with vlmprune.apply(model, "flash", draft=drafts[name], depth=depth, k=k, tree=tree, branches=branches) as h:
            t = time.perf_counter()
            out = model.generate(**inp, max_new_tokens=max_new_tokens, do_sample=False)
            elapsed = time.perf_counter() - t
        rec = h.stats.decode[-1]
        rec.total_s = elapsed  # timed from outside, like plain generate (includes option parsing)
        return out, rec

    for inp in inputs[:warmup]:
        plain(inp)
        prefill(inp)
        for name in drafts:
            spec(name, inp)
    rows: dict[str, dict[str, list[float]]] = {n: {"total": [], "decode": [], "tokens": [], "accepted": [],
                                                   "rounds": [], "draft": [], "verify": []} for n in ["plain", *drafts]}
    identical = {name: True for name in drafts}
    for _ in range(repeats):
        for inp in inputs:
            ref, t_plain = plain(inp)
            t_pre = prefill(inp)
            new = _row_tokens(ref, inp["input_ids"].shape[1], eos)
            rows["plain"]["total"].append(t_plain)
            rows["plain"]["decode"].append(max(t_plain - t_pre, 1e-9))
            rows["plain"]["tokens"].append(new)
            for name in drafts:
                out, rec = spec(name, inp)
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
    result: dict[str, Any] = {"prompts": prompts, "batch_size": batch_size, "repeats": repeats, "depth": depth,
                              "tree": tree or "chain",
                              "branches": branches if tree else 1, "max_new_tokens": max_new_tokens,
                              "threads": torch.get_num_threads(), "variants": {}}
    for name, r in rows.items():
        tokens = sum(r["tokens"])
        entry = {
            "median_total_ms": 1e3 * statistics.median(r["total"]),
            "median_decode_ms": 1e3 * statistics.median(r["decode"]),
            "tokens_per_second": tokens / sum(r["total"]),
            "decode_tokens_per_second": (tokens - prompts * repeats) / sum(r["decode"]),
            "mean_new_tokens": tokens / (prompts * repeats),
        }
        if name != "plain":
            entry.update({
                "speedup_total": plain_total / sum(r["total"]),
                "speedup_decode": plain_decode / sum(r["decode"]),
                "speedup_total_median": statistics.median(a / b for a, b in zip(rows["plain"]["total"], r["total"])),
                "speedup_decode_median": statistics.median(a / b for a, b in zip(rows["plain"]["decode"], r["decode"])),
                "verify_share_of_decode": sum(r["verify"]) / sum(r["decode"]),
                "mean_accepted": sum(r["accepted"]) / max(sum(r["rounds"]), 1),
                "draft_share_of_decode": sum(r["draft"]) / sum(r["decode"]),
                "identical_to_greedy": identical[name],
            })
        result["variants"][name] = entry
    lm = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    result["target_lm_params"] = lm
    return result


def format_table(result: dict[str, Any]) -> str:
    head = f"{'variant':<18}{'total ms':>10}{'decode ms':>11}{'tok/s':>9}{'x total':>9}{'x decode':>10}{'acc/round':>11}{'same':>6}"
    lines = [head, "-" * len(head)]
    for name, e in result["variants"].items():
        lines.append(
            f"{name:<18}{e['median_total_ms']:>10.1f}{e['median_decode_ms']:>11.1f}{e['tokens_per_second']:>9.1f}"
            f"{e.get('speedup_total', 1.0):>9.2f}{e.get('speedup_decode', 1.0):>10.2f}"
            f"{e.get('mean_accepted', float('nan')):>11.2f}{str(e.get('identical_to_greedy', '-')):>6}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vlmprune bench-flash", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--draft", default=None, help="draft directory or .safetensors file (default: the shipped one)")
    p.add_argument("--model", default=None, help="built-in checkpoint directory (default: the shipped one)")
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=1,
                   help="prompts per generate call (a left-padded batch; both variants get the same batches)")
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
    if min(args.prompts, args.repeats, args.depth, args.max_new_tokens, args.batch_size) < 1 or args.warmup < 0:
        raise ValueError("--prompts, --batch-size, --repeats, --depth and --max-new-tokens must be >= 1, --warmup >= 0")
    if args.output:
        writable_file(args.output)
    if args.model is not None and not Path(args.model).is_dir():
        raise ValueError(f"--model {args.model!r}: no such checkpoint directory")
    draft = args.draft or default_draft()
    if args.draft is not None and not Path(draft).exists():
        raise ValueError(f"--draft {args.draft!r}: no such file or directory; train one with `vlmprune train-draft`")
    torch.set_num_threads(args.threads)
    variants = ("trained",) if args.no_untrained else ("trained", "untrained")
    result = run(draft, args.prompts, args.repeats, args.warmup, args.depth, args.k, args.max_new_tokens,
                 args.seed, args.model, variants, None if args.tree == "chain" else args.tree, args.branches,
                 args.batch_size)
    print(format_table(result))
    print(json.dumps(result, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
