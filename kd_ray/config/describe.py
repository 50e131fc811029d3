"""``kd-ray config``: the effective config as YAML, each key under its field's docstring.

Python keeps no docstrings of attributes, so they are read from the section classes' source with
``ast`` (litgpt's pattern): a string literal right under an annotated field documents that field.
A field without one gets no comment; a class whose source is not available gets none at all.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap

import yaml

from kd_ray.config.load import SECTIONS, Config

HEADER = "# The effective config (defaults, then -c YAML, then --set); `kd-ray <command> -c` reads it back.\n"


def field_docs(cls) -> dict[str, str]:
    """{field name: its docstring} of a dataclass, base classes first, from the source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source shipped (a frozen or .pyc-only install)
            continue
        body = tree.body[0].body
        for stmt, after in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def render(sections: dict) -> str:
    """YAML of ``{section name: dataclass instance}``: every field, its docstring as comments."""
    out = [HEADER]
    for name, section in sections.items():
        docs = field_docs(type(section))
        out.append(f"\n{name}:\n")
        for f in dataclasses.fields(section):
            for line in docs.get(f.name, "").splitlines():
                out.append(f"  # {line}".rstrip() + "\n")
            value = dataclasses.asdict(section)[f.name]
            text = yaml.safe_dump({f.name: value}, sort_keys=False, allow_unicode=True,
                                  default_flow_style=False)
            out.append(textwrap.indent(text, "  "))
    return "".join(out)


def describe(cfg: Config) -> str:
    """The whole config, section by section in SECTIONS order."""
    return render({name: getattr(cfg, name) for name in SECTIONS})
