"""The config sections (dataclasses with a docstring under each field) and their value checks.

Every check here needs neither torch nor Ray, so bad values are refused as soon as the CLI starts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

from kd_ray.errors import ConfigError

STAGES = ("teacher", "student", "distill")
DECODERS = ("pil", "torchvision")
SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def scientific(value):
    """A float for text in scientific notation (``1e-3``, ``5E-4``), which YAML 1.1 (PyYAML)
    reads as a string when it has no dot; any other value as it is."""
    if isinstance(value, str) and SCIENTIFIC.fullmatch(value.strip()):
        return float(value)
    return value


@dataclass
class DataConfig:
    name: str = "mnist5k"
    """Dataset registry name: imagefolder, parquet, mnist5k, digits, synthetic."""
    root: Optional[str] = None
    """Folder holding the splits (imagefolder: class folders; parquet: `<split>.parquet` or `<split>/` shards)."""
    train_split: str = "train"
    """Image folders and Parquet: the split trained on (<root>/<train_split>/ or .parquet)."""
    val_split: str = "val"
    """The split every choice is made on (epochs' metrics, sweeps, `auto`'s search)."""
    test_split: str = "test"
    """Image folders and Parquet: a split read once, after the last epoch, for test metrics; used
    when <root>/<test_split> exists. Never read by training, the teacher cache or selection."""
    test_fraction: float = 0.0
    """Hold out this share of the training images as the test split (stratified, seeded by
    data.split_seed, taken before data.labels_per_class) when the data has no test split; 0 = none."""
    image_size: Optional[int] = None
    """Side in pixels fed to the model; None = the dataset's default (224 for image folders)."""
    num_classes: Optional[int] = None
    """If set, the dataset must have exactly this many classes."""
    labels_per_class: Optional[int] = None
    """Keep N labels per class for students; the rest is an unlabelled transfer set."""
    val_fraction: float = 0.2
    """Held-out fraction for datasets without a val split (mnist5k, digits)."""
    split_seed: int = 0
    """Seed of the val/test hold-outs of datasets without such splits, and of the cached views."""
    augment: bool = False
    """Random crop + flip on training images."""
    loader_workers: int = 0
    """DataLoader processes per Ray worker (per GPU); each decodes and augments on one core."""
    decoder: str = "pil"
    """Image folders: pil (Pillow + torchvision transforms) or torchvision (torchvision.io decoding
    and transforms.v2 on uint8 tensors: 1.3-1.5x the images/s per core, benchmarks/decode.md)."""
    synthetic_size: int = 512
    """Training images of the synthetic set (validation gets a quarter as many)."""

    def __post_init__(self):
        positive(self, "image_size", allow_none=True)
        positive(self, "num_classes", allow_none=True)
        positive(self, "labels_per_class", allow_none=True)
        positive(self, "synthetic_size")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"data.test_fraction must be in [0, 1), got {self.test_fraction}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.loader_workers < 0:
            raise ConfigError("data.loader_workers must be >= 0")
        if self.decoder not in DECODERS:
            raise ConfigError(f"data.decoder={self.decoder!r}: choose one of {', '.join(DECODERS)}")
        if self.decoder != "pil" and self.name != "imagefolder":
            raise ConfigError(f"data.decoder={self.decoder} applies to data.name=imagefolder only: "
                              "remove data.decoder or set it to pil")


@dataclass
class ModelConfig:
    teacher: str = "cnn_teacher"
    """Teacher architecture (model registry name)."""
    student: str = "simple_cnn"
    """Student architecture (model registry name)."""
    teacher_pretrained: Optional[str] = None
    """Local weights file to start the teacher from (never downloaded)."""
    student_pretrained: Optional[str] = None
    """Local weights file to start the student from (never downloaded)."""
    assistants: list = field(default_factory=list)
    """Teacher-assistant chain for `pipeline` (Mirzadeh et al. 2020): architectures distilled in
    turn, teacher -> assistants[0] -> ... -> student, beside the direct teacher -> student row."""

    def __post_init__(self):
        if not isinstance(self.assistants, list) or not all(isinstance(a, str) and a
                                                           for a in self.assistants):
            raise ConfigError(f"model.assistants must be a list of architecture names, e.g. "
                              f"[resnet34], got {self.assistants!r}")


@dataclass
class DistillConfig:
    loss: str = "kd"
    """The distillation method: kd, mse_logits, ce, or a plugin 'package.module:Class' (a
    Distiller subclass) or 'package.module:function' (a loss over logits)."""
    params: dict = field(default_factory=dict)
    """Method-specific settings, checked by the method (e.g. a plugin's weights or layer names)."""
    method_params: dict = field(default_factory=dict)
    """Per-method settings for `kd-ray compare` ({dkd: {beta: 2}, at: {...}}): each method of
    --methods runs with its entry (distill.params still go to distill.loss, over its entry); an
    entry's temperature and alpha apply to that method only ({dist: {temperature: 1}})."""
    temperature: Optional[float] = None
    """Softening temperature T; None = each method's own default (kd, dkd, fitnets, at: 4; dist:
    4; kd with params.standardize: 2). A value set here applies to every method of the run."""
    alpha: float = 0.9
    """Weight of the distillation term; 1 - alpha goes to cross-entropy on labels."""
    teacher_path: Union[str, list, None] = None
    """Exported teacher file (teacher.pt from train-teacher or import-teacher), or a list of them:
    an ensemble whose weighted mean logits the method sees."""
    teacher_weights: Optional[list] = None
    """Weights of the ensemble's teachers (one per teacher_path entry); None = equal weights."""
    teacher_cache: str = "auto"
    """auto (compute the teacher's logits once, keep them in `<run.storage>/teacher_cache`), off (run the
    teacher every step), or a folder from `kd-ray cache-teacher`."""
    cache_views: int = 4
    """Augmented views cached per image when data.augment is on (one per epoch, in turn)."""
    cache_encoding: Optional[str] = None
    """How cached logits are stored: float16 (dense, the default whatever the size), int8 (per-row
    scale and offset, ~half the bytes) or topk (the cache_top_k largest logits and the others'
    mass). Unset: topk if cache_top_k is set, else float16. A lossy one the method's loss cannot
    bear (over 1% off) is refused before the run."""
    cache_top_k: Optional[int] = None
    """k of cache_encoding topk (default 32); k >= the classes: dense."""
    cache_batch_size: int = 256
    """Images per teacher forward pass while building the cache."""

    def __post_init__(self):
        positive(self, "cache_views")
        positive(self, "cache_top_k", allow_none=True)
        if self.cache_encoding not in (None, "float16", "int8", "topk"):
            raise ConfigError(f"distill.cache_encoding must be float16, int8 or topk, got {self.cache_encoding!r}")
        if self.cache_top_k and self.cache_encoding in ("float16", "int8"):
            raise ConfigError(f"distill.cache_top_k applies to distill.cache_encoding=topk, not "
                              f"{self.cache_encoding}: drop one of them")
        positive(self, "cache_batch_size")
        if not isinstance(self.params, dict):
            raise ConfigError(f"distill.params must be a mapping, got {self.params!r}")
        if not isinstance(self.method_params, dict) or not all(
                isinstance(v, dict) for v in self.method_params.values()):
            raise ConfigError("distill.method_params must map method names to mappings of their "
                              f"params, e.g. {{dkd: {{beta: 2}}}}; got {self.method_params!r}")
        if not self.teacher_cache:
            raise ConfigError("distill.teacher_cache must be auto, off or a folder")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"distill.alpha must be in [0, 1], got {self.alpha}")
        if self.temperature is not None and not self.temperature > 0:
            raise ConfigError(f"distill.temperature must be > 0, got {self.temperature}")
        paths = teacher_files(self)
        if not all(isinstance(p, str) and p for p in paths):
            raise ConfigError(f"distill.teacher_path must be a file or a list of files, got "
                              f"{self.teacher_path!r}")
        if self.teacher_weights is not None:
            weights = self.teacher_weights
            if len(weights) != len(paths):
                raise ConfigError(f"distill.teacher_weights has {len(weights)} entries but "
                                  f"distill.teacher_path names {len(paths)} teacher(s): give one each")
            if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0
                       for w in weights) or not sum(weights) > 0:
                raise ConfigError(f"distill.teacher_weights must be numbers >= 0 with a positive "
                                  f"sum, got {weights!r}")


def teacher_files(distill) -> list:
    """``distill.teacher_path`` as a list (empty when unset; one entry for a single teacher)."""
    path = distill.teacher_path
    if path is None:
        return []
    return list(path) if isinstance(path, list) else [path]


@dataclass
class OptimConfig:
    name: str = "sgd"
    """sgd or adamw."""
    lr: float = 0.05
    """Peak learning rate (after warm-up), for the global batch."""
    momentum: float = 0.9
    """SGD momentum (sgd only)."""
    weight_decay: float = 5e-4
    """L2 weight decay (decoupled for adamw)."""
    epochs: int = 10
    """Epochs of the student stages (and of the teacher when teacher_epochs is None)."""
    teacher_epochs: Optional[int] = None
    """Epochs for the teacher stage; None = epochs. Read only when a teacher is trained (an
    imported teacher never consults it; 0 is refused when a teacher stage runs)."""
    batch_size: int = 64
    """Global batch size, split evenly over the Ray workers."""
    schedule: str = "cosine"
    """cosine, step or none (stepped every iteration)."""
    warmup_epochs: float = 1.0
    """Epochs (may be fractional) of linear warm-up from 1% of lr, before the schedule; 0 = none
    (docs: Methods, "Defaults")."""
    step_size: int = 30
    """Epochs between decays of the step schedule."""
    gamma: float = 0.1
    """Factor of each decay of the step schedule."""
    clip_grad_norm: Optional[float] = 5.0
    """Clip the gradients' global L2 norm to this before each step; null = no clipping. Without
    it dkd and dist collapsed to one class on data nobody tuned them on (docs: Methods, "Defaults")."""

    def __post_init__(self):
        if self.name not in ("sgd", "adamw"):
            raise ConfigError(f"optim.name must be sgd or adamw, got {self.name!r}")
        if self.schedule not in ("cosine", "step", "none"):
            raise ConfigError(f"optim.schedule must be cosine, step or none, got {self.schedule!r}")
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        positive(self, "epochs")
        if self.teacher_epochs is not None and (isinstance(self.teacher_epochs, bool)
                                                or self.teacher_epochs < 0):
            raise ConfigError(f"optim.teacher_epochs must be >= 1 (or null), got {self.teacher_epochs!r}")
        positive(self, "batch_size")
        if self.warmup_epochs < 0:
            raise ConfigError("optim.warmup_epochs must be >= 0")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ConfigError(f"optim.clip_grad_norm must be > 0 (or null), got {self.clip_grad_norm}")


@dataclass
class RunConfig:
    name: str = "kd"
    """Run name; a rerun with the same name resumes from its last checkpoint."""
    storage: str = "results"
    """Where runs are written: a local folder, or one every node mounts (NFS) for multi-node runs."""
    num_workers: Union[int, list] = 2
    """Ray Train workers (DDP ranks); ``[min, max]`` makes the worker group elastic: training starts
    with as many as the cluster holds (at least min), goes on with fewer when a node is lost and
    grows when nodes join (each change restarts the group from the last checkpoint). optim.batch_size
    is global, so the batch stays the same and the learning rate needs no change."""
    resize_interval_s: float = 60.0
    """An elastic group (``num_workers: [min, max]``) looks for more free workers this often."""
    use_gpu: bool = False
    """One GPU per worker (NCCL); CPU workers use gloo."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves for each worker."""
    threads_per_worker: int = 1
    """torch threads in each worker (1 keeps 2+ workers from fighting over cores)."""
    seed: int = 0
    """Seed of a single stage run: initial weights, data order, the labelled subset."""
    seeds: list = field(default_factory=lambda: [0])
    """Seeds the pipeline runs the students with (mean and spread are reported)."""
    runner: str = "auto"
    """auto: a 1-worker run trains in one Ray task (no DDP to set up: ~12 CPU s less start-up than
    a TorchTrainer, same files, same retries); train: a Ray Train TorchTrainer for every run.
    Runs of 2+ workers, and elastic ones, always use Ray Train."""
    max_failures: int = 3
    """Worker-group restarts after a failure (a lost node, a killed worker), each from the last
    checkpoint (FailureConfig.max_failures; -1 = no limit). Errors no retry can fix stop at once."""
    collective_timeout_s: int = 600
    """Seconds a rank waits in a collective (gradient all-reduce, metric sums, the report barrier)
    before the attempt fails; must exceed the time rank 0 takes to write a checkpoint."""
    keep_checkpoints: int = 2
    """Newest epoch checkpoints kept per run (one is written every epoch)."""
    checkpoint_every_s: Optional[float] = None
    """Also checkpoint inside an epoch about every this many seconds (rank 0 writes; all ranks agree
    on the step), so a preemption loses minutes, not an epoch; a rerun continues at that step.
    None = once per epoch. Each write pauses training for as long as a checkpoint takes."""
    stop_grace_s: float = 20.0
    """After a Ctrl-C or SIGTERM (a scheduler's stop, a spot node reclaimed), the run still ends its
    epoch and stops at the epoch's checkpoint if the epoch's rest would take at most this many
    seconds at its pace so far; otherwise it checkpoints now, mid-epoch, and stops (a rerun continues
    at that step). Schedulers commonly allow 30 s between SIGTERM and SIGKILL; 0 = always at once."""
    bf16: bool = True
    """bf16 autocast when training on GPU (ignored on CPU)."""
    channels_last: bool = True
    """NHWC memory layout for models and images on GPU (about 2x faster convolutions on H100/H200
    with bf16; ignored on CPU)."""
    ray_log_level: str = "WARNING"
    """Level of Ray Train's own console logs (INFO shows worker start-up and every report)."""
    progress_interval_s: float = 30.0
    """Seconds between progress lines inside an epoch (images done of total, images/s, ETA)."""
    dashboard_host: str = "127.0.0.1"
    """Where a local Ray instance's dashboard and job server listen (0.0.0.0 = every interface)."""
    tracker: str = "tensorboard"
    """tensorboard, or mlflow: also log every stage and trial to run.tracking_uri (params,
    per-epoch metrics, summary and comparison as artifacts; needs the `mlflow` extra)."""
    tracking_uri: Optional[str] = None
    """MLflow tracking URI (http://host:5000, file:/path, or a folder); None = a local mlruns/
    folder under run.storage on the head node."""

    def __post_init__(self):
        workers = self.num_workers
        if isinstance(workers, (list, tuple)):
            if (len(workers) != 2 or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0
                                             for w in workers) or workers[0] > workers[1]):
                raise ConfigError(f"run.num_workers must be a positive integer or [min, max] with "
                                  f"0 < min <= max, got {workers!r}")
            self.num_workers = workers[0] if workers[0] == workers[1] else list(workers)
        else:
            positive(self, "num_workers")
        if not isinstance(self.resize_interval_s, (int, float)) or not self.resize_interval_s > 0:
            raise ConfigError(f"run.resize_interval_s must be a positive number of seconds, "
                              f"got {self.resize_interval_s!r}")
        positive(self, "threads_per_worker")
        positive(self, "keep_checkpoints")
        positive(self, "collective_timeout_s")
        if not isinstance(self.progress_interval_s, (int, float)) or not self.progress_interval_s > 0:
            raise ConfigError(f"run.progress_interval_s must be a positive number of seconds, "
                              f"got {self.progress_interval_s!r}")
        if self.checkpoint_every_s is not None and (
                isinstance(self.checkpoint_every_s, bool) or not isinstance(self.checkpoint_every_s, (int, float))
                or not self.checkpoint_every_s > 0):
            raise ConfigError(f"run.checkpoint_every_s must be a positive number of seconds or null, "
                              f"got {self.checkpoint_every_s!r}")
        if isinstance(self.stop_grace_s, bool) or not isinstance(self.stop_grace_s, (int, float)) or not (
                self.stop_grace_s >= 0):
            raise ConfigError(f"run.stop_grace_s must be a number of seconds >= 0, got {self.stop_grace_s!r}")
        if not self.seeds or not all(isinstance(s, int) for s in self.seeds):
            raise ConfigError(f"run.seeds must be a non-empty list of integers, got {self.seeds!r}")
        if self.runner not in ("auto", "train"):
            raise ConfigError(f"run.runner must be auto or train, got {self.runner!r}")
        if self.tracker not in ("tensorboard", "mlflow"):
            raise ConfigError(f"run.tracker must be tensorboard or mlflow, got {self.tracker!r}")
        if self.tracking_uri is not None and (not isinstance(self.tracking_uri, str)
                                              or not self.tracking_uri):
            raise ConfigError(f"run.tracking_uri must be a URI or a folder, got {self.tracking_uri!r}")
        if self.max_failures < -1:
            raise ConfigError("run.max_failures must be >= -1 (-1 = retry forever)")
        if not self.name or "/" in self.name or "\0" in self.name or self.name in (".", ".."):
            raise ConfigError(f"run.name must be a folder name (not empty, '.' or '..', without '/'), "
                              f"got {self.name!r}")
        if len(self.name.encode("utf-8", "surrogateescape")) > 200:  # filesystems allow 255 bytes
            raise ConfigError(f"run.name is {len(self.name.encode('utf-8', 'surrogateescape'))} bytes "
                              "long; a folder name may have at most 200 (room for -2, -3 ...): shorten it")

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        """Workers a run needs to start (all of them unless elastic)."""
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        """Workers a run may use (all of them unless elastic)."""
        return self.num_workers[1] if self.elastic else self.num_workers


@dataclass
class GuardConfig:
    collapse_share: Optional[float] = 0.95
    """Stop a run whose student puts at least this share of the validation images in one class
    for guard.collapse_epochs epochs in a row (a collapsed student); null = never."""
    collapse_epochs: int = 2
    """Epochs in a row the collapse must last before the run stops."""
    min_steps: int = 50
    """The one-class rule judges only epochs past the learning-rate warm-up and past this many
    optimizer steps of the run (a short run on little data that has not learned yet is no collapse)."""
    loss_growth: Optional[float] = 10.0
    """Stop a run whose epoch training loss grows past this multiple of its first epoch's (a
    diverging student); null = never. A non-finite loss always stops the run."""

    def __post_init__(self):
        positive(self, "collapse_epochs")
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int) or self.min_steps < 0:
            raise ConfigError(f"guard.min_steps must be an integer >= 0, got {self.min_steps!r}")
        if self.collapse_share is not None and not 0.0 < self.collapse_share <= 1.0:
            raise ConfigError(f"guard.collapse_share must be in (0, 1] (or null), got {self.collapse_share}")
        if self.loss_growth is not None and not self.loss_growth > 1.0:
            raise ConfigError(f"guard.loss_growth must be > 1 (or null), got {self.loss_growth}")


PATH_KEYS = [("data", "root"), ("model", "teacher_pretrained"), ("model", "student_pretrained"),
             ("distill", "teacher_path"), ("run", "storage")]

# The sections a training run reads; the sweep section (sweep.py) searches over their keys.
RUN_SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "distill": DistillConfig,
    "optim": OptimConfig,
    "run": RunConfig,
    "guard": GuardConfig,
}


def positive(obj, name: str, allow_none: bool = False) -> None:
    value = getattr(obj, name)
    if value is None and allow_none:
        return
    section = type(obj).__name__.replace("Config", "").lower()
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{section}.{name} must be a positive integer, got {value!r}")
