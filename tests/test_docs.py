"""Meta-tests for the README (the front door) and the docs site: generated parts current, links that
resolve, every page in the site's navigation. ``tox -e docs`` builds the site itself with --strict."""

import re
from pathlib import Path

import support_recipe_reference
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_recipe_reference_is_generated_from_the_models_and_current():
    page = support_recipe_reference.PAGE.read_text()
    assert support_recipe_reference.BEGIN in page and support_recipe_reference.END in page
    current = support_recipe_reference.page_with(page, support_recipe_reference.reference())
    assert page == current, "docs/recipes.md is stale: run `python tests/support_recipe_reference.py`"


def test_the_readme_is_a_front_door():
    """At most 200 lines; the rest lives in docs/ (issue 33)."""
    assert len(README.splitlines()) <= 200


def test_the_readme_setup_is_the_two_commands_ci_runs():
    setup = re.search(r"^## Set-up.*?```bash\n(.*?)```", README, flags=re.S | re.M).group(1)
    commands = [line.split("#")[0].strip() for line in setup.splitlines()]
    assert commands == ["python -m pip install tox && tox -e demo", "tox -e py"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^tox -e py\b.*\n^tox -e docs\b", ci, flags=re.M), ".ci/run: tox -e py, then tox -e docs"


def _links(text: str) -> list[str]:
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


def test_every_link_of_the_readme_resolves():
    for target in _links(README):
        path = target.split("#")[0]
        assert not path or (ROOT / path).exists(), f"README.md links to {target}, which is not there"


def test_every_docs_page_is_in_the_site_navigation():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = {page for entry in config["nav"] for page in entry.values()}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert nav == pages, f"in docs/ but not in mkdocs.yml's nav: {pages - nav}; in nav, not in docs/: {nav - pages}"
