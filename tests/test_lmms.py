"""lmms-eval plugin: registration, the offline built-in task through lmms-eval's real evaluator,
batch-size parity, the per-request stats log, routing from vlmprune-eval, and the launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval")  # installed by the README's set-up line

from vlmprune.evals import cli, harness, lmms, lmms_runner  # noqa: E402
from vlmprune.evals.lmms_tasks import vlmprune_builtin_utils as utils  # noqa: E402

TASK = "vlmprune_builtin_image_mc"


@pytest.fixture(scope="module")
def em():
    return harness.load_model(None)


def docs(n: int) -> list[dict]:
    return [json.loads(line) for line in utils.INDEX.read_text().splitlines()[:n]]


def mc_requests(lm, n: int) -> list:
    """lmms-eval's multiple-choice requests for the first ``n`` docs, built as its task does."""
    from lmms_eval.api.instance import Instance

    items = docs(n)
    lm.task_dict = {TASK: {"test": items}}
    out = []
    for doc_id, doc in enumerate(items):
        for i, choice in enumerate(doc["choices"]):
            args = (utils.doc_to_text(doc), f" {choice}", utils.doc_to_visual, doc_id, TASK, "test")
            out.append(Instance(request_type="loglikelihood", arguments=args, idx=i,
                                metadata={"task": TASK, "doc_id": doc_id, "repeats": 1}))
    return out


def test_registered_and_declared_as_entry_point():
    lmms.register()
    from lmms_eval.models import get_model

    assert get_model("vlmprune") is lmms.VlmpruneLMM
    names = [ep.name for ep in entry_points(group="lmms_eval.models")]
    assert "vlmprune" in names


def test_index_matches_the_builtin_items():
    items = harness.ImageMC().load(20, Path("."))
    for item, doc in zip(items, docs(20)):
        assert item.uid == doc["uid"] and item.answer == doc["answer"] and tuple(doc["choices"]) == item.choices
        assert item.prompt.endswith(doc["question"])


@pytest.mark.parametrize("method,options", [("none", {}), ("fastervlm", {"ratio": 0.9})])
def test_loglikelihood_batch_parity_and_argmin_is_the_answer(em, method, options, tmp_path):
    import vlmprune

    handle = vlmprune.apply(em.model, method, **options) if method != "none" else None
    try:
        one = lmms.VlmpruneLMM.wrap(em, method, handle, batch_size=1)
        four = lmms.VlmpruneLMM.wrap(em, method, handle, stats_file=str(tmp_path / "s.jsonl"), batch_size=4)
        a = [r.text for r in one.loglikelihood(mc_requests(one, 6))]
        b = [r.text for r in four.loglikelihood(mc_requests(four, 6))]
    finally:
        if handle is not None:
            handle.remove()
    assert len(a) == len(b)
    for x, y in zip(a, b):
        loss_x, greedy_x = x
        assert loss_x > 0
        assert abs(loss_x - y[0]) < 1e-4 and greedy_x == y[1]
    # per doc, the choice with the smallest loss is the built-in harness's prediction
    items = harness.ImageMC().load(6, Path("."))
    inputs = harness.ImageMC().encode(em, items)
    with torch.no_grad(), (vlmprune.apply(em.model, method, **options) if method != "none" else _null()):
        result = harness.ImageMC().evaluate(em, items, inputs)
    k = 0
    for doc, pred in zip(docs(6), result.predictions):
        losses = [a[k + i][0] for i in range(len(doc["choices"]))]
        assert doc["choices"][losses.index(min(losses))] == pred
        k += len(doc["choices"])
    lines = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(lines) == len(b) and all(r["tflops"] > 0 for r in lines)
    assert {r["visual_tokens"] for r in lines} == ({256} if method == "none" else {26})


def test_stats_file_flops_are_per_batch(em, tmp_path):
    """The same requests logged twice give the same per-request FLOPs: a batch's method overhead is
    its own (the handle's records are not summed over every earlier batch)."""
    import vlmprune

    with vlmprune.apply(em.model, "vispruner", ratio=0.9) as handle:
        lm = lmms.VlmpruneLMM.wrap(em, "vispruner", handle, stats_file=str(tmp_path / "s.jsonl"), batch_size=3)
        requests = mc_requests(lm, 2)
        lm.loglikelihood(requests)
        lm.loglikelihood(requests)
    lines = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    half = len(lines) // 2
    assert half == len(requests)
    assert [r["tflops"] for r in lines[:half]] == pytest.approx([r["tflops"] for r in lines[half:]], rel=1e-9)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_generate_until_batch_parity(em):
    from lmms_eval.api.instance import Instance

    def requests(lm):
        items = docs(5)
        lm.task_dict = {TASK: {"test": items}}
        return [Instance(request_type="generate_until", idx=0, metadata={"task": TASK, "doc_id": i, "repeats": 1},
                         arguments=(utils.doc_to_text(d), {"max_new_tokens": 3, "until": ["</s>"]}, utils.doc_to_visual, i, TASK, "test"))
                for i, d in enumerate(items)]

    one = lmms.VlmpruneLMM.wrap(em, "none", None, batch_size=1)
    three = lmms.VlmpruneLMM.wrap(em, "none", None, batch_size=3)
    assert one.generate_until(requests(one)) == three.generate_until(requests(three))


def test_vlmprune_eval_routes_lmms_tasks_and_matches_builtin(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["--task", "image_mc,builtin_image_mc", "--method", "none,fastervlm", "--ratio", "0.9",
                   "--limit", "12", "--batch-size", "4", "--output", str(out), "--no-progress", "--no-plot"])
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())
    by = {(r["task"], r["method"]): r for r in rows}
    for method in ("none", "fastervlm"):
        ours, theirs = by[("image_mc", method)], by[(TASK, method)]
        assert theirs["source"] == "lmms-eval" and theirs["n"] == 12
        assert theirs["accuracy"] == pytest.approx(ours["accuracy"])
        assert theirs["visual_tokens"] == pytest.approx(ours["visual_tokens"])
        assert theirs["tflops"] > ours["tflops"]  # one forward per choice under lmms-eval


def test_unknown_task_lists_close_matches(capsys):
    assert cli.main(["--task", "mmbnch", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "mmbench" in err and "image_mc" in err
    with pytest.raises(ValueError, match="unknown task"):
        lmms_runner.resolve_tasks(["definitely_not_a_task"])
    assert lmms_runner.resolve_tasks(["mmbench"]) == ["mmbench_en_dev"]


def test_standard_task_offline_fails_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rc = cli.main(["--task", "mmbench", "--method", "none", "--limit", "2", "--output", str(tmp_path), "--no-progress"])
    assert rc == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "vlmprune-eval: error" in line]
    assert len(err) == 1 and "lmms-eval could not run mmbench_en_dev" in err[0]


def test_launcher_runs_lmms_eval_cli(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "vlmprune.evals.lmms_launch", "--model", "vlmprune",
           "--model_args", f"pretrained=builtin,method=fastervlm,ratio=0.5,stats_file={tmp_path / 'stats.jsonl'}",
           "--tasks", TASK, "--limit", "3", "--batch_size", "2", "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert TASK in proc.stdout and "acc" in proc.stdout
    assert len((tmp_path / "stats.jsonl").read_text().splitlines()) > 0


def test_misspelled_model_args_are_clear_errors():
    with pytest.raises(TypeError, match="unknown option.*ratoi"):
        lmms.VlmpruneLMM.create_from_arg_string("pretrained=builtin,method=fastervlm,ratoi=0.9")
    with pytest.raises(TypeError, match="without a method"):
        lmms.VlmpruneLMM.create_from_arg_string("pretrained=builtin,methd=fastervlm")
    with pytest.raises(ValueError, match="unknown method"):
        lmms.VlmpruneLMM.create_from_arg_string("pretrained=builtin,method=fastervml")


def test_generate_until_multi_round_follows_the_task_protocol(em):
    """Round 0 answers the context; the task's doc_to_text gives round 1 and then stops. Each
    round equals a single-round generation of the same prompt."""
    from lmms_eval.api.instance import Instance

    items = docs(2)
    calls = []

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        calls.append((round_idx, list(previous_output), previous_round_info))
        if round_idx == 2:
            return None, None, True, previous_output, None
        return [utils.doc_to_visual(doc)[0]], "how many objects are there ?", False, previous_output, {"r": round_idx}

    lm = lmms.VlmpruneLMM.wrap(em, "none", None)
    lm.task_dict = {TASK: {"test": items}}
    gen = {"max_new_tokens": 3}
    req = Instance(request_type="generate_until_multi_round", idx=0, metadata={"task": TASK, "doc_id": 0, "repeats": 1},
                   arguments=(utils.doc_to_text(items[0]), gen, utils.doc_to_visual, doc_to_text, 0, TASK, "test"))
    (rounds,) = lm.generate_until_multi_round([req])
    assert len(rounds) == 2 and [c[0] for c in calls] == [1, 2]
    assert calls[0][1] == rounds[:1] and calls[1][1] == rounds and calls[1][2] == {"r": 1}
    single = lambda text: Instance(request_type="generate_until", idx=0, metadata={"task": TASK, "doc_id": 0, "repeats": 1},  # noqa: E731
                                   arguments=(text, gen, utils.doc_to_visual, 0, TASK, "test"))
    assert rounds == lm.generate_until([single(utils.doc_to_text(items[0])), single("how many objects are there ?")])
