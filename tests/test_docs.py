"""The README fits a newcomer's screen and every link and repository path the docs cite exists.

Issue 21: README.md at most 200 lines, "The two commands" holding exactly the main job and the tests,
and docs/ pages whose links, anchors and cited files (`builder/...`, `tests/test_x.py::test_y`) resolve.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKDOWN = [README, *sorted((ROOT / "docs").glob("*.md"))]
TWO_COMMANDS = ["nix build .#image", "bash .ci/run"]
FIRST_SCREEN = 50  # lines: the two commands must be read without scrolling

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
SPAN = re.compile(r"`([^`\n]+)`")
TEST_DEF = re.compile(r"^(?:async )?def (test_\w+)", re.M)


def _repo_tops() -> set[str]:
    """First path components of the files git tracks (plus docs/, which this branch adds)."""
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return {line.split("/", 1)[0] for line in out.splitlines()} | {"docs"}


REPO_PATH = re.compile(
    r"(?<![\w./$<{-])((?:" + "|".join(re.escape(t) for t in sorted(_repo_tops())) + r")(?:/[\w.+-]*)*)"
    r"(::[\w]+)?")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    """Every anchor GitHub makes for the headings of a Markdown file (repeats get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            base = _slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def _test_defined(name: str, files: list[Path]) -> bool:
    """Whether one of the files defines the test function `name`."""
    return any(name in TEST_DEF.findall(f.read_text()) for f in files)


def _section(text: str, title: str) -> tuple[int, list[str]]:
    """The 1-based line of the `## title` heading and the lines up to the next `## ` heading."""
    lines = text.splitlines()
    start = lines.index(f"## {title}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return start + 1, lines[start + 1:end]


def test_readme_fits_in_200_lines() -> None:
    n = len(README.read_text().splitlines())
    assert n <= 200, f"README.md has {n} lines; move details to a docs/ page and link it"


def test_the_two_commands_section_holds_exactly_the_main_job_and_the_tests() -> None:
    line, body = _section(README.read_text(), "The two commands")
    assert line + len(body) <= FIRST_SCREEN, f"'The two commands' ends at line {line + len(body)}"
    text = "\n".join(body)
    blocks = FENCE.findall(text)
    assert len(blocks) == 1, f"one code block under 'The two commands', found {len(blocks)}"
    assert FENCE.sub("", text).strip() == "", "nothing but the code block under 'The two commands'"
    commands = [re.sub(r"\s+#\s.*", "", ln).strip() for ln in blocks[0].splitlines()[1:-1] if ln.strip()]
    assert commands == TWO_COMMANDS


def test_the_test_command_runs_pytest_over_tests() -> None:
    """`bash .ci/run` is what the README says: the dependencies, then `python -m pytest -q ... tests`."""
    run = (ROOT / ".ci/run").read_text()
    assert "bash .ci/install-deps" in run
    assert re.search(r"^python -m pytest -q .*\btests$", run, re.M)


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(doc: Path) -> None:
    bad = []
    for target in LINK.findall(FENCE.sub("", doc.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and (dest.is_dir() or anchor not in _anchors(dest)):
            bad.append(f"{target}: no heading with anchor #{anchor}")
    assert bad == []


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_cited_repository_paths_and_tests_exist(doc: Path) -> None:
    text = doc.read_text()
    tests = sorted((ROOT / "tests").glob("test_*.py"))
    bad = []
    for path, test in REPO_PATH.findall(text):
        file = ROOT / path
        if not file.exists():
            bad.append(f"{path}: no such file or directory")
        elif test and not _test_defined(test[2:], [file]):
            bad.append(f"{path}{test}: no such test")
    for span in SPAN.findall(text):
        m = re.fullmatch(r"(test_\w+\.py)(?:::(\w+))?(?:\[[^\]]*\])?", span)
        if m and not (ROOT / "tests" / m.group(1)).exists():
            bad.append(f"{span}: no tests/{m.group(1)}")
        elif m and m.group(2) and not _test_defined(m.group(2), [ROOT / "tests" / m.group(1)]):
            bad.append(f"{span}: no such test")
        elif re.fullmatch(r"test_\w+", span) and not _test_defined(span, tests):
            bad.append(f"{span}: no test of that name in tests/")
    assert bad == []


def test_code_cites_docs_pages_not_readme_sections() -> None:
    """Comments and docstrings point at the docs/ page that holds a rule, and that page exists."""
    bad = []
    for src in [*ROOT.glob("builder/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("bench/*.py"),
                *ROOT.glob("nix/**/*.nix"), ROOT / "Makefile", ROOT / ".ci/run"]:
        if src == Path(__file__).resolve():
            continue
        text = src.read_text()
        rel = src.relative_to(ROOT)
        bad += [f"{rel}: cites README section {m}" for m in re.findall(r"README, [\"\w]+", text)]
        bad += [f"{rel}: {m} does not exist" for m in re.findall(r"docs/[\w.-]+\.md", text)
                if not (ROOT / m).exists()]
    assert bad == []
