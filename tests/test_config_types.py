"""The type checking of configuration values (:mod:`spo.config.types`, on pydantic), case by case.

A table written by hand from the loader's rules (not by running any implementation): what each
annotation of the schema accepts, the canonical value it gives, and the exact one-line message of
what it refuses; the loader's lenient view (YAML files, ``key=value`` overrides) and the strict one
of :func:`spo.config.validate` (configs built in code).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args, get_origin, get_type_hints

import pytest

from spo.config import ConfigError, SPOConfig, validate
from spo.config.types import TypeProblem, coerce

MP = Literal["no", "fp16", "bf16"]
RESAMPLER = Literal["random", "win", "lose"]
REDUCTION = Literal["mean", "sum"]
PAIR = tuple[float, float]

OK = object()  # marks an accepted value: (annotation, value, OK, canonical)

# (annotation, value, OK, canonical) or (annotation, value, message): the loader's lenient view
LENIENT: list[tuple[Any, ...]] = [
    # int: ints only
    (int, 3, OK, 3),
    (int, -1, OK, -1),
    (int, "four", "k must be int, got 'four' (str)"),
    (int, "3", "k must be int, got '3' (str)"),
    (int, 2.5, "k must be int, got 2.5 (float)"),
    (int, 3.0, "k must be int, got 3.0 (float)"),
    (int, True, "k must be int, got True (bool)"),
    (int, None, "k must be int, got null"),
    (int, [1], "k must be int, got [1] (list)"),
    # float: ints converted, YAML 1.1's unresolved float strings parsed, no bools, no words
    (float, 0.25, OK, 0.25),
    (float, 7, OK, 7.0),
    (float, "6e-5", OK, 6e-5),
    (float, "1.0e-4", OK, 1e-4),
    (float, " 3e-5 ", OK, 3e-5),
    (float, True, "k must be float, got True (bool)"),
    (float, "high", "k must be float, got 'high' (str)"),
    (float, "inf", "k must be float, got 'inf' (str)"),
    (float, "nan", "k must be float, got 'nan' (str)"),
    (float, None, "k must be float, got null"),
    # bool: bools only
    (bool, True, OK, True),
    (bool, False, OK, False),
    (bool, 1, "k must be bool, got 1 (int)"),
    (bool, "on_", "k must be bool, got 'on_' (str)"),
    (bool, "true", "k must be bool, got 'true' (str)"),
    # str: strings only, a hint to quote what YAML read as a number or bool
    (str, "a", OK, "a"),
    (str, "", OK, ""),
    (str, 83, "k must be str, got 83 (int) (quote it to pass it as a string)"),
    (str, True, "k must be str, got True (bool) (quote it to pass it as a string)"),
    (str, None, "k must be str, got null"),
    (str, ["x"], "k must be str, got ['x'] (list)"),
    # X | None
    (str | None, None, OK, None),
    (str | None, "v", OK, "v"),
    (str | None, 0.5, "k must be str, got 0.5 (float) (quote it to pass it as a string) (null is also allowed)"),
    (int | None, None, OK, None),
    (int | None, 750, OK, 750),
    (int | None, True, "k must be int, got True (bool) (null is also allowed)"),
    (float | None, None, OK, None),
    (float | None, 1, OK, 1.0),
    (float | None, "1e-3", OK, 1e-3),
    (float | None, "tiny", "k must be float, got 'tiny' (str) (null is also allowed)"),
    # Literal: the choices; YAML 1.1's no/off (yes/on) as the one choice spelled so
    (RESAMPLER, "win", OK, "win"),
    (RESAMPLER, "winner", "k must be one of 'random', 'win', 'lose', got 'winner' (str); did you mean 'win'?"),
    (REDUCTION, "sum", OK, "sum"),
    (REDUCTION, "xyz", "k must be one of 'mean', 'sum', got 'xyz' (str)"),
    (REDUCTION, None, "k must be one of 'mean', 'sum', got null"),
    (REDUCTION, False, "k must be one of 'mean', 'sum', got False (bool)"),
    (MP, "fp16", OK, "fp16"),
    (MP, False, OK, "no"),
    (MP, True, "k must be one of 'no', 'fp16', 'bf16', got True (bool)"),
    (MP, 16, "k must be one of 'no', 'fp16', 'bf16', got 16 (int)"),
    # list[str], list[int]: lists only, every bad item named
    (list[str], ["to_q", "to_k"], OK, ["to_q", "to_k"]),
    (list[str], [], OK, []),
    (list[str], "to_q", "k must be list[str], got 'to_q' (str)"),
    (list[str], ("to_q",), "k must be list[str], got ('to_q',) (tuple)"),
    (list[str], ["to_q", 3], "k[1] must be str, got 3 (int) (quote it to pass it as a string)"),
    (list[str] | None, None, OK, None),  # logging.sample_prompts
    (list[str] | None, ["a cat"], OK, ["a cat"]),
    (list[str] | None, "a cat", "k must be list[str], got 'a cat' (str) (null is also allowed)"),
    (list[str] | None, ["a", 3], "k[1] must be str, got 3 (int) (quote it to pass it as a string) (null is also allowed)"),
    (list[int], [0, 251], OK, [0, 251]),
    (list[int], [0, "a"], "k[1] must be int, got 'a' (str)"),
    (list[int], [0, True], "k[1] must be int, got True (bool)"),
    # tuple[float, float]: a list (YAML has no tuples) or a tuple, of two floats
    (PAIR, [0.9, 0.99], OK, (0.9, 0.99)),
    (PAIR, [1, 0], OK, (1.0, 0.0)),
    (PAIR, (0.8, 0.95), OK, (0.8, 0.95)),
    (PAIR, ["6e-5", 0.9], OK, (6e-5, 0.9)),
    (PAIR, [0.9], "k must be tuple[float, float], got [0.9] (list) with 1 item(s) instead of 2"),
    (PAIR, [0.9, 0.99, 0.999], "k must be tuple[float, float], got [0.9, 0.99, 0.999] (list) with 3 item(s) instead of 2"),
    (PAIR, ["x"], "k must be tuple[float, float], got ['x'] (list) with 1 item(s) instead of 2"),
    (PAIR, [0.9, "x"], "k[1] must be float, got 'x' (str)"),
    (PAIR, [True, 0.9], "k[0] must be float, got True (bool)"),
    (PAIR, "ab", "k must be tuple[float, float], got 'ab' (str)"),
    (PAIR, {"a": 1}, "k must be tuple[float, float], got {'a': 1} (dict)"),
]

# the strict view (validate() on a config built in code): no YAML 1.1 hooks
STRICT: list[tuple[Any, ...]] = [
    (float, 7, OK, 7.0),
    (float, "6e-5", "k must be float, got '6e-5' (str)"),
    (float, "fast", "k must be float, got 'fast' (str)"),
    (float | None, "1e-3", "k must be float, got '1e-3' (str) (null is also allowed)"),
    (MP, False, "k must be one of 'no', 'fp16', 'bf16', got False (bool)"),
    (MP, "no", OK, "no"),
    (PAIR, [0.9, 0.99], OK, (0.9, 0.99)),
    (PAIR, ["6e-5", 0.9], "k[0] must be float, got '6e-5' (str)"),
    (int, True, "k must be int, got True (bool)"),
    (bool, 0, "k must be bool, got 0 (int)"),
    (str, 1, "k must be str, got 1 (int) (quote it to pass it as a string)"),
    (list[str], ("a",), "k must be list[str], got ('a',) (tuple)"),
]


def _check(case: tuple[Any, ...], lenient: bool) -> None:
    annotation, value, *expected = case
    if expected[0] is OK:
        result = coerce(value, annotation, "k", lenient=lenient)
        assert result == expected[1] and type(result) is type(expected[1])
        if isinstance(result, (list, tuple)):
            assert [type(r) for r in result] == [type(e) for e in expected[1]]
    else:
        with pytest.raises(TypeProblem) as info:
            coerce(value, annotation, "k", lenient=lenient)
        assert info.value.messages == [expected[0]]


@pytest.mark.parametrize("case", LENIENT, ids=[f"{c[0]}-{c[1]!r}" for c in LENIENT])
def test_lenient_view(case: tuple[Any, ...]) -> None:
    _check(case, lenient=True)


@pytest.mark.parametrize("case", STRICT, ids=[f"{c[0]}-{c[1]!r}" for c in STRICT])
def test_strict_view(case: tuple[Any, ...]) -> None:
    _check(case, lenient=False)


def test_every_bad_item_of_a_list_is_named() -> None:
    with pytest.raises(TypeProblem) as info:
        coerce(["a", 1, 2.5], list[str], "lora.target_modules")
    assert info.value.messages == [
        "lora.target_modules[1] must be str, got 1 (int) (quote it to pass it as a string)",
        "lora.target_modules[2] must be str, got 2.5 (float) (quote it to pass it as a string)",
    ]


@pytest.mark.parametrize(
    ("annotation", "value", "text", "expected"),
    [
        (str | None, 83, "0123", "0123"),  # YAML 1.1 octal
        (str | None, False, " no", "no"),
        (str | None, {"a": "b.txt"}, "a: b.txt", "a: b.txt"),
        (str, ["x"], "[x]", "[x]"),
        (str, "quoted", "'quoted'", "quoted"),  # a str parsed from the text is the value
    ],
)
def test_override_text_is_taken_where_the_field_takes_a_string(annotation, value, text, expected) -> None:
    assert coerce(value, annotation, "k", text=text) == expected


@pytest.mark.parametrize(
    ("annotation", "value", "text", "message"),
    [
        (str, None, "null", "k must be str, got null"),  # null stays null
        (float, True, "yes", "k must be float, got True (bool)"),
        (bool, 1, "1", "k must be bool, got 1 (int)"),
        (int, 2.5, "2.5", "k must be int, got 2.5 (float)"),
    ],
)
def test_override_text_does_not_rescue_other_types(annotation, value, text, message) -> None:
    with pytest.raises(TypeProblem) as info:
        coerce(value, annotation, "k", text=text)
    assert info.value.messages == [message]


# --------------------------------------------------------------------------- the schema's annotations


def _sections() -> list[type]:
    """Every section class of the schema, with each registered method's settings."""
    seen: list[type] = []

    def walk(cls: type) -> None:
        if cls in seen:
            return
        seen.append(cls)
        for tp in get_type_hints(cls).values():
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                walk(tp)

    walk(SPOConfig)
    walk(type(SPOConfig().objective))
    try:
        from spo.registry import METHODS
    except ImportError:  # before the methods' registry
        return seen
    for name in METHODS.names():
        walk(METHODS.get(name).config_class)
    return seen


def _annotations() -> set[Any]:
    return {
        tp
        for cls in _sections()
        for f in dataclasses.fields(cls)
        if not dataclasses.is_dataclass(tp := get_type_hints(cls)[f.name])
    }


def test_the_table_covers_every_annotation_of_the_schema() -> None:
    covered = {case[0] for case in LENIENT + STRICT}
    missing = [tp for tp in _annotations() if get_origin(tp) is not Literal and tp not in covered]
    assert not missing, f"add cases for {missing}"


@pytest.mark.parametrize("annotation", sorted((tp for tp in _annotations() if get_origin(tp) is Literal), key=repr))
def test_every_literal_of_the_schema_takes_its_choices_only(annotation) -> None:
    choices = get_args(annotation)
    for choice in choices:
        assert coerce(choice, annotation, "k") == choice
        assert coerce(choice, annotation, "k", lenient=False) == choice
    with pytest.raises(TypeProblem, match=r"^k must be one of "):
        coerce("not-a-choice", annotation, "k")


def test_validate_checks_each_section_against_its_own_class() -> None:
    """A section may be a subclass of its annotation (the objective section is the settings of
    ``objective.name``'s method): its own fields are checked, strictly."""
    config = SPOConfig()

    @dataclasses.dataclass
    class WithExtra(type(config.objective)):  # type: ignore[misc]
        extra: int = 1

    config.objective = WithExtra()
    config.objective.extra = "2"  # type: ignore[assignment]
    config.optimizer.lr = "6e-5"  # type: ignore[assignment]  # not lenient in code
    with pytest.raises(ConfigError) as info:
        validate(config)
    assert info.value.errors == [
        "objective.extra must be int, got '2' (str)",
        "optimizer.lr must be float, got '6e-5' (str)",
    ]
