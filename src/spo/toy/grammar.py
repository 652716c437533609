"""The toy world's prompt grammar: "[a|two] [small|large] COLOUR SHAPE[s] on a BACKGROUND background".

A prompt names the *layout* of a 32x32 image: how many objects, their size, colour and shape, and
the background. Everything else about the image (how cleanly it is drawn) is *detail*.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

from ..errors import SPOError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "white": (240, 240, 240),
}
SIZES: tuple[str, ...] = ("small", "large")
COUNTS: dict[str, int] = {"a": 1, "two": 2}

_PATTERN = re.compile(
    r"^(?P<count>a|two) (?P<size>small|large) (?P<colour>[a-z]+) (?P<shape>[a-z]+?)(?P<plural>s?) "
    r"on an? (?P<background>[a-z]+) background$"
)


class PromptGrammarError(SPOError, ValueError):
    """A prompt that the toy grammar cannot parse."""


@dataclass(frozen=True)
class Scene:
    """The layout a prompt asks for."""

    count: int
    size: str
    colour: str
    shape: str
    background: str

    @property
    def prompt(self) -> str:
        article = "a" if self.count == 1 else "two"
        plural = "s" if self.count > 1 else ""
        return f"{article} {self.size} {self.colour} {self.shape}{plural} on a {self.background} background"


def parse_prompt(prompt: str) -> Scene:
    """Parse a toy prompt; a prompt outside the grammar raises :class:`PromptGrammarError` naming it."""
    text = " ".join(prompt.strip().lower().split())
    match = _PATTERN.match(text)
    if not match:
        raise PromptGrammarError(
            f"the toy grammar cannot parse {prompt!r}: expected '[a|two] [small|large] COLOUR SHAPE[s] on a "
            f"BACKGROUND background' with COLOUR in {sorted(COLOURS)}, SHAPE in {list(SHAPES)}, "
            f"BACKGROUND in {sorted(BACKGROUNDS)}"
        )
    g = match.groupdict()
    count = COUNTS[g["count"]]
    problems = []
    if g["colour"] not in COLOURS:
        problems.append(f"colour {g['colour']!r}")
    if g["shape"] not in SHAPES:
        problems.append(f"shape {g['shape']!r}")
    if g["background"] not in BACKGROUNDS:
        problems.append(f"background {g['background']!r}")
    if (count > 1) != bool(g["plural"]):
        problems.append("number agreement ('a ... circle', 'two ... circles')")
    if problems:
        raise PromptGrammarError(f"the toy grammar cannot parse {prompt!r}: unknown {', '.join(problems)}")
    return Scene(count=count, size=g["size"], colour=g["colour"], shape=g["shape"], background=g["background"])


def all_scenes() -> list[Scene]:
    """Every scene of the grammar (2 counts x 2 sizes x 6 colours x 3 shapes x 3 backgrounds = 216)."""
    return [
        Scene(count, size, colour, shape, background)
        for count, size, colour, shape, background in itertools.product(
            COUNTS.values(), SIZES, COLOURS, SHAPES, BACKGROUNDS
        )
    ]


def vocabulary() -> list[str]:
    """Every word a toy prompt can contain (the toy tokenizer's whole vocabulary)."""
    words = {"a", "two", "on", "an", "background", *SIZES, *COLOURS, *BACKGROUNDS}
    words |= set(SHAPES) | {s + "s" for s in SHAPES}
    return sorted(words)


def split_scenes(seed: int = 0, validation: int = 24) -> tuple[list[Scene], list[Scene]]:
    """A fixed split of the grammar's scenes: (training, validation). The validation prompts are
    held out of pretraining, the preference data and SPO training."""
    scenes = all_scenes()
    random.Random(seed).shuffle(scenes)
    return scenes[validation:], scenes[:validation]


def validation_prompts() -> list[str]:
    """The built-in validation prompt set (``spo eval``'s default)."""
    return [s.prompt for s in split_scenes()[1]]


def training_prompts() -> list[str]:
    return [s.prompt for s in split_scenes()[0]]
