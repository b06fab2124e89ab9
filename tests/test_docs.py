"""The README and the docs/ pages promise only what exists: every relative link resolves, every `kislurm COMMAND`
they quote is a command of the CLI, and every option on a quoted command line in a code block is one of its
options. The README stays short (new material goes to docs/)."""

import re
from pathlib import Path

import pytest

from kislurm.cli import main

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_LIMIT = 10_000


def test_the_readme_stays_short():
    assert len((REPO / "README.md").read_text()) <= README_LIMIT


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    links = re.findall(r"\]\(([^)\s]+)\)", page.read_text())
    missing = [link for link in links if "://" not in link and not link.startswith("#")
               and not (page.parent / link.split("#")[0]).exists()]
    assert not missing, f"{page.name}: links to nothing: {missing}"


def quoted_commands(text: str) -> list[tuple[str, list[str]]]:
    """(command, options) of every `kislurm COMMAND ...` line in a fenced code block, and (command, []) of every
    inline `kislurm COMMAND` mention."""
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            m = re.match(r"\s*(?:\$\s+)?kislurm\s+([a-z][a-z-]*)(.*)", line)
            if m:
                args = m.group(2).split("#")[0]
                out.append((m.group(1), re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", args)))
    out += [(cmd, []) for cmd in re.findall(r"`kislurm ([a-z][a-z-]*)", text)]
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_quoted_commands_and_options_exist(page):
    bad = []
    for command, options in quoted_commands(page.read_text()):
        if command not in main.commands:
            bad.append(f"kislurm {command}: no such command")
            continue
        known = {o for p in main.commands[command].params for o in p.opts + p.secondary_opts} | {"--help"}
        bad += [f"kislurm {command} {o}: no such option" for o in options if o not in known]
    assert not bad, f"{page.name}: {sorted(set(bad))}"
