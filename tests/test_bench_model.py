"""``vlmprune bench --model``: a saved checkpoint with its own processor, timed per method and setting."""

from __future__ import annotations

import json

import pytest

from vlmprune import bench_model, cli


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from vlmprune.evals import builtin

    model, processor = builtin.build_untrained(seed=0)
    path = tmp_path_factory.mktemp("ckpt")
    builtin.save_builtin(model, processor, path)
    return path


def test_bench_model_rows_for_every_setting(checkpoint, tmp_path, capsys):
    out = tmp_path / "rows.json"
    rc = cli.main(["bench", "--model", str(checkpoint), "--method", "fastervlm,dyvte", "--ratios", "0,0.75",
                   "--option", "exit_layer=1", "--repeats", "1", "--warmup", "0", "--max-new-tokens", "3",
                   "--output", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert [(r["method"], r["setting"]) for r in rows] == [
        ("fastervlm", "ratio=0.0"), ("fastervlm", "ratio=0.75"), ("dyvte", "exit_layer=1")]
    full, pruned = rows[0], rows[1]
    assert full["visual_tokens"] == 256 and pruned["visual_tokens"] == 64
    assert full["llm_tokens"] - pruned["llm_tokens"] == 192
    assert full["predicted_speedup"] == pytest.approx(1.0, abs=0.01)
    assert pruned["predicted_speedup"] > 1.5
    for r in rows:
        assert r["ttft_ms"] > 0 and r["base_ttft_ms"] > 0 and r["decode_tok_s"] > 0
    assert "TTFT ms" in capsys.readouterr().out


def test_bench_model_bad_inputs(checkpoint, tmp_path, capsys):
    assert cli.main(["bench", "--model", str(tmp_path / "missing"), "--repeats", "1"]) != 0
    assert "no such directory" in capsys.readouterr().err
    assert cli.main(["bench", "--model", str(checkpoint), "--image", str(tmp_path / "none.png")]) != 0
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["bench", "--model", str(checkpoint), "--option", "exit_layer"]) != 0
    assert "key=value" in capsys.readouterr().err
    assert cli.main(["bench", "--method", "fastervlm,pool"]) == 2
    assert "need --model" in capsys.readouterr().err
    assert cli.main(["bench", "--model", str(checkpoint), "--method", "nosuch"]) == 2
    with pytest.raises(bench_model.ModelBenchError, match="dtype"):
        bench_model.load(str(checkpoint), dtype="int8")


@pytest.mark.parametrize("spec,hub", [
    ("llava-hf/llava-1.5-7b-hf", True), ("Qwen/Qwen2.5-VL-7B-Instruct", True), ("OpenGVLab/InternVL3-1B-hf", True),
    ("gpt2", True), ("./ckpt", False), ("/data/model", False), ("~/model", False), ("a/b/c", False),
    ("model.safetensors", False), ("org/weights.bin", False), ("", False),
])
def test_hub_ids_are_told_from_paths(spec, hub):
    from vlmprune.files import looks_like_hub_id

    assert looks_like_hub_id(spec) is hub


def test_a_hub_id_with_dots_is_tried_on_the_hub(monkeypatch, capsys):
    """``llava-hf/llava-1.5-7b-hf`` was refused as a missing directory (its '.5-7b-hf' read as a file
    suffix); offline, both commands now say they tried it as a hub id."""
    from vlmprune.evals import cli as eval_cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["bench", "--model", "llava-hf/llava-1.5-7b-hf", "--repeats", "1"]) != 0
    err = capsys.readouterr().err
    assert "hub id" in err and "no such directory" not in err
    assert eval_cli.main(["--model", "llava-hf/llava-1.5-7b-hf", "--limit", "2", "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "hub id" in err and "not a directory" not in err


def test_trainers_and_calibration_take_hub_ids_too(monkeypatch):
    from vlmprune.training.data import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="cannot load it from the hub"):
        load_model("Qwen/Qwen2.5-VL-3B-Instruct", "cpu")
    with pytest.raises(ValueError, match="a local checkpoint directory or a hub id"):
        load_model("/no/such/dir", "cpu")
