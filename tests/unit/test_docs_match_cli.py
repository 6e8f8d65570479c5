"""The docs and the tool agree: every ``--flag`` that README.md and docs/*.md name exists, on the command
they name it with; every key of a truthmap YAML config and every keyword of ``truthmap.run(...)`` in them
is a setting; docs/settings.md is the table the settings' declarations give."""

import re
from pathlib import Path

import click
import pytest
import yaml

from truthmap.cli import cli
from truthmap.config import SETTINGS, settings_table

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# flags of other tools the docs show (pip, ray start), and of the test scripts (checked against their source)
OTHER_TOOLS = {"--no-deps", "--no-cache-dir", "--head", "--port", "--address"}
SCRIPT = ROOT / "tests" / "stress.py"
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")


def _flags(command: click.Command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(param.opts, param.secondary_opts)
    return names


COMMAND_FLAGS = {name: _flags(command) for name, command in cli.commands.items()}
ALL_FLAGS = set().union(*COMMAND_FLAGS.values(), {"--version"})


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_flag_the_docs_name_exists(path):
    script = _text(SCRIPT) if SCRIPT.exists() else ""
    unknown = sorted({f for f in FLAG.findall(_text(path))
                      if f not in ALL_FLAGS and f not in OTHER_TOOLS and f"\"{f}\"" not in script})
    assert unknown == [], f"{path.name} names flags no command has: {unknown}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_a_command_line_in_the_docs_uses_that_commands_flags(path):
    """``truthmap CMD … --flag``: the flag is one of CMD's (up to a comment, a pipe or the end of the line)."""
    wrong = []
    for line in _text(path).splitlines():
        for match in re.finditer(r"truthmap (\w+)([^#|`]*)", line):
            command, rest = match.group(1), match.group(2)
            if command not in COMMAND_FLAGS:
                continue
            wrong += [f"truthmap {command} {f}" for f in FLAG.findall(rest) if f not in COMMAND_FLAGS[command]]
    assert wrong == [], f"{path.name}: {sorted(set(wrong))}"


def _yaml_blocks(text: str):
    for block in re.findall(r"```ya?ml\n(.*?)```", text, flags=re.S):
        values = yaml.safe_load(block)
        if isinstance(values, dict) and "apiVersion" not in values:  # a Kubernetes manifest is not a config
            yield values


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_yaml_key_and_python_keyword_the_docs_name_is_a_setting(path):
    from truthmap.config import make_config

    text = _text(path)
    for values in _yaml_blocks(text):
        make_config(values, f"{path.name} (a YAML example)")  # unknown keys and bad values fail here
    for call in re.findall(r"truthmap\.run\(([^)]*)\)", text):
        keywords = re.findall(r"(\w+)\s*=", call)
        assert set(keywords) <= set(SETTINGS) | {"site", "config", "force"}, (path.name, keywords)


def test_the_readme_shows_a_yaml_config():
    assert list(_yaml_blocks(_text(ROOT / "README.md"))), "README.md shows no YAML config to check"


REGENERATE = ("python -c \"from truthmap.config import settings_table; print(settings_table(), end='')\" "
              "> docs/settings.md")


def test_docs_settings_md_is_the_table_of_the_declarations():
    assert _text(ROOT / "docs" / "settings.md") == settings_table(), f"a setting changed: regenerate with {REGENERATE}"
