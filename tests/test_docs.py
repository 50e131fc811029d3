"""The manual: README stays a short front page whose links resolve; the configuration page names
every config key (the site build itself, `mkdocs build --strict`, runs in `make test`)."""
import dataclasses
import re
from pathlib import Path

from kd_ray.config import sections
from kd_ray.config.sweep import SweepConfig

ROOT = Path(__file__).resolve().parent.parent


def test_readme_is_short_shows_both_commands_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "make demo" in text and "make test" in text
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert any(t.startswith("docs/") for t in targets)
    missing = [t for t in targets if "://" not in t and not (ROOT / t).exists()]
    assert missing == []


def test_configuration_page_names_every_key_of_every_section():
    rows = {line.split("|")[1].strip(" `"): line
            for line in (ROOT / "docs" / "configuration.md").read_text().splitlines()
            if line.startswith("| `")}
    classes = {"data": sections.DataConfig, "model": sections.ModelConfig, "distill": sections.DistillConfig,
               "optim": sections.OptimConfig, "run": sections.RunConfig, "guard": sections.GuardConfig,
               "sweep": SweepConfig}
    missing = [f"{name}.{f.name}" for name, cls in classes.items() for f in dataclasses.fields(cls)
               if f"`{f.name}`" not in rows.get(name, "")]
    assert missing == []
