"""The ``vlmprune`` console script: ``vlmprune bench``, ``vlmprune eval`` (and more sub-commands as they land)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _ratios(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratios must be comma-separated numbers, got {text!r}") from None
    bad = [v for v in values if not 0.0 <= v < 1.0]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"every ratio must be in [0, 1); got {text!r}")
    return values


def _bench(args: argparse.Namespace) -> int:
    from . import bench
    from .registry import available_methods

    if args.method not in available_methods():
        print(f"vlmprune bench: unknown method {args.method!r}; choose from {', '.join(available_methods())}",
              file=sys.stderr)
        return 2
    rows = bench.run(args.ratios, method=args.method, size=args.size, repeats=args.repeats,
                     warmup=args.warmup, device=args.device, seed=args.seed)
    print(bench.format_table(rows))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([r.as_dict() for r in rows], indent=2))
        print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmprune", description="Visual-token reduction for Hugging Face VLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="prefill latency / memory / FLOPs benchmark of a pre-LLM method")
    b.add_argument("--method", default="fastervlm")
    b.add_argument("--ratios", type=_ratios, default=[0.0, 0.5, 0.75, 0.9, 0.95])
    b.add_argument("--size", choices=["default", "tiny"], default="default",
                   help="model size: 'default' (prefill > 100 ms on a laptop CPU) or 'tiny' (smoke test)")
    b.add_argument("--repeats", type=int, default=15, help="interleaved (unpatched, patched) pairs per ratio")
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--device", default="cpu")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--output", help="also write the rows as JSON to this file")
    b.set_defaults(func=_bench)
    e = sub.add_parser("eval", add_help=False,
                       help="accuracy vs FLOPs on the built-in benchmark (same as vlmprune-eval; see vlmprune eval --help)")
    e.set_defaults(func=_eval)
    t = sub.add_parser("train-builtin", add_help=False,
                       help="train the built-in benchmark model from scratch (see vlmprune train-builtin --help)")
    t.set_defaults(func=_train_builtin)
    g = sub.add_parser("train-gates", add_help=False,
                       help="train DyVTE exit gates on a frozen model (see vlmprune train-gates --help)")
    g.set_defaults(func=_train_gates)
    sf = sub.add_parser("train-slowfast", add_help=False,
                        help="train slow-fast hybrid layers on a frozen model (see vlmprune train-slowfast --help)")
    sf.set_defaults(func=_train_slowfast)
    c = sub.add_parser("calibrate", add_help=False,
                       help="calibrate DyMU merge thresholds for a target token count (see vlmprune calibrate dymu --help)")
    c.set_defaults(func=_calibrate)
    d = sub.add_parser("train-draft", add_help=False,
                       help="train a FLASH speculative-decoding draft on a frozen model (see vlmprune train-draft --help)")
    d.set_defaults(func=_train_draft)
    bf = sub.add_parser("bench-flash", add_help=False,
                        help="FLASH decode speed-up over plain greedy generate, interleaved (see vlmprune bench-flash --help)")
    bf.set_defaults(func=_bench_flash)
    return parser


def _train_draft(args: argparse.Namespace, rest: list[str]) -> int:
    from .training.draft import main as draft_main

    return draft_main(rest)


def _bench_flash(args: argparse.Namespace, rest: list[str]) -> int:
    from .bench_flash import main as bench_flash_main

    return bench_flash_main(rest)


def _calibrate(args: argparse.Namespace, rest: list[str]) -> int:
    from .calibrate import main as calibrate_main

    return calibrate_main(rest)


def _train_slowfast(args: argparse.Namespace, rest: list[str]) -> int:
    from .training.slowfast import main as slowfast_main

    return slowfast_main(rest)


def _train_gates(args: argparse.Namespace, rest: list[str]) -> int:
    from .training.gates import main as gates_main

    return gates_main(rest)


def _train_builtin(args: argparse.Namespace, rest: list[str]) -> int:
    from .evals.train import main as train_main

    return train_main(rest)


def _eval(args: argparse.Namespace, rest: list[str]) -> int:
    from .evals.cli import main as eval_main

    return eval_main(rest, prog="vlmprune eval")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.func in (_eval, _train_builtin, _train_gates, _train_slowfast, _calibrate, _train_draft, _bench_flash):  # the sub-command's own parser takes the rest
        return args.func(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
