"""Document functions of the offline lmms-eval task over the built-in benchmark.

The shipped index holds, per item, the image's index in the test split and its question; the
image itself is regenerated (deterministically) when lmms-eval asks for the visual.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

INDEX = Path(__file__).with_name("vlmprune_builtin_image_mc.jsonl")
ITEMS = 300  # vlmprune-eval's default image_mc limit: the same items, so the accuracies compare


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    from PIL import Image

    from vlmprune.evals import data

    return [Image.fromarray(data.make_image("test", int(doc["index"])).image)]


def doc_to_text(doc: dict[str, Any]) -> str:
    return doc["question"]


def doc_to_choice(doc: dict[str, Any]) -> list[str]:
    return list(doc["choices"])


def doc_to_target(doc: dict[str, Any]) -> int:
    return list(doc["choices"]).index(doc["answer"])


def write_index(path: Path = INDEX, n: int = ITEMS) -> Path:
    """The index file: the items of ``vlmprune-eval --task image_mc`` (first ``n``), in order."""
    from vlmprune.evals import harness

    lines = []
    for item in harness.ImageMC().load(n, Path(".")):
        index = int(item.uid.split("/")[0].split("-")[1])
        question = item.prompt.split(" ", 1)[1]  # drop the <image> placeholder
        lines.append(json.dumps({"index": index, "uid": item.uid, "qtype": item.qtype, "question": question,
                                 "choices": list(item.choices), "answer": item.answer}))
    path.write_text("\n".join(lines) + "\n")
    return path


def process_short(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Exact match of the first generated word (computed here: lmms-eval's own exact_match would
    fetch a metric script from the hub)."""
    words = (results[0] if results else "").split()
    return {"exact_match": float(bool(words) and words[0] == doc["answer"])}


if __name__ == "__main__":
    print(write_index())
