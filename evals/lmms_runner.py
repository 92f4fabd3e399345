"""lmms-eval tasks inside ``vlmprune-eval``: the same method grid, rows and plot as the built-in tasks.

Any task name that is not a built-in task is looked up in lmms-eval's task registry (with the
offline built-in tasks of :mod:`vlmprune.evals.lmms_tasks` on its include path). Each grid cell
runs lmms-eval's own evaluator on a :class:`~vlmprune.evals.lmms.VlmpruneLMM` that wraps the
already loaded model, so the scores are lmms-eval's; visual tokens and FLOPs come from the
per-request log the model writes, summed per document (a multiple-choice document costs one
forward per choice under lmms-eval).
"""

from __future__ import annotations

import difflib
import json
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: short names users type, and the lmms-eval task they mean
ALIASES: dict[str, str] = {
    "mmbench": "mmbench_en_dev",
    "gqa": "gqa",
    "pope": "pope",
    "mme": "mme",
    "scienceqa": "scienceqa_img",
    "textvqa": "textvqa_val",
    "mmmu": "mmmu_val",
    "videomme": "videomme",
    "builtin_image_mc": "vlmprune_builtin_image_mc",
    "builtin_image_short": "vlmprune_builtin_image_short",
}


class LmmsUnavailable(RuntimeError):
    """lmms-eval is not installed (or cannot be imported) but an lmms-eval task was asked for."""


def task_manager() -> Any:
    try:
        from lmms_eval.tasks import TaskManager
    except ImportError as exc:
        raise LmmsUnavailable(
            f"lmms-eval tasks need lmms-eval: pip install --no-deps lmms-eval==0.7.3 ({exc})"
        ) from None
    from .lmms import TASKS_DIR, register

    register()
    return TaskManager("WARNING", include_path=str(TASKS_DIR))


def resolve_tasks(names: Sequence[str], manager: Any | None = None) -> list[str]:
    """lmms-eval task names for ``names`` (aliases expanded); an unknown name raises ValueError
    with lmms-eval's close matches."""
    manager = manager or task_manager()
    known = set(manager.all_tasks)
    out = []
    for name in names:
        task = ALIASES.get(name, name)
        if task not in known:
            close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see `lmms-eval tasks list`"
            raise ValueError(f"unknown task {name!r} (neither built-in nor an lmms-eval task){hint}")
        out.append(task)
    return out


def _explain(exc: BaseException, names: Sequence[str]) -> str:
    """One line for a failed lmms-eval run (tenacity's RetryError unwrapped to its cause)."""
    inner = exc
    last = getattr(exc, "last_attempt", None)
    if last is not None and last.exception() is not None:
        inner = last.exception()
    first = (str(inner).strip().splitlines() or [type(inner).__name__])[0]
    hint = ""
    if any(w in first.lower() for w in ("token", "connection", "offline", "hub", "resolve", "couldn't reach")):
        hint = (" (standard lmms-eval tasks fetch their data from the Hugging Face hub; run once online or "
                "pre-cache the dataset; the offline tasks are vlmprune_builtin_image_mc / _image_short)")
    return f"lmms-eval could not run {', '.join(names)}: {type(inner).__name__}: {first}{hint}"


def _primary_metric(result: dict[str, Any]) -> tuple[str, float]:
    for key, value in result.items():
        if key == "alias" or "stderr" in key or not isinstance(value, (int, float)):
            continue
        return key.split(",")[0], float(value)
    raise ValueError(f"no numeric metric in lmms-eval result {result}")


def run_lmms(
    em: Any,
    tasks: Sequence[str],
    cells: Sequence[Any],
    *,
    limit: int | None,
    batch_size: int,
    seed: int,
    positions: str | None,
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """One row per (task, cell), in the built-in rows' format (see :mod:`vlmprune.evals.harness`)."""
    import vlmprune

    from . import harness
    from .lmms import VlmpruneLMM

    manager = task_manager()
    names = resolve_tasks(tasks, manager)
    from lmms_eval import evaluator

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, spec in enumerate(cells):
            stats = Path(tmp) / f"cell-{index}.jsonl"  # settings may repeat or hold any character
            configs = [] if spec.unpatched else harness.cell_configs(spec, seed, positions)
            with harness._PeakMemory(em.device) as mem:
                handle = vlmprune.apply(em.model, configs) if configs else None
                try:
                    lm = VlmpruneLMM.wrap(em, spec.method, handle, stats_file=str(stats), batch_size=batch_size)
                    began = time.perf_counter()
                    try:
                        out = evaluator.simple_evaluate(
                            model=lm, tasks=list(names), limit=limit, batch_size=batch_size, task_manager=manager,
                            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, log_samples=False,
                            bootstrap_iters=0, process_docs_parallel=1, verbosity="WARNING",
                        )
                    except Exception as exc:  # noqa: BLE001 - one line for the command line
                        raise RuntimeError(_explain(exc, names)) from exc
                    seconds = time.perf_counter() - began
                finally:
                    if handle is not None:
                        handle.remove()
            logs = [json.loads(line) for line in stats.read_text().splitlines() if line.strip()]
            for task in names:
                metric, value = _primary_metric(out["results"][task])
                per_doc: dict[Any, float] = defaultdict(float)
                visual, visual_in = [], []
                for rec in (r for r in logs if r["task"] == task):
                    per_doc[rec["doc_id"]] += rec["tflops"]
                    visual.append(rec["visual_tokens"])
                    visual_in.append(rec["visual_tokens_in"])
                n = max(len(per_doc), 1)
                ratio = spec.ratio
                if ratio is None:
                    ratio = round(1.0 - sum(visual) / sum(visual_in), 4) if sum(visual_in) else 0.0
                rows.append({
                    "task": task, "metric": metric, "method": spec.method, "ratio": ratio, "setting": spec.setting,
                    "accuracy": 100.0 * value if 0.0 <= value <= 1.0 else value,
                    "per_type": {}, "per_type_n": {}, "n": len(per_doc),
                    "visual_tokens": float(np.mean(visual)) if visual else 0.0,
                    "tflops": float(np.mean(list(per_doc.values()))) if per_doc else 0.0,
                    "latency_s": seconds / n / max(len(names), 1),
                    "model": em.name, "peak_mem_mb": mem.value, "batch_size": batch_size, "seed": seed,
                    "source": "lmms-eval",
                })
    return rows
