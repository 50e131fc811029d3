"""MkDocs hooks.

- benchmarks/ (at the repo root) is served as part of the site, so pages link the latest benchmark
  files, their plots and history.csv where they live instead of copies in docs/.
- `<!-- kd-ray help -->` in a page becomes the `--help` of every kd-ray command, from the parser
  itself (kd_ray.cli imports neither torch nor Ray), so the CLI reference cannot drift.
"""
import argparse
import os
import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
HELP_MARK = "<!-- kd-ray help -->"


def on_files(files, config):
    for path in sorted((ROOT / "benchmarks").iterdir()):
        if path.suffix in (".md", ".png", ".csv"):
            files.append(File(f"benchmarks/{path.name}", str(ROOT), config["site_dir"],
                              config["use_directory_urls"]))
    return files


def cli_help() -> str:
    sys.path.insert(0, str(ROOT))  # this checkout's kd_ray, not another installed copy
    os.environ["COLUMNS"] = "78"  # fits the page column without a scrollbar
    from kd_ray.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = [f"```text\n{parser.format_help()}```\n"]
    for name, command in sub.choices.items():
        parts.append(f"## `kd-ray {name}`\n\n```text\n{command.format_help()}```\n")
    return "\n".join(parts)


def on_page_markdown(markdown, page, config, files):
    if HELP_MARK in markdown:
        markdown = markdown.replace(HELP_MARK, cli_help())
    return markdown
