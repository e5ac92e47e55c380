"""Every `mqt-jax` command written in README.md and docs/ parses with the CLI's own parser
(its subcommand and flags exist, its values convert), and the README stays short."""

import re
import shlex
from pathlib import Path

import pytest

from mqt_jax.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands(page: Path) -> list[str]:
    """The `mqt-jax ...` lines of the page's bash blocks, continuation lines joined, comments
    and the options shown as placeholders ([...], A | B) left out."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("mqt-jax ") and "[" not in line and "..." not in line:
                found.append(line)
    return found


CASES = [(page.name, line) for page in PAGES for line in commands(page)]


def test_the_docs_hold_commands():
    assert len(CASES) >= 10 and any(name == "README.md" for name, _ in CASES)


@pytest.mark.parametrize("page,line", CASES)
def test_each_documented_command_parses(page, line):
    argv = shlex.split(line)[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{page}: `{line}` does not parse (exit {e.code})")


def test_the_readme_is_read_in_five_minutes():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
