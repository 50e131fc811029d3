"""`kd-ray <command> --help`: every command describes itself and every flag says what it does."""
import argparse

import pytest

from kd_ray.cli import build_parser


def subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_subcommand_has_a_description_and_every_argument_a_help(name):
    command = subcommands()[name]
    assert command.description and command.description.strip()
    missing = [a.option_strings or a.dest for a in command._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert missing == []
    command.format_help()  # a stray % in a help string fails only here


def test_set_says_its_values_are_yaml():
    text = " ".join(subcommands()["distill"].format_help().split())
    assert "VALUE is read as YAML: 0.1, true, [0, 1], {beta: 2}" in text
    assert "VALUE is read as YAML" in " ".join(subcommands()["demo"].format_help().split())


def test_cache_teacher_help_names_the_files_it_writes():
    text = " ".join(subcommands()["cache-teacher"].format_help().split())
    assert "part-NNNNN.logits.npy" in text and "manifest.json" in text and "Parquet" not in text
