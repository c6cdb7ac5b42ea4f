"""Every `mapd ...` command line in README.md, docs/*.md and the comments of configs/*.yaml names a real
subcommand and only flags that subcommand takes (as the argparse parser of mapd.cli says)."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from mapd.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "configs").glob("*.yaml"))]
INLINE = re.compile(r"`((?:python -m )?mapd(?:\.cli)? [^`]+)`")
# "mapd" where a shell command starts: a line's start (after a "$ " prompt or "X=..." assignments), after
# ; && || | or after "-m " (python -m mapd.cli, accelerate launch -m mapd.cli); not "mapd" inside prose
COMMAND = re.compile(r"(?:^\s*(?:\$\s+)?(?:\w+=\S*\s+)*|[;&|]\s*|-m\s+|python\s+)(mapd(?:\.cli)?)\s+(.*)")
VALUED_FLAG = re.compile(r"\s--?[\w-]+\s+[^-\s]")
SHELL_ENDS = {"|", "||", "&&", ";", ">", ">>", "2>&1", "&", "#", "\\|"}


def command_lines(path: Path) -> list[tuple[int, str, bool]]:
    """``(line number, text after "mapd", whole)`` for every command line: in code blocks, in inline code, and
    in a YAML file's comments. ``whole``: a command to run as written (a code block or a comment line, or inline
    code that gives a flag a value), not the name of a command in prose (`mapd teach`, `mapd teach --dry-run`)."""
    found = []
    in_block = path.suffix == ".yaml"
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        follow = number
        while line.rstrip().endswith("\\") and follow < len(lines):  # a shell line continued on the next
            line, follow = line.rstrip()[:-1] + " " + lines[follow].lstrip("# "), follow + 1
        if path.suffix == ".md" and line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if path.suffix == ".yaml":
            if "#" not in line:
                continue
            line = line.split("#", 1)[1]
        texts = [(line, True)] if in_block else []
        texts += [(match.group(1), False) for match in INLINE.finditer(line)]
        for text, block in texts:
            match = COMMAND.search(text)
            if match and not text.lstrip().startswith(("import", "from")):
                rest = match.group(2)
                found.append((number, rest, block or bool(VALUED_FLAG.search(" " + rest))))
    return found


def words(rest: str) -> list[str]:
    """The command's words up to the end of the shell command, placeholders' brackets removed."""
    rest = rest.replace("\\|", " | ").replace("[", " ").replace("]", " ").replace("…", " ")
    try:
        tokens = shlex.split(rest, comments=False)
    except ValueError:  # an unbalanced quote in prose: split on spaces
        tokens = rest.split()
    kept = []
    for token in tokens:
        if token in SHELL_ENDS or token.startswith("#") or token.endswith("`"):
            break
        kept.append(token)
    return kept


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


CASES = [(path, number, rest, whole) for path in SOURCES for number, rest, whole in command_lines(path)]


def test_the_docs_have_command_lines_to_check():
    assert len(CASES) > 50
    assert {path.name for path, _, _, _ in CASES} >= {"README.md", "formats.md", "lora-one-gpu.yaml"}


@pytest.mark.parametrize("path,number,rest,whole", CASES,
                         ids=[f"{p.relative_to(ROOT)}:{n}" for p, n, _, _ in CASES])
def test_a_documented_command_matches_the_parser(path, number, rest, whole):
    parser = build_parser()
    commands = subparsers(parser)
    tokens = words(rest)
    top = {s for a in parser._actions for s in a.option_strings}
    while tokens and tokens[0] in top:
        tokens.pop(0)
    if not tokens or tokens[0] in ("...", "COMMAND", "<command>") or tokens[0].endswith(":"):
        return  # "mapd" alone, a generic "mapd COMMAND", or output ("mapd train: 20 steps ...")
    name = tokens[0]
    assert name in commands, f"{path.name}:{number}: `mapd {rest}`: no subcommand {name!r} ({', '.join(commands)})"
    flags = {s for a in commands[name]._actions for s in a.option_strings} | top
    for token in tokens[1:]:
        if token.startswith("-") and not re.fullmatch(r"-\d.*|-", token):
            flag = token.split("=", 1)[0]
            assert flag in flags, f"{path.name}:{number}: `mapd {rest}`: {name} takes no {flag} ({', '.join(sorted(flags))})"
    required = [a.option_strings[0] for a in commands[name]._actions if a.required and a.option_strings]
    missing = [flag for flag in required if whole and flag not in tokens and not {"--help", "-h"} & set(tokens)]
    assert not missing, f"{path.name}:{number}: `mapd {rest}`: {name} needs {', '.join(missing)}"
