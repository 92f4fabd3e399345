"""Package list only (the rest is in pyproject.toml): every package under vlmprune/ is found, so
adding a method folder needs no edit here; adapters/ and evals/ install as vlmprune.adapters and
vlmprune.evals (PyPI has unrelated top-level packages of those names)."""

from setuptools import find_packages, setup

setup(
    packages=[
        *find_packages(include=["vlmprune", "vlmprune.*"]),
        "vlmprune.adapters",
        *("vlmprune.evals" + p[len("evals"):] for p in find_packages(include=["evals", "evals.*"])),
    ]
)
