"""The ``vlmprune`` console script: ``vlmprune bench`` here; every other sub-command comes from a method
(``Method.commands``) or an installed package (the ``vlmprune.commands`` entry-point group), so this
file names no method."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


def _ratios(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratios must be comma-separated numbers, got {text!r}") from None
    bad = [v for v in values if not 0.0 <= v < 1.0]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"every ratio must be in [0, 1); got {text!r}")
    return values


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (``--repeats 0`` would end in a statistics error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


class _OneLineParser(argparse.ArgumentParser):
    """A sub-command's argument errors as one line naming the fix (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _bench(args: argparse.Namespace) -> int:
    from . import bench
    from .registry import available_methods

    methods = [m for m in args.method.split(",") if m]
    unknown = [m for m in methods if m not in available_methods()]
    if unknown or not methods:
        print(f"vlmprune bench: unknown method {','.join(unknown) or args.method!r}; choose from "
              f"{', '.join(available_methods())}", file=sys.stderr)
        return 2
    if args.output:
        from .files import writable_file

        writable_file(args.output)
    if args.model is not None:
        rows = _bench_model(args, methods)
        from .bench_model import format_table
    else:
        if len(methods) > 1 or args.dtype != "float32" or args.image or args.prompt or args.max_new_tokens:
            print("vlmprune bench: several methods, --dtype, --image, --prompt and --max-new-tokens need --model",
                  file=sys.stderr)
            return 2
        rows = bench.run(args.ratios, method=methods[0], size=args.size, repeats=args.repeats,
                         warmup=args.warmup, device=args.device, seed=args.seed)
        format_table = bench.format_table
    print(format_table(rows))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([r.as_dict() for r in rows], indent=2))
        print(f"wrote {out}")
    return 0


def _bench_model(args: argparse.Namespace, methods: list[str]) -> list:
    from . import bench_model

    image = None
    if args.image:
        from PIL import Image

        path = Path(args.image).expanduser()
        if not path.is_file():
            raise bench_model.ModelBenchError(f"--image {args.image!r}: no such file")
        try:
            image = Image.open(path).convert("RGB")
        except OSError as exc:
            raise bench_model.ModelBenchError(f"cannot read image {path}: {exc}") from None
    options = {}
    for item in args.option or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise bench_model.ModelBenchError(f"--option takes key=value, got {item!r}")
        options[key] = _option_value(value)
    model, processor = bench_model.load(args.model, args.dtype, args.device)
    return bench_model.run(
        model, processor, methods, args.ratios, options=options, image=image,
        prompt=args.prompt or bench_model.DEFAULT_PROMPT, max_new_tokens=args.max_new_tokens or 32,
        repeats=args.repeats, warmup=args.warmup,
    )


def _option_value(text: str) -> object:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmprune", description="Visual-token reduction for Hugging Face VLMs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    b = sub.add_parser("bench", help="prefill latency / memory / FLOPs benchmark of a pre-LLM method")
    b.add_argument("--method", default="fastervlm")
    b.add_argument("--ratios", type=_ratios, default=[0.0, 0.5, 0.75, 0.9, 0.95])
    b.add_argument("--size", choices=["default", "tiny"], default="default",
                   help="model size: 'default' (prefill > 100 ms on a laptop CPU) or 'tiny' (smoke test)")
    b.add_argument("--repeats", type=_count(1), default=15, help="interleaved (unpatched, patched) pairs per ratio (>= 1)")
    b.add_argument("--warmup", type=_count(0), default=3, help="untimed calls before the timed ones (>= 0)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--output", help="also write the rows as JSON to this file")
    m = b.add_argument_group("your checkpoint (--model): time to first token, prefill / decode throughput, memory")
    m.add_argument("--model", help="a local Hugging Face VLM directory (or a hub id where the hub is reachable); "
                                   "--method may then list several methods, comma-separated")
    m.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    m.add_argument("--image", help="image file for the prompt (default: a generated 640x480 scene)")
    m.add_argument("--prompt", help="the question (default: 'Describe the image in detail.')")
    m.add_argument("--max-new-tokens", type=_count(2), default=None, help="tokens per timed generation (default 32)")
    m.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="a method option for every method that has it (repeatable), e.g. --option exit_layer=2")
    b.set_defaults(func=_bench)
    for name, (target, text) in sorted(_forwarded_commands().items()):
        sub.add_parser(name, add_help=False, help=text).set_defaults(func=_forward(name, target))
    return parser


def _forwarded_commands() -> dict[str, tuple[str, str]]:
    """Sub-commands that own their parser: those the registered methods declare (``Method.commands``,
    e.g. a trainer or a calibration) and those other installed packages declare in the
    ``vlmprune.commands`` entry-point group (the built-in benchmark's ``eval`` and ``train-builtin``).
    ``calibrate`` is one command whose first argument names the method."""
    from importlib.metadata import entry_points

    from .registry import available_methods, lookup

    found: dict[str, tuple[str, str]] = {}
    calibrated = []
    for name in available_methods():
        for cmd, (target, text) in getattr(lookup(name)[1], "commands", {}).items():
            if cmd == "calibrate":
                calibrated.append(name)
                found[f"calibrate {name}"] = (target, text)
            else:
                found[cmd] = (target, text)
    if calibrated:
        found["calibrate"] = ("", f"calibrate a method's parameters ({', '.join(calibrated)}); "
                                  "see vlmprune calibrate METHOD --help")
    for ep in entry_points(group="vlmprune.commands"):
        found.setdefault(ep.name, (ep.value, f"see vlmprune {ep.name} --help"))
    return {k: v for k, v in found.items() if " " not in k} | {k: v for k, v in found.items() if " " in k}


def _forward(name: str, target: str) -> object:
    def run(args: argparse.Namespace, rest: list[str]) -> int:
        entry = target
        if name == "calibrate":  # the method named first picks the calibration
            method = rest[0] if rest else ""
            entry = _forwarded_commands().get(f"calibrate {method}", ("", ""))[0]
            if not entry:
                names = [k.split(" ", 1)[1] for k in _forwarded_commands() if k.startswith("calibrate ")]
                print(f"vlmprune calibrate: name the method to calibrate first, one of: {', '.join(names)}",
                      file=sys.stderr)
                return 2
        module, _, func = entry.partition(":")
        return importlib.import_module(module).__dict__[func](rest)

    run.forwarded = True  # type: ignore[attr-defined]
    return run


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if not getattr(args.func, "forwarded", False) and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if getattr(args.func, "forwarded", False):  # the sub-command's own parser takes the rest
            return args.func(args, rest)
        return args.func(args)
    except KeyboardInterrupt:
        print(f"vlmprune {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bad path, a wrong model, a corrupt file: one line, not a traceback
        if os.environ.get("VLMPRUNE_TRACEBACK"):
            raise
        print(f"vlmprune {args.command}: error: {_one_line(exc)} (VLMPRUNE_TRACEBACK=1 shows the traceback)",
              file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)) and exc.filename:
        message = f"{exc.strerror}: {exc.filename}"
    kind = type(exc).__name__
    return f"{message}" if isinstance(exc, ValueError) and message else f"{kind}: {message}" if message else kind


if __name__ == "__main__":
    raise SystemExit(main())
