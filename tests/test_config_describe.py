"""`kd-ray config`: the effective config as YAML with each field's docstring as a comment."""
import dataclasses
import subprocess
import sys
from dataclasses import dataclass, field

import yaml

from kd_ray.cli import main
from kd_ray.config import SECTIONS, Config, load_config
from kd_ray.config.describe import describe, field_docs, render


@dataclass
class Toy:
    plain: int = 1
    """One line."""
    bare: str = "x"
    listed: list = field(default_factory=lambda: [1, 2])
    """First line,
    second line."""


def strip_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def test_field_docs_reads_the_string_under_each_field():
    assert field_docs(Toy) == {"plain": "One line.", "listed": "First line,\nsecond line."}
    text = render({"toy": Toy()})
    assert "  # One line.\n  plain: 1\n  bare: x\n  # First line,\n  # second line.\n  listed:\n" in text


def test_printed_config_loads_back_to_the_same_config(capsys, tmp_path):
    given = tmp_path / "given.yaml"
    given.write_text("optim:\n  lr: 0.01\ndata:\n  name: synthetic\n")
    sets = ["distill.params.beta=2", "sweep.space={distill.alpha: [0.1, 0.5]}", "run.name='a: b # c'",
            "distill.teacher_path=[t1.pt, t2.pt]"]
    assert main(["config", "-c", str(given), *[a for s in sets for a in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    cfg = load_config(given, sets)
    assert Config.from_dict(yaml.safe_load(strip_comments(out))) == cfg
    assert cfg.optim.lr == 0.01 and cfg.run.name == "a: b # c" and cfg.sweep.space
    (tmp_path / "printed.yaml").write_text(out)  # and as a config file, comments and all
    assert load_config(tmp_path / "printed.yaml") == cfg


def test_without_a_config_it_prints_every_default_key_under_its_docstring(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert Config.from_dict(yaml.safe_load(out)) == Config()
    documented = 0
    for name, cls in SECTIONS.items():
        section = out.split(f"\n{name}:\n", 1)[1].split("\n\n", 1)[0]  # up to the next section
        for key, doc in field_docs(cls).items():
            comment = "".join(f"  # {line}".rstrip() + "\n" for line in doc.splitlines())
            assert f"{comment}  {key}:" in section, f"{name}.{key}"
            documented += 1
        assert all(f"\n  {f.name}:" in "\n" + section for f in dataclasses.fields(cls))
    assert documented >= 20  # the sections document most of their fields


def test_config_command_imports_no_torch_or_ray():
    code = ("import sys; from kd_ray.cli import main; code = main(['config']); "
            "print('HEAVY', 'torch' in sys.modules, 'ray' in sys.modules); sys.exit(code)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("HEAVY False False")
