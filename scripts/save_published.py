"""Save a random-init model of a published geometry, with its real processor class, as a local
checkpoint (``save_pretrained`` layout), for ``vlmprune bench --model`` and
``scripts/check_checkpoints.py`` where the published weights cannot be downloaded (CI, offline).

    python scripts/save_published.py --geometry llava-1.5-7b --llm-layers 1 --output results/llava-1.5-7b-random

The geometries are the published-geometry test tier's (``tests/published.py``): the vision tower at
full size, the LLM at its real widths but ``--llm-layers`` deep, a locally built tokenizer with the
published special tokens and chat template. Random weights: for timing and mechanics, not accuracy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import published  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--geometry", required=True, choices=sorted(published.PUBLISHED))
    p.add_argument("--llm-layers", type=int, default=published.LLM_LAYERS, help="decoder layers (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="storage dtype (default: %(default)s)")
    p.add_argument("--output", required=True, help="directory to write")
    args = p.parse_args(argv)
    if args.llm_layers < 1:
        p.error("--llm-layers must be at least 1")
    published.LLM_LAYERS = args.llm_layers
    model, processor = published.PUBLISHED[args.geometry].build()
    model.to(getattr(torch, args.dtype))
    out = Path(args.output)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    params = sum(t.numel() for t in model.parameters())
    print(f"{args.geometry}: {params / 1e6:.0f} M parameters ({args.llm_layers} LLM layers, {args.dtype}) -> {out}")


if __name__ == "__main__":
    main()
