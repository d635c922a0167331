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
    """The plugins page renders the whole of hookspecs (no member list that could leave a hook out), with
    the options that make each heading ``name(arg, ...)``; docs/hooks.py fails the docs build when a
    rendered heading differs (tox -e docs)."""
    text = DOCS.read_text()
    block = re.search(r"^::: stabguard\.hookspecs\n((?:    .*\n)*)", text, flags=re.M)
    assert block, "docs/plugins.md lacks '::: stabguard.hookspecs'"
    options = block.group(1)
    assert "members:" not in options, "list no members: every hook is rendered"
    assert "show_signature_annotations: false" in options and "separate_signature: false" in options
    for name in HOOK_NAMES:
        assert hookspecs.__dict__[name].__doc__, f"{name} has no docstring to render"


def test_every_hook_docstring_says_what_it_returns():
    for name in HOOK_NAMES:
        doc = inspect.getdoc(getattr(hookspecs, name))
        assert ":return:" in doc, name
        for param in inspect.signature(getattr(hookspecs, name)).parameters:
            assert f":param {param}:" in doc, f"{name} does not document {param}"


def _page() -> str:
    """The plugins page as it is rendered: its own text and the hookspecs' docstrings (``x`` is code there)."""
    docstrings = "\n".join(inspect.getdoc(getattr(hookspecs, name)) for name in HOOK_NAMES)
    return DOCS.read_text() + "\n" + inspect.getdoc(hookspecs) + "\n" + docstrings.replace("``", "`")


def _documented(name: str) -> bool:
    """Named inside a code span: `name`, `x.name(...)`, `Verdict.name(...)`."""
    return re.search(rf"`[^`\n]*(?<![\w]){re.escape(name)}(?![\w])[^`\n]*`", _page()) is not None


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
