"""FLASH's options: the draft, how far it drafts, and how (chain or static tree)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from vlmprune.method import EvalContext, MethodConfig, Stage, axis_product

#: learned latents per visual span when a draft is built from the config (the paper's 64 for
#: 576-token LLaVA images); a trained draft keeps its own
DEFAULT_LATENTS = 64
TREE_CHOICES = (None, "chain", "static")
#: where a checkpoint's trained draft lives, next to its weights (``vlmprune train-draft`` writes it)
DRAFT_DIR = "flash-draft"


@dataclass(frozen=True)
class FlashConfig(MethodConfig):
    """``draft``: a draft directory / ``.safetensors`` file, a :class:`DraftHead`, a drafter object
    (``reset`` / ``extend`` / ``propose``, run once per row of a batch, or the batched
    ``reset_batch`` / ``extend_batch`` / ``propose_batch`` / ``select_rows``; e.g. a test oracle),
    or None for an untrained head built
    from the model's config (lossless, but slow: it accepts little). ``depth``: drafted tokens per
    round. ``k``: tokens per draft forward (None: the draft's own; may be lowered, not raised).
    ``tree``: drafting structure: None / "chain", or "static" (``branches`` top-w children of the
    last token, each continued as a chain to ``depth``, verified in one target forward with a
    tree mask). ``latents``: Q for a head built from the config
    (None: the family default). ``seed``: seeds the sampling generator (None: torch's global RNG)."""

    method: ClassVar[str] = "flash"
    stage: ClassVar[Stage] = Stage.DECODE
    # the eval grid: generation tasks only, lossless; one prompt per speculative generate, as the
    # published grid rows were measured (batched generate works: tests/test_flash_batch.py)
    eval_needs: ClassVar[frozenset[str]] = frozenset({"generates"})
    eval_one_prompt_per_call: ClassVar[bool] = True
    eval_lossless: ClassVar[bool] = True
    draft: Any = None
    depth: int = 4
    k: int | None = None
    tree: str | None = None
    branches: int = 3
    latents: int | None = None
    seed: int | None = None

    def validate(self) -> None:
        for name in ("depth", "k", "branches", "latents", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"flash: {name} must be an integer, got {value!r}")
        if self.depth < 1:
            raise ValueError(f"flash: depth (drafted tokens per round) must be >= 1, got {self.depth}")
        if self.k is not None and self.k < 1:
            raise ValueError(f"flash: k (tokens per draft forward) must be >= 1, got {self.k}")
        if self.branches < 1:
            raise ValueError(f"flash: branches (tree children of the last token) must be >= 1, got {self.branches}")
        if self.latents is not None and self.latents < 0:
            raise ValueError(f"flash: latents must be >= 0, got {self.latents}")
        if self.tree not in TREE_CHOICES:
            raise ValueError(
                f"flash: tree must be one of {', '.join(map(repr, TREE_CHOICES))}; got {self.tree!r} "
                "(dynamic EAGLE-2 trees are not implemented)"
            )

    def to_dict(self) -> dict[str, Any]:
        draft = self.draft
        if draft is not None and not isinstance(draft, (str, Path)):
            draft = type(draft).__name__
        return {"method": self.method, "draft": None if draft is None else str(draft), "depth": self.depth,
                "k": self.k, "tree": self.tree, "branches": self.branches, "latents": self.latents, "seed": self.seed}

    @classmethod
    def eval_cells(
        cls, ratios: Sequence[float], model: EvalContext, axes: Mapping[str, Sequence[Any]]
    ) -> list[dict[str, Any]]:
        """One cell (per combination of the axes), at ratio 0: FLASH removes no visual token."""
        cls.check_eval_axes(axes)
        return [{"ratio": 0.0, **combo} for combo in axis_product(axes)]

    @classmethod
    def eval_defaults(cls, model: EvalContext, options: Mapping[str, Any]) -> dict[str, Any]:
        """The draft trained for this model, when its checkpoint ships one."""
        draft = model.artifact(DRAFT_DIR)
        return {"draft": str(draft)} if draft is not None else {}

    @classmethod
    def setting_label(cls, options: Mapping[str, Any]) -> str:
        shown = {**options, "draft": "untrained"} if "draft" in options and options["draft"] is None else options
        return super().setting_label(shown)
