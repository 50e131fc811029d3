"""benchmarks/history.csv: every bench run appends its figures (kd_ray.deploy.bench.append_history)."""
import csv
from pathlib import Path

from kd_ray.deploy.bench import HISTORY_COLUMNS, append_history


def test_runs_append_rows_under_one_header(tmp_path):
    path = tmp_path / "bench" / "history.csv"
    append_history(path, "2 CPU cores, quiet", [("B1: cached KD step / CE step", "1.025", "<= 1.05")],
                   date="2026-11-30 03:17")
    append_history(path, "2 CPU cores, loaded", [("B1: cached KD step / CE step", "1.054", "<= 1.05"),
                                                 ("B1 ref: online KD step / CE step", "2.836", "")])
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(HISTORY_COLUMNS)
    rows = list(csv.DictReader(lines))
    assert [r["value"] for r in rows] == ["1.025", "1.054", "2.836"]
    assert rows[0] == {"date": "2026-11-30 03:17", "machine": "2 CPU cores, quiet",
                       "figure": "B1: cached KD step / CE step", "value": "1.025", "target": "<= 1.05"}
    assert rows[2]["machine"] == "2 CPU cores, loaded" and rows[2]["target"] == ""
    assert len(rows[1]["date"]) == len("2026-11-30 03:17")  # the run's own time when none is given


def test_the_shipped_history_has_the_columns_and_numbers():
    history = Path(__file__).resolve().parent.parent / "benchmarks" / "history.csv"
    rows = list(csv.DictReader(history.read_text().splitlines()))
    assert rows and set(rows[0]) == set(HISTORY_COLUMNS)
    for row in rows:
        float(row["value"])
        assert row["date"] and row["machine"] and row["figure"]
