"""Teacher-output cache: the teacher's logits once per replayed view, in row files, read by every
epoch and sweep trial of a logits method (``store``: manifest and checks; ``rows``: the row files;
``build``: making it)."""
from kd_ray.cache.build import build, build_shard, resolve, run_here
from kd_ray.cache.store import CachedLogits, check, load, mismatch, read_manifest, serves, wanted

__all__ = ["build", "build_shard", "resolve", "run_here", "CachedLogits", "check", "load", "mismatch",
           "read_manifest", "serves", "wanted"]
