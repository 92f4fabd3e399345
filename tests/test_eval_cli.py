"""``vlmprune-eval`` knows no method: the grid comes from the method configs' eval contract
(``MethodConfig.eval_cells`` / ``eval_defaults`` / ``setting_label`` and traits), ``--method
NAME:key=v1,v2;key2=v`` and the deprecated per-method flags make the same cells; the CLI under bad
conditions (output path, write failure, ``--limit`` past the split), the 80-column table, and
``vlmprune bench``'s count checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import vlmprune
from vlmprune.cli import main as vlmprune_main
from vlmprune.evals import builtin, cli, harness, lmms_runner
from vlmprune.method import EvalContext

#: the built-in model as the grid sees it: its checkpoint (shipped artifacts) and 4 decoder layers
BUILTIN = EvalContext(checkpoint=builtin.CHECKPOINT, builtin=True, num_layers=4)


def run_main(argv: list[str], fn=cli.main) -> int:
    try:
        return fn(argv)
    except SystemExit as exc:  # argparse errors exit
        return exc.code


def cells_for(argv: list[str], model: EvalContext = BUILTIN) -> list[tuple]:
    """(method, ratio, setting, config dicts) of every cell the CLI would run for ``argv``."""
    args = cli.build_parser().parse_args(argv)
    cells = harness.grid(args.method, args.ratio, axes=cli.shared_axes(args), model=model)
    return [(c.method, c.ratio, c.setting, [cfg.to_dict() for cfg in harness.cell_configs(c, 0, None)])
            for c in cells]


def artifact(name: str) -> str | None:
    path = builtin.CHECKPOINT / name
    return str(path) if path.exists() else None


# ------------------------------------------------------------------------------ the harness knows no method


@pytest.mark.parametrize("module", [harness, cli, lmms_runner])
def test_harness_and_cli_name_no_method(module):
    source = Path(module.__file__).read_text()
    for name in vlmprune.available_methods():
        assert f'"{name}"' not in source and f"'{name}'" not in source, (module.__name__, name)
        assert not re.search(rf"[\"'(,]\s*{name}\+", source), (module.__name__, name)  # no stack literal


def test_default_methods_come_from_the_configs():
    assert harness.default_methods() == ("none", "fastervlm", "random", "pool")
    args = cli.build_parser().parse_args([])
    assert [str(m) for m in args.method] == ["none", "fastervlm", "random", "pool"]


# ------------------------------------------------------------------------------ the same cells as before


def test_default_cells_are_the_ones_before_the_contract():
    """The default grid, and each method's own default grid on the built-in model, cell for cell."""
    cells = cells_for([])
    assert cells == [("none", 0.0, "0", [])] + [
        (m, r, f"{r:g}", [{"method": m, "ratio": r, "positions": None, "anyres": None,
                           **({"seed": 0} if m == "random" else {})}])
        for m in ("fastervlm", "random", "pool") for r in (0.5, 0.75, 0.9, 0.95)
    ]
    dyvte = cells_for(["--method", "dyvte"])
    gates = artifact("dyvte-gates")
    assert [(r, s) for _, r, s, _ in dyvte] == [(None, f"exit_layer={k}") for k in (1, 2, 3)] + (
        [(None, "gates=gates.safetensors")] if gates else [])
    assert [c[0]["exit_layer"] for _, _, _, c in dyvte[:3]] == [1, 2, 3]
    dymu = cells_for(["--method", "dymu"])
    assert [(r, s, c[0]["preset"]) for _, r, s, c in dymu] == [
        (None, f"preset={p}", p) for p in ("low", "mid", "high")]
    slowfast = cells_for(["--method", "slowfast"])
    assert [s for _, _, s, _ in slowfast] == ["fast", "pooling", "hybrid"]
    modes = {s: c[0] for _, _, s, c in slowfast}
    assert all(c["mosaic"] == 2 for c in modes.values())
    assert (modes["pooling"]["slow_frames"], modes["pooling"]["slow_stride"], modes["pooling"]["fast_stride"]) == (1, 2, 8)
    assert modes["fast"]["adapter"] is None and modes["pooling"]["adapter"] is None
    assert modes["hybrid"]["adapter"] == artifact("slowfast-hybrid")
    flash = cells_for(["--method", "none,flash,fastervlm+flash", "--ratio", "0.5,0.9"])
    assert [(m, r, s) for m, r, s, _ in flash] == [
        ("none", 0.0, "0"), ("flash", 0.0, "0"), ("fastervlm+flash", 0.5, "0.5"), ("fastervlm+flash", 0.9, "0.9")]
    assert flash[1][3] == [{"method": "flash", "draft": artifact("flash-draft"), "depth": 4, "k": None, "tree": None,
                            "branches": 3, "latents": None, "seed": 0}]
    stack = flash[3][3]
    assert stack[0] == {"method": "fastervlm", "ratio": 0.9, "positions": None, "anyres": None}
    assert stack[1] == flash[1][3][0]


def test_untrained_model_gets_no_shipped_defaults():
    """Without a checkpoint: no mosaic layout, no adapter or draft, and DyVTE needs its layers."""
    bare = EvalContext(num_layers=4)
    assert [s for _, _, s, _ in cells_for(["--method", "dyvte"], bare)] == ["exit_layer=1", "exit_layer=2", "exit_layer=3"]
    assert cells_for(["--method", "flash"], bare)[0][3][0]["draft"] is None
    assert all(c[0]["mosaic"] == 0 and c[0]["adapter"] is None for _, _, _, c in cells_for(["--method", "slowfast"], bare))
    with pytest.raises(ValueError, match="exit-layer"):
        harness.grid(["dyvte"], [0.5], model=EvalContext())


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (["--method", "dyvte", "--exit-layer", "2"], ["--method", "dyvte:exit_layer=2"]),
        (["--method", "dyvte", "--exit-layer", "1,3", "--gates", "/x/gates"], ["--method", "dyvte:exit_layer=1,3;gates=/x/gates"]),
        (["--method", "dyvte", "--exit-layer", "1,3"], ["--method", "dyvte", "--opt", "exit_layer=1,3"]),
        (["--method", "dymu", "--preset", "mid,high"], ["--method", "dymu:preset=mid,high"]),
        (["--method", "slowfast", "--slowfast-mode", "hybrid,fast"], ["--method", "slowfast:mode=hybrid,fast"]),
        (["--method", "none,dyvte,dymu,slowfast", "--exit-layer", "2", "--preset", "low", "--slowfast-mode", "pooling"],
         ["--method", "none,dyvte:exit_layer=2,dymu:preset=low,slowfast:mode=pooling"]),
        (["--method", "fastervlm,dyvte", "--ratio", "0.5", "--exit-layer", "1,2"],
         ["--method", "fastervlm,dyvte:exit_layer=1,2", "--ratio", "0.5"]),
    ],
)
def test_method_syntax_and_deprecated_flags_make_the_same_cells(old, new):
    assert cells_for(old) == cells_for(new)


def test_axes_cross_and_label_the_rows():
    cells = cells_for(["--method", "dyvte:exit_layer=1,2;threshold=0.3,0.6,random:seed=1,2", "--ratio", "0.9"])
    assert [(m, s) for m, _, s, _ in cells] == [
        ("dyvte", "exit_layer=1,threshold=0.3"), ("dyvte", "exit_layer=1,threshold=0.6"),
        ("dyvte", "exit_layer=2,threshold=0.3"), ("dyvte", "exit_layer=2,threshold=0.6"),
        ("random", "seed=1"), ("random", "seed=2")]
    assert [c[0]["seed"] for m, _, _, c in cells if m == "random"] == [1, 2]  # the axis wins over --seed
    sf = cells_for(["--method", "slowfast:mode=pooling;p=4"])
    assert [s for _, _, s, _ in sf] == ["pooling,p=4"] and sf[0][3][0]["slow_frames"] == 1
    stack = cells_for(["--method", "fastervlm+flash:depth=2,3", "--ratio", "0.9"])
    assert [s for _, _, s, _ in stack] == ["depth=2", "depth=3"]
    assert [c[1]["depth"] for _, _, _, c in stack] == [2, 3] and stack[0][3][0]["ratio"] == 0.9


def test_traits_replace_method_names():
    flash, stack, slowfast, pool = harness.grid(
        ["flash", "fastervlm+flash", "slowfast:mode=fast", "pool"], [0.9], model=BUILTIN)
    image_mc, video_caption = harness.TASKS["image_mc"](), harness.TASKS["video_caption"]()
    assert [harness.applies_to(c, image_mc) for c in (flash, stack, slowfast, pool)] == [False, False, False, True]
    assert all(harness.applies_to(c, video_caption) for c in (flash, stack, slowfast, pool))
    assert flash.one_prompt_per_call and stack.one_prompt_per_call and not pool.one_prompt_per_call
    assert flash.lossless and not stack.lossless and not pool.lossless


def test_values_and_method_lists_parse():
    assert [harness.parse_value(v) for v in ("2", "0.5", "true", "False", "None", "null", "a/b")] == [
        2, 0.5, True, False, None, None, "a/b"]
    spec = harness.parse_method("dyvte:exit_layer=1,2;threshold=0.3")
    assert spec.name == "dyvte" and spec.axes_dict() == {"exit_layer": [1, 2], "threshold": [0.3]}
    assert str(spec) == "dyvte:exit_layer=1,2;threshold=0.3"
    texts, bad = cli._method_texts("none,dyvte:exit_layer=1,2,3,fastervlm+flash,dymu:preset=low,high")
    assert texts == ["none", "dyvte:exit_layer=1,2,3", "fastervlm+flash", "dymu:preset=low,high"] and not bad


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--method", "dyvte:nope=1"], "unknown option(s) nope for method 'dyvte'"),
        (["--method", "dyvte:exit_layer"], "NAME:key=v1,v2;key2=v3"),
        (["--method", "none:ratio=0.5"], "takes no options"),
        (["--method", "fastervlm", "--opt", "nope=1"], "--opt nope"),
        (["--method", "fastervlm", "--opt", "bad"], "--opt takes key=v1"),
        (["--method", "dyvte", "--gates", "/nonexistent/gates"], "/nonexistent/gates"),
    ],
)
def test_bad_method_options_are_one_line(argv, needle, capsys, monkeypatch):
    monkeypatch.setattr(harness, "load_model", _no_model)
    assert run_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vlmprune-eval: error:") and needle in err, err


def test_bad_option_value_fails_before_any_item(capsys):
    assert run_main(["--model", "untrained", "--method", "dymu:preset=huge", "--limit", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vlmprune-eval: error:") and "huge" in err[-1] and "Traceback" not in "\n".join(err)


# ------------------------------------------------------------------------------ the CLI under bad conditions


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the arguments were checked")


@pytest.mark.parametrize("where", ["existing-file", "below-a-file"])
def test_output_path_is_checked_before_the_model_loads(where, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    output = blocker if where == "existing-file" else blocker / "results"
    monkeypatch.setattr(harness, "load_model", _no_model)
    assert run_main(["--output", str(output), "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("vlmprune-eval: error: --output") and str(blocker) in err


def test_failed_write_still_prints_the_table(tmp_path, monkeypatch, capsys):
    def full_disk(rows, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(harness, "write_json", full_disk)
    argv = ["--model", "untrained", "--task", "image_mc", "--method", "none", "--limit", "2", "--output",
            str(tmp_path / "out"), "--no-progress", "--no-plot"]
    assert run_main(argv) == 1
    out, err = capsys.readouterr()
    assert "| image_mc | none | 0 |" in out
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "No space left on device" in err and err.startswith("vlmprune-eval: error: could not write")


def test_limit_past_the_split_runs_the_split_with_one_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(harness.ImageMC, "split_size", 3)
    argv = ["--model", "untrained", "--task", "image_mc", "--method", "none", "--limit", "10", "--output",
            str(tmp_path), "--no-progress", "--no-plot"]
    assert run_main(argv) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "note:" in line]
    assert len(notes) == 1 and "--limit 10" in notes[0] and "image_mc 3" in notes[0]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["n"] for r in rows] == [3]


@pytest.fixture(scope="module")
def untrained():
    return harness.load_model("untrained")


def test_inputs_encoded_per_batch_give_the_same_rows(untrained, tmp_path, monkeypatch):
    """Past the kept-inputs budget every cell encodes batch by batch: the same numbers."""
    kw = dict(limit=5, batch_size=2, data_dir=tmp_path, progress=False, keep_predictions=True)
    methods = ["none", "fastervlm"]
    kept = harness.run_eval(untrained, ["image_mc", "image_short"], methods, [0.75], **kw)
    encodes = []
    encode = harness.ImageMC.encode
    monkeypatch.setattr(harness, "ENCODED_BYTES_KEPT", 0)
    monkeypatch.setattr(harness.ImageMC, "encode", lambda self, em, items: encodes.append(len(items)) or encode(self, em, items))
    lazy = harness.run_eval(untrained, ["image_mc", "image_short"], methods, [0.75], **kw)
    for a, b in zip(kept, lazy, strict=True):
        assert (a["task"], a["method"], a["setting"]) == (b["task"], b["method"], b["setting"])
        assert a["predictions"] == b["predictions"] and a["scores"] == b["scores"]
        assert a["tflops"] == b["tflops"] and a["visual_tokens"] == b["visual_tokens"]
    # per task: the first batch (warm-up), then every batch once per cell, never more than a batch at once
    assert max(encodes) == 2 and len(encodes) == 2 * (1 + 2 * 3)


# ------------------------------------------------------------------------------ the table in 80 columns


def _row(task, method, setting, ratio, acc, tokens, tflops, latency, mem, metric="accuracy", qtypes=("color",)):
    return {"task": task, "metric": metric, "method": method, "setting": setting, "ratio": ratio, "accuracy": acc,
            "visual_tokens": tokens, "tflops": tflops, "latency_s": latency, "peak_mem_mb": mem,
            "per_type": {q: acc for q in qtypes}}


REALISTIC = [
    _row("image_mc", "none", "0", 0.0, 92.3, 256.0, 0.00129, 0.0264, 42.0,
         qtypes=("color", "count", "exist", "relation", "shape", "size")),
    _row("image_mc", "fastervlm", "0.95", 0.95, 71.0, 13.0, 0.000638, 0.0144, 0.0),
    _row("image_short", "random", "0.75", 0.75, 88.7, 64.0, 0.000756, 0.0187, None),
    _row("video_mc", "dyvte", "exit_layer=2", 0.5, 60.0, 256.0, 0.00202, 0.0404, 19.0, qtypes=("count", "direction")),
    _row("video_mc", "dyvte", "gates=gates.safetensors", 0.1, 80.0, 460.8, 0.00283, 0.0614, 20.0),
    _row("video_mc", "dymu", "preset=high", 0.3037, 75.0, 356.5, 0.00209, 0.0459, 18.0),
    _row("video_caption", "slowfast", "pooling", 0.9531, 26.8, 24.0, 0.00126, 0.0298, 10.0, metric="token_f1"),
    _row("video_caption", "flash", "0", 0.0, 80.3, 512.0, 0.00284, 0.0536, 6.0, metric="token_f1"),
    _row("video_caption", "fastervlm+flash", "0.9", 0.9, 85.7, 52.0, 0.00133, 0.0333, 5.0, metric="token_f1"),
    _row("video_caption", "fastervlm+flash", "depth=2,tree=static", 0.9, 85.7, 52.0, 0.00133, 0.0333, 5.0,
         metric="token_f1"),
]


def test_table_fits_80_columns_without_ellipsis():
    from rich.console import Console

    console = Console(width=80, record=True, color_system=None)
    for table in harness.rich_tables(harness.summary_tables(REALISTIC)):
        console.print(table)
    text = console.export_text()
    assert "…" not in text and "..." not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    for name in ("video_caption", "fastervlm+flash", "image_short"):  # names are never cut
        assert re.search(rf"(^| ){re.escape(name)}( |$)", text, re.M), name
    assert " 1.29 " in text and " 0.638 " in text  # GFLOPs per sample
    assert "token F1" in text


def test_plain_table_keeps_the_columns():
    text = harness.format_plain(harness.summary_tables(REALISTIC))
    assert "| task | method | setting | score | tokens | GFLOPs | ms | MB |" in text
    assert "| video_mc | dyvte | exit_layer=2 (0.50) | 60.0 | 256.0 | 2.02 | 40.4 | 19 |" in text
    assert "| image_short | random | 0.75 | 88.7 | 64.0 | 0.756 | 18.7 | n/a |" in text


# ------------------------------------------------------------------------------ vlmprune bench


@pytest.mark.parametrize(("argv", "needle"), [(["--repeats", "0"], "--repeats"), (["--warmup", "-1"], "--warmup"),
                                              (["--repeats", "x"], "--repeats")])
def test_bench_counts_are_checked(argv, needle, capsys):
    assert run_main(["bench", "--size", "tiny", *argv], vlmprune_main) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("vlmprune bench: error:") and needle in err


def test_large_limits_make_items_on_demand_with_identical_rows(monkeypatch, tmp_path):
    """Above KEEP_ITEMS a task's items are made batch by batch (memory does not grow with --limit);
    the rows are the same as with the items held in memory."""
    from vlmprune.evals import harness

    em = harness.load_model(None)
    kwargs = dict(limit=6, batch_size=4, progress=False, data_dir=tmp_path)
    held = harness.run_eval(em, ["image_mc", "video_mc"], ["none", "random"], [0.9], **kwargs)
    monkeypatch.setattr(harness, "KEEP_ITEMS", {"image": 2, "video": 2})
    harness._images.cache_clear()
    harness._videos.cache_clear()
    items = harness.TASKS["image_mc"]().load(6, tmp_path)
    assert isinstance(items, harness.LazyItems) and len(items) == 6 and len(items[2:5]) == 3
    lazy = harness.run_eval(em, ["image_mc", "video_mc"], ["none", "random"], [0.9], **kwargs)
    harness._images.cache_clear()
    harness._videos.cache_clear()
    keys = ("task", "method", "accuracy", "tflops", "n")
    assert [tuple(r[k] for k in keys) for r in held] == [tuple(r[k] for k in keys) for r in lazy]
