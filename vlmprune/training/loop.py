"""A small accelerate-based training loop: seeded, time-boxed, resumable, with a progress bar.

Each trainable part of vlmprune supplies a ``step_fn(step) -> (loss, metrics)``; the loop owns the
optimiser, the warm-up/cosine schedule, gradient clipping, logging, and a resume file written
every ``checkpoint_every`` steps so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm


@dataclass
class LoopConfig:
    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    max_minutes: float | None = None  # stop early (and say so) when the time budget is spent
    log_every: int = 50
    checkpoint_every: int = 200
    resume_file: str | Path | None = None
    desc: str = "train"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _lr_factor(step: int, cfg: LoopConfig, minutes: float) -> float:
    """Linear warm-up, then cosine to 10%; a time budget counts as progress too, so a run that
    stops on its budget still ends with a decayed learning rate."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.max_minutes:
        progress = max(progress, minutes / cfg.max_minutes)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_loop(
    modules: dict[str, nn.Module],
    params: Iterable[nn.Parameter],
    step_fn: Callable[[int], tuple[Tensor, dict[str, float]]],
    cfg: LoopConfig,
) -> dict[str, Any]:
    """Run ``cfg.steps`` optimisation steps of ``step_fn`` over ``params``.

    ``modules`` are saved in the resume file (their state dicts) together with the optimiser, so
    an interrupted run restarts from its last checkpoint with identical state.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    clock = {"offset": 0.0, "began": time.time()}

    def minutes() -> float:
        return clock["offset"] + (time.time() - clock["began"]) / 60

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg, minutes()))
    start, history = 0, []
    resume = Path(cfg.resume_file) if cfg.resume_file else None
    if resume is not None and resume.exists():
        state = torch.load(resume, map_location="cpu", weights_only=False)
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, history = state["step"], state["history"]
        clock["offset"] = state.get("minutes", 0.0)
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
    else:
        seed_everything(cfg.seed)
    clock["began"] = time.time()
    bar = tqdm(total=cfg.steps, initial=start, desc=cfg.desc, dynamic_ncols=True)
    stopped_early = False
    running: dict[str, float] = {}
    step = start
    for step in range(start, cfg.steps):
        loss, metrics = step_fn(step)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        for k, v in {"loss": float(loss.detach()), **metrics}.items():
            running[k] = 0.9 * running.get(k, v) + 0.1 * v
        bar.update(1)
        if (step + 1) % cfg.log_every == 0:
            bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()})
            history.append({"step": step + 1, "minutes": minutes(), **running})
        if resume is not None and (step + 1) % cfg.checkpoint_every == 0:
            _save(resume, modules, optimizer, scheduler, step + 1, history, minutes())
        if cfg.max_minutes is not None and minutes() > cfg.max_minutes:
            stopped_early = True
            step += 1
            break
    else:
        step = cfg.steps
    bar.close()
    if resume is not None:
        _save(resume, modules, optimizer, scheduler, step, history, minutes())
    return {"steps": step, "minutes": minutes(), "stopped_early": stopped_early,
            "history": history, "config": {k: str(v) for k, v in asdict(cfg).items()}}


def _save(
    path: Path, modules: dict[str, nn.Module], optimizer: Any, scheduler: Any, step: int, history: list, minutes: float
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "modules": {k: m.state_dict() for k, m in modules.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "minutes": minutes,
            "history": history,
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
        },
        tmp,
    )
    tmp.replace(path)
    (path.parent / "history.json").write_text(json.dumps(history, indent=1))


def add_run_args(p: Any) -> None:
    """The options every trainer shares: time cap, device, threads, seed, fresh start."""
    p.add_argument("--minutes", type=float, default=None, help="stop after this many minutes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true", help="start afresh even if a resume state exists")


def prepare_run(args: Any, positive: tuple[str, ...], outputs: tuple[tuple[str, Any], ...] = ()) -> None:
    """What every trainer checks before it loads a model: thread count, options that must be >= 1,
    that ``--data`` exists and that ``--output`` (and any other ``(flag, path)`` in ``outputs``) can
    be written, so a bad path fails in one line instead of after minutes of work."""
    from vlmprune.files import writable_dir

    from .data import check_data

    if args.threads:
        torch.set_num_threads(args.threads)
    bad = [name for name in positive if getattr(args, name) < 1]
    if bad:
        raise ValueError(f"{', '.join('--' + n.replace('_', '-') for n in bad)} must be positive")
    check_data(args.data)
    writable_dir(args.output)
    for flag, path in outputs:
        writable_dir(path, flag)
