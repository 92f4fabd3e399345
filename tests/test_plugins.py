"""A third-party method joins through the ``vlmprune.methods`` entry-point group: the complete method of
docs/extending.md, built from that page into a throw-away package, runs through ``vlmprune.apply`` and
``vlmprune-eval`` without any edit to vlmprune."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlmprune
from vlmprune import registry

sys.path.insert(0, str(Path(__file__).parent))
from tiny import IMAGE_TOKEN, llava_inputs, tiny_llava  # noqa: E402

DOC = Path(__file__).parent.parent / "docs" / "extending.md"


def write_plugin(root: Path) -> None:
    """The package files exactly as docs/extending.md shows them, plus an installed distribution's
    metadata declaring the entry point (what ``pip install`` of such a package leaves behind)."""
    blocks = re.findall(r"```python\n# (vlmprune_stride/[\w/]+\.py)\n(.*?)```", DOC.read_text(), flags=re.S)
    assert {name for name, _ in blocks} >= {"vlmprune_stride/__init__.py", "vlmprune_stride/config.py",
                                            "vlmprune_stride/method.py", "vlmprune_stride/ops.py"}
    for name, body in blocks:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    info = root / "vlmprune_stride-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vlmprune-stride\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[vlmprune.methods]\nstride = vlmprune_stride\n")


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    write_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setattr(registry, "_discovered", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("vlmprune_stride")]:
        del sys.modules[name]


def test_the_documented_method_runs_through_apply(plugin):
    assert "stride" in vlmprune.available_methods()
    assert "fastervlm" in vlmprune.available_methods()  # the built-in ones are still there
    from vlmprune_stride.ops import evenly_spaced

    assert evenly_spaced(16, 4).tolist() == [0, 5, 10, 15]
    model = tiny_llava(seed=0)
    inp = llava_inputs(model, batch=2)
    with torch.no_grad():
        stock = model(**inp).logits
        seen = []
        with vlmprune.apply(model, "stride", ratio=0.75) as handle:
            hook = model.model.language_model.register_forward_pre_hook(
                lambda m, a, k: seen.append(k["inputs_embeds"]), with_kwargs=True)
            model(**inp)
            hook.remove()
            assert handle.stats.last.visual_out == [4, 4]
            assert type(handle.config).__name__ == "StrideConfig" and vlmprune.StrideConfig is type(handle.config)
        embeds = model.get_input_embeddings()(inp["input_ids"].masked_fill(inp["input_ids"] == IMAGE_TOKEN, 0))
        image = model.model.get_image_features(inp["pixel_values"]).pooler_output
        kept = torch.stack([f[[0, 5, 10, 15]] for f in image])
        first = int((inp["input_ids"][0] == IMAGE_TOKEN).nonzero()[0])
        torch.testing.assert_close(seen[0][:, first : first + 4], kept)
        torch.testing.assert_close(seen[0][:, :first], embeds[:, :first])
        assert torch.equal(model(**inp).logits, stock)  # removed exactly


def test_a_taken_name_is_refused(plugin):
    vlmprune.available_methods()
    from vlmprune_stride.method import Stride

    class Other(Stride):
        pass

    with pytest.raises(ValueError, match="already registered"):
        vlmprune.register_method(Other)


def test_the_documented_method_runs_through_vlmprune_eval(plugin, tmp_path):
    out = tmp_path / "eval"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-c", "from vlmprune.evals.cli import main; raise SystemExit(main())",
           "--task", "image_mc", "--method", "none,stride", "--ratio", "0.75", "--limit", "8",
           "--output", str(out), "--no-plot", "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((out / "results.json").read_text())
    stride = [r for r in rows if r["method"] == "stride"]
    assert len(stride) == 1 and stride[0]["ratio"] == 0.75 and stride[0]["n"] == 8
