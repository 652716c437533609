"""The toy world: a procedural text-to-image domain with known ground truth (docs/toy-world.md).

Modules: ``grammar`` (prompts, scenes, the fixed split), ``render`` (scenes and detail
degradations), ``oracles`` (alignment, aesthetic), ``model`` (the pixel-space model, ``toy``
backbone), ``pretrain``, ``preference_data`` (the toy Pick-a-Pic), ``clip`` (the toy CLIP),
``build`` (``spo toy build``), ``evaluate`` / ``eval_run`` (``spo eval``) and ``demo`` (the
main job). The shipped weights live in ``toy/weights`` (``toy:`` references, spo.builtin).
"""

from .grammar import PromptGrammarError, Scene, all_scenes, parse_prompt, training_prompts, validation_prompts, vocabulary
from .oracles import aesthetic, aesthetic_defects, alignment, read_layout
from .render import DEGRADATIONS, degrade, degrade_randomly, misalign, render

__all__ = [
    "DEGRADATIONS",
    "PromptGrammarError",
    "Scene",
    "aesthetic",
    "aesthetic_defects",
    "alignment",
    "all_scenes",
    "degrade",
    "degrade_randomly",
    "misalign",
    "parse_prompt",
    "read_layout",
    "render",
    "training_prompts",
    "validation_prompts",
    "vocabulary",
]
