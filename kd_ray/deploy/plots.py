"""Evaluation figures: confusion matrix and reliability diagram (matplotlib, Agg backend)."""
from __future__ import annotations

import numpy as np


def _pyplot():
    import matplotlib  # local: slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(confusion: np.ndarray, classes, path) -> None:
    """Rows: true class, columns: predicted; colour is the row's share, numbers are counts."""
    plt = _pyplot()
    n = len(classes)
    share = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    side = min(4 + 0.45 * n, 20)
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    if n <= 30:
        ax.set_xticks(range(n), [str(c) for c in classes], rotation=90 if n > 10 else 0)
        ax.set_yticks(range(n), [str(c) for c in classes])
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(bins: list[dict], ece: float, path) -> None:
    """Accuracy per confidence bin against the diagonal of perfect calibration."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    if bins:
        centres = [(b["low"] + b["high"]) / 2 for b in bins]
        widths = [b["high"] - b["low"] for b in bins]
        ax.bar(centres, [b["accuracy"] for b in bins], width=widths, edgecolor="black",
               alpha=0.7, label="accuracy")
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="C3",
                label="mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {100 * ece:.2f}%)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
