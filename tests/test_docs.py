"""The docs stay short and their commands stay real.

README.md is the five-minute page, so it has a line budget. Every command shown in a
fenced code block of README.md, docs/*.md or deployments/README.md must parse:

- ``make TARGET [VAR=value]``: ``make -n`` in the repository root (prints, runs nothing);
- ``nasfcos ...``: the ``nasfcos`` parser (``build_parser`` of its console script's module);
- ``nasfcos-report ...`` (and any other console script): its ``main(argv)``;
- ``python -m MODULE ...`` for the project's own modules: the module run as ``python -m``
  runs it (``runpy``; a package runs its ``__main__``).

Nothing runs: ``argparse.ArgumentParser.parse_args`` parses for real, then raises a private
exception, so a removed or renamed flag fails here and a correct command stops before it
does any work. Console scripts and packages are read from pyproject.toml, so the test follows
modules when they move.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import runpy
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "deployments" / "README.md"]
README_MAX_LINES = 250

_PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS: dict[str, str] = _PYPROJECT["project"]["scripts"]  # name -> "module:function"
# top-level packages of the project ("nasfcos*" -> "nasfcos"): `python -m` of anything else
# (pytest, pip, compileall) is not ours to check
PACKAGES = {p.rstrip("*").rstrip(".") for p in _PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
_PYTHON = re.compile(r"python(\d+(\.\d+)?)?")
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def code_lines(text: str):
    """The lines of the fenced code blocks of a page, backslash-continued lines joined."""
    fenced, held = False, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced, held = not fenced, ""
            continue
        if not fenced:
            continue
        line = held + line.strip()
        if line.endswith("\\"):
            held = line[:-1] + " "
            continue
        held = ""
        yield line.removeprefix("$ ")


def command_words(line: str) -> list[str]:
    """The line as shell words, without a trailing comment and leading VAR=value words."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # not shell (an unbalanced quote in a table or in Python)
        return []
    while words and _ENV.match(words[0]):
        words = words[1:]
    return words


def documented_commands() -> dict[str, list[str]]:
    """Kind ("make", "nasfcos", "script", "module") -> the command lines found, in page order."""
    found: dict[str, list[str]] = {"make": [], "nasfcos": [], "script": [], "module": []}
    for page in PAGES:
        for line in code_lines(page.read_text()):
            words = command_words(line)
            if not words:
                continue
            name = words[0].rsplit("/", 1)[-1]  # .venv/bin/nasfcos is nasfcos; a folder "nasfcos/" is not
            if name == "make":
                kind = "make"
            elif name == "nasfcos":
                kind = "nasfcos"
            elif name in SCRIPTS:
                kind = "script"
            elif _PYTHON.fullmatch(name) and words[1:2] == ["-m"] and len(words) > 2 and words[2].split(".")[0] in PACKAGES:
                kind = "module"
            else:
                continue
            command = shlex.join(words)
            if command not in found[kind]:
                found[kind].append(command)
    return found


COMMANDS = documented_commands()


class _Parsed(BaseException):
    """Raised by the patched parse_args once the arguments parsed: nothing runs after it."""


@pytest.fixture
def parse_only(monkeypatch):
    """Make every ArgumentParser parse its arguments for real and then stop the program."""
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        real(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)


def expect_parsed(command: str, run) -> None:
    """``run()`` must reach parse_args and get through it (``--help`` exits 0 instead)."""
    try:
        run()
    except _Parsed:
        return
    except SystemExit as e:
        if e.code == 0 and {"-h", "--help"} & set(shlex.split(command)):
            return
        pytest.fail(f"{command}: its parser refused the arguments (exit {e.code})")
    pytest.fail(f"{command}: finished without parsing any arguments")


def test_readme_is_a_five_minute_read():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move details to docs/"


def test_docs_show_commands_of_every_kind():
    """Guards the extraction: if it finds nothing of a kind, the tests below check nothing."""
    assert {kind: len(found) > 0 for kind, found in COMMANDS.items()} == dict.fromkeys(COMMANDS, True)


@pytest.mark.parametrize("command", COMMANDS["make"], ids=str)
def test_make_target_exists(command):
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    # -n prints the recipes without running them; MAKE=true makes a recursive $(MAKE) line,
    # which -n would run, a no-op
    out = subprocess.run(["make", "-n", *shlex.split(command)[1:], "MAKE=true"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{command}: {out.stderr.strip()}"


@pytest.mark.parametrize("command", COMMANDS["nasfcos"], ids=str)
def test_nasfcos_command_parses(command, parse_only):
    module = importlib.import_module(SCRIPTS["nasfcos"].split(":")[0])
    expect_parsed(command, lambda: module.build_parser().parse_args(shlex.split(command)[1:]))


@pytest.mark.parametrize("command", COMMANDS["script"], ids=str)
def test_console_script_parses(command, parse_only):
    name, *argv = shlex.split(command)
    module, _, function = SCRIPTS[name.rsplit("/", 1)[-1]].partition(":")
    main = getattr(importlib.import_module(module), function)
    expect_parsed(command, lambda: main(argv))


@pytest.mark.parametrize("command", COMMANDS["module"], ids=str)
def test_python_module_parses(command, parse_only, monkeypatch):
    _, _, module, *argv = shlex.split(command)
    monkeypatch.setattr(sys, "argv", [module, *argv])
    expect_parsed(command, lambda: runpy.run_module(module, run_name="__main__", alter_sys=False))
