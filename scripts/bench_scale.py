"""Memory and time of kd_ray's data and teacher-cache reads as the dataset grows.

For each size (default 10 k, 100 k, 1 M rows; 1,000 classes; 8 px PNG images) this writes a
sharded Parquet image table (``data.parquet.TableWriter``, as ``kd-ray convert`` does) and a
teacher cache (``cache.rows.ShardWriter`` in 2 shards, as 2 build workers write it, top-32
encoding: the default at this size), then starts 2 worker processes (ranks 0 and 1 of 2) per
path that read one epoch each through the real code:
  table: ``build_data`` (name: parquet) + ``engine.make_loaders`` (row-group aware sampler) ->
         decoded, transformed image batches;
  cache: ``cache.load`` + ``ShuffleSampler`` + DataLoader over ``CachedLogits.row``.
Each worker reports its peak RSS (``VmHWM``: the whole process, imports included), its RSS
before the epoch, rows/s and epoch seconds. The epoch reads without training (1 M rows of
training would take hours on 2 shared cores; the student step is the same at every size).

    python scripts/bench_scale.py [--sizes 10000,100000,1000000] [--out benchmarks/scale.md]
"""
from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CLASSES, IMAGE, TOP_K, BATCH, WORLD = 1000, 8, 32, 256, 2


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mib() -> float:
    """VmHWM: this process's own high-water mark (ru_maxrss would carry the parent's over exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def machine() -> str:
    """The machine line of history.csv: CPU, cores, Python and torch."""
    import platform

    import torch

    from kd_ray.deploy.bench import cpu_name

    return (f"{os.cpu_count()} CPU cores ({cpu_name()}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def write_table(root: Path, rows: int) -> None:
    import numpy as np
    from PIL import Image

    from kd_ray.data.parquet import CLASSES_KEY, SCHEMA, TableWriter

    rng = np.random.default_rng(0)
    pool = []
    for _ in range(256):  # distinct tiny PNGs, reused: encoding 1 M images would dominate
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8)).save(buf, format="PNG")
        pool.append(buf.getvalue())
    schema = SCHEMA.with_metadata({CLASSES_KEY: json.dumps([f"c{c}" for c in range(CLASSES)]).encode()})
    for split, count in (("train", rows), ("val", 2 * CLASSES)):
        (root / split).mkdir(parents=True)
        writer = TableWriter(root / split, schema, 8 * 2**20)  # 8 MiB shards: several per table
        for i in range(count):
            writer.add(pool[i % 256], i % CLASSES, f"c{i % CLASSES}/{i}.png")
        writer.finish()


def write_cache(folder: Path, rows: int) -> None:
    import numpy as np

    from kd_ray.cache.rows import ShardWriter

    folder.mkdir(parents=True)
    bounds = [0, rows // 2, rows]
    rng = np.random.default_rng(0)
    for s in range(2):
        writer = ShardWriter(folder, s, bounds[s + 1] - bounds[s], CLASSES, TOP_K)
        for start in range(bounds[s], bounds[s + 1], 8192):
            stop = min(start + 8192, bounds[s + 1])
            writer.add(rng.standard_normal((stop - start, CLASSES), dtype=np.float32))
        writer.close()
    (folder / "manifest.json").write_text(json.dumps(
        {"samples": rows, "views": 1, "num_classes": CLASSES, "bounds": bounds, "top_k": TOP_K}))


def worker(kind: str, path: str, rank: int, queue) -> None:
    import torch
    from torch.utils.data import DataLoader, Dataset

    torch.set_num_threads(1)
    base = rss_mib()
    started = time.perf_counter()
    if kind == "table":
        from kd_ray.config import DataConfig
        from kd_ray.data import build_data
        from kd_ray.engine import make_loaders

        bundle = build_data(DataConfig(name="parquet", root=path, image_size=IMAGE), "teacher", 0)
        loader, sampler, _ = make_loaders(bundle, BATCH * WORLD, rank, WORLD, 0, 0)
    else:
        from kd_ray.cache import load
        from kd_ray.data.sampling import ShuffleSampler

        class Rows(Dataset):
            def __init__(self, logits):
                self.logits = logits

            def __len__(self):
                return self.logits.samples

            def __getitem__(self, flat):
                return self.logits.row(flat % self.logits.samples, flat // self.logits.samples)

        rows = Rows(load(path))
        sampler = ShuffleSampler(rows, num_replicas=WORLD, rank=rank, seed=0)
        loader = DataLoader(rows, batch_size=BATCH, sampler=sampler)
    sampler.set_epoch(1)
    opened = time.perf_counter() - started
    before = rss_mib()
    t0, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)
    seconds = time.perf_counter() - t0
    queue.put({"kind": kind, "rank": rank, "rows": count, "seconds": seconds, "open_s": opened,
               "rss_imports": base, "rss_before": before, "peak": peak_mib()})


def measure(kind: str, path: Path) -> list[dict]:
    ctx = mp.get_context("spawn")  # fresh processes: nothing inherited counts towards their peaks
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(kind, str(path), r, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"{kind} worker failed with exit code {p.exitcode}")
    return sorted(results, key=lambda r: r["rank"])


def compare_orders(path: Path, limit: int = 50_000) -> dict:
    """Raw reader rows/s (decode only): the windowed shuffled order of ``data.sampling`` against a
    sequential scan of the row groups (what an IterableDataset over row groups reads at best)."""
    from kd_ray.data.parquet import ParquetImages, split_files
    from kd_ray.data.sampling import ShuffleSampler

    out = {}
    for name in ("sequential", "windowed shuffle"):
        table = ParquetImages(split_files(path, "train"))
        order = list(ShuffleSampler(table, seed=0, shuffle=name != "sequential"))[:limit]
        t0 = time.perf_counter()
        for i in order:
            table[i]
        out[name] = (len(order) / (time.perf_counter() - t0), table.reads)
    return out


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, sec) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, marker in (("table", "o"), ("cache", "s")):
        mine = [r for r in rows if r["kind"] == kind]
        sizes = sorted({r["size"] for r in mine})
        for rank in range(WORLD):
            pts = [r for s in sizes for r in mine if r["size"] == s and r["rank"] == rank]
            mem.plot(sizes, [r["peak"] for r in pts], marker=marker, label=f"{kind}, worker {rank}")
            sec.plot(sizes, [r["seconds"] for r in pts], marker=marker, label=f"{kind}, worker {rank}")
    mem.set(xscale="log", xlabel="rows", ylabel="peak RSS (MiB)", title="Per-worker peak memory")
    mem.set_ylim(bottom=0)
    sec.set(xscale="log", yscale="log", xlabel="rows", ylabel="epoch seconds (reading)",
            title="Epoch time (each worker reads half)")
    for ax in (mem, sec):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--out", default="benchmarks/scale.md")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results, lines = [], []

    def say(text: str) -> None:
        lines.append(text)
        print(f"[bench_scale] {text}", flush=True)

    for size in sizes:
        work = Path(tempfile.mkdtemp(prefix="kd_ray_bench_scale_"))
        try:
            t0 = time.perf_counter()
            write_table(work / "table", size)
            write_cache(work / "cache", size)
            disk = {k: sum(f.stat().st_size for f in (work / k).rglob("*") if f.is_file()) / 2**20
                    for k in ("table", "cache")}
            say(f"{size} rows: table {disk['table']:.1f} MiB, cache {disk['cache']:.1f} MiB on disk "
                f"(written in {time.perf_counter() - t0:.1f}s)")
            if size == sizes[-1]:
                orders = compare_orders(work / "table")
                say("  raw table reader, one process: " + ", ".join(
                    f"{name} {speed:.0f} rows/s ({reads} row group reads)" for name, (speed, reads) in orders.items()))
            for kind in ("table", "cache"):
                for r in measure(kind, work / kind):
                    r.update(size=size)
                    results.append(r)
                    say(f"  {kind} worker {r['rank']}: {r['rows']} rows in {r['seconds']:.1f}s "
                        f"({r['rows'] / r['seconds']:.0f} rows/s), peak RSS {r['peak']:.0f} MiB "
                        f"(after imports {r['rss_imports']:.0f}, before the epoch {r['rss_before']:.0f})")
        finally:
            shutil.rmtree(work, ignore_errors=True)

    table = ["| rows | path | worker | peak RSS MiB | RSS before epoch MiB | rows/s | epoch s |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    table += [f"| {r['size']:,} | {r['kind']} | {r['rank']} | {r['peak']:.0f} | {r['rss_before']:.0f} | "
              f"{r['rows'] / r['seconds']:.0f} | {r['seconds']:.1f} |" for r in results]
    summary, figures = [], []
    lo, hi = min(sizes), max(sizes)
    for kind in ("table", "cache"):
        for rank in range(WORLD):
            a, b = (next(r for r in results if (r["kind"], r["rank"], r["size"]) == (kind, rank, s))
                    for s in (lo, hi))
            per_row = [f"{1e6 * r['seconds'] / r['rows']:.0f}" for s in sizes for r in results
                       if (r["kind"], r["rank"], r["size"]) == (kind, rank, s)]
            # epoch time ~ rows^k: k = 1 is linear (a per-row cost that does not grow with size)
            k = math.log(b["seconds"] / a["seconds"]) / math.log(hi / lo)
            figures += [(f"{kind} worker {rank}: peak RSS {hi:,} / {lo:,} rows", f"{b['peak'] / a['peak']:.3f}",
                         "<= 1.10"), (f"{kind} worker {rank}: time exponent (epoch time ~ rows^k)", f"{k:.2f}", "")]
            summary.append(f"{kind} worker {rank}: peak RSS x{b['peak'] / a['peak']:.3f} from {lo:,} to "
                           f"{hi:,} rows (target <= 1.10); epoch time x{b['seconds'] / a['seconds']:.1f} "
                           f"for x{hi / lo:.0f} rows: time ~ rows^{k:.2f} (1 = linear); "
                           f"us per row {' / '.join(per_row)}")
    for line in summary:
        say(line)
    print("\n".join(table), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, out.with_suffix(".png"))
    out.write_text(
        f"# bench_scale ({time.strftime('%Y-%m-%d %H:%M')}, `python scripts/bench_scale.py`)\n\n"
        + __doc__.split("\n\n")[1].strip() + "\n\n" + "\n".join(f"- {line}" for line in lines)
        + "\n\n" + "\n".join(table) + f"\n\n![memory and time against size]({out.with_suffix('.png').name})\n")
    from kd_ray.deploy.bench import append_history

    history = append_history(out.parent / "history.csv", machine(), figures)
    print(f"[bench_scale] wrote {out} and {out.with_suffix('.png')}, appended to {history}")


if __name__ == "__main__":
    main()
