"""``[training]`` values against the types ``TrainingArguments`` declares for them.

TrainingArguments is a dataclass that does not check its inputs: ``max_steps = "twenty-four"`` is kept
as a string and only fails deep inside the Trainer with a bare ``TypeError``. Its type hints say what
each field takes; they are read here so that ``stabguard validate`` names the key and the value instead.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import types
import typing
from typing import Any


# Fields whose declared type is narrower than what TrainingArguments takes (its docstring and __post_init__):
# ``fsdp`` is declared ``str | None`` but takes a bool or a list of options too.
WIDER = {"fsdp": bool | str | list[str] | None}


@functools.cache
def field_types() -> dict[str, Any]:
    """Each init field of ``TrainingArguments`` -> its resolved type hint."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: WIDER.get(f.name, hints[f.name]) for f in dataclasses.fields(TrainingArguments) if f.init}


def toml_repr(value: Any) -> str:
    """A value as it was written in the recipe: ``"five"``, ``true``, ``5``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _arms(hint: Any) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _enum_of(hint: Any) -> type[enum.Enum] | None:
    """The enum of ``IntervalStrategy | str`` fields: the string must be one of its values."""
    return next((arm for arm in _arms(hint) if isinstance(arm, type) and issubclass(arm, enum.Enum)), None)


def accepts(hint: Any, value: Any) -> bool:
    """Whether a TOML value fits a type hint; an int fits a float, a bool fits neither."""
    if len(_arms(hint)) > 1:
        choices = _enum_of(hint)
        if choices is not None and isinstance(value, str):
            return value in {member.value for member in choices}
        return any(accepts(arm, value) for arm in _arms(hint))
    origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if hint is typing.Any:
        return True
    if origin is typing.Literal:
        return any(value is arg or (type(value) is type(arg) and value == arg) for arg in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(accepts(args[0], v) for v in value) if args else isinstance(value, list)
    if isinstance(origin, type) and issubclass(origin, enum.Enum):
        return isinstance(value, origin) or value in {member.value for member in origin}
    return isinstance(value, origin) if isinstance(origin, type) else True


def _is_stringlike(hint: Any) -> bool:
    return hint is str or (isinstance(hint, type) and issubclass(hint, enum.Enum))


_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a table",
          type(None): None}


def describe(hint: Any) -> str:
    """What a type hint asks for, in the recipe's words: ``an integer``, ``one of "no", "steps"``."""
    choices = _enum_of(hint)
    if choices is not None:
        values = [toml_repr(member.value) for member in choices]
        if len(values) > 12:  # OptimizerNames has ~40: name the enum, show the first few
            return f"one of the {len(values)} {choices.__name__} values ({', '.join(values[:6])}, ...)"
        return "one of " + ", ".join(values)
    words = []
    for arm in _arms(hint):
        origin = typing.get_origin(arm) or arm
        if origin is list:
            args = typing.get_args(arm)
            word = "a list of strings" if args and _is_stringlike(args[0]) else "a list"
        elif origin is typing.Literal:
            word = " or ".join(toml_repr(arg) for arg in typing.get_args(arm))
        else:
            word = _WORDS.get(origin, f"a {getattr(origin, '__name__', origin)}")
        if word and word not in words:
            words.append(word)
    return " or ".join(words)


def check_types(training: dict[str, Any]) -> list[tuple[str, str]]:
    """``(training.key, message)`` for each value of a known field that its type does not accept."""
    types_ = field_types()
    errors = []
    for key, value in training.items():
        hint = types_.get(key)
        if hint is not None and not accepts(hint, value):
            errors.append((f"training.{key}", f"expected {describe(hint)}, got {toml_repr(value)}"))
    return errors
