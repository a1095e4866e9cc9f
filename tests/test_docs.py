"""The documentation stays true to the repository: the results page and the README's methods
table match the stored result tables, the README is short and its test command is what CI runs, every relative link resolves,
and every registered method has its page."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from protect.generator import available_methods

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import make_docs  # noqa: E402
from tables import NAME_PATTERN, TABLES_DIR  # noqa: E402

README = ROOT / "README.md"
DOC_PAGES = sorted([README, *(ROOT / "docs").rglob("*.md")])
TABLE_KEYS = {"name", "title", "section", "command", "protocol", "hardware", "measured", "commit", "columns", "rows", "notes"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_results_page_matches_the_stored_tables() -> None:
    page = ROOT / "docs" / "results.md"
    assert page.read_text(encoding="utf-8") == make_docs.render(), (
        "docs/results.md is out of date: run python benchmarks/make_docs.py and commit it"
    )


def test_readme_methods_table_matches_the_stored_tables() -> None:
    text = README.read_text(encoding="utf-8")
    assert text == make_docs.render_readme(text), (
        "the README's methods table is out of date: run python benchmarks/make_docs.py and commit it"
    )


@pytest.mark.parametrize("path", sorted(TABLES_DIR.glob("*.json")), ids=lambda p: p.name)
def test_stored_tables_are_complete(path: Path) -> None:
    table = json.loads(path.read_text(encoding="utf-8"))
    assert TABLE_KEYS <= set(table), f"{path.name} lacks {sorted(TABLE_KEYS - set(table))}"
    assert table["name"] == path.stem and NAME_PATTERN.fullmatch(table["name"])
    assert table["command"] and table["protocol"] and table["hardware"]
    for row in table["rows"]:
        assert len(row) == len(table["columns"]), f"{path.name}: {row}"


def test_readme_is_at_most_12000_characters() -> None:
    length = len(README.read_text(encoding="utf-8"))
    assert length <= 12_000, f"README.md has {length} characters; move detail to docs/"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    text = README.read_text(encoding="utf-8")
    after = text.split("Run the tests", 1)[1]
    command = re.search(r"```bash\n(.+?)\n```", after, re.DOTALL).group(1).strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert command in ci_lines, f".ci/run does not run the README's test command:\n{command}"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page, and its explicit <a id="..."> anchors."""
    text = page.read_text(encoding="utf-8")
    headings = re.findall(r"^#+ (.+)$", text, re.MULTILINE)
    slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
    return slugs | set(re.findall(r'<a id="([^"]+)"></a>', text))


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.relative_to(ROOT)}: link to missing {target}"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{page.relative_to(ROOT)}: no anchor #{anchor} in {path or page.name}"


@pytest.mark.parametrize("method", sorted(available_methods()))
def test_every_method_has_a_page_listed_in_both_indexes(method: str) -> None:
    assert (ROOT / "docs" / "methods" / f"{method}.md").is_file(), f"write docs/methods/{method}.md"
    assert f"(docs/methods/{method}.md)" in README.read_text(encoding="utf-8"), f"add {method} to the README's methods table"
    assert f"(methods/{method}.md)" in (ROOT / "docs" / "README.md").read_text(encoding="utf-8"), \
        f"add {method} to docs/README.md"
