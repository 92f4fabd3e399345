"""``vlmprune-lmms-eval`` / ``python -m vlmprune.evals.lmms_launch``: lmms-eval's own CLI with the
``vlmprune`` model registered first and the offline built-in task added to ``--include_path``.

Plain ``lmms-eval --model vlmprune`` also works (the model is an entry point of this package);
this launcher is what ``accelerate launch -m vlmprune.evals.lmms_launch ...`` runs for
data-parallel evaluation, and it spares users the include path of the offline task.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from .lmms import TASKS_DIR, register

    args = list(sys.argv[1:] if argv is None else argv)
    register()
    if "--include_path" in args:
        i = args.index("--include_path")
        if i + 1 < len(args) and str(TASKS_DIR) not in args[i + 1]:
            args.insert(i + 2, "--include_path")
            args.insert(i + 3, str(TASKS_DIR))
    else:
        args += ["--include_path", str(TASKS_DIR)]
    from lmms_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
