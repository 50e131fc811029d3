"""kd_ray as a user gets it from `pip install .`: a wheel in a fresh venv, run from another folder.

The fresh venv takes kd_ray from the wheel only; its dependencies (torch, Ray, ...) come from this
environment's site-packages through a path file, so the test needs no download. The demo starts
its own local Ray instance, whose workers run the fresh venv's Python and so the installed wheel.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.cluster


def repo_copy(dest: Path) -> Path:
    """The checkout's tracked and new files (what a clean clone holds, plus uncommitted work)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name, follow_symlinks=False)
    return dest


def test_pip_install_into_a_fresh_venv_runs_the_demo_outside_the_checkout(tmp_path):
    source = repo_copy(tmp_path / "src")
    env_dir = tmp_path / "venv"
    venv.create(env_dir)  # no pip of its own: this environment's pip installs into it (--python)
    python = env_dir / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # Dependencies from this environment (a plain path: its own .pth files, such as the editable
    # kd_ray of the checkout, are not read).
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # The wheel `pip install .` would build (with this environment's setuptools, offline), then
    # installed into the fresh venv.
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert wheel.returncode == 0, wheel.stderr[-3000:]
    [built] = (tmp_path / "dist").glob("kd_ray-*.whl")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                              "--no-deps", str(built)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_GCS"))}
    env.update(RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    where = subprocess.run([python, "-c", "import kd_ray; print(kd_ray.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(site), where  # the wheel, not the checkout
    demo = subprocess.run(
        # The demo as shipped, smaller; its cnn_teacher costs ~9x simple_cnn's CPU a batch (~13 CPU s here).
        [env_dir / "bin" / "kd-ray", "demo", "--set", "optim.epochs=1", "--set", "optim.teacher_epochs=1",
         "--set", "model.teacher=simple_cnn",
         "--set", "run.seeds=[0]", "--set", "data.labels_per_class=20", "--set", "run.num_workers=1"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    table = (elsewhere / "results" / "demo" / "comparison.md").read_text()
    assert "teacher" in table and "labels only" in table and "distilled" in table
