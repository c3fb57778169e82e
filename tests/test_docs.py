"""The front door stays true: the README's commands are CI's, and every docs page is on the site.

Cheap text checks only; `make lint` builds the site itself (`mkdocs build --strict`: broken links, pages left
out of the nav and the generated CLI reference fail it).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = ROOT / "docs"


def _nav_pages() -> set[str]:
    """The .md files mkdocs.yml's nav names (a page is `Title: file.md` or `- file.md`)."""
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8").split("\nnav:", 1)[1]
    return set(re.findall(r"([\w./-]+\.md)\s*$", nav, flags=re.M))


def test_readme_keeps_the_commands_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in ci and "make lint" in ci
    block = re.search(r"```bash\n(make demo .*?)```", README, flags=re.S)
    assert block, "the README's set-up block (make demo / make test) is gone"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^test: .*\n\t\$\(BIN\)/pytest$", makefile, flags=re.M)
    assert re.search(r"^demo: .*\n\t\$\(BIN\)/keyedge quickstart ", makefile, flags=re.M)


def test_readme_is_short_and_links_only_existing_files():
    assert len(README.splitlines()) <= 150
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links {target}, which does not exist"


def test_every_docs_page_is_in_the_nav():
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    nav = _nav_pages()
    assert pages - nav == set(), "docs pages missing from mkdocs.yml's nav"
    assert nav - pages == set(), "mkdocs.yml's nav names pages that do not exist"


def test_cli_reference_is_generated_not_copied():
    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert "::: mkdocs-click" in page
    assert "--key-file" not in page  # options come from the Typer app at build time


def test_lint_builds_the_site_strictly():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    lint = makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    assert "mkdocs build --strict" in lint
