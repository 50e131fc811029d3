"""The package's shape: every module imports on its own, test-only code stays out of a normal run,
and bad input is refused before torch or Ray is imported (the import contracts themselves are
checked by `lint-imports`, which `make test` runs)."""
import json
import pkgutil
import subprocess
import sys
import time

import kd_ray

MODULES = sorted(m.name for m in pkgutil.walk_packages(kd_ray.__path__, "kd_ray."))


def test_the_package_has_the_layers_of_the_readme():
    top = {m.split(".")[1] for m in MODULES}
    assert top == {"cache", "cli", "cli_parser", "cluster", "config", "data", "deploy", "engine", "errors", "log",
                   "methods", "models", "registry", "runs", "storage", "testing"}


def test_every_module_imports_in_a_fresh_interpreter_and_none_imports_test_code():
    """One fresh interpreter imports every runtime module, then checks that none of them pulled in
    kd_ray.testing (the fault plan is loaded by name only when KD_RAY_FAULTS is set)."""
    runtime = [m for m in MODULES if not m.startswith("kd_ray.testing")]
    script = (
        "import importlib, json, os, sys\n"
        "os.environ.pop('KD_RAY_FAULTS', None)\n"
        f"for name in {runtime!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('kd_ray.testing'))))\n"
        "importlib.import_module('kd_ray.testing.faults')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[-1]) == []


def _cli(*argv):
    """kd-ray in a fresh interpreter: (exit code, stderr, seconds, heavy modules it imported)."""
    script = ("import sys\nfrom kd_ray.cli import main\ncode = main(sys.argv[1:])\n"
              "print(sorted(m for m in ('torch', 'ray', 'torchvision') if m in sys.modules), file=sys.stderr)\n"
              "sys.exit(code)\n")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    *lines, heavy = out.stderr.strip().splitlines()
    return out.returncode, "\n".join(lines), seconds, heavy


def test_a_missing_data_root_and_an_unknown_key_are_refused_before_torch_and_ray():
    """docs/configuration.md: such errors answer in about 0.3 s (the bound is generous for a busy machine)."""
    code, err, seconds, heavy = _cli("train-student", "--set", "data.name=imagefolder",
                                     "--set", "data.root=/nowhere/imagenette")
    assert code == 2 and err.startswith("kd-ray: error: data.root /nowhere/imagenette not found")
    assert heavy == "[]" and seconds < 3.0, (heavy, seconds)
    code, err, seconds, heavy = _cli("distill", "--set", "data.colour=red")
    assert code == 2 and "unknown key(s) data.colour" in err and len(err.splitlines()) == 1
    assert heavy == "[]" and seconds < 3.0, (heavy, seconds)


def test_a_teacher_file_error_is_refused_before_ray_is_imported(tmp_path):
    """Checks that open the data or the teacher file need torch, not Ray."""
    code, err, seconds, heavy = _cli("distill", "--set", "data.name=synthetic",
                                     "--set", f"distill.teacher_path={tmp_path}/nowhere.pt")
    assert code == 2 and "nowhere.pt not found" in err and len(err.splitlines()) == 1
    assert "'ray'" not in heavy and "'torch'" in heavy, heavy


def test_a_worker_on_tensor_data_never_imports_torchvision():
    """Importing torchvision costs ~2 CPU s (it loads torch._dynamo): a worker that trains a small
    CNN on tensor data skips it, one that reads an image folder imports it."""
    script = (
        "import sys\n"
        "import kd_ray.cluster.worker\n"
        "from kd_ray.config import load_config\n"
        "from kd_ray.data import build_data\n"
        "from kd_ray.models import build_model\n"
        "cfg = load_config(overrides=['data.name=synthetic', 'data.synthetic_size=64', 'data.image_size=16'])\n"
        "build_data(cfg.data, 'distill', 0).train[0]\n"
        "build_model('tiny_cnn', 3)\n"
        "print('torchvision' in sys.modules)\n"
        "build_model('resnet18', 3)\n"
        "print('torchvision' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "True"]
