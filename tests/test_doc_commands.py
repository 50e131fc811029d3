"""Every `kd-ray` command shown in the README and the docs parses as written, and its config (a
shipped file under configs/ and its --set values) loads: a dry check, nothing is run."""
import re
import shlex
from pathlib import Path

import pytest

from kd_ray.cli import build_parser
from kd_ray.config import load_config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"```(?:bash|console|sh)?\n(.*?)```", re.S)


def commands():
    for page in PAGES:
        for block in BLOCK.findall(page.read_text()):
            text = block.replace("\\\n", " ")  # continued lines
            for line in text.splitlines():
                line = line.strip().removeprefix("$ ")
                if line.startswith("kd-ray "):
                    yield pytest.param(line, id=f"{page.relative_to(ROOT)}:{line[:60]}")


@pytest.mark.parametrize("line", list(commands()))
def test_a_documented_command_parses_and_its_config_loads(line):
    argv = shlex.split(line, comments=True)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`{line}` does not parse (exit {exc.code})")
    config = getattr(args, "config", None)
    overrides = getattr(args, "overrides", [])
    shipped = config and (ROOT / config).is_file() and config.startswith("configs/")
    if shipped or (config is None and overrides):
        load_config(ROOT / config if shipped else None, overrides)  # a bad key or value raises


def test_the_pages_show_commands():
    assert len(list(commands())) >= 20  # the collector finds the pages' commands
