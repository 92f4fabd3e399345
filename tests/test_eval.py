"""``vlmprune-eval``: the grid runner, its outputs, argument errors and batch-size invariance.

Everything runs on the built-in architecture with random weights (``builtin.build_untrained``),
a few items per task, so the numbers are not accuracies worth reading, only the plumbing is.
"""

from __future__ import annotations

import json

import pytest

import vlmprune
from vlmprune.cli import main as vlmprune_main
from vlmprune.evals import builtin, data, harness
from vlmprune.evals.cli import main

REQUIRED = {"task", "method", "ratio", "accuracy", "tflops", "visual_tokens", "latency_s", "peak_mem_mb", "per_type", "n"}


def run_main(argv: list[str], fn=main) -> int:
    try:
        return fn(argv)
    except SystemExit as exc:  # argparse errors exit
        return exc.code


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained built-in model saved like the shipped one (exercises --model DIR)."""
    path = tmp_path_factory.mktemp("ckpt")
    model, processor = builtin.build_untrained(seed=0)
    builtin.save_builtin(model, processor, path)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return tmp_path_factory.mktemp("videos")


@pytest.fixture(scope="module")
def untrained():
    return harness.load_model("untrained")


@pytest.fixture(scope="module")
def cli_run(checkpoint, videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    argv = ["--model", str(checkpoint), "--limit", "4", "--method", "none,fastervlm,random,pool",
            "--ratio", "0.5,0.9", "--output", str(out), "--data-dir", str(videos), "--no-progress"]
    assert main(argv) == 0
    return out, json.loads((out / "results.json").read_text())


def test_cli_writes_json_rows_and_plot(cli_run, capsys):
    out, rows = cli_run
    assert (out / "accuracy_vs_flops.png").stat().st_size > 10_000
    # 4 tasks x (none + 3 methods x 2 ratios)
    assert len(rows) == 4 * 7
    assert {r["task"] for r in rows} == set(harness.BUILTIN_TASKS)
    for r in rows:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["n"] == 4 and 0.0 <= r["accuracy"] <= 100.0
        assert r["per_type"] and all(0.0 <= v <= 100.0 for v in r["per_type"].values())
        assert r["latency_s"] > 0 and r["tflops"] > 0
    caption = [r for r in rows if r["task"] == "video_caption"]
    assert all(r["metric"] == "token_f1" and r["generated_tokens"] > 0 for r in caption)


def test_visual_tokens_and_flops_follow_the_ratio(cli_run):
    _, rows = cli_run
    by = {(r["task"], r["method"], r["ratio"]): r for r in rows}
    for task, images in (("image_mc", 1), ("image_short", 1), ("video_mc", 2), ("video_caption", 2)):
        assert by[task, "none", 0.0]["visual_tokens"] == 256 * images
        assert by[task, "fastervlm", 0.9]["visual_tokens"] == 26 * images
        assert by[task, "random", 0.9]["visual_tokens"] == 26 * images
        assert by[task, "pool", 0.9]["visual_tokens"] == 25 * images  # 16x16 grid pooled to 5x5
        for method in ("fastervlm", "random", "pool"):
            assert by[task, "none", 0.0]["tflops"] > by[task, method, 0.5]["tflops"] > by[task, method, 0.9]["tflops"]
    # the FLOPs convention: unpruned image_mc = vision + projector + LLM prefill on the real length
    r = by["image_mc", "none", 0.0]
    assert r["flops"]["decode"] == 0 and r["flops"]["overhead"] == 0
    assert by["image_mc", "fastervlm", 0.9]["flops"]["overhead"] > 0  # the [CLS] scoring
    assert r["flops"]["vision"] == by["image_mc", "fastervlm", 0.9]["flops"]["vision"]


def test_batch_size_does_not_change_results(untrained, videos):
    runs = [
        harness.run_eval(untrained, ["image_mc", "video_caption"], ["none", "fastervlm"], [0.9], limit=6,
                         batch_size=bs, data_dir=videos, progress=False, keep_predictions=True)
        for bs in (1, 8)
    ]
    for a, b in zip(*runs):
        assert (a["task"], a["method"]) == (b["task"], b["method"])
        assert a["predictions"] == b["predictions"]
        assert a["scores"] == b["scores"]
        assert a["visual_tokens"] == b["visual_tokens"] and a["tflops"] == b["tflops"]


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--task", "image_mc,mmbnch"], ["mmbnch", "mmbench", "image_mc, image_short, video_mc, video_caption"]),
        (["--method", "fastervlm,nope"], ["nope", "none, " + ", ".join(sorted(vlmprune.available_methods()))]),
        (["--ratio", "0.5,1.0"], ["[0, 1)"]),
        (["--ratio", "abc"], ["[0, 1)", "'abc'"]),
        (["--limit", "0"], ["positive"]),
        (["--model", "/nonexistent/ckpt"], ["/nonexistent/ckpt", "save_builtin"]),
    ],
)
def test_bad_arguments_give_one_clear_line(argv, needles, capsys):
    assert run_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("vlmprune-eval: error:")
    for needle in needles:
        assert needle in err


def test_unloadable_model_directory_gives_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert run_main(["--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "AutoModelForImageTextToText" in err


def test_generic_checkpoint_path_matches_builtin_path(checkpoint, videos, untrained, monkeypatch):
    """A local checkpoint that is not recognised as built-in goes through AutoModelForImageTextToText /
    AutoProcessor and the first-token choice rule; on the built-in model both paths agree."""
    monkeypatch.setattr(harness, "_is_builtin_checkpoint", lambda path: False)
    generic = harness.load_model(str(checkpoint))
    assert not generic.builtin
    kw = dict(limit=4, data_dir=videos, progress=False, keep_predictions=True)
    a = harness.run_eval(generic, ["image_mc", "image_short"], ["none"], [], **kw)
    b = harness.run_eval(untrained, ["image_mc", "image_short"], ["none"], [], **kw)
    assert [r["predictions"] for r in a] == [r["predictions"] for r in b]


def test_missing_shipped_checkpoint_says_how_to_train(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(builtin, "CHECKPOINT", tmp_path / "not-trained-yet")
    assert run_main(["--limit", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train" in err and "not-trained-yet" in err


def test_vlmprune_eval_subcommand_forwards(capsys):
    assert run_main(["eval", "--method", "bogus"], vlmprune_main) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlmprune eval: error:") and "fastervlm" in err
    assert run_main(["eval", "--help"], vlmprune_main) == 0
    assert "--batch-size" in capsys.readouterr().out


def test_token_f1_and_grid():
    assert harness.token_f1("a red circle".split(), "a red circle".split()) == 1.0
    assert harness.token_f1([], "a".split()) == 0.0 and harness.token_f1([], []) == 1.0
    assert harness.token_f1("a a blue".split(), "a red".split()) == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    cells = harness.grid(["none", "pool"], [0.5, 0.9])
    assert [(c.method, c.ratio, c.setting) for c in cells] == [("none", 0.0, "0"), ("pool", 0.5, "0.5"), ("pool", 0.9, "0.9")]
    cells = harness.grid(["dyvte"], [0.5], exit_layers=[1, 2], gates="/x/gates")
    assert [(c.method, c.ratio, c.setting) for c in cells] == [
        ("dyvte", None, "exit_layer=1"), ("dyvte", None, "exit_layer=2"), ("dyvte", None, "gates=gates")]
    with pytest.raises(ValueError, match="exit-layer"):
        harness.grid(["dyvte"], [0.5])


def test_items_are_deterministic_and_balanced(videos):
    a = harness.ImageMC().load(12, videos)
    b = harness.ImageMC().load(12, videos)
    assert [(i.uid, i.prompt, i.answer) for i in a] == [(i.uid, i.prompt, i.answer) for i in b]
    assert {i.qtype for i in a} == set(data.IMAGE_QTYPES)
    assert all(i.answer in i.choices for i in a)
