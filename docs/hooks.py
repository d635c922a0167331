"""mkdocs hook: the generated hook reference keeps rule 12 of the style guide (every hook has a heading
``name(arg, ...)``): a hook of stabguard/hookspecs.py without one on the plugins page fails the build."""

from __future__ import annotations

import ast
import html
import re
from pathlib import Path

HOOKSPECS = Path(__file__).resolve().parents[1] / "stabguard" / "hookspecs.py"


def hook_signatures() -> dict[str, str]:
    """Every ``@hookspec`` function as ``name(arg, ...)``, read from the source."""
    tree = ast.parse(HOOKSPECS.read_text())
    return {f.name: f"{f.name}({', '.join(a.arg for a in f.args.args)})" for f in tree.body
            if isinstance(f, ast.FunctionDef) and any("hookspec" in ast.unparse(d) for d in f.decorator_list)}


def headings(page_html: str) -> dict[str, str]:
    """id -> the heading's text, tags and permalink stripped."""
    found = re.findall(r'<h\d id="([^"]+)"[^>]*>(.*?)</h\d>', page_html, flags=re.S)
    return {anchor: " ".join(html.unescape(re.sub(r"<[^>]+>", "", text)).replace("¶", "").split())
            for anchor, text in found}


def on_page_content(page_html, page, config, files):
    if page.file.src_uri != "plugins.md":
        return page_html
    shown = headings(page_html)
    missing = [sig for name, sig in hook_signatures().items()
               if shown.get(f"stabguard.hookspecs.{name}", "").replace(" ,", ",") != sig]
    if missing:
        raise SystemExit(f"docs/plugins.md: no heading for {', '.join(missing)} in the generated hook reference")
    return page_html
