"""The toy world: a procedural text-to-image domain with known ground truth (docs/toy-world.md).

Done so far: the prompt grammar, the renderer and its detail degradations, and the two oracles.
The pixel-space base model, its pretraining, the preference data and the shipped weights follow.
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
