"""``vlmprune-eval`` (also ``python -m vlmprune.evals`` and ``vlmprune eval``): accuracy versus FLOPs
of every method and ratio on the built-in tasks, as a table, ``results.json`` and a plot."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NoReturn

from . import harness

EPILOG = f"""\
tasks (built-in, test split; items per task by default: {", ".join(f"{k} {v}" for k, v in harness.DEFAULT_LIMITS.items())}):
  image_mc       image questions (colour, shape, count, size, relation, exist), argmax over the
                 question's choices of the answer-position logits
  image_short    the same questions answered by greedy generation (exact match of the first word)
  video_mc       video questions (direction, moving, first, count); 8 frames tiled into 2 images
  video_caption  greedy caption of the clip, scored by token F1 against the reference (shown as
                 the accuracy column, labelled "token F1")

Item i of an image task is test image i with one of its questions (question types taken in turn);
item i of a video task is test clip i. The same items serve every method and ratio.

--model: omit it for the shipped built-in model; or a directory saved with
  vlmprune.evals.builtin.save_builtin; or another local Hugging Face checkpoint that loads with
  AutoModelForImageTextToText and AutoProcessor (offline). Other checkpoints get the same prompts
  ("<image> what color is the circle ?", the <image> placeholder replaced by the processor's own
  image token; no chat template) and multiple choice compares the logit of each choice's first
  token, so they run but are not tuned for these tasks.

Results: a table, <output>/results.json (one row per task x method x ratio: accuracy %, per-type
accuracy, visual tokens, TFLOPs per sample, latency of the model calls per sample (inputs are
encoded once, untimed), peak memory) and
<output>/accuracy_vs_flops.png. The data of every run are the same fixed test items; --seed only
seeds the methods that draw (random).
"""


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line naming the fix (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _tasks(text: str) -> list[str]:
    """Built-in task names, or lmms-eval task names / aliases (checked once lmms-eval is loaded)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no task given; built-in tasks: {', '.join(harness.TASKS)}")
    return list(dict.fromkeys(names))


def _methods(text: str) -> list[str]:
    from vlmprune.registry import available_methods

    valid = ["none", *available_methods()]
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if any(part not in valid or part == "none" for part in m.split("+")) and m not in valid]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"unknown method {', '.join(map(repr, bad)) or repr(text)}; choose from {', '.join(valid)} "
            "(or a stack joined by '+', e.g. fastervlm+flash)"
        )
    return list(dict.fromkeys(names))


def _ratios(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"ratios must be comma-separated numbers in [0, 1), e.g. 0.5,0.9; got {text!r}"
        ) from None
    bad = [v for v in values if not 0.0 <= v < 1.0]
    if not values or bad:
        raise argparse.ArgumentTypeError(
            f"every ratio must be in [0, 1) (the fraction of visual tokens removed); got {text!r}"
        )
    return list(dict.fromkeys(values))


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _layers(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"exit layers must be comma-separated integers >= 0, e.g. 1,2; got {text!r}")
    return list(dict.fromkeys(values))


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def build_parser(prog: str = "vlmprune-eval") -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description="Accuracy versus FLOPs of visual-token reduction methods on the built-in benchmark "
        "(a small LLaVA-architecture model trained by this project on synthetic image and video tasks).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--task", type=_tasks, default=list(harness.BUILTIN_TASKS),
                   help=f"comma list of tasks (default: all built-in: {','.join(harness.BUILTIN_TASKS)}); any other "
                   "name is an lmms-eval task (e.g. mmbench, vlmprune_builtin_image_mc), run through lmms-eval's evaluator")
    p.add_argument("--model", default=None,
                   help="checkpoint directory (default: the shipped built-in model); see below")
    p.add_argument("--method", type=_methods, default=list(harness.DEFAULT_METHODS),
                   help=f"comma list; 'none' is the unpatched model (default: {','.join(harness.DEFAULT_METHODS)})")
    p.add_argument("--ratio", type=_ratios, default=list(harness.DEFAULT_RATIOS),
                   help="comma list of fractions of visual tokens removed, each in [0, 1) "
                   f"(default: {','.join(f'{r:g}' for r in harness.DEFAULT_RATIOS)}); 'none' runs once at 0")
    p.add_argument("--exit-layer", type=_layers, default=None,
                   help="dyvte: comma list of fixed exit layers K (layers K.. run without visual tokens; "
                   "default with --method dyvte: 1..L-1 plus the shipped gates)")
    p.add_argument("--gates", default=None,
                   help="dyvte: trained gates (a gates.safetensors file or its directory); default: the "
                   "built-in model's shipped gates")
    p.add_argument("--preset", default=",".join(harness.DYMU_PRESETS),
                   help="dymu: comma list of threshold presets (default: low,mid,high; built-in model)")
    p.add_argument("--slowfast-mode", default=",".join(harness.SLOWFAST_CELLS),
                   help="slowfast: comma list of modes: fast (fast tokens only), pooling (training-free "
                   "SlowFast), hybrid (trained cross-attention to the slow tokens) (default: all three)")
    p.add_argument("--limit", type=_positive, default=None,
                   help="items per task (default: per-task counts below, sized for a 5-minute run)")
    p.add_argument("--batch-size", type=_positive, default=16, help="items per model call (default: 16)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--threads", type=_positive, default=1,
                   help="CPU threads for torch (default: 1; the built-in model is so small that more threads "
                   "mostly add hand-off costs, and on a busy shared CPU they slow it down several-fold)")
    p.add_argument("--seed", type=int, default=0, help="seed of the methods that draw, e.g. random (default: 0)")
    p.add_argument("--output", default="results", help="output directory (default: results/)")
    p.add_argument("--positions", choices=["contiguous", "original"], default=None,
                   help="positions of the kept tokens, passed to the pre-LLM methods (default: the model's)")
    p.add_argument("--data-dir", default=str(harness.DEFAULT_VIDEO_DIR),
                   help=f"where the test clips are written as mp4 once (default: {harness.DEFAULT_VIDEO_DIR})")
    p.add_argument("--no-plot", action="store_true", help="skip accuracy_vs_flops.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _fail(prog: str, message: str, code: int = 2) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None, prog: str = "vlmprune-eval") -> int:
    args = build_parser(prog).parse_args(argv)
    builtin_tasks = [t for t in args.task if t in harness.TASKS]
    lmms_tasks = [t for t in args.task if t not in harness.TASKS]
    if lmms_tasks:
        from . import lmms_runner

        try:
            lmms_runner.resolve_tasks(lmms_tasks)
        except (ValueError, lmms_runner.LmmsUnavailable) as exc:
            return _fail(prog, f"{exc} (built-in tasks: {', '.join(harness.TASKS)})")
    import torch

    torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        return _fail(prog, f"unknown --device {args.device!r}; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _fail(prog, f"--device {args.device} asked for but CUDA is not available; use --device cpu")
    try:
        em = harness.load_model(args.model, device=args.device, seed=args.seed)
    except harness.ModelLoadError as exc:
        return _fail(prog, str(exc))
    import vlmprune.adapters

    exit_layers, gates = args.exit_layer or [], args.gates
    if "dyvte" in args.method and args.exit_layer is None and gates is None:
        exit_layers = list(range(1, len(vlmprune.adapters.for_model(em.model).decoder_layers)))
        gates = harness.shipped_gates(em)
    if gates is not None and not Path(gates).exists():
        return _fail(prog, f"--gates {gates}: no such file or directory (train gates with `vlmprune train-gates`)")
    began = time.perf_counter()
    rows = []
    try:
        if builtin_tasks:
            rows += harness.run_eval(
                em, builtin_tasks, args.method, args.ratio, limit=args.limit, batch_size=args.batch_size,
                seed=args.seed, positions=args.positions, data_dir=args.data_dir, exit_layers=exit_layers, gates=gates,
                presets=_split(args.preset), slowfast_modes=_split(args.slowfast_mode),
                progress=False if args.no_progress else None,
            )
        if lmms_tasks:
            cells = harness.grid(args.method, args.ratio, exit_layers, gates, _split(args.preset),
                                 _split(args.slowfast_mode), harness.method_extras(em))
            rows += lmms_runner.run_lmms(
                em, lmms_tasks, cells, limit=args.limit, batch_size=args.batch_size, seed=args.seed,
                positions=args.positions, progress=False if args.no_progress else None,
            )
    except (ValueError, OSError, RuntimeError) as exc:  # unreadable video cache, unsupported model, lmms-eval, ...
        return _fail(prog, str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 1)
    elapsed = time.perf_counter() - began
    harness.print_tables(rows)
    out = Path(args.output)
    path = harness.write_json(rows, out / "results.json")
    print(f"wrote {path}")
    if not args.no_plot:
        print(f"wrote {harness.plot(rows, out / 'accuracy_vs_flops.png')}")
    print(f"{len(rows)} grid cells in {elapsed:.0f} s on {device}, {args.threads} thread(s) ({em.name})")
    return 0



def command(argv: list[str] | None = None) -> int:
    """``vlmprune eval``: the same as ``vlmprune-eval``."""
    return main(argv, prog="vlmprune eval")


if __name__ == "__main__":
    raise SystemExit(main())
