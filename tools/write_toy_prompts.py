"""Write the toy prompt sets that ``toy:training-prompts`` / ``toy:validation-prompts`` name
(``src/spo/toy/weights/prompts/*.txt``, one prompt per line) from the toy grammar.

Run after changing ``src/spo/toy/grammar.py``:  ``python tools/write_toy_prompts.py``
(``tests/test_builtin.py`` fails while the shipped files and the grammar differ).
"""

from __future__ import annotations

from spo.builtin import TOY_PROMPT_SETS
from spo.toy.grammar import training_prompts, validation_prompts

GENERATORS = {"training-prompts": training_prompts, "validation-prompts": validation_prompts}


def main() -> None:
    for name, path in TOY_PROMPT_SETS.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{prompt}\n" for prompt in GENERATORS[name]()), encoding="utf-8")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
