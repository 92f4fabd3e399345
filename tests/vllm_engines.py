"""vLLM engines for the plugin tests, one at a time in this process (vLLM's CPU engine keeps
process-wide state, so the previous engine is shut down before the next starts)."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from typing import Any


def one_at_a_time(model: str, reuse: bool = False, **defaults: Any) -> Iterator[Any]:
    """Body of a module fixture: yields ``make(additional_config, model=None, **engine_args)`` -> an
    ``LLM`` on ``model`` (or the given one) with ``defaults`` and ``engine_args``; ``reuse``: the same
    arguments return the running engine instead of starting it again."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM
    from vllm.distributed import cleanup_dist_env_and_memory

    held: list = []

    def close() -> None:
        while held:
            held.pop()
            gc.collect()
            cleanup_dist_env_and_memory()

    def make(additional_config: dict, model_path: str | None = None, **engine_args: Any) -> Any:
        engine_args.setdefault("model", model_path or model)
        key = repr((additional_config, sorted(engine_args.items())))
        if reuse and held and held[-1][0] == key:
            return held[-1][1]
        close()
        llm = LLM(additional_config=additional_config, **{**defaults, **engine_args})
        held.append((key, llm))
        return llm

    try:
        yield make
    finally:
        close()
