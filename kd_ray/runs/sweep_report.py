"""What a sweep leaves on the head node: summary table (md/csv), best.yaml, heatmap.png."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import yaml

from kd_ray.config import Config
from kd_ray.config.sweep import apply_params, space_entry
from kd_ray.errors import KdRayError
from kd_ray.log import get
from kd_ray.runs.files import read_history
from kd_ray.runs.report import save_figure, write_tables
from kd_ray.storage import location

log = get(__name__)
TRIALS_DIR = "trials"  # one Ray Train run per trial (checkpoints, metrics.jsonl, config.yaml)

T_KEY, ALPHA_KEY = "distill.temperature", "distill.alpha"


def _short(key: str) -> str:
    return {T_KEY: "T", ALPHA_KEY: "alpha"}.get(key, key)


def swept_keys(cfg: Config) -> list[str]:
    """The swept keys, T and alpha first."""
    return sorted(cfg.sweep.space, key=lambda k: (k != T_KEY, k != ALPHA_KEY))


def _pct(metric: str, value):
    """Accuracy-like metrics are shown in percent."""
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return 100 * value if "top" in metric else value


def trial_rows(cfg: Config, sweep_dir: Path, trials: list[dict]) -> list[dict]:
    """One row per trial, best first. ``trials``: {"name", "params", "error", "last"} from Tune."""
    metric, budget = cfg.sweep.metric, cfg.optim.epochs
    sign = 1 if cfg.sweep.mode == "max" else -1
    rows = []
    for trial in trials:
        history = [h for h in read_history(location(sweep_dir) / TRIALS_DIR / trial["name"]) if metric in h]
        last = trial.get("last") or {}
        if metric in last and last.get("epoch", 0) > (history[-1]["epoch"] if history else 0):
            history.append(last)  # Tune heard of an epoch the trial had no time to log
        epochs = history[-1]["epoch"] if history else 0
        best = max(history, key=lambda h: sign * h[metric]) if history else None
        if trial["error"]:
            stop = f"error: {trial['error']}"
        elif epochs >= budget:
            stop = "completed"
        else:
            stop = f"stopped early by ASHA after epoch {epochs}"
        row = {"trial": trial["name"]}
        row.update({_short(k): trial["params"].get(k) for k in swept_keys(cfg)})
        row.update({"epochs": epochs, "best_epoch": best["epoch"] if best else None,
                    f"best {metric}": _pct(metric, best[metric]) if best else None,
                    f"final {metric}": _pct(metric, history[-1][metric]) if history else None})
        if any("test/top1" in h for h in history):  # read once, after the last epoch; never ranks
            row["test/top1"] = _pct("test/top1", history[-1].get("test/top1"))
        row["stop"] = stop
        rows.append(row)
    if any("test/top1" in r for r in rows):  # one column for all (early-stopped trials: empty)
        rows = [{**{k: v for k, v in r.items() if k != "stop"}, "test/top1": r.get("test/top1"),
                 "stop": r["stop"]} for r in rows]
    final = f"final {metric}"
    rows.sort(key=lambda r: (r["stop"].startswith("error"), r[final] is None, -sign * (r[final] or 0.0),
                             r["trial"]))
    return rows


def markdown_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if c in ("trial", "stop") else "---:"
                                                         for c in cols) + "|"]
    for row in rows:
        cells = [f"{v:.2f}" if isinstance(v, float) else ("" if v is None else str(v)) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_config(cfg: Config, params: dict) -> dict:
    """The best trial's config as a plain distillation config (no sweep section)."""
    best = apply_params(cfg, params).replace(run={"name": f"{cfg.run.name}-best"})
    raw = best.to_dict()
    raw.pop("sweep")
    return raw


def plot_sweep(cfg: Config, rows: list[dict], path) -> bool:
    """Heatmap of the final metric over (T, alpha) for discrete values, else a scatter."""
    import matplotlib  # local: slow to import, and only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = f"final {cfg.sweep.metric}"
    keys = [k for k in swept_keys(cfg) if all(isinstance(r[_short(k)], (int, float)) for r in rows)][:2]
    done = [r for r in rows if r[metric] is not None and not r.get("stop", "").startswith("error")]
    if not keys or not done:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    discrete = all(space_entry(k, cfg.sweep.space[k])[2] in ("grid", "choice") for k in keys)
    if len(keys) == 2 and discrete:
        xs = sorted({r[_short(keys[0])] for r in rows})
        ys = sorted({r[_short(keys[1])] for r in rows})
        cells = {}
        for r in done:
            cells.setdefault((r[_short(keys[0])], r[_short(keys[1])]), []).append(r[metric])
        grid = [[statistics.fmean(cells[(x, y)]) if (x, y) in cells else math.nan for x in xs] for y in ys]
        image = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
        ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
        values = [v for row in grid for v in row if not math.isnan(v)]
        middle = (min(values) + max(values)) / 2
        for j, y in enumerate(ys):
            for i, x in enumerate(xs):
                if (x, y) in cells:  # dark text on the bright half of viridis
                    ax.text(i, j, f"{grid[j][i]:.1f}", ha="center", va="center", fontsize=9,
                            color="k" if grid[j][i] > middle else "w")
        ax.set_ylabel(_short(keys[1]))
    elif len(keys) == 2:
        image = ax.scatter([r[_short(keys[0])] for r in done], [r[_short(keys[1])] for r in done],
                           c=[r[metric] for r in done], cmap="viridis", s=60, edgecolors="k")
        ax.set_ylabel(_short(keys[1]))
    else:
        image = None
        ax.plot([r[_short(keys[0])] for r in done], [r[metric] for r in done], "o")
        ax.set_ylabel(metric)
    if image is not None:
        fig.colorbar(image, ax=ax, label=metric + (" (%)" if "top" in metric else ""))
    ax.set_xlabel(_short(keys[0]))
    ax.set_title(f"{cfg.run.name}: {metric} per trial (early-stopped trials at their last epoch)",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


def write_sweep_report(cfg: Config, sweep_dir, trials: list[dict]) -> tuple[Path, str]:
    """Write summary.md/.csv, best.yaml and heatmap.png; raise if every trial failed.

    ``trials``: one {"name", "params", "error" (one line or None), "last" (last metrics)} per trial.
    """
    sweep_dir = location(sweep_dir)
    if not trials:
        raise KdRayError(f"the sweep in {sweep_dir} ran no trials")
    first_error = next((t["error"] for t in trials if t["error"]), None)
    rows = trial_rows(cfg, sweep_dir, trials)
    table = markdown_table(rows)
    write_tables(sweep_dir / "summary", rows, table)
    plot_sweep(cfg, rows, sweep_dir / "heatmap.png")
    final = f"final {cfg.sweep.metric}"
    good = [r for r in rows if not r["stop"].startswith("error") and r[final] is not None]
    if not good:
        raise KdRayError(f"every trial of the sweep failed; the first error: {first_error} "
                         f"(table in {sweep_dir / 'summary.md'})")
    if len(good) < len(rows):
        log.warning(f"{len(rows) - len(good)} of {len(rows)} trials failed; the first error: {first_error}")
    best = next(t for t in trials if t["name"] == good[0]["trial"])
    (sweep_dir / "best.yaml").write_text(
        f"# Best trial of sweep {cfg.run.name}: {best['name']} "
        f"({cfg.sweep.metric} {good[0][final]:.2f}); "
        "run it with: kd-ray distill -c best.yaml\n"
        + yaml.safe_dump(best_config(cfg, best["params"]), sort_keys=False))
    return sweep_dir, table
