"""Type checking of configuration values against the schema's annotations, on pydantic.

:func:`coerce` checks one value against one field annotation of :mod:`spo.config.schema` with a
cached :class:`pydantic.TypeAdapter` and returns it in canonical form; a value that does not fit
raises :class:`TypeProblem` with one line per problem, in the loader's words (``KEY must be
TYPE, got VALUE (TYPE)``).  The schema stays plain dataclasses: each annotation is given to
pydantic as a *view* that pins down how strict each kind is:

* ``int``, ``bool``, ``str``: pydantic's strict mode (no bool as a number, no number as a bool,
  no string as a number, no number as a string);
* ``float``: strict, which takes an int (converted); ``list[...]``: strict (a list);
  ``tuple[...]``: pydantic's lax tuple, which takes a list (YAML has no tuples);
* ``Literal[...]`` and ``X | None``: as pydantic does them.

The loader's *lenient* view (YAML files and ``key=value`` overrides, ``lenient=True``) adds two
hooks for what PyYAML's YAML 1.1 resolver does, and nothing else: a string that pydantic parses
as a finite float is a float (PyYAML leaves ``6e-5`` a string), and a boolean is the one choice
of a ``Literal`` spelled ``no``/``off``/``false`` (``yes``/``on``/``true``), so
``mixed_precision: no`` is ``"no"``.  :func:`spo.config.validate` on a config built in code
uses the strict view (``lenient=False``), without either.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Sequence
from functools import lru_cache
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BeforeValidator, ConfigDict, Strict, TypeAdapter, ValidationError

__all__ = ["TypeProblem", "coerce", "show", "type_name"]


class TypeProblem(ValueError):
    """A value that does not fit its annotation.

    Attributes:
        messages: One line per problem, each naming the dotted key (``optimizer.betas[1]``).
    """

    def __init__(self, messages: Sequence[str]) -> None:
        self.messages = list(messages)
        super().__init__("; ".join(self.messages))


def coerce(value: Any, annotation: Any, key: str, lenient: bool = True, text: str | None = None) -> Any:
    """Check ``value`` against ``annotation`` and return it in canonical form.

    Args:
        value: The value (parsed YAML, or an attribute of a config built in code).
        annotation: The field's annotation in the schema.
        key: The dotted key, for messages.
        lenient: Add the YAML 1.1 hooks (loading); ``False`` for a config built in code.
        text: The text ``value`` was parsed from (a ``key=value`` override): when the parsed
            value does not fit but the text itself does (a ``str`` field given ``0123``, ``no``
            or ``a: b.txt``, which YAML reads as an int, a bool or a mapping), the text is taken
            as typed. ``null`` stays null.

    Raises:
        TypeProblem: naming ``key``, the expected type and the value received.
    """
    adapter = _adapter(annotation, lenient)
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        if text is not None and value is not None and not isinstance(value, str):
            try:
                return adapter.validate_python(text.strip())
            except ValidationError:
                pass
        raise TypeProblem(_messages(exc, annotation, key)) from None


# --------------------------------------------------------------------------- the pydantic view


@lru_cache(maxsize=None)
def _adapter(annotation: Any, lenient: bool) -> TypeAdapter:
    return TypeAdapter(_view(annotation, lenient))


def _view(tp: Any, lenient: bool) -> Any:
    """``tp`` as pydantic is to check it (see the module's documentation)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp in (int, bool, str):
        return Annotated[tp, Strict()]
    if tp is float:
        return Annotated[float, Strict(), BeforeValidator(_yaml_float)] if lenient else Annotated[float, Strict()]
    if origin is Literal:
        return Annotated[tp, BeforeValidator(_yaml_bool_choice(args))] if lenient else tp
    if origin is list:
        return Annotated[list[_view(args[0], lenient)], Strict()]
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple[_view(args[0], lenient), ...]
        return tuple[tuple(_view(a, lenient) for a in args)]
    if origin in (Union, types.UnionType):
        return Union[tuple(_view(a, lenient) for a in args)]
    if tp is type(None) or tp is Any:
        return tp
    raise TypeError(f"unsupported annotation {tp!r} in the config schema")  # a schema bug


_FINITE_FLOAT = TypeAdapter(float, config=ConfigDict(allow_inf_nan=False))


def _yaml_float(value: Any) -> Any:
    """A string that pydantic parses as a finite float (``"6e-5"``), as that float."""
    if isinstance(value, str):
        try:
            return _FINITE_FLOAT.validate_python(value)
        except ValidationError:
            pass
    return value


def _yaml_bool_choice(choices: tuple[Any, ...]) -> Any:
    """A hook taking a YAML 1.1 boolean as the one choice spelled like it (``no`` for false)."""
    spelled = {
        flag: [c for c in choices if isinstance(c, str) and c.lower() in words]
        for flag, words in ((True, ("yes", "on", "true")), (False, ("no", "off", "false")))
    }

    def hook(value: Any) -> Any:
        if isinstance(value, bool) and len(spelled[value]) == 1:
            return spelled[value][0]
        return value

    return hook


# --------------------------------------------------------------------------- messages


def show(value: Any) -> str:
    """``'four' (str)``-style rendering of a received value (``null`` for None)."""
    if value is None:
        return "null"
    return f"{value!r} ({type(value).__name__})"


def type_name(tp: Any) -> str:
    """Human-readable name of an annotation (``int``, ``one of 'a', 'b'``, ``list[str]``)."""
    if tp is type(None):
        return "null"
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return repr(tp).replace("typing.", "")
    if isinstance(tp, type):
        return tp.__name__
    return repr(tp)


def _optional(tp: Any) -> Any:
    """``X`` for ``X | None``, else None."""
    if get_origin(tp) in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if len(options) == 1 and len(get_args(tp)) == 2:
            return options[0]
    return None


_LENGTH_ERRORS = ("missing", "too_short", "too_long")  # pydantic's, for a tuple's length


def _messages(exc: ValidationError, tp: Any, key: str) -> list[str]:
    """pydantic's errors for ``value`` as the loader's one-line messages."""
    inner = _optional(tp)  # ``X | None``: X's message, noting null (``A | B``: one message for both)
    errors = exc.errors(include_url=False)
    lengths = [e for e in errors if e["type"] in _LENGTH_ERRORS]
    messages = []
    for error in lengths or errors:  # a tuple of the wrong length: that, not its items
        message = _message(error, inner if inner is not None else tp, key)
        messages.append(f"{message} (null is also allowed)" if inner is not None else message)
    return list(dict.fromkeys(messages))  # a short tuple reports each missing item: once


def _message(error: Any, tp: Any, key: str) -> str:
    indices = [i for i in error["loc"] if isinstance(i, int)]  # list / tuple items
    received = error["input"]
    if error["type"] in _LENGTH_ERRORS:  # a tuple of the wrong length
        if error["type"] == "missing":
            indices = indices[:-1]
        tp, key = _item(tp, key, indices)
        return (f"{key} must be {type_name(tp)}, got {show(received)} with {len(received)} item(s) "
                f"instead of {len(get_args(tp))}")
    tp, key = _item(tp, key, indices)
    hint = ""
    if get_origin(tp) is Literal and isinstance(received, str):
        close = difflib.get_close_matches(received, [str(a) for a in get_args(tp)], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
    elif tp is str and isinstance(received, (int, float, bool)):
        hint = " (quote it to pass it as a string)"
    return f"{key} must be {type_name(tp)}, got {show(received)}{hint}"


def _item(tp: Any, key: str, indices: list[int]) -> tuple[Any, str]:
    """The annotation and the dotted key of the item at ``indices`` of a list / tuple field."""
    for i in indices:
        tp = _optional(tp) or tp
        args = get_args(tp)
        tp = args[0] if get_origin(tp) is list or (len(args) == 2 and args[1] is Ellipsis) else args[i]
        key = f"{key}[{i}]"
    return tp, key
