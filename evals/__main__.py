"""``python -m vlmprune.evals``: the same as ``vlmprune-eval``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m vlmprune.evals"))
