"""Every ``vlmprune`` sub-command meets a bad path with one line on stderr and a non-zero exit code,
never a traceback (and before any long work)."""

from __future__ import annotations

import pytest

from vlmprune.cli import main


@pytest.fixture
def not_a_dir(tmp_path):
    """A path whose parent is a regular file: nothing can be written or read there."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    return blocker / "below"


BAD = {
    "calibrate": lambda p: ["calibrate", "dymu", "--model", "/nonexistent/model", "--target-tokens", "10",
                            "--output", str(p / "t.json")],
    "calibrate-data": lambda p: ["calibrate", "dymu", "--data", "/nonexistent/images", "--target-tokens", "100",
                                 "--output", str(p / "t.json")],
    "train-gates": lambda p: ["train-gates", "--model", "/nonexistent/model", "--output", str(p)],
    "train-gates-data": lambda p: ["train-gates", "--data", "/nonexistent/data.jsonl", "--output", str(p), "--steps", "1"],
    "train-slowfast": lambda p: ["train-slowfast", "--model", "/nonexistent/model", "--output", str(p)],
    "train-draft": lambda p: ["train-draft", "--model", "/nonexistent/model", "--output", str(p)],
    "bench-flash": lambda p: ["bench-flash", "--model", "/nonexistent/model"],
    "bench-flash-draft": lambda p: ["bench-flash", "--draft", "/nonexistent/draft", "--prompts", "1", "--repeats", "1"],
    "train-builtin": lambda p: ["train-builtin", "--output", str(p)],
    "eval": lambda p: ["eval", "--model", "/nonexistent/model"],
    "eval-output": lambda p: ["eval", "--output", str(p), "--limit", "2", "--task", "image_mc"],
    "bench-output": lambda p: ["bench", "--size", "tiny", "--repeats", "1", "--warmup", "0", "--ratios", "0",
                               "--output", str(p / "x.json")],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_path_is_one_line_and_a_nonzero_exit(case, not_a_dir, capsys):
    try:
        code = main(BAD[case](not_a_dir))
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code not in (0, None), err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line and "Loading weights" not in line]
    assert len(lines) == 1 or (lines and lines[0].startswith("usage:")), err  # argparse prints usage + one line
    assert lines[-1].startswith("vlmprune"), err
