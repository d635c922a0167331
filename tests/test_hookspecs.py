"""Meta-tests: the hook names the product promises, and docs that stay true to the specs."""

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
