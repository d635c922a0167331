import enum
from typing import Any, Literal

from stabguard.training_types import accepts, check_types, describe, field_types, toml_repr


class Strategy(enum.Enum):
    NO = "no"
    STEPS = "steps"


def test_numbers_take_ints_but_never_bools_or_strings():
    assert accepts(float, 1) and accepts(float, 1e-4) and accepts(int, 3)
    assert not accepts(float, "1e-4") and not accepts(int, 2.0) and not accepts(int, True)
    assert accepts(bool, False) and not accepts(bool, 0)


def test_unions_lists_literals_and_enums():
    assert accepts(int | None, None) and not accepts(int | None, "x")
    assert accepts(str | list[str], ["a"]) and not accepts(list[str], ["a", 1])
    assert accepts(str | Literal[False], False) and not accepts(str | Literal[False], True)
    assert accepts(Strategy | str, "steps") and not accepts(Strategy | str, "step")
    assert accepts(dict[str, Any] | str | None, {"use_reentrant": False})


def test_descriptions_use_the_recipe_words():
    assert describe(int) == "an integer" and describe(float | None) == "a number"
    assert describe(Strategy | str) == 'one of "no", "steps"'
    assert describe(str | list[str]) == "a string or a list of strings"
    assert toml_repr(True) == "true" and toml_repr("x") == '"x"' and toml_repr(5) == "5"


def test_the_table_is_read_from_training_arguments():
    types = field_types()
    assert types["max_steps"] is int and types["learning_rate"] is float and "output_dir" in types
    assert check_types({"max_steps": 24, "learning_rate": 1e-4, "report_to": "none", "optim": "adamw_torch"}) == []
    assert check_types({"save_strategy": "step"}) == [
        ("training.save_strategy", 'expected one of "no", "steps", "epoch", "best", got "step"')]
