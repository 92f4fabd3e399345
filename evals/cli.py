"""``vlmprune-eval`` (also ``python -m vlmprune.evals`` and ``vlmprune eval``): accuracy versus FLOPs
of every method and ratio on the built-in tasks, as a table, ``results.json`` and a plot."""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path
from typing import NoReturn

from . import harness

EPILOG = """\
tasks (built-in, test split; items per task by default: {limits}):
  image_mc       image questions (colour, shape, count, size, relation, exist), argmax over the
                 question's choices of the answer-position logits
  image_short    the same questions answered by greedy generation (exact match of the first word)
  video_mc       video questions (direction, moving, first, count); 8 frames tiled into 2 images
  video_caption  greedy caption of the clip, scored by token F1 against the reference (shown as
                 the accuracy column, labelled "token F1")
  video_dense_caption  (not in the default list; for --model captioner, the shipped captioner) a 33-47 word
                 caption of a 2-3 object clip, scored by the per-fact score (share of the clip's
                 facts stated correctly; token F1 in the JSON's other_metrics)

Item i of an image task is test image i with one of its questions (question types taken in turn);
item i of a video task is test clip i. The same items serve every method and ratio.

--model: omit it for the shipped built-in model; or a directory saved with
  vlmprune.evals.builtin.save_builtin; or another local Hugging Face checkpoint that loads with
  AutoModelForImageTextToText and AutoProcessor (offline). Other checkpoints get the same prompts
  ("<image> what color is the circle ?", the <image> placeholder replaced by the processor's own
  image token; no chat template) and multiple choice compares the logit of each choice's first
  token, so they run but are not tuned for these tasks.

Methods and their options: --method takes a comma list of NAME or NAME:key=v1,v2;key2=v3 (quote
it in a shell: ';' ends a command). Each key is an option of the method's config, its values one
grid axis; several axes form a cross product, e.g. --method 'none,NAME:key=1,2,3;other=0.5'.
Values are read as int, float, true/false, None, else text (after a comma a bare method name starts
the next method, so write None, capitalised, among several values). --opt key=v1,v2 sets an axis for
every chosen method that has that option. Without axes each method runs its own default grid (a
pruning method at every --ratio; others their presets, modes or layers and the artifacts shipped
next to the checkpoint). A stack a+b runs at every ratio (when a part takes one), each part with
its own defaults.
{options}

Results: a table, <output>/results.json (one row per task x method x ratio: accuracy %, per-type
accuracy, visual tokens, TFLOPs per sample, latency of the model calls per sample (inputs are
encoded untimed), peak memory) and <output>/accuracy_vs_flops.png; the table shows GFLOPs and
milliseconds. The data of every run are the same fixed test items; --seed only seeds the methods
that draw at random.
"""

#: deprecated flags from the time the CLI knew the methods: each becomes an axis (flag's dest ->
#: option name) for every chosen method whose config has that option
ALIASES: dict[str, str] = {"exit_layer": "exit_layer", "gates": "gates", "preset": "preset", "slowfast_mode": "mode"}


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


def _is_method(name: str) -> bool:
    from vlmprune.registry import available_methods

    valid = set(available_methods())
    return name == harness.NONE or all(part in valid for part in name.split("+"))


def _method_texts(text: str) -> tuple[list[str], list[str]]:
    """Split a --method list into one text per method: a comma starts a new method when what
    follows names one (``a``, ``a+b``, ``a:...``), else it separates values of the last option."""
    texts: list[str] = []
    bad: list[str] = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        if _is_method(token.split(":", 1)[0].strip()):
            texts.append(token)
        elif texts and ":" in texts[-1]:
            texts[-1] += "," + token
        else:
            bad.append(token)
    return texts, bad


def _methods(text: str) -> list[harness.MethodSpec]:
    """Methods of the grid: ``NAME``, a stack ``a+b`` or ``NAME:key=v1,v2;key2=v3``."""
    from vlmprune.registry import available_methods, lookup

    valid = [harness.NONE, *available_methods()]
    texts, bad = _method_texts(text)
    if not texts or bad:
        raise argparse.ArgumentTypeError(
            f"unknown method {', '.join(map(repr, bad)) or repr(text)}; choose from {', '.join(valid)} "
            "(or a stack joined by '+'; options as NAME:key=v1,v2;key2=v3)"
        )
    specs = []
    for t in dict.fromkeys(texts):
        try:
            spec = harness.parse_method(t)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if spec.name == harness.NONE and spec.axes:
            raise argparse.ArgumentTypeError("'none' (the unpatched model) takes no options")
        if spec.axes:
            options = set().union(*(lookup(p)[0].option_names() for p in spec.parts))
            unknown = [k for k, _ in spec.axes if k not in options]
            if unknown:
                raise argparse.ArgumentTypeError(
                    f"unknown option(s) {', '.join(unknown)} for method {spec.name!r}; valid options: "
                    f"{', '.join(sorted(options))}"
                )
        specs.append(spec)
    return specs


def _opt(text: str) -> tuple[str, list]:
    """``key=v1,v2``: one axis for every chosen method that has the option ``key``."""
    key, eq, values = text.partition("=")
    parsed = [harness.parse_value(v) for v in values.split(",") if v.strip()]
    if not eq or not key.strip().isidentifier() or not parsed:
        raise argparse.ArgumentTypeError(f"--opt takes key=v1[,v2...], e.g. --opt seed=1,2; got {text!r}")
    return key.strip(), parsed


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


def _method_options_text() -> str:
    """The epilog's list of every registered method's options (read from the configs)."""
    from vlmprune.registry import available_methods, lookup

    lines = ["Options per method:"]
    for name in available_methods():
        options = ", ".join(lookup(name)[0].option_names()) or "-"
        lines += textwrap.wrap(options, 98, initial_indent=f"  {name:<10} ", subsequent_indent=" " * 13)
    return "\n".join(lines)


def build_parser(prog: str = "vlmprune-eval") -> argparse.ArgumentParser:
    defaults = harness.default_methods()
    p = _Parser(
        prog=prog,
        description="Accuracy versus FLOPs of visual-token reduction methods on the built-in benchmark "
        "(a small LLaVA-architecture model trained by this project on synthetic image and video tasks).",
        epilog=EPILOG.format(limits=", ".join(f"{k} {v}" for k, v in harness.DEFAULT_LIMITS.items()),
                             options=_method_options_text()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--task", type=_tasks, default=list(harness.BUILTIN_TASKS),
                   help=f"comma list of tasks (default: all built-in: {','.join(harness.BUILTIN_TASKS)}); any other "
                   "name is an lmms-eval task (e.g. mmbench, vlmprune_builtin_image_mc), run through lmms-eval's evaluator")
    p.add_argument("--model", default=None,
                   help="checkpoint directory, or builtin / captioner for the shipped ones (default: builtin); see below")
    p.add_argument("--method", type=_methods, default=[harness.MethodSpec(m) for m in defaults],
                   help=f"comma list of NAME or NAME:key=v1,v2;key2=v3 (see below); 'none' is the unpatched "
                   f"model (default: {','.join(defaults)})")
    p.add_argument("--ratio", type=_ratios, default=list(harness.DEFAULT_RATIOS),
                   help="comma list of fractions of visual tokens removed, each in [0, 1) "
                   f"(default: {','.join(f'{r:g}' for r in harness.DEFAULT_RATIOS)}); 'none' runs once at 0")
    p.add_argument("--opt", type=_opt, action="append", default=[], metavar="KEY=V1[,V2...]",
                   help="an option axis for every chosen method that has option KEY (repeatable)")
    p.add_argument("--exit-layer", type=_layers, default=None,
                   help="deprecated, = --opt exit_layer=K[,K...]: fixed exit layers (layers K.. run without "
                   "visual tokens); without it and --gates: 1..L-1 plus the shipped gates")
    p.add_argument("--gates", default=None,
                   help="deprecated, = --opt gates=PATH: trained exit gates (a gates.safetensors file or its "
                   "directory); default: the ones shipped next to the checkpoint")
    p.add_argument("--preset", type=_split, default=None,
                   help="deprecated, = --opt preset=P[,P...]: threshold presets (default: low,mid,high; built-in model)")
    p.add_argument("--slowfast-mode", type=_split, default=None,
                   help="deprecated, = --opt mode=M[,M...]: fast (fast tokens only), pooling (training-free "
                   "SlowFast), hybrid (trained cross-attention to the slow tokens) (default: all three)")
    p.add_argument("--limit", type=_positive, default=None,
                   help="items per task (default: per-task counts below, sized for a 5-minute run; at most "
                   "the task's split)")
    p.add_argument("--batch-size", type=_positive, default=16, help="items per model call (default: 16)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--threads", type=_positive, default=1,
                   help="CPU threads for torch (default: 1; the built-in model is so small that more threads "
                   "mostly add hand-off costs, and on a busy shared CPU they slow it down several-fold)")
    p.add_argument("--seed", type=int, default=0, help="seed of the methods that draw at random (default: 0)")
    p.add_argument("--output", default="results", help="output directory (default: results/)")
    p.add_argument("--positions", choices=["contiguous", "original"], default=None,
                   help="positions of the kept tokens, passed to the pre-LLM methods (default: the model's)")
    p.add_argument("--data-dir", default=str(harness.DEFAULT_VIDEO_DIR),
                   help=f"where the test clips are written as mp4 once (default: {harness.DEFAULT_VIDEO_DIR})")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="hf: the Hugging Face model in this process (default); vllm: served by vLLM with the "
                   "vlmprune plugin (built-in tasks; adds requests/s, output tokens/s and time to first token; docs/vllm.md)")
    p.add_argument("--concurrency", type=_positive, default=8,
                   help="--backend vllm: requests the engine runs together (default: 8)")
    p.add_argument("--no-plot", action="store_true", help="skip accuracy_vs_flops.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _fail(prog: str, message: str, code: int = 2) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def shared_axes(args: argparse.Namespace) -> dict[str, list]:
    """Axes for every chosen method that has the option: ``--opt`` and the deprecated flags."""
    axes: dict[str, list] = {}
    for dest, option in ALIASES.items():
        value = getattr(args, dest)
        if value is not None:
            axes[option] = value if isinstance(value, list) else [value]
    for key, values in args.opt:
        axes.setdefault(key, []).extend(values)
    return axes


def _unused_opts(args: argparse.Namespace) -> list[str]:
    """``--opt`` keys no chosen method has (a typo would otherwise be silently ignored)."""
    from vlmprune.registry import lookup

    options: set[str] = set()
    for spec in args.method:
        if spec.name != harness.NONE:
            options |= set().union(*(lookup(p)[0].option_names() for p in spec.parts))
    return [key for key, _ in args.opt if key not in options]


def _cap_limit(args: argparse.Namespace, tasks: list[str], prog: str) -> None:
    """A --limit beyond a task's split runs the whole split, with one note."""
    if args.limit is None:
        return
    over = {t: harness.split_size(harness.TASKS[t]()) for t in tasks}
    over = {t: n for t, n in over.items() if n is not None and args.limit > n}
    if over:
        sizes = ", ".join(f"{t} {n}" for t, n in over.items())
        print(f"{prog}: note: --limit {args.limit} is more than the test split has ({sizes} items); "
              "running the whole split", file=sys.stderr)


def _write_outputs(rows: list[dict], args: argparse.Namespace, prog: str) -> int:
    """results.json and the plot; a failure (disk full, directory removed meanwhile) is one line."""
    out = Path(args.output)
    try:
        print(f"wrote {harness.write_json(rows, out / 'results.json')}")
        if not args.no_plot:
            print(f"wrote {harness.plot(rows, out / 'accuracy_vs_flops.png')}")
    except OSError as exc:
        reason = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc) or type(exc).__name__
        return _fail(prog, f"could not write the results to {out} ({reason}); the table above is all there is", 1)
    return 0


def main(argv: list[str] | None = None, prog: str = "vlmprune-eval") -> int:
    args = build_parser(prog).parse_args(argv)
    from vlmprune.files import writable_dir

    try:
        writable_dir(args.output, "--output")
    except ValueError as exc:
        return _fail(prog, str(exc))
    unused = _unused_opts(args)
    if unused:
        return _fail(prog, f"--opt {', '.join(unused)}: no chosen method has that option")
    if args.gates is not None and not Path(args.gates).exists():
        return _fail(prog, f"--gates {args.gates}: no such file or directory (train gates with `vlmprune train-gates`)")
    builtin_tasks = [t for t in args.task if t in harness.TASKS]
    lmms_tasks = [t for t in args.task if t not in harness.TASKS]
    if args.backend == "vllm":
        return _main_vllm(args, builtin_tasks, lmms_tasks, argv, prog)
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
    try:  # every cell's config is built once here, so a bad option value fails before any work
        cells = harness.grid(args.method, args.ratio, axes=shared_axes(args), model=harness.eval_context(em))
        for cell in cells:
            harness.cell_configs(cell, args.seed, args.positions)
    except (ValueError, TypeError) as exc:
        return _fail(prog, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    _cap_limit(args, builtin_tasks, prog)
    began = time.perf_counter()
    rows = []
    try:
        if builtin_tasks:
            rows += harness.run_eval(
                em, builtin_tasks, cells=cells, limit=args.limit, batch_size=args.batch_size, seed=args.seed,
                positions=args.positions, data_dir=args.data_dir, progress=False if args.no_progress else None,
            )
        if lmms_tasks:
            rows += lmms_runner.run_lmms(
                em, lmms_tasks, cells, limit=args.limit, batch_size=args.batch_size, seed=args.seed,
                positions=args.positions, progress=False if args.no_progress else None,
            )
    except (ValueError, OSError, RuntimeError) as exc:  # unreadable video cache, unsupported model, lmms-eval, ...
        return _fail(prog, str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 1)
    elapsed = time.perf_counter() - began
    harness.print_tables(rows)
    code = _write_outputs(rows, args, prog)
    if code == 0:
        print(f"{len(rows)} grid cells in {elapsed:.0f} s on {device}, {args.threads} thread(s) ({em.name})")
    return code


def _main_vllm(args: argparse.Namespace, tasks: list[str], lmms_tasks: list[str], argv: list[str] | None,
               prog: str) -> int:
    """``--backend vllm``: the grid's cells as vLLM engines with the plugin (evals/vllm_backend.py)."""
    from vlmprune.method import EvalContext

    from . import builtin, vllm_backend

    if lmms_tasks:
        return _fail(prog, f"--backend vllm runs the built-in tasks ({', '.join(harness.TASKS)}); "
                     f"not {', '.join(lmms_tasks)}")
    from .provider import named_checkpoints

    path = Path(named_checkpoints().get(args.model or "builtin", args.model))
    if not (path / "config.json").exists():
        return _fail(prog, f"--backend vllm needs a checkpoint directory; {path} has no config.json")
    explicit = any(a == "--method" or a.startswith("--method=") for a in (argv if argv is not None else sys.argv[1:]))
    try:
        cells = harness.grid(args.method, args.ratio, axes=shared_axes(args),
                             model=EvalContext(checkpoint=path, builtin=path == builtin.CHECKPOINT))
        if not explicit:  # the default grid: the methods vLLM can run
            from vlmprune.vllm import engine_methods

            runnable = set(engine_methods())
            cells = [c for c in cells if c.unpatched or (not c.parts and c.method in runnable)]
        for cell in cells:
            vllm_backend.additional_config(cell)
    except (ValueError, TypeError) as exc:
        return _fail(prog, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    _cap_limit(args, tasks, prog)
    began = time.perf_counter()
    try:
        rows = vllm_backend.run_vllm(str(path), tasks, cells, limit=args.limit, concurrency=args.concurrency,
                                     seed=args.seed, data_dir=args.data_dir, device=args.device)
    except (ValueError, OSError, RuntimeError) as exc:
        return _fail(prog, str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 1)
    harness.print_tables(rows)
    vllm_backend.print_serving(rows)
    code = _write_outputs(rows, args, prog)
    if code == 0:
        print(f"{len(rows)} grid cells in {time.perf_counter() - began:.0f} s, served by vLLM ({path.name})")
    return code


def command(argv: list[str] | None = None) -> int:
    """``vlmprune eval``: the same as ``vlmprune-eval``."""
    return main(argv, prog="vlmprune eval")


if __name__ == "__main__":
    raise SystemExit(main())
