"""Meta-tests: the hook names the product promises, and docs that stay true to the specs."""

import dataclasses
import inspect
import re
from pathlib import Path

from stabguard import hookspecs
from stabguard.manager import HOOK_NAMES

DOCS = Path(__file__).parent.parent / "docs" / "plugins.md"


def test_product_hook_names_exist():
    assert {"pre_collate", "post_backward", "pre_step", "on_log"} <= set(HOOK_NAMES)
    assert {"configure", "setup_model", "make_optimizer", "post_collate", "on_alert", "on_train_end"} <= set(HOOK_NAMES)


def test_make_optimizer_is_firstresult_and_others_are_not():
    specs = {name: getattr(hookspecs, name).stabguard_spec for name in HOOK_NAMES}
    assert specs["make_optimizer"]["firstresult"]
    assert not any(spec["firstresult"] for name, spec in specs.items() if name != "make_optimizer")


def test_every_hook_has_a_documented_heading_with_its_signature():
    headings = set(re.findall(r"^### (\w+\(.*\))$", DOCS.read_text(), flags=re.M))
    for name in HOOK_NAMES:
        params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert f"{name}({params})" in headings, f"docs/plugins.md lacks '### {name}({params})'"


def test_every_hook_docstring_says_what_it_returns():
    for name in HOOK_NAMES:
        doc = inspect.getdoc(getattr(hookspecs, name))
        assert ":return:" in doc, name
        for param in inspect.signature(getattr(hookspecs, name)).parameters:
            assert f":param {param}:" in doc, f"{name} does not document {param}"


def _documented(name: str) -> bool:
    """Named inside a code span: `name`, `x.name(...)`, `Verdict.name(...)`."""
    return re.search(rf"`[^`\n]*(?<![\w]){re.escape(name)}(?![\w])[^`\n]*`", DOCS.read_text()) is not None


def _public(cls) -> list[str]:
    fields = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
    methods = [n for n, v in vars(cls).items() if callable(v) or isinstance(v, (classmethod, property))]
    return [n for n in dict.fromkeys(fields + methods) if not n.startswith("_")]


def test_every_public_attribute_a_guard_reads_is_documented():
    from stabguard.events import EventLog
    from stabguard.step import StepState
    from stabguard.testing import GuardRun
    from stabguard.verdict import Verdict

    public = {"StepState": _public(StepState), "Verdict": _public(Verdict), "GuardRun": _public(GuardRun),
              "EventLog": [n for n in _public(EventLog) if n != "close"] + ["events", "run", "rank", "path"]}
    missing = [f"{owner}.{name}" for owner, names in public.items() for name in names if not _documented(name)]
    assert not missing, f"docs/plugins.md does not mention: {', '.join(missing)}"
