"""The verdict of ``kd-ray auto``: does the distilled student beat the labels-only one on the test
split, beyond seed noise? Plain Python and scipy (no torch, no Ray).

Both students of a seed share that seed's labelled subset, data order and initial weights, so the
per-seed differences are paired: their spread is the seed noise of the *difference*, which is
smaller than either model's own. The interval is Student's t on those differences (a handful of
seeds: the normal interval would be too narrow), from ``scipy.stats``.
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import asdict, dataclass

from kd_ray.storage import location, save_figure

LEVEL = 0.95


@dataclass
class Verdict:
    base: list            # test top-1 % of the labels-only student, per seed
    distilled: list       # test top-1 % of the distilled student, same seeds
    diff_mean: float      # mean of the paired differences (points)
    low: float            # the 95% interval of that mean
    high: float
    verdict: str          # helps | no better | worse | inconclusive: run more seeds
    margin: float         # differences within +- margin points count as "no better"
    seeds: list = None    # the seeds, in the order of base and distilled


def paired_interval(diffs: list, level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval of the mean of paired differences; with one
    difference the interval is unbounded."""
    from scipy import stats  # local: scipy is slow to import

    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return mean, -math.inf, math.inf
    sem = statistics.stdev(diffs) / math.sqrt(n)
    half = stats.t.ppf(0.5 + level / 2, df=n - 1) * sem
    return mean, mean - half, mean + half


def judge(low: float, high: float, margin: float) -> str:
    """helps: the whole interval above 0; worse: below 0; no better: inside +-margin; else the
    seeds cannot tell."""
    if low > 0:
        return "helps"
    if high < 0:
        return "worse"
    if -margin <= low and high <= margin:
        return "no better"
    return "inconclusive: run more seeds"


def make_verdict(base: list, distilled: list, margin: float = 1.0, seeds=None) -> Verdict:
    """``base`` and ``distilled``: test top-1 % per seed, in the same seed order."""
    if len(base) != len(distilled) or not base:
        raise ValueError("the verdict needs one labels-only and one distilled result per seed")
    mean, low, high = paired_interval([d - b for b, d in zip(base, distilled)])
    return Verdict(list(base), list(distilled), mean, low, high, judge(low, high, margin), margin,
                   list(seeds) if seeds is not None else list(range(len(base))))


def _pm(values: list) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {spread:.2f}"


def verdict_markdown(v: Verdict, chosen: str, cost: dict) -> str:
    n = len(v.base)
    lines = [
        f"**Verdict: {v.verdict}** (test split, {n} paired seed(s); 95% Student-t interval of the "
        f"paired difference; 'no better' = inside ±{v.margin:g} points)", "",
        f"| student | test top-1 % (mean ± std) | seeds {', '.join(map(str, v.seeds))} |", "|---|---:|---|",
        f"| labels only | {_pm(v.base)} | {', '.join(f'{x:.2f}' for x in v.base)} |",
        f"| distilled: {chosen} | {_pm(v.distilled)} | {', '.join(f'{x:.2f}' for x in v.distilled)} |",
        f"| difference (paired) | {v.diff_mean:+.2f} [{v.low:+.2f}, {v.high:+.2f}] | "
        f"{', '.join(f'{d - b:+.2f}' for b, d in zip(v.base, v.distilled))} |", "",
        "| cost | value |", "|---|---:|",
    ]
    lines += [f"| {k} | {val} |" for k, val in cost.items()]
    return "\n".join(lines)


def write_verdict(out_dir, v: Verdict, chosen: str, cost: dict) -> str:
    """verdict.md, verdict.csv and verdict.png in ``out_dir``; returns the markdown."""
    out = location(out_dir)
    text = verdict_markdown(v, chosen, cost)
    (out / "verdict.md").write_text(text + "\n")
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["seed", "labels_only_test_top1", "distilled_test_top1", "difference"])
    for seed, b, d in zip(v.seeds, v.base, v.distilled):
        writer.writerow([seed, f"{b:.4f}", f"{d:.4f}", f"{d - b:.4f}"])
    summary = {k: val for k, val in asdict(v).items() if k not in ("base", "distilled", "seeds")}
    writer.writerow([])
    writer.writerow(list(summary) + ["chosen"])
    writer.writerow(list(summary.values()) + [chosen])
    (out / "verdict.csv").write_text(rows.getvalue())
    plot_verdict(v, chosen, out / "verdict.png")
    return text


def plot_verdict(v: Verdict, chosen: str, path) -> None:
    """Left: each seed's pair (labels only -> distilled); right: the paired difference and its
    interval against 0 and the +-margin band."""
    import matplotlib  # local: slow to import, and only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(8.5, 4), gridspec_kw={"width_ratios": [3, 2]})
    for i, (seed, b, d) in enumerate(zip(v.seeds, v.base, v.distilled)):
        left.plot([0, 1], [b, d], "-o", color=f"C{i}", label=f"seed {seed}")
    left.set_xticks([0, 1], ["labels only", f"distilled\n{chosen}"], fontsize=8)
    left.set_xlim(-0.3, 1.3)
    left.set_ylabel("test top-1 (%)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.axhspan(-v.margin, v.margin, color="0.85", label=f"±{v.margin:g} points")
    right.axhline(0, color="k", lw=0.8)
    finite = [x for x in (v.low, v.high) if math.isfinite(x)]
    low = v.low if math.isfinite(v.low) else v.diff_mean
    high = v.high if math.isfinite(v.high) else v.diff_mean
    right.errorbar([0], [v.diff_mean], yerr=[[v.diff_mean - low], [high - v.diff_mean]], fmt="o",
                   ms=8, capsize=6, color="C3", label="mean, 95% interval")
    right.set_xticks([])
    right.set_ylabel("distilled - labels only (points)")
    if finite:
        right.set_ylim(min(finite + [-v.margin]) - 1, max(finite + [v.margin]) + 1)
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.02), frameon=False)
    fig.suptitle(f"Verdict: {v.verdict}", fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
