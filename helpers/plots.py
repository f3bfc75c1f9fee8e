"""Plots: class distribution, token lengths, training curves, confusion matrix.

Taught in notebook 01 (distribution, lengths), 06 (curves) and 07 (confusion matrix); used by
``helpers.train``. Each function returns a matplotlib Figure (outside pyplot, so a notebook shows it
once, as the cell's value) and saves it as PNG when given a path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def _finish(fig: Figure, path: str | Path | None) -> Figure:
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    return fig


def plot_class_distribution(
    splits: dict[str, pd.DataFrame], names: Sequence[str], path: str | Path | None = None
) -> Figure:
    """Bar chart of examples per class in each split."""
    counts = pd.DataFrame(
        {split: np.bincount(df["label"], minlength=len(names)) for split, df in splits.items()},
        index=list(names),
    )
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    counts.plot.bar(ax=ax, rot=0)
    ax.set_ylabel("examples")
    ax.set_title("Examples per class")
    return _finish(fig, path)


def plot_token_lengths(
    lengths: Sequence[int], max_length: int | None = None, path: str | Path | None = None
) -> Figure:
    """Histogram of lengths in tokens, with the truncation length marked."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.hist(lengths, bins=40)
    if max_length is not None:
        ax.axvline(max_length, color="red", linestyle="--", label=f"max_length = {max_length}")
        ax.legend()
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.set_title("Token lengths")
    return _finish(fig, path)


def smoothed(values: Sequence[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard smooths): each point
    mixes ``1 - weight`` of its own value with the average so far, so noise fades and trends
    stay."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def plot_training_curves(
    log_history: Sequence[dict[str, Any]],
    path: str | Path | None = None,
    examples_per_step: int = 1,
) -> Figure:
    """Training loss (raw and smoothed) and validation loss and metrics from
    ``Trainer.state.log_history``, against examples seen (``examples_per_step``: the effective
    batch size; 1 plots optimizer steps)."""

    def seen(row: dict[str, Any]) -> int:
        return int(row["step"]) * examples_per_step

    train = [(seen(row), row["loss"]) for row in log_history if "loss" in row]
    evals = [row for row in log_history if "eval_loss" in row]
    fig = Figure(figsize=(10, 3.5))
    left, right = fig.subplots(1, 2)
    if train:
        x, loss = zip(*train, strict=True)
        left.plot(x, loss, alpha=0.35, color="C0", label="train loss")
        left.plot(x, smoothed(loss), color="C0", label="train loss, smoothed")
    if evals:
        left.plot(
            [seen(r) for r in evals],
            [r["eval_loss"] for r in evals],
            "o-",
            color="C1",
            label="val loss",
        )
        for key in ("eval_accuracy", "eval_macro_f1"):
            if key in evals[0]:
                right.plot(
                    [seen(r) for r in evals],
                    [r[key] for r in evals],
                    "o-",
                    label=key.removeprefix("eval_"),
                )
    axis = "examples seen" if examples_per_step > 1 else "step"
    left.set_xlabel(axis)
    left.set_title("Loss")
    left.legend()
    right.set_xlabel(axis)
    right.set_title(f"Validation metrics ({len(evals)} evaluations)")
    right.set_ylim(0, 1)
    if right.lines:
        right.legend()
    return _finish(fig, path)


def plot_confusion_matrix(
    matrix: pd.DataFrame | np.ndarray, names: Sequence[str], path: str | Path | None = None
) -> Figure:
    """Heat map of a confusion matrix (rows: true label, columns: predicted label)."""
    values = np.asarray(matrix)
    fig = Figure(figsize=(4.5, 4))
    ax = fig.subplots()
    ax.imshow(values, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            color = "white" if values[i, j] > values.max() / 2 else "black"
            ax.text(j, i, int(values[i, j]), ha="center", va="center", color=color)
    ax.set_title("Confusion matrix")
    return _finish(fig, path)
